"""Wiring and supervision: Settings in, a running daemon out.

The one place that builds components: the directory and its trust, the token
verifier, the STS source, the cache around it, and the two HTTP listeners. The
server receives ready objects and constructs nothing. `running()` is what both
`irsa-cache serve` and the tests use; `serve()` adds signals and supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon import cluster_budget, config, limiter, server, sts
from daemon.cache import CachePolicy, CredentialCache
from daemon.directory.base import Directory, RoleChanged, Trust
from daemon.directory.static import load_static_config
from daemon.errors import ConfigError
from daemon.models import Clock, CredentialSource, system_clock
from daemon.tokens import TokenVerifier

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0  # well inside a pod's default 30 s termination grace
DIRECTORY_SYNC_WAIT_SECONDS = 10.0


@dataclass
class RunningDaemon:
    """Handles on a daemon started by `running()`."""

    listen: list[config.Address]  # as bound: a port given as 0 is resolved here
    metrics_listen: config.Address
    cache: CredentialCache
    verifier: server.Verifier
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def credentials_url(self) -> str:
        return f"http://{self.listen[0]}{server.CREDENTIALS_PATH}"


@dataclass
class Identities:
    """Who callers are and which role they get: the directory and the verifier of its tokens."""

    directory: Directory
    verifier: server.Verifier
    issuer: str
    on_role_change: Callable[[RoleChanged], None] = lambda callback: None
    api: Any = None  # the Kubernetes API client (--directory kubernetes), for the shared STS budget


async def static_identities(settings: config.Settings, clock: Clock) -> Identities:
    assert settings.directory.static_config is not None  # config validated it
    trust, directory = load_static_config(settings.directory.static_config)
    return Identities(directory=directory, verifier=await _key_set_verifier(trust, clock), issuer=trust.issuer)


async def kubernetes_identities(
    settings: config.Settings, clock: Clock, stack: contextlib.AsyncExitStack
) -> Identities:
    from kubernetes_asyncio import client
    from kubernetes_asyncio import config as kube_config

    from daemon.directory import kubernetes

    wanted = settings.directory
    configuration = client.Configuration()
    if wanted.kubeconfig is not None:
        await kube_config.load_kube_config(config_file=str(wanted.kubeconfig), client_configuration=configuration)
    else:
        kube_config.load_incluster_config(client_configuration=configuration)
    api = await stack.enter_async_context(client.ApiClient(configuration))
    assert wanted.node_name is not None  # config validated it
    directory = kubernetes.KubernetesDirectory(
        api=api, node_name=wanted.node_name, annotation_prefix=wanted.annotation_prefix,
        pod_wait_seconds=wanted.pod_wait_seconds,
    )
    keys = kubernetes.ApiServerKeySource(api)
    try:
        issuer = wanted.issuer or await keys.issuer()
    except Exception as exc:
        raise ConfigError([f"--issuer: cannot read the API server's discovery document: {exc}"]) from exc
    verifier: server.Verifier
    if wanted.token_review:
        verifier = kubernetes.TokenReviewVerifier(
            api=api, issuer=issuer, audience=wanted.audience, clock=clock, max_cached=config.VERIFIED_TOKENS_MAX
        )
    else:
        verifier = await _key_set_verifier(Trust(issuer=issuer, audience=wanted.audience, key_source=keys), clock)

    def subscribe(callback: RoleChanged) -> None:
        directory.on_role_change = callback

    return Identities(directory=directory, verifier=verifier, issuer=issuer, on_role_change=subscribe, api=api)


async def _key_set_verifier(trust: Trust, clock: Clock) -> TokenVerifier:
    verifier = TokenVerifier(
        issuer=trust.issuer,
        audience=trust.audience,
        key_source=trust.key_source,
        clock=clock,
        leeway_seconds=config.TOKEN_LEEWAY_SECONDS,
        refetch_min_interval_seconds=config.JWKS_REFETCH_MIN_INTERVAL_SECONDS,
        max_verified=config.VERIFIED_TOKENS_MAX,
    )
    try:
        await verifier.load_keys()
    except Exception as exc:
        raise ConfigError([f"signing keys: cannot load from {trust.key_source.description}: {exc}"]) from exc
    return verifier


def cache_policy(settings: config.CacheSettings) -> CachePolicy:
    return CachePolicy(
        serve_floor_seconds=settings.serve_floor_seconds,
        refresh_jitter=settings.refresh_jitter,
        idle_evict_seconds=settings.idle_evict_seconds,
        max_entries=settings.max_entries,
        stale_cutoff_seconds=settings.stale_cutoff_seconds,
        request_hold_seconds=settings.request_hold_seconds,
    )


def cluster_share(settings: config.StsSettings) -> cluster_budget.ClusterShare | None:
    """The node's part of --sts-cluster-rate (None without it); its node count is set later."""
    if settings.cluster is None:
        return None
    return cluster_budget.ClusterShare(cluster_budget.SharePolicy(
        rate_per_second=settings.cluster.rate_per_second, burst=settings.cluster.burst))


