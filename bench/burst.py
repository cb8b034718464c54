"""Burst benchmark: a scale-out of N pods over K identities, straight to STS and through irsa-cache.

    python bench/burst.py                    # 1000 pods, 20 identities, arriving within 10 s
    python bench/burst.py --pods 5000        # the bigger scale-out

One command, real clients, everything on 127.0.0.1:

- **STS** is moto (`daemon.embedded.MotoSts`) behind `bench/sts_throttling.py`, a
  double in a process of its own that admits AssumeRoleWithWebIdentity at `--sts-rate`
  calls/s (token bucket, `--sts-bucket` deep) for all callers together, answers the
  rest with STS's own `Throttling` error (HTTP 400, "Rate exceeded"), and answers
  everything after `--sts-latency`.  The default, 20 calls/s, is real STS's quota of
  about 600 calls/s per account and region shared by 30 nodes scaling out at once:
  a per-node slice of the account.
- **Pods** are real botocore credential fetches, one botocore Session each (sharing
  one parsed-model loader per process, as `daemon/demo.py` does), started at their
  arrival times (N independent uniform times within `--window`: a Poisson process
  conditioned on N arrivals) on thread pools in `--client-procs` worker processes, so
  the clients get both cores.  Each pod's Session is built before the clock starts
  (as an application builds it at import): what is timed is the credential fetch.
  A pod fails only if it ends without credentials.
- **direct**: each pod has `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE` and uses
  botocore's `AssumeRoleWithWebIdentityProvider` with `AWS_ENDPOINT_URL_STS` pointing
  at the double, in botocore's default (legacy) retry mode: 5 attempts, Throttling
  retried with exponential backoff.  Only the lookup of those variables is
  redirected from `os.environ` to the pod's own mapping (many pods share a process);
  `AWS_ROLE_SESSION_NAME=pod-<n>` is set too, so that the double can count each
  pod's attempts.
- **irsa-cache**: each pod has `AWS_CONTAINER_CREDENTIALS_FULL_URI` +
  `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` and uses botocore's `ContainerProvider`
  (which retries a non-200, e.g. a 503, twice after 1 s) against `python -m daemon
  serve` in a process of its own, default budget (10 calls/s, burst 20, 8 at once)
  and wait policy, on the same double, reset between modes.
- **steady state**: `daemon.cache.CredentialCache` behind the real STS budget
  (`daemon.limiter`), driven in-process on a virtual-time event loop by pods that
  refetch as botocore does (15 min before expiry), against a counting STS: each
  issued session must be refreshed exactly once, and no pod may get credentials
  with less than the serve floor left.

Time to credentials is shown next to its physical floor (`physical_floor`): what
the best possible agent would reach when STS admits `--sts-rate` calls/s from a
bucket of `--sts-bucket` and each identity needs one call, computed per pod from the
same start times. E.g. 2000 pods over 50 identities at 10 calls/s after a bucket of
10: the last identities cannot have credentials before about 4 s.

Prints a side-by-side table and writes bench/results/burst.json and bench/burst.png
(needs matplotlib: `pip install matplotlib`; without it the chart is skipped).
The exit status is 0 when the benchmark ran, whatever it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REGION = "us-east-1"
MODES = ("direct", "irsa-cache")
BUCKET_SECONDS = 0.5
WORKER_READY_TIMEOUT_SECONDS = 120.0
WORKER_TAIL_SECONDS = 300.0  # after the last arrival, the most a mode may take before it is killed
PROGRESS_EVERY_SECONDS = 10.0


# ---------------------------------------------------------------------------------------------
# Worker side: one process of simulated pods. Imports botocore only.
# ---------------------------------------------------------------------------------------------


def _web_identity_provider(session: Any, environ: Mapping[str, str]) -> Any:
    """botocore's own web-identity provider, built as `create_credential_resolver` builds it,
    reading AWS_ROLE_ARN / AWS_WEB_IDENTITY_TOKEN_FILE from the pod's mapping, not os.environ."""
    from botocore.credentials import AssumeRoleWithWebIdentityProvider, _get_client_creator

    class PodWebIdentityProvider(AssumeRoleWithWebIdentityProvider):
        def _get_env_config(self, key: str) -> str | None:
            name = self._CONFIG_TO_ENV_VAR.get(key)
            return environ.get(name) if name else None

    return PodWebIdentityProvider(
        load_config=lambda: session.full_config,
        client_creator=_get_client_creator(session, session.get_config_variable("region")),
        profile_name=session.get_config_variable("profile") or "default",
        cache={},
    )


def _pod_session(mode: str, environ: Mapping[str, str], loader: Any) -> Any:
    """A pod's own botocore session, with only the provider its mode's variables select."""
    import botocore.session
    from botocore.credentials import ContainerProvider, CredentialResolver

    session = botocore.session.Session()
    session.register_component("data_loader", loader)
    provider = _web_identity_provider(session, environ) if mode == "direct" else ContainerProvider(environ=dict(environ))
    session.register_component("credential_provider", CredentialResolver([provider]))
    return session


def _fetch_credentials(session: Any) -> float | None:
    """The pod's first need for credentials. Returns the seconds left on what it got."""
    credentials = session.get_credentials()
    if credentials is None:
        raise RuntimeError("the provider found no configuration")
    frozen = credentials.get_frozen_credentials()  # the web-identity provider calls STS only here
    if not frozen.access_key or not frozen.secret_key or not frozen.token:
        raise RuntimeError("incomplete credentials")
    expiry = getattr(credentials, "_expiry_time", None)  # RefreshableCredentials keep it here
    return (expiry - datetime.now(timezone.utc)).total_seconds() if expiry else None


