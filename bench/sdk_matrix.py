"""SDK x STS latency: does each real AWS SDK client get credentials, in how many requests, how fast?

    python bench/sdk_matrix.py                           # 0.1, 1.2, 2, 4 and 8 s, about 1.5 min
    python bench/sdk_matrix.py --latencies 8 --serve-arg=--sts-timeout=10

One command, real clients, everything on 127.0.0.1:

- **the daemon** runs as deployed, `python -m daemon serve` in a process of its own with
  its default settings (plus any `--serve-arg`), a static directory, STS at the double;
- **STS** is moto behind tests/sts_double.py, which answers the daemon's calls after the
  latency of the row (the clients' own AWS call, which proves their credentials, goes to
  moto directly);
- **pods** are four real clients (tests/sdk_clients): boto3, the AWS CLI v1, the JS SDK
  v3's container provider and a Go program built against Debian's Go SDK v2, each in a
  process of its own, configured only by the environment, each with an identity of its
  own (a cold cache), all four at once. Each talks to the daemon through a relay of its
  own (tests/client_tap.py) that records every request: its answer's status, or that the
  client gave up first. Time to credentials runs from the client's first request to the
  end of its first 200, so the client's start-up is not counted.

A client still waiting after `--bound` seconds is killed and counted as failed. Prints a
Markdown table (the README's) and writes bench/results/sdk_matrix.json. Needs what
.ci/run installs: the test extra (awscli), `npm ci` in tests/sdk_clients/js, and Debian's
golang-go and golang-github-aws-aws-sdk-go-v2-dev; a missing client is left out, saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import boto3  # noqa: E402

from daemon.embedded import DEMO_ACCOUNT, Background, Issuer, MotoSts, free_port  # noqa: E402
from daemon.sts import session_name_for  # noqa: E402
from tests import sdk_clients  # noqa: E402
from tests.sts_double import StsDouble  # noqa: E402

ROLE = f"arn:aws:iam::{DEMO_ACCOUNT}:role/matrix"


def cell(trial: sdk_clients.Trial) -> str:
    requests = len(trial.requests)
    noun = "request" if requests == 1 else "requests"
    statuses = ", ".join("gave up" if status is None else str(status) for status in trial.statuses)
    if trial.ok:
        took = trial.seconds_to_credentials
        shown = f" ({statuses})" if requests > 1 else ""
        return f"ok, {requests} {noun}{shown}, {took:.2f} s" if took is not None else f"ok, {requests} {noun}"
    still = ", still waiting: killed" if trial.bounded else ""
    return f"**failed**, {requests} {noun} ({statuses}){still}"


async def run(latencies: list[float], serve_args: list[str], bound_seconds: float, workdir: Path) -> dict[str, Any]:
    issuer = Issuer()
    static = issuer.write_static_config(workdir, {"system:serviceaccount:matrix:*": ROLE})
    with contextlib.ExitStack() as stack:
        moto = MotoSts(log_path=workdir / "moto.log")
        stack.enter_context(moto)
        # moto loads its STS backend on the first call, which takes a while: not in a row.
        boto3.client("sts", region_name="us-east-1", endpoint_url=moto.url, aws_access_key_id="warm",
                     aws_secret_access_key="up").assume_role_with_web_identity(
            RoleArn=ROLE, RoleSessionName="warm-up", WebIdentityToken="x" * 16)
        sts = await StsDouble(moto.url).start()
        try:
            listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            daemon = Background(
                [sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
                 "--static-config", str(static), "--region", "us-east-1", "--sts-endpoint-url", sts.url,
                 *serve_args],
                ready_url=f"http://{metrics_listen}/readyz", log_path=workdir / "daemon.log",
            )
            await asyncio.to_thread(daemon.__enter__)
            stack.callback(daemon.__exit__)
            return await _rows(latencies, listen, sts, issuer, bound_seconds, workdir, serve_args)
        finally:
            await sts.stop()


async def _rows(latencies: list[float], listen: str, sts: StsDouble, issuer: Issuer, bound_seconds: float,
                workdir: Path, serve_args: list[str]) -> dict[str, Any]:
    moto_url = sts.upstream  # the clients' own AWS call: only the exchange is slowed
    everyone = sdk_clients.clients(workdir)
    skipped = {}
    for client in everyone:
        reason = await asyncio.to_thread(sdk_clients.missing, client, workdir)  # builds the Go client
        if reason is not None:
            skipped[client.name] = reason
    present = [client for client in everyone if client.name not in skipped]
    for name, reason in skipped.items():
        print(f"left out {name}: {reason}", file=sys.stderr)
    # The daemon's first exchange sets up its STS client and connection: not in a row.
    async with aiohttp.ClientSession() as http:
        warm_up = {"Authorization": issuer.mint("system:serviceaccount:matrix:warm-up")}
        async with http.get(f"http://{listen}/v1/credentials", headers=warm_up) as response:
            assert response.status == 200, await response.text()
    rows = []
    for number, latency in enumerate(latencies):
        sts.delay_seconds = latency
        subjects = {client.name: f"system:serviceaccount:matrix:{client.name}-{number}" for client in present}
        trials = await asyncio.gather(*(
            sdk_clients.trial(client, daemon_address=listen, token=issuer.mint(subjects[client.name]),
                              workdir=workdir / f"{client.name}-{latency:g}", aws_api_url=moto_url,
                              bound_seconds=bound_seconds)
            for client in present))
        calls = {client.name: sum(1 for call in sts.assume_calls
                                  if call.session_name == session_name_for(subjects[client.name]))
                 for client in present}
        rows.append({"latency_seconds": latency, "trials": trials, "sts_calls": calls})
        print(f"  STS {latency:g} s: " + "; ".join(trial.describe() for trial in trials), file=sys.stderr)
    return {"clients": present, "skipped": skipped, "rows": rows, "serve_args": serve_args}


def table(result: dict[str, Any]) -> str:
    present = result["clients"]
    lines = ["| STS answers in | " + " | ".join(client.label for client in present) + " | STS calls per identity |",
             "| --- |" + " --- |" * (len(present) + 1)]
    for row in result["rows"]:
        calls = sorted(set(row["sts_calls"].values()))
        shown = str(calls[0]) if len(calls) == 1 else f"{calls[0]}–{calls[-1]}"
        lines.append(f"| {row['latency_seconds']:g} s | " + " | ".join(cell(trial) for trial in row["trials"])
                     + f" | {shown} |")
    return "\n".join(lines)


def as_json(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "serve_args": result["serve_args"],
        "skipped": result["skipped"],
        "rows": [
            {
                "latency_seconds": row["latency_seconds"],
                "clients": {
                    trial.client.name: {
                        "label": trial.client.label,
                        "ok": trial.ok,
                        "killed_at_bound": trial.bounded,
                        "statuses": trial.statuses,
                        "request_seconds": [request.seconds for request in trial.requests],
                        "seconds_to_credentials": trial.seconds_to_credentials,
                        "sts_calls": row["sts_calls"][trial.client.name],
                        "error": None if trial.ok else (trial.output.get("error") or trial.stderr.strip()[-500:]),
                    }
                    for trial in row["trials"]
                },
            }
            for row in result["rows"]
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latencies", default="0.1,1.2,2,4,8", help="STS latencies in seconds, comma-separated")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                        help="extra flag for irsa-cache serve (repeatable), e.g. --serve-arg=--sts-timeout=10")
    parser.add_argument("--bound", type=float, default=45.0, help="kill a client still waiting after this (s)")
    args = parser.parse_args()
    latencies = [float(part) for part in args.latencies.split(",") if part.strip()]
    serve_args = [piece for flag in args.serve_arg for piece in flag.split("=", 1)]
    with tempfile.TemporaryDirectory(prefix="sdk-matrix-") as scratch:
        result = asyncio.run(run(latencies, serve_args, args.bound, Path(scratch)))
    settings = " ".join(serve_args) or "the defaults"
    print(f"irsa-cache serve with {settings}; cold cache, one pod per client, all four at once; "
          f"Python {platform.python_version()}")
    print()
    print(table(result))
    out = ROOT / "bench" / "results" / "sdk_matrix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(as_json(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
