"""Wiring and supervision of `irsa-cache webhook`: settings in, a running webhook out.

`running()` builds the parts (certificate, API client, ServiceAccount reader,
reviewer), binds the HTTPS and metrics listeners and starts the certificate watcher;
tests use it directly. `serve()` adds signals: on SIGTERM the webhook says not ready,
keeps answering for `drain_seconds` while the Service takes it out of rotation (a
call that found no webhook would create its pod without credentials), then stops.

Start-up problems a user can fix (certificate files, kubeconfig, an address already in
use) are ConfigErrors: one line each, exit status 2. The API server being unreachable
is not one: the webhook starts, and a pod admitted meanwhile is created unchanged
with a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon import logs
from daemon.config import Address
from daemon.errors import ConfigError
from daemon.webhook import server
from daemon.webhook import settings as webhook_settings
from daemon.webhook.accounts import ServiceAccounts
from daemon.webhook.admission import AccountSource, Reviewer
from daemon.webhook.settings import WebhookSettings
from daemon.webhook.tls import ReloadingCertificate, TlsFilesError

log = logging.getLogger(__name__)


@dataclass
class RunningWebhook:
    """Handles on a webhook started by `running()`."""

    listen: Address  # as bound: a port given as 0 is resolved here
    metrics_listen: Address
    certificate: ReloadingCertificate
    draining: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{self.listen}{server.MUTATE_PATH}"

    @property
    def ready(self) -> bool:
        return not self.draining and not self.certificate.expired


@contextlib.asynccontextmanager
async def running(settings: WebhookSettings, *, accounts: AccountSource | None = None) -> AsyncIterator[RunningWebhook]:
    """Start the webhook; stop it on exit. `accounts` replaces the API server in tests."""
    certificate = ReloadingCertificate(cert_file=settings.tls_cert, key_file=settings.tls_key)
    try:
        certificate.load()
    except TlsFilesError as exc:
        raise ConfigError([f"--tls-cert/--tls-key: {exc}"]) from exc
    async with contextlib.AsyncExitStack() as stack:
        if accounts is None:
            api = await stack.enter_async_context(await _api_client(settings))
            accounts = ServiceAccounts(
                api=api,
                grace_seconds=webhook_settings.SERVICE_ACCOUNT_GRACE_SECONDS,
                retry_seconds=webhook_settings.SERVICE_ACCOUNT_RETRY_SECONDS,
                request_seconds=webhook_settings.SERVICE_ACCOUNT_REQUEST_SECONDS,
            )
        reviewer = Reviewer(accounts=accounts, settings=settings.injection,
                            deadline_seconds=webhook_settings.ADMISSION_DEADLINE_SECONDS)

        runner = web.AppRunner(server.create_app(reviewer=reviewer), access_log=None,
                               shutdown_timeout=webhook_settings.SHUTDOWN_GRACE_SECONDS)
        stack.push_async_callback(runner.cleanup)
        listen = await _start(runner, settings.listen, "--listen", certificate)

        webhook = RunningWebhook(listen=listen, metrics_listen=settings.metrics_listen, certificate=certificate)
        metrics_runner = web.AppRunner(server.create_metrics_app(ready=lambda: webhook.ready), access_log=None)
        stack.push_async_callback(metrics_runner.cleanup)
        webhook.metrics_listen = await _start(metrics_runner, settings.metrics_listen, "--metrics-listen", None)

        watcher = asyncio.create_task(certificate.watch(settings.tls_reload_interval_seconds),
                                      name="certificate watcher")
        webhook.tasks.append(watcher)
        log.info("webhook on %s, metrics on %s", webhook.url, webhook.metrics_listen, extra={
            "audience": settings.injection.audience, "daemon_namespace": settings.injection.daemon_namespace,
            "certificate_not_after": str(certificate.not_after)})
        try:
            yield webhook
        finally:
            for task in webhook.tasks:
                task.cancel()
            await asyncio.gather(*webhook.tasks, return_exceptions=True)


async def _start(runner: web.AppRunner, address: Address, flag: str,
                 certificate: ReloadingCertificate | None) -> Address:
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port,
                       ssl_context=certificate.context if certificate is not None else None)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError([f"{flag}: cannot listen on {address}: {exc.strerror or exc}"]) from exc
    host, port, *_ = runner.addresses[0]
    return Address(str(host), int(port))


async def _api_client(settings: WebhookSettings) -> Any:
    """A kubernetes-asyncio ApiClient (an async context manager) for the API server."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio import config as kube_config

    configuration = client.Configuration()
    try:
        if settings.kubeconfig is not None:
            await kube_config.load_kube_config(config_file=str(settings.kubeconfig),
                                               client_configuration=configuration)
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
    except Exception as exc:  # the loaders raise ConfigException, but also KeyError/YAML errors on a broken file
        where = f"--kubeconfig: {settings.kubeconfig}" if settings.kubeconfig else "in-cluster configuration"
        hint = "" if settings.kubeconfig else " (outside a cluster, pass --kubeconfig)"
        raise ConfigError([f"{where}: {type(exc).__name__}: {exc}{hint}".replace("\n", " ")]) from exc
    return client.ApiClient(configuration)


async def serve(settings: WebhookSettings) -> int:
    """Run until SIGTERM/SIGINT (then drain), or until a task dies (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running(settings) as webhook:
        stopper = asyncio.create_task(stop.wait(), name="signal wait")
        done, _ = await asyncio.wait([stopper, *webhook.tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper:
                log.error("task %r stopped: %r; shutting down", task.get_name(),
                          task.exception() if not task.cancelled() else "cancelled")
                return 1
        webhook.draining = True
        log.info("stopping on signal: not ready, answering for %g s more", settings.drain_seconds)
        await asyncio.sleep(settings.drain_seconds)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        settings = webhook_settings.webhook_settings_from(args)
        logs.configure(settings.log_level)
        return asyncio.run(serve(settings))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"irsa-cache: error: {problem}", file=sys.stderr)
        return 2
