"""Wiring and supervision: Settings in, a running daemon out.

The one place that builds components: the directory and its trust, the token
verifier, the STS source, the cache around it, and the two listeners. The server
receives ready objects and constructs nothing. `running()` is what both `irsa-cache
serve` and the tests use; `serve()` adds signals, supervision and the drain.

What a failure means, per root task:

- a listen address that cannot be bound, a static config or key-set file that is
  wrong, a kubeconfig that cannot be read: the user can fix it locally, so the
  daemon exits with status 2 and one line saying what to do;
- an upstream that cannot be reached at start (the API server, a key-set URL) or
  later: an outage to wait out, never a reason to exit (every node would crash-loop
  through it). The daemon starts, /readyz says why it is not ready, and the
  informers and the key loader retry with backoff; what is cached keeps being served;
- a root task that raises: a bug in irsa-cache, logged by the task's name, and the
  daemon exits 1 so that the kubelet restarts it. Nothing an upstream sends can
  cause it: every upstream answer is translated at its client.

SIGTERM: /readyz turns 503 ("draining"), the credentials sockets stop accepting,
idle keep-alive connections close (the others after their answer), requests under way (including callers held for an STS exchange) are answered within
`drain_seconds`: when they are not done by then, held callers get 503 with
Retry-After (every SDK retries it, on the next daemon). Then the daemon exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon import cluster_budget, config, handoff, limiter, listeners, metrics, server, sts
from daemon.cache import CachePolicy, CredentialCache
from daemon.directory.base import Directory, RoleChanged, Trust
from daemon.directory.static import load_static_config
from daemon.errors import ConfigError
from daemon.logs import RateLimited, describe
from daemon.models import Clock, CredentialSource, system_clock
from daemon.tokens import FileKeySource, TokenVerifier

log = logging.getLogger(__name__)

CLEANUP_SECONDS = 2.0  # after the drain: close what is left


@dataclass
class RunningDaemon:
    """Handles on a daemon started by `running()`."""

    listen: list[config.Address]  # as bound: a port given as 0 is resolved here
    metrics_listen: config.Address
    cache: CredentialCache
    verifier: server.Verifier
    directory: Directory
    credentials: list[listeners.Listener] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    draining_event: asyncio.Event = field(default_factory=asyncio.Event)  # /readyz says "draining" once set

    @property
    def draining(self) -> bool:
        return self.draining_event.is_set()

    @property
    def credentials_url(self) -> str:
        return f"http://{self.listen[0]}{server.CREDENTIALS_PATH}"

    async def drain(self, seconds: float) -> None:
        """Stop taking connections and answer every request under way within `seconds`."""
        if self.draining:
            return
        self.draining_event.set()
        log.info("draining: no new connections; answering requests under way within %.0f s", seconds)
        for listener in self.credentials:
            listener.stop_accepting()
        tables = {listener.table for listener in self.credentials}
        for table in tables:
            table.close_after_answers()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # Held callers wait for their exchanges until a second before the deadline...
        while any(table.busy for table in tables) and loop.time() < deadline - 1.0:
            await asyncio.sleep(0.05)
        # ...then get their answer now: 503 + Retry-After, or still valid credentials.
        self.cache.release_waiters()
        while any(table.busy for table in tables) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        left = sum(table.busy for table in tables)
        log.info("drained%s", f"; {left} requests still open at the deadline" if left else "")


@dataclass
class Identities:
    """Who callers are and which role they get: the directory and the verifier of its tokens."""

    directory: Directory
    verifier: server.Verifier
    on_role_change: Callable[[RoleChanged], None] = lambda callback: None
    api: Any = None  # the Kubernetes API client (--directory kubernetes), for the shared STS budget


async def static_identities(settings: config.Settings, clock: Clock) -> Identities:
    assert settings.directory.static_config is not None  # config validated it
    trust, directory = load_static_config(settings.directory.static_config)
    verifier = _key_set_verifier(trust, clock)
    if isinstance(trust.key_source, FileKeySource):
        # A file is the user's to fix: a bad one ends the start with its reason.
        try:
            await verifier.load_keys()
        except Exception as exc:  # noqa: BLE001 - reported as a configuration error
            raise ConfigError([f"jwks_file: {trust.key_source.path}: {describe(exc)}"]) from None
    return Identities(directory=directory, verifier=verifier)


async def kubernetes_identities(
    settings: config.Settings, clock: Clock, stack: contextlib.AsyncExitStack
) -> Identities:
    from kubernetes_asyncio import client

    from daemon.directory import kubernetes

    wanted = settings.directory
    configuration = await _kubernetes_configuration(wanted.kubeconfig)
    api = await stack.enter_async_context(client.ApiClient(configuration))
    assert wanted.node_name is not None  # config validated it
    directory = kubernetes.KubernetesDirectory(
        api=api, node_name=wanted.node_name, annotation_prefix=wanted.annotation_prefix,
        pod_wait_seconds=wanted.pod_wait_seconds, timeouts=wanted.timeouts,
        absent_pod_seconds=wanted.absent_pod_seconds,
    )
    metrics.API_SERVER_AVAILABLE.set_function(lambda: 1.0 if directory.api_server_available else 0.0)
    keys = kubernetes.ApiServerKeySource(api, wanted.timeouts)
    verifier: server.Verifier
    if wanted.token_review:
        verifier = kubernetes.TokenReviewVerifier(
            api=api, issuer=wanted.issuer, audience=wanted.audience, clock=clock,
            max_cached=config.VERIFIED_TOKENS_MAX, timeouts=wanted.timeouts, discover_issuer=keys.issuer,
        )
    else:
        trust = Trust(issuer=wanted.issuer, audience=wanted.audience, key_source=keys)  # type: ignore[arg-type]
        verifier = _key_set_verifier(trust, clock, discover_issuer=keys.issuer,
                                     retry_max_seconds=wanted.timeouts.backoff_max_seconds)

    def subscribe(callback: RoleChanged) -> None:
        directory.on_role_change = callback

    return Identities(directory=directory, verifier=verifier, on_role_change=subscribe, api=api)


async def _kubernetes_configuration(kubeconfig: object) -> object:
    """The API client's configuration, or ConfigError saying why it cannot be had."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio import config as kube_config

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            await kube_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig is not None else "in-cluster configuration"
        hint = "" if kubeconfig is not None else (
            " (not running in a pod: pass --kubeconfig FILE, or use --directory static)")
        raise ConfigError([f"{where}: {describe(exc)}{hint}"]) from None
    except Exception as exc:  # noqa: BLE001 - whatever the library meets in a file that is not a kubeconfig
        raise ConfigError([f"--kubeconfig {kubeconfig}: not a kubeconfig the client can use ({describe(exc)})"]) \
            from None
    return configuration


