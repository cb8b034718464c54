"""`irsa-cache simulate`: flags in, the three modes side by side out (table, `--json`, `--plot`).

The daemon's own cache and budget flags are `irsa-cache serve`'s (`config.SERVE_OPTIONS`:
same names, parsers, defaults and help), so a simulated daemon is configured exactly as
a deployed one; the environment is not read. Bad values are reported one per line and
exit 2, as `serve` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

from daemon import config
from daemon.errors import ConfigError
from daemon.simulate import inputs as inputs_module
from daemon.simulate.inputs import MODES, PLACEMENTS, SCENARIOS, DaemonKnobs, Inputs

# `irsa-cache serve` flags that shape a node's cache and STS budget, and where they go.
DAEMON_FLAGS = {
    "--session-duration": "session_duration_seconds",
    "--serve-floor": "serve_floor_seconds",
    "--refresh-jitter": "refresh_jitter",
    "--request-hold": "request_hold_seconds",
    "--refresh-wait": "refresh_wait_seconds",
    "--idle-evict": "idle_evict_seconds",
    "--max-entries": "max_entries",
    "--sts-rate": "sts_rate_per_second",
    "--sts-burst": "sts_burst",
    "--sts-concurrency": "sts_concurrency",
    "--sts-queue": "sts_queue",
    "--sts-cluster-rate": "cluster_rate_per_second",
    "--sts-cluster-burst": "cluster_burst",
}
_OPTIONS = {option.flag: option for option in config.SERVE_OPTIONS if option.flag in DAEMON_FLAGS}


def knobs_from_flags(argv: list[str]) -> DaemonKnobs:
    """What a daemon started with these `irsa-cache serve` flags (flag, value, ...) runs
    with, the rest at serve's defaults; ConfigError where serve would refuse them."""
    given = dict(zip(argv[::2], argv[1::2], strict=True))
    problems = [f"{flag}: not a setting of the daemon's cache or STS budget" for flag in given if flag not in _OPTIONS]
    knobs = _daemon_knobs(lambda option: given.get(option.flag), problems)
    if problems:
        raise ConfigError(problems)
    return knobs