def worker_main(spec_path: str, out_path: str) -> int:
    """Run the pods of one worker process: print `ready`, read the start time t0, start each
    pod at t0 + its arrival, write one result per pod to `out_path`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it stops us on Ctrl-C
    spec = json.loads(Path(spec_path).read_text())
    import botocore.loaders
    import botocore.session

    loader = botocore.loaders.create_loader()
    # Parse the STS model and endpoint data once before the clock starts, as a process
    # that has run before would have (and as the daemon's own client has).
    warm = botocore.session.Session()
    warm.register_component("data_loader", loader)
    warm.create_client("sts", region_name=REGION, endpoint_url="http://127.0.0.1:9")
    # Each pod's Session is built before the clock starts, as an application builds it at
    # import: what is timed is the credential fetch. (A Session costs ~7 ms of CPU, the
    # same in both modes; building 1000 of them inside the window would only measure
    # this 2-core box.) The web-identity provider still builds its STS client inside
    # the fetch, as it does in a real pod.
    sessions = {pod["i"]: _pod_session(spec["mode"], pod["env"], loader) for pod in spec["pods"]}
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 1
    t0 = float(line)

    def watchdog() -> None:  # the parent went away, or the mode overran: stop
        sys.stdin.read()
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    overrun = threading.Timer(spec["deadline_seconds"], lambda: os._exit(4))
    overrun.daemon = True
    overrun.start()

    def run(pod: dict[str, Any]) -> dict[str, Any]:
        scheduled = t0 + pod["at"]
        delay = scheduled - time.time()
        if delay > 0:
            time.sleep(delay)
        started = time.time()
        cpu = time.thread_time()
        result: dict[str, Any] = {"i": pod["i"], "identity": pod["identity"], "scheduled": scheduled - t0,
                                  "started": started - t0}
        try:
            result["remaining"] = _fetch_credentials(sessions.pop(pod["i"]))
            result["error"] = None
        except Exception as exc:  # a pod without credentials is a result, not a crash
            result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        result["finished"] = time.time() - t0
        result["cpu"] = time.thread_time() - cpu
        return result

    usage_before = os.times()
    with ThreadPoolExecutor(max_workers=spec["threads"], thread_name_prefix="pod") as pool:
        results = list(pool.map(run, spec["pods"]))
    usage = os.times()
    Path(out_path).write_text(json.dumps({
        "results": results,
        "cpu_seconds": (usage.user - usage_before.user) + (usage.system - usage_before.system),
    }))
    print("done", flush=True)
    os._exit(0)  # the watchdog thread is blocked on stdin: do not wait for it


# ---------------------------------------------------------------------------------------------
# Orchestrator side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    i: int
    identity: int
    at: float
    token_file: Path


def percentile(values: list[float], fraction: float) -> float:
    from daemon.stats import nearest_rank  # the parent's summary; workers import botocore only

    value = nearest_rank(values, fraction)
    return math.nan if value is None else value


def physical_floor(results: list[dict[str, Any]], *, rate: float, bucket: float, latency: float) -> list[float]:
    """The least time to credentials each pod could have had, given only STS's admission rate.

    Each identity needs one AssumeRoleWithWebIdentity call before any of its pods can
    have credentials, and STS admits `rate` calls/s from a bucket of `bucket` (full at
    the start). The best any agent can do is call for each identity as soon as its
    first pod starts, in that order, each call as soon as the bucket allows, and answer
    every pod of an identity the moment its call returns (after `latency`); a pod that
    starts later waits for nothing. Returns that floor per pod, in seconds, from the
    pod's own start, the clock its measured time to credentials uses."""
    first_start: dict[int, float] = {}
    for result in sorted(results, key=lambda r: r["started"]):
        first_start.setdefault(result["identity"], result["started"])
    tokens, clock = bucket, 0.0
    ready_at: dict[int, float] = {}
    for identity, start in sorted(first_start.items(), key=lambda item: item[1]):
        at = max(start, clock)
        tokens = min(bucket, tokens + (at - clock) * rate)
        if tokens < 1.0:
            at += (1.0 - tokens) / rate
            tokens = 1.0
        tokens -= 1.0
        clock = at
        ready_at[identity] = at + latency
    return [max(0.0, ready_at[r["identity"]] - r["started"]) for r in results]


def _proc_cpu_seconds(pid: int) -> float:
    from daemon.embedded import cpu_seconds

    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return math.nan


def _system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _http_json(url: str, *, method: str = "GET", timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _clean_environment() -> dict[str, str]:
    """The machine's environment without any AWS setting, and no config files: only what we set counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_CONFIG_FILE": "/nonexistent/irsa-cache-bench/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/irsa-cache-bench/credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    })
    return env


class Workers:
    """The client worker processes of one mode; killed on exit, whatever happened."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.wait(timeout=10)
            for stream in (process.stdin, process.stdout):
                with contextlib.suppress(Exception):
                    stream.close()  # type: ignore[union-attr]


def _read_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                return process.stdout.readline().strip()
            if process.poll() is not None:
                raise RuntimeError(f"client worker exited with {process.returncode} before it reported")
    raise TimeoutError("client worker did not answer in time")


def run_pods(mode: str, pods: list[Pod], pod_env: Any, process_env: dict[str, str],
             args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    """Start every pod at its arrival time across the worker processes; gather their results."""
    deadline_seconds = args.window + WORKER_TAIL_SECONDS
    with Workers() as workers:
        outputs = []
        for w in range(args.client_procs):
            mine = pods[w::args.client_procs]
            spec = workdir / f"{mode}-worker{w}.json"
            spec.write_text(json.dumps({
                "mode": mode, "threads": args.client_threads, "deadline_seconds": deadline_seconds + 30,
                "pods": [{"i": p.i, "identity": p.identity, "at": p.at, "env": pod_env(p)} for p in mine],
            }))
            out = workdir / f"{mode}-worker{w}.out.json"
            outputs.append(out)
            workers.processes.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec), str(out)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=process_env, text=True, cwd=workdir,
            ))
        ready_by = time.monotonic() + WORKER_READY_TIMEOUT_SECONDS
        for process in workers.processes:
            if _read_line(process, ready_by) != "ready":
                raise RuntimeError("client worker said something other than ready")
        t0 = time.time() + 0.5
        busy0, total0 = _system_busy()
        for process in workers.processes:
            assert process.stdin is not None
            process.stdin.write(f"{t0!r}\n")
            process.stdin.flush()
        done_by = time.monotonic() + deadline_seconds
        waiting = list(workers.processes)
        while waiting:
            # Wait for the workers' `done` in short slices, saying how far STS has got meanwhile.
            slice_end = min(done_by, time.monotonic() + PROGRESS_EVERY_SECONDS)
            with contextlib.suppress(TimeoutError):
                while waiting:
                    if _read_line(waiting[0], slice_end) != "done":
                        raise RuntimeError("client worker did not finish cleanly")
                    waiting.pop(0).wait(timeout=30)
            if waiting:
                if time.monotonic() >= done_by:
                    raise TimeoutError(f"{mode}: pods still running {deadline_seconds:g} s after the start; stopped")
                with contextlib.suppress(OSError, ValueError):
                    stats = progress()
                    print(f"      {time.time() - t0:5.1f} s: {stats['calls']:,} STS calls so far, "
                          f"{stats['throttled']:,} throttled", flush=True)
        wall = time.time() - t0
        busy1, total1 = _system_busy()
        results: list[dict[str, Any]] = []
        cpu = 0.0
        for out in outputs:
            data = json.loads(out.read_text())
            results += data["results"]
            cpu += data["cpu_seconds"]
    results.sort(key=lambda r: r["i"])
    cores = os.cpu_count() or 1
    return {"t0": t0, "results": results, "wall": wall, "client_cpu_seconds": cpu,
            "box_busy_cores": (busy1 - busy0) / max(1, total1 - total0) * cores}