def _key_set_verifier(trust: Trust, clock: Clock, *, discover_issuer: object = None,
                      retry_max_seconds: float = 30.0) -> TokenVerifier:
    return TokenVerifier(
        issuer=trust.issuer,
        audience=trust.audience,
        key_source=trust.key_source,
        clock=clock,
        leeway_seconds=config.TOKEN_LEEWAY_SECONDS,
        refetch_min_interval_seconds=config.JWKS_REFETCH_MIN_INTERVAL_SECONDS,
        max_verified=config.VERIFIED_TOKENS_MAX,
        discover_issuer=discover_issuer,  # type: ignore[arg-type]
        retry_max_seconds=retry_max_seconds,
    )


def cache_policy(settings: config.CacheSettings) -> CachePolicy:
    return CachePolicy(
        serve_floor_seconds=settings.serve_floor_seconds,
        refresh_jitter=settings.refresh_jitter,
        idle_evict_seconds=settings.idle_evict_seconds,
        max_entries=settings.max_entries,
        stale_cutoff_seconds=settings.stale_cutoff_seconds,
        request_hold_seconds=settings.request_hold_seconds,
        refresh_wait_seconds=settings.refresh_wait_seconds,
        refusal_seconds=settings.refusal_seconds,
        invalid_token_refusal_seconds=settings.invalid_token_refusal_seconds,
    )


def cluster_share(settings: config.StsSettings,
                  rng: random.Random | None = None) -> cluster_budget.ClusterShare | None:
    """The node's part of --sts-cluster-rate (None without it); its node count is set later."""
    if settings.cluster is None:
        return None
    return cluster_budget.ClusterShare(cluster_budget.SharePolicy(
        rate_per_second=settings.cluster.rate_per_second, burst=settings.cluster.burst), rng=rng)