def _daemon_knobs(text_of: Callable[[config.Option], str | None], problems: list[str]) -> DaemonKnobs:
    """The daemon's knobs from the text given for each of serve's options (None: its
    default), checked by serve's own rules; each problem is added to `problems`."""
    knobs: dict[str, Any] = {}
    serve_values: dict[str, Any] = {}  # by the option's dest, for the rules `serve` applies
    for flag, option in _OPTIONS.items():
        text = text_of(option) or option.default
        value = None
        if text is not None:
            try:
                value = option.parse(text)
            except ValueError as exc:
                problems.append(f"{flag}: {exc}")
        serve_values[option.dest] = value
        if value is not None:
            knobs[DAEMON_FLAGS[flag]] = value
    problems += config.cache_and_sts_rules(serve_values, {option.dest: flag for flag, option in _OPTIONS.items()})
    return DaemonKnobs(**knobs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_argument_group("the cluster")
    shape.add_argument("--nodes", required=True, metavar="N", help="nodes in the cluster")
    shape.add_argument("--identities", required=True, metavar="K", help="service accounts with a role")
    shape.add_argument("--pods-per-identity", required=True, metavar="P", help="pods of each identity")
    shape.add_argument("--placement", default="spread", metavar="|".join(PLACEMENTS),
                       help="spread: each identity's pods round-robin over all nodes; packed: nodes filled "
                            f"one after another, {inputs_module.MAX_PODS_PER_NODE} pods each; random (default: spread)")
    what = parser.add_argument_group("what happens")
    what.add_argument("--scenario", default="scale-out", metavar="|".join(SCENARIOS),
                      help="steady: hours of refreshes; scale-out: the pods start over --ramp; rollout: a DaemonSet "
                           "update, --surge nodes at a time; node-replacement: every node replaced, --surge at a "
                           "time; cold-start: every node and pod at once (default: scale-out)")
    what.add_argument("--duration", metavar="SECONDS",
                      help="how long to simulate (default: steady 6h; rollout until a session after it; the "
                           "others until every pod has credentials, at most 1h)")
    what.add_argument("--ramp", metavar="SECONDS",
                      help=f"pods start spread over this time (default: {inputs_module.SCALE_OUT_RAMP_SECONDS:g} s, "
                           f"or pods / {inputs_module.POD_STARTS_PER_SECOND:g} s if longer; cold-start: 0)")
    what.add_argument("--surge", metavar="N", help="nodes replaced at a time (default: a tenth of them)")
    what.add_argument("--handoff", action=argparse.BooleanOptionalAction, default=True,
                      help="a new irsa-cache pod starts with the old one's cache entries (default: yes)")
    sts = parser.add_argument_group("STS")
    sts.add_argument("--account-rate", default="600", metavar="PER_SECOND",
                     help="STS calls per second the account admits, all callers together (default: 600)")
    sts.add_argument("--account-burst", metavar="N", help="calls STS admits at once (default: one second's worth)")
    sts.add_argument("--sts-latency", default="0.05", metavar="SECONDS", help="time to every STS answer (default: 0.05)")
    daemon = parser.add_argument_group("irsa-cache (the daemon's own flags, same defaults)")
    for flag, option in _OPTIONS.items():
        default = f" (default: {option.default})" if option.default is not None else ""
        daemon.add_argument(flag, dest=option.dest, metavar=option.metavar, help=f"{option.help}{default}")
    out = parser.add_argument_group("output")
    out.add_argument("--modes", default=",".join(MODES), metavar="LIST",
                     help=f"which modes, comma-separated (default: {','.join(MODES)})")
    out.add_argument("--seed", default="1", metavar="S", help="random seed: same seed, same run (default: 1)")
    out.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    out.add_argument("--plot", metavar="FILE.png", help="chart of STS calls per second over time, per mode")


def inputs_from(args: argparse.Namespace) -> tuple[Inputs, list[str]]:
    """Validated inputs and modes; raises ConfigError with one line per bad value."""
    problems: list[str] = []

    def parsed(flag: str, text: str | None, parse: Any) -> Any:
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            problems.append(f"{flag}: {exc}")
            return None

    values = {
        "nodes": parsed("--nodes", args.nodes, config.parse_positive_int),
        "identities": parsed("--identities", args.identities, config.parse_positive_int),
        "pods_per_identity": parsed("--pods-per-identity", args.pods_per_identity, config.parse_positive_int),
        "placement": parsed("--placement", args.placement, config.parse_choice(*PLACEMENTS)),
        "scenario": parsed("--scenario", args.scenario, config.parse_choice(*SCENARIOS)),
        "duration_seconds": parsed("--duration", args.duration, config.parse_duration),
        "ramp_seconds": parsed("--ramp", args.ramp, config.parse_duration),
        "surge": parsed("--surge", args.surge, config.parse_positive_int),
        "account_rate_per_second": parsed("--account-rate", args.account_rate, config.parse_positive_float),
        "account_burst": parsed("--account-burst", args.account_burst, config.parse_positive_int),
        "sts_latency_seconds": parsed("--sts-latency", args.sts_latency, config.parse_duration),
        "seed": parsed("--seed", args.seed, int),
    }
    knobs = _daemon_knobs(lambda option: getattr(args, option.dest), problems)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    for mode in modes:
        if mode not in MODES:
            problems.append(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    if not modes:
        problems.append("--modes: name at least one")
    if problems:
        raise ConfigError(problems)
    inputs = Inputs(handoff=args.handoff, daemon=knobs,
                    **{k: v for k, v in values.items() if v is not None})
    return inputs, modes


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from daemon.simulate import report
    from daemon.simulate.run import simulate

    try:
        inputs, modes = inputs_from(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"irsa-cache simulate: error: {problem}", file=sys.stderr)
        return 2
    except ValueError as exc:  # what Inputs checks across fields
        for problem in str(exc).splitlines():
            print(f"irsa-cache simulate: error: {problem}", file=sys.stderr)
        return 2
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            print("irsa-cache simulate: error: --plot needs matplotlib: pip install 'irsa-cache[bench]'",
                  file=sys.stderr)
            return 2
    plan = inputs_module.plan(inputs)
    results = {mode: simulate(inputs, plan, mode) for mode in modes}
    if args.json:
        json.dump(report.document(inputs, plan, results), out, indent=2)
        out.write("\n")
    else:
        out.write(report.table(inputs, plan, results) + "\n")
    if args.plot:
        from daemon.simulate import plot

        plot.write(Path(args.plot), inputs, results)
        if not args.json:
            out.write(f"chart: {args.plot}\n")
    return 0