def summarize(mode: str, run: dict[str, Any], calls: list[dict[str, Any]], identities: int,
              floor: dict[str, float]) -> dict[str, Any]:
    """`floor`: the STS double's rate, bucket and latency (see physical_floor)."""
    results = run["results"]
    ok = [r for r in results if r["error"] is None]
    floors = physical_floor(results, **floor)
    failed = [r for r in results if r["error"] is not None]
    ttc = [r["finished"] - r["started"] for r in ok]
    lag = [r["started"] - r["scheduled"] for r in results]
    throttled = sum(1 for c in calls if c["result"] == "throttled")
    successful = sum(1 for c in calls if c["result"] == "ok")
    per_role = Counter(c["role"] for c in calls)
    per_session = Counter(c.get("session") for c in calls)
    per_role_ok = Counter(c["role"] for c in calls if c["result"] == "ok")
    remaining = [r["remaining"] for r in ok if r.get("remaining") is not None]
    events = sorted([(r["started"], 1) for r in results] + [(r["finished"], -1) for r in results])
    in_flight = peak_in_flight = 0
    for _, step in events:
        in_flight += step
        peak_in_flight = max(peak_in_flight, in_flight)
    t0 = run["t0"]
    horizon = max([r["finished"] for r in results] + [c["t"] - t0 for c in calls] + [0.0])
    buckets = int(horizon / BUCKET_SECONDS) + 1
    timeline = {"ok": [0] * buckets, "throttled": [0] * buckets, "error": [0] * buckets}
    for c in calls:
        index = min(buckets - 1, max(0, int((c["t"] - t0) / BUCKET_SECONDS)))
        timeline[c["result"]][index] += 1
    return {
        "mode": mode,
        "pods": len(results),
        "pods_failed": len(failed),
        "failure_reasons": Counter(_short_error(r["error"]) for r in failed).most_common(5),
        "sts_calls": len(calls),
        "sts_throttled": throttled,
        "sts_successful": successful,
        "sts_errors": len(calls) - throttled - successful,
        "distinct_identities_called": len(per_role),
        "sts_calls_per_identity": len(calls) / identities,
        "sts_calls_per_session_name_max": max(per_session.values(), default=0),
        "sts_calls_per_identity_max": max(per_role.values(), default=0),
        "sts_successful_per_identity": successful / identities,
        "sts_successful_per_identity_max": max(per_role_ok.values(), default=0),
        "ttc_p50_ms": percentile(ttc, 0.50) * 1000,
        "ttc_p90_ms": percentile(ttc, 0.90) * 1000,
        "ttc_p99_ms": percentile(ttc, 0.99) * 1000,
        "ttc_max_ms": max(ttc, default=math.nan) * 1000,
        "floor_p50_ms": percentile(floors, 0.50) * 1000,
        "floor_p99_ms": percentile(floors, 0.99) * 1000,
        "floor_max_ms": max(floors, default=math.nan) * 1000,
        "failed_gave_up_after_p50_ms": percentile([r["finished"] - r["started"] for r in failed], 0.5) * 1000,
        "start_lag_p50_ms": percentile(lag, 0.50) * 1000,
        "start_lag_p99_ms": percentile(lag, 0.99) * 1000,
        "start_lag_max_ms": max(lag, default=math.nan) * 1000,
        "client_cpu_seconds": run["client_cpu_seconds"],
        "client_cpu_ms_per_pod": run["client_cpu_seconds"] / max(1, len(results)) * 1000,
        "pod_thread_cpu_ms_p50": percentile([r["cpu"] for r in results], 0.5) * 1000,
        "box_busy_cores": run["box_busy_cores"],
        "peak_pods_in_flight": peak_in_flight,
        "ttc_from_schedule_p50_ms": percentile([r["finished"] - r["scheduled"] for r in ok], 0.50) * 1000,
        "ttc_from_schedule_p99_ms": percentile([r["finished"] - r["scheduled"] for r in ok], 0.99) * 1000,
        "wall_seconds": run["wall"],
        "min_credentials_left_seconds": min(remaining, default=math.nan),
        "ttc_seconds": sorted(ttc),
        "timeline_bucket_seconds": BUCKET_SECONDS,
        "timeline": timeline,
        "arrivals": [r["scheduled"] for r in results],
        "starts": [r["started"] for r in results],
    }


def account_cpu(summary: dict[str, Any]) -> None:
    """Cores used, during the mode, by processes other than the clients and our servers."""
    ours = summary["client_cpu_seconds"] + sum(summary["server_cpu_seconds"].values())
    summary["other_cores"] = max(0.0, summary["box_busy_cores"] - ours / max(summary["wall_seconds"], 1e-9))


def histogram_quantiles(before: Any, after: Any, name: str, quantiles: tuple[float, ...]) -> dict[str, float]:
    """Upper bounds (bucket edges) of quantiles of a Prometheus histogram's growth between two scrapes."""
    edges: dict[float, float] = {}
    for snapshot, sign in ((after, 1), (before, -1)):
        for (sample, labels), value in snapshot.items():
            if sample == f"{name}_bucket":
                edge = float(dict(labels)["le"])
                edges[edge] = edges.get(edge, 0.0) + sign * value
    cumulative = sorted(edges.items())
    total = cumulative[-1][1] if cumulative else 0
    found = {}
    for q in quantiles:
        found[f"p{round(q * 100)}"] = next((edge for edge, count in cumulative if total and count >= q * total), math.nan)
    return found


