"""`--plot FILE.png`: calls per second STS received over time, per mode, against the account quota.

matplotlib comes with the `bench` extra and is imported only here, only when a chart
is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from daemon.simulate.inputs import Inputs
from daemon.simulate.report import describe
from daemon.simulate.run import ModeResult

MAX_POINTS = 1500  # longer runs are averaged over wider bins
# Wide to narrow, so that modes that coincide all stay visible.
STYLES = {
    "direct": dict(color="#d62728", linewidth=3.2, alpha=0.55),
    "per-pod": dict(color="#ff7f0e", linewidth=2.0, linestyle="--"),
    "irsa-cache": dict(color="#1f77b4", linewidth=1.1),
}


class MatplotlibMissingError(Exception):
    pass


def write(path: Path, inputs: Inputs, results: Mapping[str, ModeResult]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MatplotlibMissingError(
            "--plot needs matplotlib: pip install 'irsa-cache[bench]' (or matplotlib)") from exc

    figure, (received, throttled) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                                 gridspec_kw={"height_ratios": [3, 2]})
    for mode, result in results.items():
        admitted, refused = result.counts.admitted, result.counts.throttled
        width = max(1, -(-len(admitted) // MAX_POINTS))
        start = result.window_start
        xs = [start + i + width / 2 for i in range(0, len(admitted), width)]
        calls = [sum(admitted[i:i + width]) + sum(refused[i:i + width]) for i in range(0, len(admitted), width)]
        refusals = [sum(refused[i:i + width]) for i in range(0, len(refused), width)]
        style = STYLES.get(mode, {})
        received.plot(xs, [c / width for c in calls], label=mode, **style)  # type: ignore[arg-type]
        throttled.plot(xs, [t / width for t in refusals], label=mode, **style)  # type: ignore[arg-type]
    received.axhline(inputs.account_rate_per_second, color="black", linestyle="--", linewidth=1,
                     label=f"account quota ({inputs.account_rate_per_second:g}/s)")
    received.set_ylabel("calls STS received per second")
    received.legend(loc="upper right")
    received.set_title("\n".join(describe(inputs)), fontsize=8.5, loc="left")
    throttled.set_ylabel("answered Throttling per second")
    throttled.set_xlabel("simulated seconds")
    for axes in (received, throttled):
        axes.grid(True, alpha=0.3)
        axes.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
