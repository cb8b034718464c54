"""Shared-budget benchmark: real irsa-cache processes sharing one throttling STS, three budgets.

    python bench/shared_budget.py            # the three cases below, about 3 minutes
    python bench/shared_budget.py --case spread-8

Each case starts N real daemons (`python -m daemon serve --directory kubernetes`, one per
node), in turn with each budget:

- **per-node**: the default, `--sts-rate 10 --sts-burst 20`, CUBIC cuts on throttling;
- **static split**: `--sts-rate R/N --sts-burst B/N` (rounded down, at least 1);
- **shared**: `--sts-cluster-rate R --sts-cluster-burst B`, the node count read from the
  DaemonSet's status;

against one STS: moto behind `bench/sts_throttling.py` (R calls/s for everyone, bucket B,
50 ms per answer, `Throttling` beyond). The Kubernetes API is tests/k8s_double.py, in this
process: ServiceAccounts annotated with roles, the pods bound to their nodes, the
DaemonSet. Pods are aiohttp clients that do what botocore's container provider does (2 s
timeout, 3 attempts, 1 s sleep after each failure; any non-200 is a failure), with tokens
signed by the issuer whose keys the API double serves; they are placed and started
exactly as `irsa-cache simulate` places and starts them (its `plan()`, same seed), so the
simulation of the same case is printed beside the measurement. A pod fails if its SDK gives
up (no restart here).

Cases (from issue 13's measurements): 8 nodes at 20/s and 16 nodes at 50/s with every
node's pods starting within 1 s (20 identities, 5 pods each per node); 16 nodes at 20/s
with the pods on 2 of them (200 pods). Prints a table; writes bench/results/shared_budget.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from daemon.embedded import DEMO_ACCOUNT, Background, Issuer, MotoSts, free_port  # noqa: E402
from daemon.simulate.cli import knobs_from_flags  # noqa: E402
from daemon.simulate.inputs import Inputs, plan  # noqa: E402
from daemon.simulate.run import simulate  # noqa: E402
from daemon.simulate.sdk import CONTAINER_PROVIDER  # noqa: E402
from tests.k8s_double import K8sApiDouble, daemon_set, pod, service_account  # noqa: E402

NAMESPACE = DAEMONSET = "irsa-cache"
DAEMON_READY_TIMEOUT_SECONDS = 90.0
STS_LATENCY_SECONDS = 0.05
BOTOCORE = CONTAINER_PROVIDER  # the pods' SDK, as the simulation plays it
CASES = {
    "spread-8": dict(nodes=8, rate=20, identities=20, pods_per_identity=8 * 5, placement="spread"),
    "spread-16": dict(nodes=16, rate=50, identities=20, pods_per_identity=16 * 5, placement="spread"),
    "uneven-16": dict(nodes=16, rate=20, identities=20, pods_per_identity=10, placement="packed"),
}
BUDGETS = ("per-node", "static split", "shared")


def budget_flags(budget: str, nodes: int, rate: float) -> list[str]:
    if budget == "static split":
        return ["--sts-rate", f"{rate / nodes:g}", "--sts-burst", str(max(1, int(rate // nodes)))]
    if budget == "shared":
        return ["--sts-cluster-rate", f"{rate:g}", "--sts-cluster-burst", str(int(rate))]
    return []


@dataclass
class Outcome:
    sts_calls: int
    throttled: int
    failed_pods: int
    pods: int
    last_served_seconds: float


def subject(identity: int) -> str:
    return f"system:serviceaccount:team-{identity}:app"


def http_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


async def pod_fetch(http: aiohttp.ClientSession, url: str, token: str, start_at: float) -> float | None:
    """botocore's container provider, against one daemon: seconds to credentials, or None."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    started = time.monotonic()
    for _ in range(BOTOCORE.attempts):
        try:
            async with http.get(url, headers={"Authorization": token},
                                timeout=aiohttp.ClientTimeout(total=BOTOCORE.timeout_seconds)) as answer:
                await answer.read()
                if answer.status == 200:
                    return time.monotonic() - started
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(BOTOCORE.sleep_seconds)
    return None


