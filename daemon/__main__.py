"""The `irsa-cache` command: `serve` runs the daemon, `init-network` puts its link-local
addresses on the node (the DaemonSet's init container), `webhook` points opted-in pods at
it as they are created, `inject` does the same to workload YAML, `doctor` names the broken
link when a pod gets no credentials, `simulate` plays a whole cluster against STS's quota on
a virtual clock, `demo` shows it working end to end."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from daemon import __version__, config, logs, netsetup
from daemon.errors import ConfigError


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop `serve` runs on: uvloop's (libuv, in C), the one place it is chosen.

    Its sockets, transports and timers cost less per connection and per request than
    asyncio's own; every request pays for them. Benchmarks build their baselines on
    this same loop, so that a comparison compares the daemon, not the loops."""
    import uvloop

    return uvloop.new_event_loop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irsa-cache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"irsa-cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the credential cache daemon")
    config.add_serve_options(serve)
    init_network = commands.add_parser(
        "init-network",
        help="add the link-local listen addresses to this node, idempotently (init container; needs NET_ADMIN)",
        description=netsetup.__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    netsetup.add_arguments(init_network)
    webhook = commands.add_parser(
        "webhook", help="mutating admission webhook: point opted-in pods at the node's irsa-cache (HTTPS)",
    )
    from daemon.webhook import settings as webhook_settings

    webhook_settings.add_webhook_options(webhook)
    from daemon import inject as inject_module

    inject = commands.add_parser(
        "inject", help="point the pods of workloads in Kubernetes YAML at irsa-cache, offline (stdout)",
        description=inject_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inject_module.add_arguments(inject)
    demo = commands.add_parser(
        "demo", help="run an embedded issuer, STS (moto) and daemon, and start simulated pods against it"
    )
    from daemon import demo as demo_module  # imports moto and boto3: only for this command

    demo_module.add_arguments(demo)
    from daemon.doctor import cli as doctor_cli

    doctor = commands.add_parser(
        "doctor", help="check each link of IRSA (token, OIDC provider, trust policy, ServiceAccount, pod, STS) "
        "and name the broken one with its fix", description=doctor_cli.DESCRIPTION,
    )
    doctor_cli.add_arguments(doctor)
    from daemon.simulate import cli as simulate_cli

    simulate = commands.add_parser(
        "simulate", help="simulate a cluster's STS traffic: direct IRSA, a per-pod cache and irsa-cache side by side",
        description=simulate_cli.__doc__.split("\n\n")[0],
    )
    simulate_cli.add_arguments(simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init-network":
        return netsetup.main(args)
    if args.command == "webhook":
        from daemon.webhook import app as webhook_app

        return webhook_app.main(args)
    if args.command == "inject":
        from daemon import inject

        return inject.main(args)
    if args.command == "demo":
        from daemon import demo

        return demo.main(args)
    if args.command == "doctor":
        from daemon.doctor import cli as doctor_cli

        return doctor_cli.main(args)
    if args.command == "simulate":
        from daemon.simulate import cli as simulate_cli

        return simulate_cli.main(args)
    try:
        settings = config.settings_from(args)
        logs.configure(settings.log_level)
        from daemon import app

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(app.serve(settings))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"irsa-cache: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