def _short_error(error: str) -> str:
    if "Throttling" in error:
        return "Throttling (Rate exceeded) after botocore's retries"
    return error.split(":", 1)[0] + ": " + error.split(":", 1)[-1].strip()[:120]


# ---------------------------------------------------------------------------------------------
# Steady state: the cache's refresh rules on a virtual clock
# ---------------------------------------------------------------------------------------------


class _VirtualClockSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls for real I/O without blocking; a wait for a timer moves virtual time instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("virtual-time loop: nothing is scheduled and nothing can wake it")
        self.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time jumps to the next timer: hours of cache life in seconds."""

    def __init__(self) -> None:
        self._virtual = _VirtualClockSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def steady_state(*, identities: int, pods_per_identity: int, hours: float, session_seconds: int,
                 sts_latency: float, seed: int) -> dict[str, Any]:
    from daemon import config, limiter
    from daemon.cache import CachePolicy, CredentialCache
    from daemon.embedded import DEMO_ACCOUNT
    from daemon.models import CacheKey, Credentials, Identity, VerifiedToken

    loop = VirtualTimeLoop()
    epoch = 1_800_000_000.0

    def clock() -> float:
        return epoch + loop.time()

    rng = random.Random(seed)
    calls: list[tuple[float, str]] = []
    served: list[float] = []
    outcomes: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    finished_at: list[float] = []
    policy = CachePolicy()  # the daemon's defaults

    class CountingSts:
        """Healthy STS: answers after `sts_latency`, credentials for exactly `session_seconds`."""

        async def assume_role(self, *, role_arn: str, token: VerifiedToken) -> Credentials:
            calls.append((loop.time(), role_arn))
            await asyncio.sleep(sts_latency)
            issued = math.floor(clock())
            return Credentials(
                access_key_id=f"ASIA{len(calls):016d}", secret_access_key="secret", session_token="session",
                expiration=datetime.fromtimestamp(issued + session_seconds, timezone.utc),
                account_id=DEMO_ACCOUNT, assumed_role_arn=f"arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/r/s",
            )

    async def scenario() -> None:
        budget = limiter.StsBudget(limiter.BudgetPolicy())  # defaults: 10/s, burst 20, 8 at once
        source = limiter.BudgetedSource(source=CountingSts(), budget=budget, retry=limiter.RetryPolicy(),
                                        rng=random.Random(seed))
        cache = CredentialCache(source=source, clock=clock, policy=policy, rng=random.Random(seed + 1))
        maintenance = asyncio.create_task(cache.run(interval_seconds=config.MAINTENANCE_INTERVAL_SECONDS))
        end = hours * 3600

        async def pod(identity: int, start: float) -> None:
            await asyncio.sleep(start)
            subject = f"system:serviceaccount:team-{identity}:app"
            who = Identity(issuer="https://oidc.bench.test", subject=subject, audience="sts.amazonaws.com")
            key = CacheKey.of(f"arn:aws:iam::{DEMO_ACCOUNT}:role/team-{identity}-app", who)
            while loop.time() < end:
                token = VerifiedToken(identity=who, raw=f"token-{uuid.uuid4()}", expires_at=clock() + 86_400,
                                      fingerprint="0" * 12)
                try:
                    credentials, outcome = await cache.get(key, token)
                except Exception as exc:  # a refusal is what this check looks for
                    refused[type(exc).__name__] += 1
                    await asyncio.sleep(1.0)
                    continue
                left = credentials.remaining(clock())
                served.append(left)
                outcomes[outcome.value] += 1
                # botocore refreshes 15 min before expiry (advisory), at its next signed call:
                # this pod makes one within a minute.
                wait = max(1.0, left - 900) + rng.uniform(0, 60)
                await asyncio.sleep(min(wait, max(0.0, end - loop.time())))  # the run ends at `end`

        # Half the pods start in the first minute (a scale-out), the rest at random moments
        # of the run, so that fetches land at every point of an entry's life.
        total = identities * pods_per_identity
        tasks = [asyncio.create_task(pod(n % identities, rng.uniform(0, 60) if n < total // 2 else rng.uniform(0, end)))
                 for n in range(total)]
        await asyncio.gather(*tasks)
        finished_at.append(loop.time())
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance

    real_started = time.perf_counter()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()

    lower, upper = 0.5 - policy.refresh_jitter, 0.5 + policy.refresh_jitter
    slack = config.MAINTENANCE_INTERVAL_SECONDS + sts_latency + 1.0  # one tick, the call, whole seconds
    by_role: dict[str, list[float]] = {}
    for at, role in calls:
        by_role.setdefault(role, []).append(at)
    gaps = [b - a for times in by_role.values() for a, b in zip(times, times[1:])]
    # One refresh per session: consecutive calls for an identity are 0.4-0.6 of a lifetime apart
    # (a duplicate would be closer, a missed or late refresh further), and the last session
    # of each identity was still short of its refresh window when the run ended.
    in_window = all(lower * session_seconds - slack <= g <= upper * session_seconds + slack for g in gaps)
    end = finished_at[0] if finished_at else math.inf
    last_in_time = all(end - times[-1] <= upper * session_seconds + slack for times in by_role.values())
    refreshes = len(calls) - len(by_role)
    min_left = min(served, default=math.nan)
    floor_ok = bool(served) and min_left >= policy.serve_floor_seconds
    failed = [name for name, ok in (
        ("an identity never called STS", len(by_role) == identities),
        (f"calls not {lower:.2f}-{upper:.2f} of a lifetime apart", in_window),
        ("a session outlived its refresh window", last_in_time),
        ("a pod got credentials under the serve floor", floor_ok),
        ("pods were refused", not refused),
    ) if not ok]
    passed = not failed
    return {
        "passed": passed,
        "identities": identities,
        "pods": identities * pods_per_identity,
        "virtual_hours": hours,
        "session_seconds": session_seconds,
        "serve_floor_seconds": policy.serve_floor_seconds,
        "refresh_jitter": policy.refresh_jitter,
        "sts_calls": len(calls),
        "cold_calls": len(by_role),
        "refresh_calls": refreshes,
        "virtual_seconds_run": end,
        "calls_per_identity_per_hour": len(calls) / identities / (end / 3600),
        "gap_min_lifetimes": min(gaps, default=math.nan) / session_seconds,
        "gap_max_lifetimes": max(gaps, default=math.nan) / session_seconds,
        "refresh_window_ok": in_window and last_in_time,
        "failed_checks": failed,
        "fetches": len(served) + sum(refused.values()),
        "outcomes": dict(outcomes),
        "refused": dict(refused),
        "min_left_served_seconds": min_left,
        "floor_ok": floor_ok,
        "real_seconds": time.perf_counter() - real_started,
    }


def steady_state_line(s: dict[str, Any]) -> str:
    verdict = "PASS" if s["passed"] else "FAIL (" + "; ".join(s["failed_checks"]) + ")"
    return (
        f"steady state: {verdict}: {s['identities']} identities, {s['pods']} pods, {s['virtual_hours']:g} h on a "
        f"virtual clock, {s['session_seconds']} s sessions: {s['sts_calls']} STS calls = {s['cold_calls']} cold + "
        f"{s['refresh_calls']} refreshes (consecutive calls {s['gap_min_lifetimes']:.2f}-"
        f"{s['gap_max_lifetimes']:.2f} of a lifetime apart{': one refresh per session' if s['refresh_window_ok'] else ''}; "
        f"{s['calls_per_identity_per_hour']:.2f} calls per identity per hour); {s['fetches']:,} pod fetches, least time left on credentials served "
        f"{s['min_left_served_seconds']:,.0f} s (floor {s['serve_floor_seconds']:g} s), "
        f"{sum(s['refused'].values())} refused"
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt_ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value / 1000:,.2f} s" if value >= 10_000 else f"{value:,.0f} ms" if value >= 100 else f"{value:,.1f} ms"


def print_table(scenario: dict[str, Any], by_mode: dict[str, dict[str, Any]], out: Any) -> None:
    d, c = by_mode["direct"], by_mode["irsa-cache"]
    rows: list[tuple[str, str, str]] = [
        ("pods", f"{d['pods']:,}", f"{c['pods']:,}"),
        ("pods that got no credentials", f"{d['pods_failed']:,}", f"{c['pods_failed']:,}"),
        ("STS calls (AssumeRoleWithWebIdentity)", f"{d['sts_calls']:,}", f"{c['sts_calls']:,}"),
        ("  throttled (400 Throttling)", f"{d['sts_throttled']:,}", f"{c['sts_throttled']:,}"),
        ("  successful", f"{d['sts_successful']:,}", f"{c['sts_successful']:,}"),
        ("STS calls per identity", f"{d['sts_calls_per_identity']:.1f}", f"{c['sts_calls_per_identity']:.1f}"),
        ("  successful, per identity (max)", f"{d['sts_successful_per_identity']:.1f} ({d['sts_successful_per_identity_max']})",
         f"{c['sts_successful_per_identity']:.1f} ({c['sts_successful_per_identity_max']})"),
        ("time to credentials p50", _fmt_ms(d["ttc_p50_ms"]), _fmt_ms(c["ttc_p50_ms"])),
        ("time to credentials p99", _fmt_ms(d["ttc_p99_ms"]), _fmt_ms(c["ttc_p99_ms"])),
        ("time to credentials max", _fmt_ms(d["ttc_max_ms"]), _fmt_ms(c["ttc_max_ms"])),
        ("  its physical floor p50 / p99", f"{_fmt_ms(d['floor_p50_ms'])} / {_fmt_ms(d['floor_p99_ms'])}",
         f"{_fmt_ms(c['floor_p50_ms'])} / {_fmt_ms(c['floor_p99_ms'])}"),
        ("  its physical floor max", _fmt_ms(d["floor_max_ms"]), _fmt_ms(c["floor_max_ms"])),
        ("failed pods gave up after (p50)", _fmt_ms(d["failed_gave_up_after_p50_ms"]), _fmt_ms(c["failed_gave_up_after_p50_ms"])),
        ("least time left on credentials", f"{d['min_credentials_left_seconds']:,.0f} s", f"{c['min_credentials_left_seconds']:,.0f} s"),
        ("client: pod start lag p99 / max", f"{_fmt_ms(d['start_lag_p99_ms'])} / {_fmt_ms(d['start_lag_max_ms'])}",
         f"{_fmt_ms(c['start_lag_p99_ms'])} / {_fmt_ms(c['start_lag_max_ms'])}"),
        ("client: CPU per pod", _fmt_ms(d["client_cpu_ms_per_pod"]), _fmt_ms(c["client_cpu_ms_per_pod"])),
        ("client: most pods in flight", f"{d['peak_pods_in_flight']:,}", f"{c['peak_pods_in_flight']:,}"),
        ("machine: busy cores (of which others')", f"{d['box_busy_cores']:.2f} ({d['other_cores']:.2f})",
         f"{c['box_busy_cores']:.2f} ({c['other_cores']:.2f})"),
        ("wall time", f"{d['wall_seconds']:.1f} s", f"{c['wall_seconds']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n  {'':<{width}}  {'direct':>16}  {'irsa-cache':>16}", file=out)
    for name, a, b in rows:
        print(f"  {name:<{width}}  {a:>16}  {b:>16}", file=out)
    for mode in MODES:
        for reason, count in by_mode[mode]["failure_reasons"]:
            print(f"  {mode}: {count:,} pods failed: {reason}", file=out)
    print(f"  direct: at most {d['sts_calls_per_session_name_max']} STS attempts by one pod (botocore's legacy retry "
          f"mode allows 5); irsa-cache: at most {c['sts_calls_per_session_name_max']} per identity", file=out)
    from daemon.config import serve_default  # the benchmark runs the daemon with its defaults

    print(f"\n  physical floor: one STS call per identity, admitted at {scenario['sts_rate']:g}/s from a bucket of "
          f"{scenario['sts_bucket']:g} (full at the start), in the order the identities' first pods start, "
          f"answered after {scenario['sts_latency'] * 1000:g} ms; every pod of an identity served the moment its "
          f"call returns. irsa-cache p99 {_fmt_ms(c['ttc_p99_ms'])} against a floor of {_fmt_ms(c['floor_p99_ms'])}"
          f" (the node's own budget, --sts-rate {serve_default('--sts-rate'):g} --sts-burst "
          f"{serve_default('--sts-burst'):g}, "
          f"is not part of the floor)", file=out)
    cores = os.cpu_count() or 1
    offered = scenario["pods"] / scenario["window"]
    print(f"\n  client side: the scenario offers {offered:,.0f} pod starts/s.", file=out)
    for mode in MODES:
        m = by_mode[mode]
        per_pod = m["client_cpu_ms_per_pod"] / 1000
        print(f"    {mode}: {per_pod * 1000:.1f} ms of client CPU per pod, so {cores} cores alone start at most "
              f"~{cores / per_pod:,.0f} pods/s; starts ran behind schedule by p50 {_fmt_ms(m['start_lag_p50_ms'])}, "
              f"p99 {_fmt_ms(m['start_lag_p99_ms'])}; time to credentials counted from the schedule instead: "
              f"p50 {_fmt_ms(m['ttc_from_schedule_p50_ms'])}, p99 {_fmt_ms(m['ttc_from_schedule_p99_ms'])}", file=out)


def draw_chart(path: Path, scenario: dict[str, Any], by_mode: dict[str, dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  chart skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False

    colors = {"direct": "#d95f02", "irsa-cache": "#1b6fb5"}
    fig = plt.figure(figsize=(13, 8.5), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1], hspace=0.45, wspace=0.1)
    cdf = fig.add_subplot(grid[0, :])
    for mode in MODES:
        m = by_mode[mode]
        times = m["ttc_seconds"]
        if times:
            ys = [(n + 1) / m["pods"] for n in range(len(times))]
            cdf.step(times, ys, where="post", color=colors[mode], linewidth=2.2,
                     label=f"{mode}: p50 {_fmt_ms(m['ttc_p50_ms'])}, p99 {_fmt_ms(m['ttc_p99_ms'])}, "
                           f"{m['pods_failed']:,} of {m['pods']:,} pods got no credentials")
    cdf.set_xscale("log")
    cdf.set_ylim(0, 1.02)
    cdf.set_xlabel("time to credentials, seconds (log scale)")
    cdf.set_ylabel("fraction of pods with credentials")
    cdf.set_title("Time to credentials, from each pod's start (CDF; pods that never got credentials keep a curve below 1)")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="center", fontsize=10)  # the curves keep to the top left and the bottom right

    horizon = max(len(by_mode[m]["timeline"]["ok"]) for m in MODES) * BUCKET_SECONDS
    peak = max(max(a + b for a, b in zip(by_mode[m]["timeline"]["ok"], by_mode[m]["timeline"]["throttled"])) for m in MODES)
    axes = [fig.add_subplot(grid[1, 0])]
    axes.append(fig.add_subplot(grid[1, 1], sharey=axes[0], sharex=axes[0]))
    for ax, mode in zip(axes, MODES):
        m = by_mode[mode]
        ok, throttled = m["timeline"]["ok"], m["timeline"]["throttled"]
        xs = [n * BUCKET_SECONDS for n in range(len(ok))]
        ax.bar(xs, ok, width=BUCKET_SECONDS, align="edge", color="#2a9d4a", label="successful")
        ax.bar(xs, throttled, width=BUCKET_SECONDS, align="edge", bottom=ok, color="#d62728", label="throttled")
        starts = [0] * len(ok)
        for at in m["starts"]:  # when each pod really began (later than scheduled if the clients fell behind)
            starts[min(len(starts) - 1, max(0, int(at / BUCKET_SECONDS)))] += 1
        ax.step(xs, starts, where="post", color="#444444", linewidth=1.0, linestyle="--",
                label=f"pod starts (per {BUCKET_SECONDS:g} s)")
        ax.axhline(scenario["sts_rate"] * BUCKET_SECONDS, color="#7f7f7f", linewidth=1, linestyle=":",
                   label=f"STS quota ({scenario['sts_rate']:g}/s)")
        ax.set_title(f"{mode}: {m['sts_calls']:,} STS calls ({m['sts_calls_per_identity']:.1f} per identity), "
                     f"{m['sts_throttled']:,} throttled;\n{m['pods_failed']:,} of {m['pods']:,} pods got no credentials",
                     fontsize=10.5)
        ax.set_xlabel(f"seconds since the burst began (pods start within {scenario['window']:g} s)")
        ax.set_xlim(0, horizon)
        ax.set_ylim(0, peak * 1.3 + 1)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=9, ncol=2)
    axes[0].set_ylabel(f"STS calls per {BUCKET_SECONDS:g} s")
    plt.setp(axes[1].get_yticklabels(), visible=False)
    fig.suptitle(
        f"{scenario['pods']:,} pods, {scenario['identities']} identities, starting within {scenario['window']:g} s; "
        f"STS double: {scenario['sts_rate']:g} calls/s (bucket {scenario['sts_bucket']:g}), "
        f"{scenario['sts_latency'] * 1000:g} ms latency",
        fontsize=12,
    )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _daemon_log_summary(log_path: Path) -> dict[str, Any]:
    """What the daemon said about the burst: warnings by message, 503s, budget cuts."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    audit_outcomes: Counter[str] = Counter()
    examples: list[str] = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        levels[record.get("level", "?")] += 1
        if record.get("logger") == "irsa_cache.audit":
            audit_outcomes[record.get("outcome", "?")] += 1
        elif record.get("level") in ("warning", "error", "critical"):
            text = record.get("message", "")
            messages[text.split(":")[0][:90]] += 1
            if len(examples) < 5:
                examples.append(line[:400])
    return {"levels": dict(levels), "warnings": messages.most_common(8), "audit_outcomes": dict(audit_outcomes),
            "examples": examples}


