"""The one place where the simulator meets the daemon's cache and budget.

Everything that knows the API of `daemon.cache`, `daemon.limiter`, `daemon.models` and
`daemon.errors` is here, so that a change there (how long a caller waits, remembered
refusals, the handoff between generations) is followed by editing this module alone.
The rest of the simulator sees a `SimulatedDaemon` per node: `request(identity, pod,
reply)`, `stop()`, `start(handoff=...)`.

What is real and what is modelled: the `CredentialCache`, `StsBudget` and
`BudgetedSource` are the daemon's own, built by `app.cache_policy()` and
`app.budgeted()` as `irsa-cache serve` builds them; STS is `account.AccountSts`
behind a `CredentialSource`; the HTTP layer is the mapping of outcomes to status
codes that `server.py` makes (200, or the error's status).

With `--sts-cluster-rate`, each generation's budget gets its `ClusterShare` from
`app.cluster_share()` and is told the node count at once (a real daemon reads it from
its DaemonSet at start and every 30 s).

Maintenance runs when the cache says an entry is due (`next_check_at()`), not on the
daemon's one-second tick: one timer per node, moved earlier whenever a request or an
exchange may have made something due sooner. An entry that is due but held back (no
pod of its identity on the node) is looked at again a tick later, as the daemon would.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from datetime import datetime, timezone

from daemon import app, config
from daemon.cache import CredentialCache
from daemon.errors import DaemonError, StsUnavailableError
from daemon.models import CacheKey, Credentials, Identity, VerifiedToken
from daemon.simulate.account import AccountSts
from daemon.simulate.inputs import DaemonKnobs
from daemon.simulate.pods import Reply
from daemon.simulate.vloop import VirtualTimeLoop

EPOCH = 1_800_000_000.0  # wall time at loop time 0: the cache compares expirations against it
ISSUER = "https://oidc.simulated.invalid"
AUDIENCE = "sts.amazonaws.com"
ACCOUNT = "123456789012"
TOKEN_LIFETIME_SECONDS = 86_400.0  # IRSA's projected token; the kubelet rotates it at 80 %
TOKEN_ROTATE_FRACTION = 0.8

_STS_TIMEOUT_SECONDS = config.serve_default("--sts-timeout")  # read once, not per simulated daemon


def identity_key(identity: int) -> CacheKey:
    subject = f"system:serviceaccount:team-{identity}:app"
    who = Identity(issuer=ISSUER, subject=subject, audience=AUDIENCE)
    return CacheKey.of(f"arn:aws:iam::{ACCOUNT}:role/team-{identity}-app", who)


class Tokens:
    """Each pod's projected token, as the kubelet rotates it (the same object until rotation)."""

    def __init__(self) -> None:
        self._issued: dict[int, tuple[int, VerifiedToken]] = {}  # pod -> (rotation, token)

    def of(self, pod: int, key: CacheKey, started_at: float, now: float) -> VerifiedToken:
        period = TOKEN_LIFETIME_SECONDS * TOKEN_ROTATE_FRACTION
        rotation = int((now - started_at) // period)
        issued = self._issued.get(pod)
        if issued is not None and issued[0] == rotation:
            return issued[1]
        who = Identity(issuer=key.issuer, subject=key.subject, audience=key.audience)
        token = VerifiedToken(identity=who, raw=f"pod-{pod}-{rotation}",
                              expires_at=EPOCH + started_at + rotation * period + TOKEN_LIFETIME_SECONDS,
                              fingerprint=f"{pod:012x}"[-12:])
        self._issued[pod] = (rotation, token)
        return token

    def forget(self, pod: int) -> None:
        self._issued.pop(pod, None)


class ModelledSts:
    """`CredentialSource` on the account model: Throttling as sts.py raises it."""

    def __init__(self, *, loop: VirtualTimeLoop, account: AccountSts, session_seconds: float) -> None:
        self._loop = loop
        self._account = account
        self._session_seconds = session_seconds

    async def assume_role(self, *, role_arn: str, token: VerifiedToken) -> Credentials:
        admitted = self._account.call(self._loop.time())
        await asyncio.sleep(self._account.latency)
        if not admitted:
            raise StsUnavailableError("STS refused AssumeRoleWithWebIdentity: Throttling: Rate exceeded",
                                      sts_code="Throttling", throttled=True)
        expires = math.floor(EPOCH + self._loop.time() + self._session_seconds)
        return Credentials(
            access_key_id="ASIASIMULATED", secret_access_key="simulated", session_token="simulated",
            expiration=datetime.fromtimestamp(expires, timezone.utc), account_id=ACCOUNT,
            assumed_role_arn=f"arn:aws:sts::{ACCOUNT}:assumed-role/{role_arn.rsplit('/', 1)[-1]}/sim",
        )


class _Generation:
    """One DaemonSet pod's process: its budget (and its part of a shared one), and the source
    that calls STS through it. It knows the node count at once (the daemon reads it at start)."""

    def __init__(self, daemon: SimulatedDaemon) -> None:
        self.share = app.cluster_share(daemon.sts_settings, rng=daemon.rng)
        if self.share is not None:
            self.share.set_nodes(daemon.nodes())
        self.source = app.budgeted(daemon.sts, daemon.sts_settings, self.share, rng=daemon.rng)


class _NodeSource:
    """What the node's cache calls: the current generation's budget. Tells the daemon when an
    exchange ends, since its entry's next due time moves then."""

    def __init__(self, daemon: SimulatedDaemon) -> None:
        self._daemon = daemon

    async def assume_role(self, *, role_arn: str, token: VerifiedToken, reason: str, ticket: object) -> Credentials:
        daemon = self._daemon
        try:
            return await daemon.generation.source.assume_role(role_arn=role_arn, token=token, reason=reason,
                                                              ticket=ticket)  # type: ignore[arg-type]
        finally:
            daemon.loop.call_soon(daemon.poke)

    def promote(self, ticket: object) -> None:
        self._daemon.generation.source.promote(ticket)  # type: ignore[arg-type]


class SimulatedDaemon:
    """irsa-cache on one node: the real cache and budget, driven on the virtual loop."""

    def __init__(self, *, loop: VirtualTimeLoop, knobs: DaemonKnobs, sts: ModelledSts,
                 in_use: Callable[[CacheKey], bool], nodes: Callable[[], int], rng: random.Random) -> None:
        self.loop = loop
        self.rng = rng  # the jitter of its cache, budget and share: seeded, so a run repeats
        self.knobs = knobs
        self.sts = sts
        self.in_use = in_use
        self.nodes = nodes  # the DaemonSet's desiredNumberScheduled
        cluster = None
        if knobs.cluster_rate_per_second is not None:
            cluster = config.ClusterBudgetSettings(
                rate_per_second=knobs.cluster_rate_per_second,
                burst=knobs.cluster_burst or config.cluster_burst_default(knobs.cluster_rate_per_second),
                daemonset_namespace="simulated", daemonset_name="irsa-cache")
        self.sts_settings = config.StsSettings(
            region="simulated", endpoint_url="http://sts.simulated.invalid",
            session_duration_seconds=int(knobs.session_duration_seconds),
            timeout_seconds=_STS_TIMEOUT_SECONDS,
            rate_per_second=knobs.sts_rate_per_second, burst=knobs.sts_burst,
            concurrency=knobs.sts_concurrency, max_queued=knobs.sts_queue, cluster=cluster,
        )
        self.up = True
        self.generation = _Generation(self)
        self.cache = self._new_cache()
        self._run: asyncio.Task[None] | None = None
        self._open: dict[asyncio.Task[object], Reply] = {}  # requests waiting for an answer
        self._maintenance: asyncio.TimerHandle | None = None
        self._maintenance_at = math.inf
        self._start_run()

    def _new_cache(self) -> CredentialCache:
        policy = app.cache_policy(config.CacheSettings(
            serve_floor_seconds=self.knobs.serve_floor_seconds, refresh_jitter=self.knobs.refresh_jitter,
            idle_evict_seconds=self.knobs.idle_evict_seconds, max_entries=self.knobs.max_entries,
            request_hold_seconds=self.knobs.request_hold_seconds,
            refresh_wait_seconds=self.knobs.refresh_wait_seconds,
        ))
        return CredentialCache(source=_NodeSource(self), clock=self._clock, policy=policy, in_use=self.in_use,
                               in_use_means_live_pod=True, rng=self.rng)  # as in Kubernetes mode: the node's pods are known

    def _clock(self) -> float:
        return EPOCH + self.loop.time()

    def _start_run(self) -> None:
        # cache.run() is what ends a daemon's exchanges when its process stops (its
        # `finally`); its own tick is not used: the interval is longer than any run.
        self._run = asyncio.ensure_future(self.cache.run(interval_seconds=1e12), loop=self.loop)

    # --- requests ---

    def request(self, key: CacheKey, token: VerifiedToken, reply: Reply) -> asyncio.Task[object] | None:
        """GET /v1/credentials from a pod: `reply(status, expires at (loop time))`."""
        if not self.up:
            reply(0, None)
            return None
        task = self.loop.create_task(self.cache.get(key, token))
        self._open[task] = reply
        task.add_done_callback(self._answer)
        return task

    def _answer(self, task: asyncio.Task[object]) -> None:
        reply = self._open.pop(task, None)
        self.poke()
        if reply is None or task.cancelled():
            return  # the pod hung up, or the process ended (and said so)
        error = task.exception()
        if error is None:
            credentials, _ = task.result()  # type: ignore[misc]
            reply(200, credentials.expires_at - EPOCH)
        elif isinstance(error, DaemonError):
            reply(error.status, None)
        else:
            raise error

    # --- maintenance at the entries' due times ---

    def poke(self) -> None:
        """Something may be due sooner: bring the maintenance timer forward if so."""
        if not self.up:
            return
        at = self.cache.next_check_at() - EPOCH
        if at < self._maintenance_at:
            self._schedule_maintenance(max(at, self.loop.time()))

    def _schedule_maintenance(self, at: float) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        self._maintenance_at = at
        self._maintenance = self.loop.call_at(at, self._maintain)

    def _maintain(self) -> None:
        self._maintenance = None
        self._maintenance_at = math.inf
        self.cache.maintain()
        now = self.loop.time()
        at = self.cache.next_check_at() - EPOCH
        if at <= now:  # due but held back: the daemon's next tick
            at = now + config.MAINTENANCE_INTERVAL_SECONDS
        if at < math.inf:
            self._schedule_maintenance(at)

    # --- the DaemonSet pod's life ---

    def nodes_changed(self) -> None:
        """The DaemonSet's node count changed: the shared budget follows (at once, here)."""
        if self.generation.share is not None:
            self.generation.share.set_nodes(self.nodes())

    def stop(self) -> None:
        """The process ends: exchanges under way are cancelled, nothing answers."""
        self.up = False
        open_requests, self._open = self._open, {}
        for task, reply in open_requests.items():
            task.cancel()
            reply(0, None)  # the connection is reset
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance, self._maintenance_at = None, math.inf

    def start(self, *, handoff: bool) -> None:
        """A new process: a fresh budget; the old one's cache entries if handed off, else none.

        The handoff is modelled as the new generation starting with the old one's entries
        (credentials, tokens, refresh times) and none of its exchanges."""
        self.generation = _Generation(self)
        if not handoff:
            self.cache = self._new_cache()
        self.up = True
        self._start_run()
        self.poke()