def budgeted(source: CredentialSource, settings: config.StsSettings,
             share: cluster_budget.ClusterShare | None = None,
             rng: random.Random | None = None) -> limiter.BudgetedSource:
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
    return limiter.BudgetedSource(source=source, budget=budget, retry=retry, rng=rng)


def raise_fd_limit(wanted_connections: int) -> int:
    """Raise the soft file-descriptor limit to the hard one (containers often start at
    1024) and return how many client connections it leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    room = max(16, soft - config.FD_RESERVE - config.METRICS_LIMITS.max_connections)
    log.info("file descriptors: limit %d (hard %d); up to %d credential connections", soft, hard,
             min(room, wanted_connections))
    if room < wanted_connections:
        log.warning("--max-connections %d does not fit the file descriptor limit %d: using %d",
                    wanted_connections, soft, room)
    return min(room, wanted_connections)


def _handoff_path(path: Path | None) -> Path | None:
    """The handoff socket's path, if handoffs can happen here: its directory exists (the
    DaemonSet mounts it from the host; a daemon run by hand usually has none)."""
    if path is None:
        return None
    if not path.parent.is_dir():
        log.info("handoff: %s does not exist: no warm handoff to or from this daemon", path.parent)
        return None
    return path


async def _sockets(addresses: Sequence[config.Address], role: str, inheritance: handoff.Inheritance | None,
                   handoff_path: Path | None) -> list[socket.socket]:
    """A listening socket per address: the predecessor's if it handed one over, else bound here."""
    sockets: list[socket.socket] = []
    inherited = list(inheritance.sockets) if inheritance is not None else []
    try:
        for address in addresses:
            match = next((item for item in inherited if item[0] == role and item[1].host == address.host
                          and address.port in (0, item[1].port)), None)
            if match is not None:
                inherited.remove(match)
                sockets.append(match[2])
            else:
                # Only a predecessor that hands nothing over lets go of an address on its own.
                patient = inheritance is None and handoff_path is not None and handoff_path.exists()
                sockets.append(await _bind(address, patient=patient))
    except listeners.BindError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError([str(exc)]) from None
    for item in inherited:
        if item[0] == role:  # an address the predecessor had and we do not: it serves it until it stops
            item[2].close()
    return sockets


async def _bind(address: config.Address, *, patient: bool) -> socket.socket:
    """Bind `address`; if a predecessor that did not hand over may still hold it (its
    handoff socket is there), wait up to config.BIND_WAIT_SECONDS for it to let go."""
    deadline = asyncio.get_running_loop().time() + (config.BIND_WAIT_SECONDS if patient else 0)
    while True:
        try:
            return listeners.bind(address)
        except listeners.BindError as exc:
            if exc.errno != errno.EADDRINUSE or asyncio.get_running_loop().time() >= deadline:
                raise
            log.warning("%s; waiting for the process holding it to exit (an irsa-cache that does not hand over?)",
                        exc)
            await asyncio.sleep(1.0)


class StatusFiles:
    """`started` and `ready` in --status-dir, for the kubelet's exec probes: a file each
    process keeps in its own pod, so that a probe never reads another generation's state
    (both generations accept on the same metrics socket during an upgrade)."""

    def __init__(self, directory: Path | None, not_ready: Callable[[], list[str]]) -> None:
        self._directory = directory
        self._not_ready = not_ready

    def started(self) -> None:
        self._write("started", "started\n")

    async def run(self) -> None:
        if self._directory is None:
            return
        ready: bool | None = None
        try:
            while True:
                now_ready = not self._not_ready()
                if now_ready != ready:  # the probe reads whether the file is there: touch it on a change
                    if now_ready:
                        ready = True if self._write("ready", "ready\n") else None  # a failed write: again
                    else:
                        self._remove("ready")
                        ready = False
                await asyncio.sleep(config.STATUS_INTERVAL_SECONDS)
        finally:
            self._remove("ready")

    def _write(self, name: str, text: str) -> bool:
        if self._directory is None:
            return True
        try:
            temporary = self._directory / f".{name}.tmp"
            temporary.write_text(text)
            temporary.replace(self._directory / name)
        except OSError as exc:
            log.warning("cannot write %s in %s: %s", name, self._directory, describe(exc))
            return False  # tried again on the next pass
        return True

    def _remove(self, name: str) -> None:
        if self._directory is not None:
            with contextlib.suppress(OSError):
                (self._directory / name).unlink()