@contextlib.asynccontextmanager
async def daemons(nodes: int, argv: list[str], env: dict[str, str], logs: Path) -> AsyncIterator[list[str]]:
    """One `irsa-cache serve` per node, all started at once; ready when their /readyz says so.
    (Waiting must not block this loop: it serves the API double the daemons sync from.)
    A daemon that lost its port to another process (the machine is shared) starts again."""
    processes: dict[int, subprocess.Popen[bytes]] = {}
    ports: dict[int, tuple[int, int]] = {}

    def start(node: int) -> None:
        port, metrics_port = free_port(), free_port()
        with (logs / f"node-{node}.log").open("wb") as log:
            processes[node] = subprocess.Popen(
                [*argv, "--node-name", f"node-{node}", "--listen", f"127.0.0.1:{port}",
                 "--metrics-listen", f"127.0.0.1:{metrics_port}"], stdout=log, stderr=log, env=env)
        ports[node] = (port, metrics_port)

    try:
        for node in range(nodes):
            start(node)
        deadline = time.monotonic() + DAEMON_READY_TIMEOUT_SECONDS
        async with aiohttp.ClientSession() as http:
            for node in range(nodes):
                restarts = 0
                while True:
                    process = processes[node]
                    if process.poll() is not None:
                        log = (logs / f"node-{node}.log").read_text()
                        if "address already in use" in log and restarts < 3:
                            restarts += 1
                            start(node)
                            continue
                        raise RuntimeError(f"a daemon exited with {process.returncode}; see {logs}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"daemons not ready after {DAEMON_READY_TIMEOUT_SECONDS:g} s; see {logs}")
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{ports[node][1]}/readyz") as answer:
                            if answer.status == 200:
                                break
                    await asyncio.sleep(0.1)
        yield [f"http://127.0.0.1:{ports[node][0]}/v1/credentials" for node in range(nodes)]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def run_case(name: str, budget: str, *, sts_url: str, sts_admin: str, issuer: Issuer, workdir: Path,
                   seed: int, timeline: bool = False) -> tuple[Outcome, Outcome]:
    case = CASES[name]
    nodes, rate = case["nodes"], case["rate"]
    inputs = Inputs(nodes=nodes, identities=case["identities"], pods_per_identity=case["pods_per_identity"],
                    placement=case["placement"], ramp_seconds=1.0, account_rate_per_second=rate,
                    account_burst=int(rate), sts_latency_seconds=STS_LATENCY_SECONDS, seed=seed,
                    daemon=knobs_from_flags(budget_flags(budget, nodes, rate)))  # as the real daemons run
    cluster_plan = plan(inputs)
    simulated = await asyncio.to_thread(simulate, inputs, cluster_plan, "irsa-cache")  # its own loop

    k8s = await K8sApiDouble(issuer=issuer.url, jwks=issuer.jwks()).start()
    try:
        for identity in range(inputs.identities):
            k8s.create(service_account(f"team-{identity}", "app", f"arn:aws:iam::{DEMO_ACCOUNT}:role/team-{identity}"))
        k8s.create(daemon_set(NAMESPACE, DAEMONSET, desired=nodes))
        tokens = {}
        for start in cluster_plan.starts:
            bound = k8s.create(pod(f"team-{start.identity}", f"app-{start.pod}", f"node-{start.node}", "app"))
            tokens[start.pod] = issuer.mint(subject(start.identity), pod_name=bound["metadata"]["name"],
                                            pod_uid=bound["metadata"]["uid"])
        kubeconfig = k8s.write_kubeconfig(workdir / "kubeconfig")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IRSA_CACHE_"))}
        env.update(DAEMONSET_NAME=DAEMONSET, POD_NAMESPACE=NAMESPACE)
        argv = [sys.executable, "-m", "daemon", "serve", "--directory", "kubernetes", "--kubeconfig", str(kubeconfig),
                "--region", "us-east-1", "--sts-endpoint-url", sts_url, "--log-level", "warning",
                *budget_flags(budget, nodes, rate)]
        logs = workdir / f"{name}-{budget.replace(' ', '-')}"
        logs.mkdir()
        async with daemons(nodes, argv, env, logs) as urls:
            if budget == "shared":
                await asyncio.sleep(1.0)  # the first read of the DaemonSet, right after start
            http_json(f"{sts_admin}/__bench__/reset", "POST")
            zero = time.monotonic() + 0.5
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                results = await asyncio.gather(*(
                    pod_fetch(http, urls[s.node], tokens[s.pod], zero + s.at) for s in cluster_plan.starts))
            stats = http_json(f"{sts_admin}/__bench__/stats")
            calls = http_json(f"{sts_admin}/__bench__/calls")
    finally:
        await k8s.stop()
    served = [r for r in results if r is not None]
    if timeline:
        t0 = min((c["t"] for c in calls), default=0.0)
        ok = [0] * 20; thr = [0] * 20
        for c in calls:
            i = int(c["t"] - t0)
            if i < 20:
                (ok if c["result"] == "ok" else thr)[i] += 1
        print(f"{name} {budget}: admitted/s {ok}; throttled/s {thr}", file=sys.stderr)
    measured = Outcome(sts_calls=stats["calls"] - stats["throttled"], throttled=stats["throttled"],
                       failed_pods=len(results) - len(served), pods=len(results),
                       last_served_seconds=max(served, default=float("nan")))
    # The simulated figure comparable to "no restarts here": pods that failed at least once.
    modelled = Outcome(sts_calls=simulated.sts_calls, throttled=simulated.throttled,
                       failed_pods=simulated.failed_pods, pods=simulated.pods,
                       last_served_seconds=simulated.ttc_max_seconds or float("nan"))
    return measured, modelled


async def main_async(args: argparse.Namespace) -> int:
    cases = [args.case] if args.case else list(CASES)
    workdir = Path(tempfile.mkdtemp(prefix="irsa-cache-shared-budget-"))
    issuer = Issuer()
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        moto = stack.enter_context(MotoSts(log_path=workdir / "moto.log"))
        for name in cases:
            rate = CASES[name]["rate"]
            port = free_port()
            stack_case = contextlib.ExitStack()
            with stack_case:
                stack_case.enter_context(Background(
                    [sys.executable, str(HERE / "sts_throttling.py"), "--port", str(port), "--upstream", moto.url,
                     "--rate", str(rate), "--burst", str(rate), "--latency", str(STS_LATENCY_SECONDS)],
                    ready_url=f"http://127.0.0.1:{port}/__bench__/health", log_path=workdir / f"sts-{name}.log"))
                sts_url = f"http://127.0.0.1:{port}"
                for budget in BUDGETS:
                    print(f"{name}: {budget} ...", file=sys.stderr, flush=True)
                    measured, modelled = await run_case(name, budget, sts_url=sts_url, sts_admin=sts_url,
                                                        issuer=issuer, workdir=workdir, seed=args.seed,
                                                        timeline=args.timeline)
                    rows.append({"case": name, "budget": budget, "measured": asdict(measured),
                                 "simulated": asdict(modelled)})
    print(table(rows))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "shared_budget.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<10} {'budget':<13} {'throttled':>15} {'failed pods':>15} {'last served (s)':>17} "
             f"{'STS calls':>11}",
             f"{'':<10} {'':<13} {'real / sim':>15} {'real / sim':>15} {'real / sim':>17} {'real':>11}"]
    for row in rows:
        real, sim = row["measured"], row["simulated"]
        lines.append(
            f"{row['case']:<10} {row['budget']:<13} {real['throttled']:>7} / {sim['throttled']:<5} "
            f"{real['failed_pods']:>5} of {real['pods']:<3} / {sim['failed_pods']:<3} "
            f"{real['last_served_seconds']:>7.1f} / {sim['last_served_seconds']:<7.1f} {real['sts_calls']:>11}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case only")
    parser.add_argument("--seed", type=int, default=1, help="the simulation's seed: where and when pods start")
    parser.add_argument("--timeline", action="store_true", help="also print STS's admitted and throttled calls per second")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
