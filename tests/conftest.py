"""Shared fixtures: a real STS emulator (moto server) behind a recording proxy, an
OIDC issuer with a fresh key, a fake clock, and daemons started on loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from prometheus_client import REGISTRY

from daemon import app, config
from daemon.__main__ import new_event_loop
from daemon.embedded import DEMO_ACCOUNT, Issuer, MotoSts, write_token
from daemon.models import Clock, CredentialSource, system_clock
from tests.k8s_double import K8sApiDouble, pod, service_account
from tests.sts_double import StsDouble

# `irsa-cache serve` runs on uvloop (daemon.__main__.new_event_loop). The tests of what
# reaches into the loop's sockets, transports and timers (the listeners' bounds, the
# endpoint's answers to hostile input, the drain) run on it and on asyncio's own loop;
# the rest on asyncio's (the daemon's logic does not depend on the loop, and a subprocess
# started with `python -m daemon serve` runs on uvloop as in production).
BOTH_LOOPS = frozenset({"test_listeners.py", "test_security.py", "test_shutdown.py"})


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    if item.path.name in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": new_event_loop}
    return {"asyncio": asyncio.new_event_loop}

ROLE_A = f"arn:aws:iam::{DEMO_ACCOUNT}:role/app-a"
ROLE_B = f"arn:aws:iam::{DEMO_ACCOUNT}:role/app-b"
ROLE_BATCH = f"arn:aws:iam::{DEMO_ACCOUNT}:role/batch"
SUBJECT_A = "system:serviceaccount:team-a:app"
SUBJECT_B = "system:serviceaccount:team-b:app"
DEFAULT_IDENTITIES = {
    SUBJECT_A: ROLE_A,
    SUBJECT_B: ROLE_B,
    "system:serviceaccount:batch:*": ROLE_BATCH,
}


class FakeClock:
    """Wall time that only moves when a test says so."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _close_the_loop_made_for_a_sync_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """looptime's plugin asks the event loop policy for a loop even in a sync test, which
    creates one that nobody closes; its ResourceWarning would then fail whichever test the
    garbage collector happens to run in. Close it where it was made."""
    yield
    if not inspect.iscoroutinefunction(request.function):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # none set (this fixture already cleared it): nothing was made
            return
        if not loop.is_running():
            loop.close()
            asyncio.set_event_loop(None)


@pytest.fixture(scope="session")
def moto_sts() -> Iterator[MotoSts]:
    with MotoSts() as sts:
        # moto loads its STS backend on the first call, which can take seconds: do it now.
        boto3.client("sts", region_name="us-east-1", endpoint_url=sts.url, aws_access_key_id="warm",
                     aws_secret_access_key="up").assume_role_with_web_identity(
            RoleArn=ROLE_A, RoleSessionName="warm-up", WebIdentityToken="x" * 16)
        yield sts


@pytest.fixture(scope="session")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
async def sts(moto_sts: MotoSts) -> AsyncIterator[StsDouble]:
    double = await StsDouble(moto_sts.url).start()
    yield double
    await double.stop()


StartDaemon = Callable[..., Awaitable[app.RunningDaemon]]


def serve_args(static_config: Path, sts_url: str, *extra: str) -> list[str]:
    return [
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--static-config", str(static_config), "--region", "us-east-1",
        "--sts-endpoint-url", sts_url,
        *extra,
    ]


@pytest.fixture
async def start_daemon(tmp_path: Path, issuer: Issuer, sts: StsDouble) -> AsyncIterator[StartDaemon]:
    """Start in-process daemons (stopped at the end of the test) against the STS double."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            *extra_args: str,
            identities: dict[str, str] | None = None,
            clock: Clock = system_clock,
            source: CredentialSource | None = None,
            adjust: Callable[[config.Settings], config.Settings] | None = None,
        ) -> app.RunningDaemon:
            """`adjust` changes settings no flag reaches (limits, deadlines) for a test."""
            static_config = issuer.write_static_config(tmp_path, identities or DEFAULT_IDENTITIES)
            settings = config.parse_serve_args(serve_args(static_config, sts.url, *extra_args), environ={})
            if adjust is not None:
                settings = adjust(settings)
            return await stack.enter_async_context(app.running(settings, clock=clock, source=source))

        yield start


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> app.RunningDaemon:
    return await start_daemon()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@dataclass