@contextlib.asynccontextmanager
async def running(
    settings: config.Settings,
    *,
    clock: Clock = system_clock,
    source: CredentialSource | None = None,
) -> AsyncIterator[RunningDaemon]:
    """Start every part of the daemon; stop them all on exit. `source` replaces STS in tests."""
    async with contextlib.AsyncExitStack() as stack:
        metrics.GENERATION_STARTED.set(time.time())
        if settings.directory.kind == "kubernetes":
            identities = await kubernetes_identities(settings, clock, stack)
        else:
            identities = await static_identities(settings, clock)
        directory, verifier = identities.directory, identities.verifier
        # Configuration is good: take over from a predecessor (its sockets, its cache), or bind.
        handoff_path = _handoff_path(settings.server.handoff_socket)
        inheritance = await asyncio.to_thread(handoff.inherit, handoff_path) if handoff_path else None
        if inheritance is not None:
            stack.callback(inheritance.connection.close)
        credential_sockets = await _sockets(settings.server.listen, "credentials", inheritance, handoff_path)
        metrics_sockets = await _sockets([settings.server.metrics_listen], "metrics", inheritance, handoff_path)
        for sock in (*credential_sockets, *metrics_sockets):
            stack.callback(sock.close)
        max_connections = raise_fd_limit(settings.server.credentials_limits.max_connections)
        tasks: list[asyncio.Task[None]] = []
        for name, work in (("directory", directory.run()), ("signing keys", verifier.run())):
            task = asyncio.create_task(work, name=name)
            stack.push_async_callback(_cancel, task)
            tasks.append(task)
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
            in_use=directory.in_use, in_use_means_live_pod=settings.directory.kind == "kubernetes",
        )
        if share is not None and settings.sts.cluster is not None:
            follow = asyncio.create_task(cluster_budget.follow_node_count(
                api=identities.api, namespace=settings.sts.cluster.daemonset_namespace,
                name=settings.sts.cluster.daemonset_name, share=share,
                interval_seconds=config.DAEMONSET_READ_INTERVAL_SECONDS,
            ), name="daemonset node count")
            stack.push_async_callback(_cancel, follow)
            tasks.append(follow)
        identities.on_role_change(lambda subject: cache.drop(lambda key: key.subject == subject, "directory"))
        if inheritance is not None:
            taken = cache.restore(inheritance.entries, inheritance.refusals)
            log.info("handoff: %d cached identities taken over", taken)
        draining = asyncio.Event()
        handed_over = asyncio.Event()

        def not_ready() -> list[str]:
            reasons = [r for r in (verifier.not_ready_reason, directory.not_ready_reason) if r]
            if handed_over.is_set():
                reasons.insert(0, "handed over to a successor")
            if draining.is_set():
                reasons.insert(0, "draining (stopping)")
            return reasons

        metrics.DIRECTORY_READY.set_function(lambda: 0.0 if not_ready() else 1.0)
        # Metrics and probes first: /healthz answers and /readyz says why while the directory syncs.
        metrics_runner = web.AppRunner(server.create_metrics_app(not_ready=not_ready), access_log=None,
                                       shutdown_timeout=CLEANUP_SECONDS)
        await metrics_runner.setup()
        stack.push_async_callback(metrics_runner.cleanup)
        (metrics_listener,) = await listeners.serve(
            name="metrics", runner=metrics_runner, sockets=metrics_sockets, limits=settings.server.metrics_limits,
            render=server.raw_error_response,
        )
        stack.callback(metrics_listener.stop_accepting)
        status = StatusFiles(settings.server.status_dir, not_ready)
        status.started()
        await _wait_ready(directory, verifier)

        hosts: frozenset[str] = frozenset()  # filled once the listeners report their ports
        credentials_app = server.create_app(verifier=verifier, directory=directory, cache=cache, hosts=lambda: hosts)
        credentials_runner = web.AppRunner(
            credentials_app, access_log=None, handler_cancellation=True, shutdown_timeout=CLEANUP_SECONDS,
        )
        await credentials_runner.setup()
        stack.push_async_callback(credentials_runner.cleanup)
        credentials = await listeners.serve(
            name="credentials", runner=credentials_runner, sockets=credential_sockets,
            limits=_with_max(settings.server.credentials_limits, max_connections),
            render=server.raw_error_response, shortcut=credentials_app[server.SHORTCUT],
        )
        bound = [listener.address for listener in credentials]
        hosts = server.allowed_hosts(bound)
        daemon = RunningDaemon(listen=bound, metrics_listen=metrics_listener.address, cache=cache, verifier=verifier,
                               directory=directory, credentials=credentials, tasks=tasks, draining_event=draining)

        maintenance = asyncio.create_task(
            cache.run(interval_seconds=config.MAINTENANCE_INTERVAL_SECONDS), name="cache maintenance"
        )
        tasks.append(maintenance)
        tasks.append(asyncio.create_task(status.run(), name="status files"))
        if inheritance is not None:
            await asyncio.to_thread(inheritance.confirm)  # we serve: the predecessor retires

        def retire() -> None:
            """A successor has our sockets and our cache: it refreshes, it answers probes and
            scrapes; we answer what reaches us until SIGTERM."""
            handed_over.set()
            cache.retire()
            metrics_listener.stop_accepting()

        if handoff_path is not None:
            predecessor = handoff.Predecessor(
                path=handoff_path,
                sockets=[*(("credentials", s) for s in credential_sockets), ("metrics", metrics_sockets[0])],
                snapshot=cache.snapshot, on_handed_over=retire,
            )
            try:
                predecessor.start()
            except OSError as exc:
                log.warning("handoff: cannot listen on %s (%s): a successor will start cold", handoff_path,
                            describe(exc))
            else:
                stack.callback(predecessor.close)
        log.info(
            "serving credentials on %s, metrics on %s",
            ", ".join(map(str, bound)), daemon.metrics_listen,
            extra={"sts_endpoint": settings.sts.endpoint_url, "issuer": getattr(verifier, "issuer", None)},
        )
        try:
            yield daemon
        finally:
            for listener in credentials:
                listener.stop_accepting()
            cache.release_waiters()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _with_max(limits: config.ConnectionLimits, max_connections: int) -> config.ConnectionLimits:
    import dataclasses

    return dataclasses.replace(limits, max_connections=max_connections)


