"""The simulation against the real thing at small scale: `irsa-cache serve` processes on
loopback, one per simulated node, real botocore container-provider fetches as the pods (at
the simulation's own start times), moto behind the recording STS double as STS.

Stated tolerance: STS calls and pods that failed must match exactly; throttled answers
within half of the simulated count either way and time to credentials (median) within a
second. What differs, and why the slack: real processes and threads are scheduled by a
busy 2-core machine, HTTP and moto add milliseconds, and the real clock does not jump.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from daemon.embedded import DEMO_ACCOUNT, Issuer, write_token
from daemon.simulate.inputs import Inputs, plan
from daemon.simulate.run import ModeResult, simulate
from tests.conftest import pod_environment
from tests.sts_double import StsCall, StsDouble, sts_error

START_TIMEOUT_SECONDS = 30.0
SERVING = re.compile(r"serving credentials on (127\.0\.0\.1:\d+)")


def subject(identity: int) -> str:
    return f"system:serviceaccount:team-{identity}:app"


@dataclass
class Node:
    process: asyncio.subprocess.Process
    url: str


@contextlib.asynccontextmanager
async def daemons(count: int, static_config: Path, sts_url: str, logs: Path) -> AsyncIterator[list[Node]]:
    """`count` irsa-cache processes with their default cache and budget, each on its own port."""
    started: list[tuple[asyncio.subprocess.Process, Path]] = []
    try:
        for n in range(count):
            log = logs / f"daemon-{n}.log"
            with log.open("wb") as sink:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "daemon", "serve", "--directory", "static",
                    "--static-config", str(static_config), "--listen", "127.0.0.1:0",
                    "--metrics-listen", "127.0.0.1:0", "--region", "us-east-1", "--sts-endpoint-url", sts_url,
                    stdout=asyncio.subprocess.DEVNULL, stderr=sink,
                    env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IRSA_CACHE_"))},
                )
            started.append((process, log))
        nodes = []
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for process, log in started:
            while not (found := SERVING.search(log.read_text())):
                assert process.returncode is None, log.read_text()
                assert time.monotonic() < deadline, f"no daemon listening after {START_TIMEOUT_SECONDS:g} s"
                await asyncio.sleep(0.05)
            nodes.append(Node(process, f"http://{found.group(1)}/v1/credentials"))
        yield nodes
    finally:
        for process, _ in started:
            if process.returncode is None:
                process.terminate()
        for process, _ in started:
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(process.wait(), timeout=10)


def fetch_as_a_pod(url: str, token_file: Path, delay: float, clock_zero: float) -> float | None:
    """One pod: wait until its start time, then botocore's container provider, as the SDK runs it.
    Returns the seconds from its start to credentials, or None if the SDK gave up."""
    from botocore.credentials import ContainerProvider

    time.sleep(max(0.0, clock_zero + delay - time.monotonic()))
    started = time.monotonic()
    try:
        credentials = ContainerProvider(environ=pod_environment(url, token_file)).load()
        credentials.get_frozen_credentials()
    except Exception:
        return None
    return time.monotonic() - started


class TokenBucket:
    """The account's quota, in real time: a fault for the STS double that answers Throttling."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()
        self.throttled = 0

    def __call__(self, call: StsCall) -> web.Response | None:
        if call.action != "AssumeRoleWithWebIdentity":
            return None
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        self.throttled += 1
        return sts_error("Throttling", "Rate exceeded")


@dataclass
class Measured:
    sts_calls: int
    throttled: int
    failed_pods: int
    ttc: list[float]


async def run_for_real(inputs: Inputs, issuer: Issuer, sts: StsDouble, tmp_path: Path) -> Measured:
    roles = {subject(i): f"arn:aws:iam::{DEMO_ACCOUNT}:role/team-{i}" for i in range(inputs.identities)}
    static_config = issuer.write_static_config(tmp_path, roles)
    bucket = TokenBucket(inputs.account_rate_per_second, inputs.burst)
    sts.delay_seconds = inputs.sts_latency_seconds
    sts.fault = bucket
    starts = plan(inputs).starts
    token_files = [write_token(tmp_path / f"token-{s.pod}", issuer.mint(subject(s.identity))) for s in starts]
    async with daemons(inputs.nodes, static_config, sts.url, tmp_path) as nodes:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=len(starts)) as pool:
            zero = time.monotonic() + 0.5  # every thread is up before the first pod starts
            waits = [loop.run_in_executor(pool, fetch_as_a_pod, nodes[s.node].url, token_files[s.pod], s.at, zero)
                     for s in starts]
            results = await asyncio.wait_for(asyncio.gather(*waits), timeout=60)
    admitted = sts.assume_calls
    return Measured(sts_calls=len(admitted) - bucket.throttled, throttled=bucket.throttled,
                    failed_pods=sum(1 for r in results if r is None), ttc=sorted(r for r in results if r is not None))


@pytest.mark.parametrize("rate", [pytest.param(50, id="ample-quota"), pytest.param(3, id="throttling-quota")])
async def test_real_daemons_agree_with_the_simulation(
    rate: int, issuer: Issuer, sts: StsDouble, tmp_path: Path
) -> None:
    inputs = Inputs(nodes=4, identities=3, pods_per_identity=8, ramp_seconds=0.5, account_rate_per_second=rate,
                    account_burst=rate, sts_latency_seconds=0.05)
    # The simulation runs its own (virtual-time) loop: not inside this test's.
    simulated: ModeResult = await asyncio.to_thread(simulate, inputs, plan(inputs), "irsa-cache")

    real = await run_for_real(inputs, issuer, sts, tmp_path)

    assert real.sts_calls == simulated.sts_calls == 12  # one per node and identity
    assert real.failed_pods == simulated.failed_pods == 0
    assert abs(real.throttled - simulated.throttled) <= simulated.throttled / 2, (real, simulated)
    assert simulated.ttc_p50_seconds is not None
    assert abs(statistics.median(real.ttc) - simulated.ttc_p50_seconds) <= 1.0, (real.ttc, simulated)