def _machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import botocore

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import daemon

    source = Path(daemon.__file__).resolve().parent
    in_checkout = source == REPO / "daemon"
    dirty = in_checkout and bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "daemon"],
                                                capture_output=True, text=True).stdout.strip())
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "botocore": botocore.__version__,
            "daemon_source": str(source), "daemon_in_checkout": in_checkout, "commit": commit,
            "daemon_tree_modified": dirty}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _finite(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pods", type=int, default=1000, help="pods that start")
    parser.add_argument("--identities", type=int, default=20, help="service accounts (roles) they spread over")
    parser.add_argument("--window", type=float, default=10.0, help="seconds within which all pods arrive")
    parser.add_argument("--sts-rate", type=float, default=20.0, help="STS double: AssumeRoleWithWebIdentity calls/s admitted")
    parser.add_argument("--sts-bucket", type=float, default=20.0, help="STS double: token bucket size")
    parser.add_argument("--sts-latency", type=float, default=0.05, help="STS double: seconds before every answer")
    # Each worker is held to one core by its GIL and loses time to hundreds of threads
    # contending for it; more processes than cores starts pods closer to their schedule.
    parser.add_argument("--client-procs", type=int, default=4, help="client worker processes")
    parser.add_argument("--client-threads", type=int, default=256, help="pod threads per client worker process")
    parser.add_argument("--steady-hours", type=float, default=24.0, help="virtual hours of the steady-state check")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, help="JSON figures (default bench/results/burst.json; burst-N.json for --pods N other than 1000)")
    parser.add_argument("--chart", type=Path, help="PNG chart (default bench/burst.png; burst-N.png for --pods N other than 1000)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    suffix = "" if args.pods == 1000 else f"-{args.pods}"
    args.results = args.results or HERE / "results" / f"burst{suffix}.json"
    args.chart = args.chart or HERE / f"burst{suffix}.png"
    if args.pods < 1 or args.identities < 1 or args.window <= 0 or args.client_procs < 1 or args.client_threads < 1:
        parser.error("--pods, --identities, --client-procs, --client-threads must be at least 1; --window above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stdout
    have_matplotlib = True
    if not args.no_chart:
        if importlib.util.find_spec("matplotlib") is None:
            have_matplotlib = False
            print(f"matplotlib is not installed: the benchmark runs, but {args.chart} will not be drawn.\n"
                  "  install it with: pip install matplotlib   (or the project's `bench` extra)", file=sys.stderr)

    from daemon.demo import metric_total, scrape
    from daemon.embedded import DEMO_ACCOUNT, Background, Issuer, MotoSts, free_port, write_token

    # SIGTERM as Ctrl-C: unwind, so every child process is stopped by its context manager.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    machine = _machine()
    scenario = {"pods": args.pods, "identities": args.identities, "window": args.window,
                "arrivals": "N independent uniform times in the window (Poisson conditioned on N)",
                "sts_rate": args.sts_rate, "sts_bucket": args.sts_bucket, "sts_latency": args.sts_latency,
                "client_procs": args.client_procs, "client_threads": args.client_threads, "seed": args.seed,
                "daemon_budget": "defaults: --sts-rate 10 --sts-burst 20 --sts-concurrency 8, default wait policy"}
    print(f"burst: {args.pods:,} pods over {args.identities} identities within {args.window:g} s; STS double "
          f"{args.sts_rate:g} calls/s (bucket {args.sts_bucket:g}), {args.sts_latency * 1000:g} ms latency; "
          f"clients: {args.client_procs} processes x {args.client_threads} threads", file=out)
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, botocore "
          f"{machine['botocore']}; daemon from {machine['daemon_source']}"
          f"{' at ' + machine['commit'] if machine['daemon_in_checkout'] else ' (not this checkout)'}"
          f"{' (with uncommitted changes under daemon/)' if machine['daemon_tree_modified'] else ''}", file=out, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="irsa-cache-burst-"))
    rng = random.Random(args.seed)
    issuer = Issuer()
    subjects = [f"system:serviceaccount:team-{i}:app" for i in range(args.identities)]
    roles = [f"arn:aws:iam::{DEMO_ACCOUNT}:role/team-{i}-app" for i in range(args.identities)]
    static_config = issuer.write_static_config(workdir, dict(zip(subjects, roles)))
    arrivals = sorted(rng.uniform(0, args.window) for _ in range(args.pods))
    tokens = workdir / "tokens"
    tokens.mkdir()
    pods = []
    for i, at in enumerate(arrivals):
        identity = i % args.identities
        name = f"app-{uuid.uuid4().hex[:5]}"
        token_file = write_token(tokens / f"pod-{i}.token", issuer.mint(subjects[identity], pod_name=name))
        pods.append(Pod(i=i, identity=identity, at=at, token_file=token_file))
    print(f"minted {len(pods):,} pod tokens; files and logs in {workdir}", file=out, flush=True)

    by_mode: dict[str, dict[str, Any]] = {}
    daemon_report: dict[str, Any] = {}
    floor = {"rate": args.sts_rate, "bucket": args.sts_bucket, "latency": args.sts_latency}
    try:
        with contextlib.ExitStack() as stack:
            moto = stack.enter_context(MotoSts(log_path=workdir / "moto.log"))
            sts_port = free_port()
            sts_url = f"http://127.0.0.1:{sts_port}"
            double = stack.enter_context(Background(
                [sys.executable, str(HERE / "sts_throttling.py"), "--port", str(sts_port), "--upstream", moto.url,
                 "--rate", str(args.sts_rate), "--burst", str(args.sts_bucket), "--latency", str(args.sts_latency)],
                ready_url=f"{sts_url}/__bench__/health", log_path=workdir / "sts-double.log",
            ))
            base_env = _clean_environment()

            def progress() -> dict[str, int]:
                return _http_json(f"{sts_url}/__bench__/stats", timeout=2)

            # --- direct: every pod calls STS itself -------------------------------------------
            _http_json(f"{sts_url}/__bench__/reset", method="POST")
            print("\n[1/3] direct: each pod calls AssumeRoleWithWebIdentity itself ...", file=out, flush=True)
            cpu_before = {name: _proc_cpu_seconds(p.process.pid) for name, p in (("sts", double), ("moto", moto))}
            run = run_pods(
                "direct", pods,
                # AWS_ROLE_SESSION_NAME only names the pod in the double's log, to count its attempts.
                lambda p: {"AWS_ROLE_ARN": roles[p.identity], "AWS_WEB_IDENTITY_TOKEN_FILE": str(p.token_file),
                           "AWS_ROLE_SESSION_NAME": f"pod-{p.i}"},
                {**base_env, "AWS_ENDPOINT_URL_STS": sts_url}, args, workdir, progress,
            )
            calls = _http_json(f"{sts_url}/__bench__/calls")
            by_mode["direct"] = summarize("direct", run, calls, args.identities, floor)
            by_mode["direct"]["server_cpu_seconds"] = {
                name: _proc_cpu_seconds(p.process.pid) - cpu_before[name] for name, p in (("sts", double), ("moto", moto))}
            account_cpu(by_mode["direct"])
            print(f"      done in {run['wall']:.1f} s: {by_mode['direct']['sts_calls']:,} STS calls, "
                  f"{by_mode['direct']['pods_failed']:,} pods without credentials", file=out, flush=True)

            # --- irsa-cache: every pod asks the daemon -----------------------------------------
            time.sleep(1.0)
            _http_json(f"{sts_url}/__bench__/reset", method="POST")
            listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            daemon_log = workdir / "daemon.log"
            daemon = stack.enter_context(Background(
                # -P: the current directory must not shadow the daemon this process imported (PYTHONPATH, or the install)
                [sys.executable, "-P", "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
                 "--static-config", str(static_config), "--region", REGION, "--sts-endpoint-url", sts_url],
                ready_url=f"http://{metrics_listen}/readyz", log_path=daemon_log, env=base_env,
            ))
            metrics_url = f"http://{metrics_listen}/metrics"
            credentials_url = f"http://{listen}/v1/credentials"
            print(f"[2/3] irsa-cache: each pod asks the daemon at {credentials_url} ...", file=out, flush=True)
            before = scrape(metrics_url)
            cpu_before = {name: _proc_cpu_seconds(p.process.pid) for name, p in (("sts", double), ("moto", moto), ("daemon", daemon))}
            run = run_pods(
                "irsa-cache", pods,
                lambda p: {"AWS_CONTAINER_CREDENTIALS_FULL_URI": credentials_url,
                           "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(p.token_file)},
                base_env, args, workdir, progress,
            )
            time.sleep(0.5)  # let the daemon's log and counters settle
            after = scrape(metrics_url)
            calls = _http_json(f"{sts_url}/__bench__/calls")
            by_mode["irsa-cache"] = summarize("irsa-cache", run, calls, args.identities, floor)
            by_mode["irsa-cache"]["server_cpu_seconds"] = {
                name: _proc_cpu_seconds(p.process.pid) - cpu_before[name]
                for name, p in (("sts", double), ("moto", moto), ("daemon", daemon))}

            def delta(name: str, **labels: str) -> float:
                return metric_total(after, name, **labels) - metric_total(before, name, **labels)

            codes = sorted({dict(labels).get("code") for (sample, labels) in after
                            if sample == "irsa_cache_requests_total"} - {None})
            daemon_report = {
                "requests_by_code": {code: int(delta("irsa_cache_requests_total", code=code)) for code in codes
                                     if delta("irsa_cache_requests_total", code=code)},
                "requests_by_outcome": {o: int(delta("irsa_cache_requests_total", outcome=o))
                                        for o in ("hit", "miss", "coalesced", "stale", "overloaded", "error", "denied")
                                        if delta("irsa_cache_requests_total", outcome=o)},
                "sts_calls_by_result": {r: int(delta("irsa_cache_sts_calls_total", result=r))
                                        for r in ("success", "throttled", "denied", "error")
                                        if delta("irsa_cache_sts_calls_total", result=r)},
                "sts_retries": int(delta("irsa_cache_sts_retries_total")),
                "budget_rate_after": metric_total(after, "irsa_cache_sts_budget_rate"),
                "answer_seconds_at_most": histogram_quantiles(before, after, "irsa_cache_request_duration_seconds",
                                                              (0.5, 0.99, 1.0)),
            }
            account_cpu(by_mode["irsa-cache"])
            print(f"      done in {run['wall']:.1f} s: {by_mode['irsa-cache']['sts_calls']:,} STS calls, "
                  f"{by_mode['irsa-cache']['pods_failed']:,} pods without credentials; daemon answered "
                  + ", ".join(f"{n:,} x {c}" for c, n in daemon_report["requests_by_code"].items()), file=out, flush=True)
            stack.close()  # stop the daemon, the double and moto before the in-process check
            daemon_report["log"] = _daemon_log_summary(daemon_log)
    except KeyboardInterrupt:
        print("\ninterrupted: child processes stopped", file=sys.stderr)
        return 130

    print(f"[3/3] steady state: the cache's refresh rules over {args.steady_hours:g} virtual hours ...", file=out, flush=True)
    steady = steady_state(identities=args.identities, pods_per_identity=10, hours=args.steady_hours,
                          session_seconds=3600, sts_latency=args.sts_latency, seed=args.seed)

    print_table(scenario, by_mode, out)
    print(f"\n  irsa-cache daemon: answers {daemon_report['requests_by_code']}, outcomes "
          f"{daemon_report['requests_by_outcome']}, STS results {daemon_report['sts_calls_by_result']}, "
          f"retries {daemon_report['sts_retries']}, budget after {daemon_report['budget_rate_after']:g}/s; log "
          f"levels {daemon_report['log']['levels']}", file=out)
    answer = daemon_report["answer_seconds_at_most"]
    print("  irsa-cache daemon's own answer time (histogram bucket edges): "
          + ", ".join(f"{q} <= {v * 1000:g} ms" for q, v in answer.items()), file=out)
    for message, count in daemon_report["log"]["warnings"]:
        print(f"    daemon log warning x{count}: {message}", file=out)
    for mode in MODES:
        cpu = by_mode[mode]["server_cpu_seconds"]
        print(f"  {mode}: CPU seconds used meanwhile by " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
              + f"; clients {by_mode[mode]['client_cpu_seconds']:.1f}", file=out)
    print(f"\n  {steady_state_line(steady)}", file=out)

    args.results.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python bench/burst.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine, "scenario": scenario, "modes": by_mode, "daemon": daemon_report,
              "steady_state": steady, "workdir": str(workdir)}
    args.results.write_text(json.dumps(_finite(record), indent=1, default=str))
    print(f"\n  figures: {args.results}", file=out)
    if not args.no_chart and have_matplotlib and draw_chart(args.chart, scenario, by_mode):
        print(f"  chart:   {args.chart}", file=out)
    shutil.rmtree(tokens, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
