"""The figures of a run, as a side-by-side table and as the `--json` document users script against.

`--json` prints `{"inputs": {...}, "modes": {"direct": M, "per-pod": M, "irsa-cache": M}}`;
each M has `sts_calls` (admitted by STS, not attempts), `throttled` (attempts answered
Throttling), `failed_pods`, `peak_calls_per_second`, `ttc_p50_seconds`,
`ttc_p99_seconds`, `ttc_max_seconds`, and for `steady` `calls_per_node_identity_hour`;
then what else a reader may want (`unserved_pods`, `pods`, `fetches`, the measured
window, and what the run cost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from daemon.simulate.inputs import Inputs, Plan
from daemon.simulate.run import ModeResult


def inputs_document(inputs: Inputs, plan: Plan) -> dict[str, Any]:
    document = {k: v for k, v in dataclasses.asdict(inputs).items() if k != "daemon"}
    document.update(ramp_seconds=inputs.ramp, account_burst=inputs.burst, pods=inputs.pods,
                    surge=inputs.wave_size, measured_from_seconds=plan.measure_from)
    document["daemon"] = dataclasses.asdict(inputs.daemon)
    return document


def mode_document(result: ModeResult, *, steady: bool) -> dict[str, Any]:
    document: dict[str, Any] = {
        "sts_calls": result.sts_calls,
        "throttled": result.throttled,
        "failed_pods": result.failed_pods,
        "peak_calls_per_second": result.peak_calls_per_second,
        "ttc_p50_seconds": _round(result.ttc_p50_seconds),
        "ttc_p99_seconds": _round(result.ttc_p99_seconds),
        "ttc_max_seconds": _round(result.ttc_max_seconds),
    }
    if steady:
        document["calls_per_node_identity_hour"] = _round(result.calls_per_node_identity_hour)
    document.update(
        unserved_pods=result.unserved_pods, pods=result.pods, fetches=result.fetches,
        window_seconds=_round(result.window_end - result.window_start), events=result.events,
        wall_seconds=round(result.wall_seconds, 3),
    )
    return document


def document(inputs: Inputs, plan: Plan, results: Mapping[str, ModeResult]) -> dict[str, Any]:
    steady = inputs.scenario == "steady"
    return {"inputs": inputs_document(inputs, plan),
            "modes": {mode: mode_document(result, steady=steady) for mode, result in results.items()}}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def describe(inputs: Inputs) -> list[str]:
    knobs = inputs.daemon
    what = {
        "steady": "steady state",
        "scale-out": f"scale-out: {inputs.pods:,} pods starting over {inputs.ramp:g} s",
        "cold-start": f"cold start: {inputs.pods:,} pods starting " + (
            "at once" if not inputs.ramp else f"over {inputs.ramp:g} s"),
        "rollout": f"DaemonSet rollout, {inputs.wave_size} node(s) at a time, "
                   f"{'with' if inputs.handoff else 'without'} the cache handoff",
        "node-replacement": f"node replacement, {inputs.wave_size} node(s) at a time",
    }[inputs.scenario]
    budget = (f"--sts-cluster-rate {knobs.cluster_rate_per_second:g} --sts-cluster-burst {knobs.cluster_burst}"
              if knobs.cluster_rate_per_second else
              f"--sts-rate {knobs.sts_rate_per_second:g} --sts-burst {knobs.sts_burst}")
    return [
        f"{inputs.nodes:,} nodes x {inputs.identities:,} identities x {inputs.pods_per_identity:,} pods each "
        f"({inputs.placement}); {what}",
        f"STS: {inputs.account_rate_per_second:g} calls/s for the account (burst {inputs.burst}), "
        f"{inputs.sts_latency_seconds * 1000:g} ms per answer; irsa-cache: {budget}, "
        f"--session-duration {knobs.session_duration_seconds:g}",
    ]


_Row = tuple[str, Callable[[ModeResult], str]]


def table(inputs: Inputs, plan: Plan, results: Mapping[str, ModeResult]) -> str:
    rows: list[_Row] = [
        ("STS calls", lambda r: f"{r.sts_calls:,}"),
        ("throttled", lambda r: f"{r.throttled:,}"),
        ("peak calls/s (throttled included)", lambda r: f"{r.peak_calls_per_second:,}"),
        ("pods that failed", lambda r: f"{r.failed_pods:,} of {r.pods:,}"),
        ("time to credentials p50", lambda r: _seconds(r.ttc_p50_seconds)),
        ("time to credentials p99", lambda r: _seconds(r.ttc_p99_seconds)),
        ("time to credentials max", lambda r: _seconds(r.ttc_max_seconds)),
    ]
    if inputs.scenario == "steady":
        rows.append(("calls per node-identity-hour", lambda r: _number(r.calls_per_node_identity_hour)))
    if any(r.unserved_pods for r in results.values()):
        rows.append(("pods never served", lambda r: f"{r.unserved_pods:,}"))
    rows.append(("simulated / wall time", lambda r: f"{r.window_end - r.window_start:,.0f} s / {r.wall_seconds:.1f} s"))
    modes = list(results)
    width = max(len(label) for label, _ in rows)
    cells = {mode: [render(results[mode]) for _, render in rows] for mode in modes}
    column = {mode: max(len(mode), *(len(c) for c in cells[mode])) for mode in modes}
    lines = [*describe(inputs), ""]
    lines.append(" " * width + "".join(f"  {mode:>{column[mode]}}" for mode in modes))
    for i, (label, _) in enumerate(rows):
        lines.append(f"{label:<{width}}" + "".join(f"  {cells[mode][i]:>{column[mode]}}" for mode in modes))
    if plan.measure_from:
        lines.append(f"(counted from {plan.measure_from:g} s, when the {inputs.scenario} begins)")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:,.1f} s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