async def _wait_ready(directory: Directory, verifier: server.Verifier) -> None:
    """Give the directory and the keys a moment before serving; /readyz tells the rest."""
    try:
        async with asyncio.timeout(config.DIRECTORY_SYNC_WAIT_SECONDS):
            while not (directory.ready and verifier.ready):
                await asyncio.sleep(0.05)
    except TimeoutError:
        reasons = "; ".join(r for r in (verifier.not_ready_reason, directory.not_ready_reason) if r)
        log.warning("not ready after %.0f s (%s); serving, /readyz says not ready", config.DIRECTORY_SYNC_WAIT_SECONDS,
                    reasons)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


_loop_errors = RateLimited(log, per_second=1.0, burst=5)


def _quiet_loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """asyncio reports an accept() that failed for want of file descriptors with a traceback,
    once per retry of every listener: at a bounded rate and in one line here."""
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        _loop_errors.log(logging.WARNING, "%s: %s", context.get("message", "accept failed"), describe(error))
        return
    loop.default_exception_handler(context)


async def serve(settings: config.Settings) -> int:
    """Run until SIGTERM/SIGINT (drain, exit 0), or until a root task fails (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_loop_errors)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    failed: list[asyncio.Task[None]] = []

    def watch(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task)
            stop.set()

    async with running(settings) as daemon:
        for task in daemon.tasks:
            task.add_done_callback(watch)
        await stop.wait()
        if failed:
            for task in failed:
                error = task.exception()
                log.error("task %r failed: %r; exiting so that the kubelet restarts irsa-cache (a bug: please "
                          "report it)", task.get_name(), error, exc_info=error)
            return 1
        log.info("stopping on signal")
        await daemon.drain(settings.server.drain_seconds)
    return 0