def budgeted(source: CredentialSource, settings: config.StsSettings,
             share: cluster_budget.ClusterShare | None = None) -> limiter.BudgetedSource:
    budget = limiter.StsBudget(
        limiter.BudgetPolicy(
            rate_per_second=settings.rate_per_second,
            burst=settings.burst,
            concurrency=settings.concurrency,
            max_queued=settings.max_queued,
            min_rate_per_second=config.STS_MIN_RATE_PER_SECOND,
        ),
        share,
    )
    retry = limiter.RetryPolicy(
        max_attempts=config.STS_MAX_ATTEMPTS, deadline_seconds=config.STS_EXCHANGE_DEADLINE_SECONDS
    )
    return limiter.BudgetedSource(source=source, budget=budget, retry=retry)


async def _start_sites(runner: web.AppRunner, addresses: tuple[config.Address, ...]) -> list[config.Address]:
    await runner.setup()
    for address in addresses:
        await web.TCPSite(runner, address.host, address.port).start()
    return [config.Address(str(host), int(port)) for host, port, *_ in runner.addresses]


@contextlib.asynccontextmanager
async def running(
    settings: config.Settings,
    *,
    clock: Clock = system_clock,
    source: CredentialSource | None = None,
) -> AsyncIterator[RunningDaemon]:
    """Start every part of the daemon; stop them all on exit. `source` replaces STS in tests."""
    async with contextlib.AsyncExitStack() as stack:
        if settings.directory.kind == "kubernetes":
            identities = await kubernetes_identities(settings, clock, stack)
        else:
            identities = await static_identities(settings, clock)
        directory, verifier = identities.directory, identities.verifier
        directory_task = asyncio.create_task(directory.run(), name="directory")
        stack.push_async_callback(_cancel, directory_task)
        if source is None:
            source = await stack.enter_async_context(
                sts.StsSource(
                    region=settings.sts.region,
                    endpoint_url=settings.sts.endpoint_url,
                    session_duration_seconds=settings.sts.session_duration_seconds,
                    timeout_seconds=settings.sts.timeout_seconds,
                )
            )
        share = cluster_share(settings.sts)
        cache = CredentialCache(
            source=budgeted(source, settings.sts, share), clock=clock, policy=cache_policy(settings.cache),
            in_use=directory.in_use,
        )
        node_count: list[asyncio.Task[None]] = []
        if share is not None and settings.sts.cluster is not None:
            node_count.append(asyncio.create_task(cluster_budget.follow_node_count(
                api=identities.api, namespace=settings.sts.cluster.daemonset_namespace,
                name=settings.sts.cluster.daemonset_name, share=share,
                interval_seconds=config.DAEMONSET_READ_INTERVAL_SECONDS,
            ), name="daemonset node count"))
            stack.push_async_callback(_cancel, node_count[0])
        identities.on_role_change(lambda subject: cache.drop(lambda key: key.subject == subject, "directory"))
        await _wait_ready(directory)

        hosts: frozenset[str] = frozenset()  # filled once the ports are bound
        app = server.create_app(
            verifier=verifier, directory=directory, cache=cache, hosts=lambda: hosts
        )
        credentials_runner = web.AppRunner(
            app, access_log=None, max_field_size=config.MAX_HEADER_BYTES, shutdown_timeout=SHUTDOWN_GRACE_SECONDS
        )
        stack.push_async_callback(credentials_runner.cleanup)
        bound = await _start_sites(credentials_runner, settings.server.listen)
        hosts = server.allowed_hosts(bound)

        metrics_app = server.create_metrics_app(ready=lambda: verifier.ready and directory.ready)
        metrics_runner = web.AppRunner(metrics_app, access_log=None)
        stack.push_async_callback(metrics_runner.cleanup)
        (metrics_bound, *_) = await _start_sites(metrics_runner, (settings.server.metrics_listen,))

        maintenance = asyncio.create_task(
            cache.run(interval_seconds=config.MAINTENANCE_INTERVAL_SECONDS), name="cache maintenance"
        )
        daemon = RunningDaemon(
            listen=bound, metrics_listen=metrics_bound, cache=cache, verifier=verifier,
            tasks=[maintenance, directory_task, *node_count],
        )
        log.info(
            "serving credentials on %s, metrics on %s",
            ", ".join(map(str, bound)), metrics_bound,
            extra={"sts_endpoint": settings.sts.endpoint_url, "issuer": identities.issuer},
        )
        try:
            yield daemon
        finally:
            for task in daemon.tasks:
                task.cancel()
            await asyncio.gather(*daemon.tasks, return_exceptions=True)


async def _wait_ready(directory: Directory) -> None:
    """Give the directory a moment to sync before serving; /readyz tells the rest."""
    try:
        async with asyncio.timeout(DIRECTORY_SYNC_WAIT_SECONDS):
            while not directory.ready:
                await asyncio.sleep(0.05)
    except TimeoutError:
        log.warning("directory not ready after %.0f s; serving, /readyz says not ready", DIRECTORY_SYNC_WAIT_SECONDS)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def serve(settings: config.Settings) -> int:
    """Run until SIGTERM/SIGINT, or until a root task dies (then exit non-zero)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running(settings) as daemon:
        stopper = asyncio.create_task(stop.wait(), name="signal wait")
        done, _ = await asyncio.wait([stopper, *daemon.tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper:
                log.error("task %r stopped: %r; shutting down", task.get_name(), task.exception() if not task.cancelled() else "cancelled")
                return 1
        log.info("stopping on signal")
    return 0
