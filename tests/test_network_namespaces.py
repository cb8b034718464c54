"""A pod reaching the daemon at 169.254.170.23 across a network, as on a node.

Two network namespaces this test creates: the "node", where `irsa-cache init-network`
puts 169.254.170.23/32 on the node, `irsa-cache serve` listens on 169.254.170.23:80
and moto plays STS; and the "pod", joined to the node by a veth pair, with a route to
169.254.170.23 through it, where a real boto3 client configured only by
AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE calls
GetCallerIdentity. The veth addresses (TEST-NET-1, 192.0.2.0/30) exist only inside
these two namespaces; nothing leaves them. Processes and namespaces are removed
at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.embedded import DEMO_ACCOUNT, Issuer, write_token
from tests.conftest import CALLER_IDENTITY_SCRIPT, ROLE_A, SUBJECT_A, pod_environment
from tests.test_init_network import REPO, clean_environment, in_namespace, init_network, ip, network_namespace

NODE_VETH, POD_VETH = "node0", "pod0"
NODE_ADDRESS, POD_ADDRESS = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, inside the test namespaces only
MOTO_PORT = 5000
METRICS = "127.0.0.1:9464"  # the node namespace's own loopback
CREDENTIALS_URL = "http://169.254.170.23/v1/credentials"
STS_URL = f"http://{NODE_ADDRESS}:{MOTO_PORT}"
READY_TIMEOUT_SECONDS = 60
POD_TIMEOUT_SECONDS = 60

# Run in the node namespace: wait for moto and the daemon, and make moto load its STS
# backend now (its first call can take seconds, longer than a pod's SDK waits).
READY_SCRIPT = """
import sys, boto3
from daemon.embedded import wait_until
sts_url, ready_url, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
wait_until(sts_url + "/moto-api/", timeout_seconds=timeout)
boto3.client("sts", region_name="us-east-1", endpoint_url=sts_url, aws_access_key_id="warm",
             aws_secret_access_key="up").assume_role_with_web_identity(
    RoleArn="arn:aws:iam::123456789012:role/warm-up", RoleSessionName="warm-up", WebIdentityToken="x" * 16)
wait_until(ready_url, timeout_seconds=timeout)
"""


@pytest.fixture
def node_and_pod() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair; the pod routes 169.254.170.23 to the node."""
    with network_namespace("node") as node, network_namespace("pod") as pod:
        for namespace in (node, pod):
            ip("-n", namespace, "link", "set", "lo", "up")
        # Created inside the node namespace with its peer put straight into the pod's:
        # neither end ever appears in the machine's own namespace.
        ip("-n", node, "link", "add", NODE_VETH, "type", "veth", "peer", "name", POD_VETH, "netns", pod)
        ip("-n", node, "address", "add", f"{NODE_ADDRESS}/30", "dev", NODE_VETH)
        ip("-n", pod, "address", "add", f"{POD_ADDRESS}/30", "dev", POD_VETH)
        ip("-n", node, "link", "set", NODE_VETH, "up")
        ip("-n", pod, "link", "set", POD_VETH, "up")
        ip("-n", pod, "route", "add", "169.254.170.23/32", "via", NODE_ADDRESS, "dev", POD_VETH)
        yield node, pod


class Processes:
    """Children started in a namespace, each logging to a file; all stopped on exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, namespace: str, *argv: str) -> subprocess.Popen[bytes]:
        with open(self.directory / f"{name}.log", "wb") as log:
            # `ip netns exec` execs the command: the child is the program itself.
            process = subprocess.Popen(in_namespace(namespace, *argv), stdout=log, stderr=log, cwd=REPO,
                                       env=clean_environment())
        self.running[name] = process
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log\n{(self.directory / f'{name}.log').read_text()[-3000:]}"
                         for name in self.running)

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    children = Processes(tmp_path)
    try:
        yield children
    finally:
        children.stop()


def wait_ready(node: str, processes: Processes) -> None:
    """Bounded: the ready check in the node namespace passes, or a child dies, or time runs out."""
    checker = subprocess.Popen(
        in_namespace(node, sys.executable, "-c", READY_SCRIPT, STS_URL, f"http://{METRICS}/readyz",
                     str(READY_TIMEOUT_SECONDS)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=clean_environment(),
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS + 10
    try:
        while checker.poll() is None:
            dead = [name for name, process in processes.running.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"{'exited early: ' + ', '.join(dead) if dead else 'not ready in time'}\n"
                            f"{processes.logs()}")
            time.sleep(0.1)
        output, _ = checker.communicate(timeout=10)
        assert checker.returncode == 0, f"not ready: {output.decode()}\n{processes.logs()}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            checker.kill()
        checker.communicate(timeout=10)  # reaps it and closes its pipe


def test_a_pod_in_another_namespace_gets_credentials_from_169_254_170_23(
    node_and_pod: tuple[str, str], processes: Processes, tmp_path: Path
) -> None:
    node, pod = node_and_pod
    issuer = Issuer()
    static_config = issuer.write_static_config(tmp_path, {SUBJECT_A: ROLE_A})
    token = write_token(tmp_path / "pod.token", issuer.mint(SUBJECT_A, pod_name="app-7d9f"))

    setup = init_network(node)
    assert setup.returncode == 0, setup.stderr
    processes.start("moto", node, sys.executable, "-m", "moto.server", "-H", NODE_ADDRESS, "-p", str(MOTO_PORT))
    processes.start(
        "daemon", node, sys.executable, "-m", "daemon", "serve",
        "--listen", "169.254.170.23:80", "--metrics-listen", METRICS,
        "--static-config", str(static_config), "--region", "us-east-1", "--sts-endpoint-url", STS_URL,
    )
    wait_ready(node, processes)

    environment = pod_environment(CREDENTIALS_URL, token)
    assert {k for k in environment if k.startswith("AWS_CONTAINER_")} == {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"}
    client = subprocess.run(
        in_namespace(pod, sys.executable, "-c", CALLER_IDENTITY_SCRIPT, STS_URL),
        env=environment, capture_output=True, text=True, timeout=POD_TIMEOUT_SECONDS, cwd=REPO,
    )

    assert client.returncode == 0, f"{client.stderr}\n{processes.logs()}"
    assert client.stdout.strip() == f"arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/app-a/team-a.app"
    # The daemon in the node namespace issued them, to this pod: its audit line says so.
    daemon_log = (tmp_path / "daemon.log").read_text()
    audit = [line for line in map(json.loads, daemon_log.splitlines()) if line["logger"] == "irsa_cache.audit"]
    assert [(line["pod"], line["role_arn"]) for line in audit] == [("app-7d9f", ROLE_A)], daemon_log