class Answer:
    status: int
    content_type: str
    body: dict[str, Any]
    headers: Any


async def fetch(
    http: aiohttp.ClientSession, daemon: app.RunningDaemon, token: str | None, *,
    host: str | None = None, path: str = "/v1/credentials", method: str = "GET",
) -> Answer:
    headers = {} if token is None else {"Authorization": token}
    if host is not None:
        headers["Host"] = host
    url = f"http://{daemon.listen[0]}{path}"
    async with http.request(method, url, headers=headers) as response:
        text = await response.text()
        return Answer(response.status, response.headers.get("Content-Type", ""), json.loads(text) if text else {}, response.headers)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def pod_environment(credentials_url: str, token_file: Path) -> dict[str, str]:
    """What a pod's container sees: the two variables, and no other way to credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=credentials_url,
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


CALLER_IDENTITY_SCRIPT = """
import sys, boto3
sts = boto3.client("sts", region_name="us-east-1", endpoint_url=sys.argv[1])
print(sts.get_caller_identity()["Arn"])
"""


async def boto3_caller_identity(credentials_url: str, token_file: Path, sts_url: str) -> str:
    """Run a real boto3 client in its own process, configured only by the environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLER_IDENTITY_SCRIPT, sts_url,
        env=pod_environment(credentials_url, token_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode().strip()


def token_file(tmp_path: Path, token: str, name: str = "token") -> Path:
    return write_token(tmp_path / name, token)


# --- Kubernetes: the API double, the daemon against it, and a cluster's objects ---

NODE = "node-a"


@pytest.fixture
async def k8s(issuer: Issuer) -> AsyncIterator[K8sApiDouble]:
    double = await K8sApiDouble(issuer=issuer.url, jwks=issuer.jwks()).start()
    yield double
    await double.stop()


StartK8sDaemon = Callable[..., Awaitable[app.RunningDaemon]]


@pytest.fixture
async def start_k8s_daemon(k8s: K8sApiDouble, sts: StsDouble, tmp_path: Path) -> AsyncIterator[StartK8sDaemon]:
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            *extra: str, adjust: Callable[[config.Settings], config.Settings] | None = None
        ) -> app.RunningDaemon:
            settings = config.parse_serve_args(
                ["--directory", "kubernetes", "--kubeconfig", str(kubeconfig), "--node-name", NODE,
                 "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--region", "us-east-1",
                 "--sts-endpoint-url", sts.url, *extra],
                environ={},
            )
            if adjust is not None:
                settings = adjust(settings)
            return await stack.enter_async_context(app.running(settings))

        yield start


class Cluster:
    """Objects in the API double, and tokens minted for pods as the kubelet would."""

    def __init__(self, k8s: K8sApiDouble, issuer: Issuer) -> None:
        self.k8s = k8s
        self.issuer = issuer

    def account(self, namespace: str, name: str, role_arn: str | None) -> dict:
        return self.k8s.create(service_account(namespace, name, role_arn))

    def pod(self, namespace: str, name: str, account: str, node: str = NODE) -> dict:
        return self.k8s.create(pod(namespace, name, node, account))

    def token(self, bound_pod: dict, **claims: object) -> str:
        meta, spec = bound_pod["metadata"], bound_pod["spec"]
        subject = f"system:serviceaccount:{meta['namespace']}:{spec['serviceAccountName']}"
        return self.issuer.mint(subject, pod_name=meta["name"], pod_uid=meta["uid"], **claims)


@pytest.fixture
def cluster(k8s: K8sApiDouble, issuer: Issuer) -> Cluster:
    return Cluster(k8s, issuer)


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.02)
