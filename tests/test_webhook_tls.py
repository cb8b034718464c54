"""The webhook's TLS: a real handshake against certificates made in the test, the
certificate files rotated under a running webhook (served from the next handshake on,
no restart), a broken rotation that changes nothing, and start-up problems that end
in one line and exit status 2."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from daemon.webhook import app, metrics, settings
from tests.certificates import Authority, authority, install, issue, served_serial
from tests.k8s_double import K8sApiDouble
from tests.test_webhook import admission_review
from tests.webhook_cases import account, admitted, container, template

RELOAD_INTERVAL_SECONDS = 0.05


@pytest.fixture
def ca() -> Authority:
    return authority()


@pytest.fixture
async def k8s() -> AsyncIterator[K8sApiDouble]:
    double = await K8sApiDouble().start()
    double.create(account())
    yield double
    await double.stop()


@contextlib.asynccontextmanager
async def started(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> AsyncIterator[app.RunningWebhook]:
    cert, key = install(issue(ca), tmp_path / "tls")
    config = settings.parse_webhook_args(
        ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key),
         "--kubeconfig", str(k8s.write_kubeconfig(tmp_path / "kubeconfig"))], environ={})
    async with app.running(replace(config, tls_reload_interval_seconds=RELOAD_INTERVAL_SECONDS)) as webhook:
        yield webhook


async def handshake(webhook: app.RunningWebhook, context: ssl.SSLContext, server_name: str = "localhost") -> int:
    """Connect as a TLS client would; the serial number of the certificate served."""
    _, writer = await asyncio.open_connection(
        webhook.listen.host, webhook.listen.port, ssl=context, server_hostname=server_name)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        return served_serial(ssl_object.getpeercert(binary_form=True))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def wait_for_serial(webhook: app.RunningWebhook, context: ssl.SSLContext, serial: int) -> float:
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    async with asyncio.timeout(5):
        while await handshake(webhook, context) != serial:
            await asyncio.sleep(RELOAD_INTERVAL_SECONDS)
    return loop.time() - started_at


def reloads(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("irsa_cache_webhook_certificate_reloads_total", {"result": result}) or 0.0


async def test_a_client_that_trusts_the_ca_gets_answers(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    async with started(tmp_path, ca, k8s) as webhook:
        connector = aiohttp.TCPConnector(ssl=ca.client_context())
        async with aiohttp.ClientSession(connector=connector) as https:
            body = admission_review(admitted(template(container("app"))))
            async with https.post(webhook.url, json=body) as response:
                assert response.status == 200
                assert "patch" in (await response.json())["response"]


async def test_a_client_that_does_not_trust_the_ca_is_refused(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    async with started(tmp_path, ca, k8s) as webhook:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await handshake(webhook, authority("another CA").client_context())
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            await handshake(webhook, ca.client_context(), server_name="irsa-cache-webhook.irsa-cache.svc")


async def test_plain_http_gets_no_answer(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    async with started(tmp_path, ca, k8s) as webhook, aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.post(f"http://{webhook.listen}/mutate", json={}) as response:
                await response.read()


async def test_a_rotated_certificate_is_served_without_a_restart(
    tmp_path: Path, ca: Authority, k8s: K8sApiDouble
) -> None:
    async with started(tmp_path, ca, k8s) as webhook:
        client = ca.client_context()
        first = await handshake(webhook, client)
        before = reloads("success")
        renewed = issue(ca)

        install(renewed, tmp_path / "tls")  # cert-manager renewed the Secret; the kubelet swapped the files

        assert await wait_for_serial(webhook, client, renewed.serial) < 2
        assert renewed.serial != first
        assert reloads("success") == before + 1
        expiry = metrics.REGISTRY.get_sample_value("irsa_cache_webhook_certificate_expiry_timestamp_seconds")
        assert expiry == renewed.certificate.not_valid_after_utc.timestamp()


async def test_a_rotation_signed_by_a_new_ca_is_served_too(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    async with started(tmp_path, ca, k8s) as webhook:
        new_ca = authority("rotated CA")
        renewed = issue(new_ca)
        install(renewed, tmp_path / "tls")
        looking = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # sees whatever is served, trusts nothing
        looking.check_hostname = False
        looking.verify_mode = ssl.CERT_NONE
        await wait_for_serial(webhook, looking, renewed.serial)
        assert await handshake(webhook, new_ca.client_context()) == renewed.serial
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(webhook, ca.client_context())


async def test_a_broken_rotation_keeps_the_old_certificate(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    async with started(tmp_path, ca, k8s) as webhook:
        client = ca.client_context()
        first = await handshake(webhook, client)
        errors = reloads("error")
        one, other = issue(ca), issue(ca)
        # A certificate with another certificate's key: what a half-done manual rotation leaves.
        (tmp_path / "tls" / "tls.crt").write_bytes(one.cert_pem)
        (tmp_path / "tls" / "tls.key").write_bytes(other.key_pem)
        async with asyncio.timeout(5):
            while reloads("error") == errors:
                await asyncio.sleep(RELOAD_INTERVAL_SECONDS)
        assert await handshake(webhook, client) == first, "the old pair is still served"
        (tmp_path / "tls" / "tls.crt").write_text("not a certificate")
        await asyncio.sleep(RELOAD_INTERVAL_SECONDS * 4)
        assert await handshake(webhook, client) == first

        install(one, tmp_path / "tls")  # the pair completed
        await wait_for_serial(webhook, client, one.serial)


async def test_an_expired_certificate_makes_the_webhook_unready(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    async with started(tmp_path, ca, k8s) as webhook:
        assert webhook.ready
        old = issue(ca, lifetime=timedelta(minutes=-1))
        install(old, tmp_path / "tls")
        async with asyncio.timeout(5):
            while webhook.ready:
                await asyncio.sleep(RELOAD_INTERVAL_SECONDS)
        async with aiohttp.ClientSession() as plain, plain.get(f"http://{webhook.metrics_listen}/readyz") as response:
            assert response.status == 503


# --- the command: start-up errors, and stopping on SIGTERM ----------------------------


def irsa_cache(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("IRSA_CACHE_", "KUBERNETES_"))}
    return subprocess.run([sys.executable, "-m", "daemon", "webhook", *args], capture_output=True, text=True,
                          timeout=timeout, env={**environment, **(env or {})})


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return install(issue(authority()), tmp_path / "tls")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_start_up_errors_are_one_line_and_exit_2(tmp_path: Path, tls_files: tuple[Path, Path], busy_port: int) -> None:
    cert, key = tls_files
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: [\n")
    other_key = tmp_path / "other.key"
    other_key.write_bytes(issue(authority()).key_pem)
    not_a_cert = tmp_path / "not-a-cert.pem"
    not_a_cert.write_text("hello\n")
    listen = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    cases = [
        ([*listen, "--tls-key", str(key)], "--tls-cert: required"),
        ([*listen, "--tls-cert", str(not_a_cert), "--tls-key", str(key)], "not-a-cert.pem: not a PEM certificate"),
        ([*listen, "--tls-cert", str(cert), "--tls-key", str(other_key)], "does the key belong to the certificate?"),
        ([*listen, "--tls-cert", str(cert), "--tls-key", str(key)], "in-cluster configuration: "),
        ([*listen, "--tls-cert", str(cert), "--tls-key", str(key), "--kubeconfig", str(kubeconfig)],
         f"--kubeconfig: {kubeconfig}: "),
        (["--listen", f"127.0.0.1:{busy_port}", "--metrics-listen", "127.0.0.1:0", "--tls-cert", str(cert),
          "--tls-key", str(key), "--kubeconfig", str(K8sApiDouble().write_kubeconfig(tmp_path / "good"))],
         f"--listen: cannot listen on 127.0.0.1:{busy_port}: "),
    ]
    for args, message in cases:
        result = irsa_cache(*args)
        assert result.returncode == 2, (args, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith("irsa-cache: error: ") and message in line, line
        assert "Traceback" not in result.stderr


async def test_sigterm_drains_then_exits_0(tmp_path: Path, tls_files: tuple[Path, Path], k8s: K8sApiDouble) -> None:
    cert, key = tls_files
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "webhook", "--listen", "127.0.0.1:0",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--tls-cert", str(cert), "--tls-key", str(key),
        "--kubeconfig", str(k8s.write_kubeconfig(tmp_path / "kubeconfig")), "--drain", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    readyz = f"http://127.0.0.1:{metrics_port}/readyz"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as plain:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with plain.get(readyz) as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            async with asyncio.timeout(2):
                while True:
                    async with plain.get(readyz) as response:
                        if response.status == 503:
                            break
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(10):
                status = await process.wait()
        assert status == 0
        assert 1.0 <= time.monotonic() - sent < 8
        stderr = (await process.stderr.read()).decode() if process.stderr else ""
        assert "stopping on signal" in stderr and "Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
