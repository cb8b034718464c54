"""The STS budget shared by every node (`--sts-cluster-rate`): a guaranteed share, and borrowing.

STS's quota is one per account and region. Per-node budgets do not add up to it: a
thousand nodes at 10 calls/s may fire 10,000/s, and each cut to its 0.5/s floor is
still 500/s. A static split (rate / nodes on each) never throttles, but an idle node's
slice is wasted while a busy one crawls at its own. Here each node:

- holds its fair share, `rate / nodes`, as a guaranteed rate, with a burst of a
  little less than `burst / nodes` (`burst_fraction`: STS's own bucket is a guess,
  and calls from many nodes do not arrive in step): when every node bursts at once,
  together they ask what the account allows, so STS need not throttle. The node
  count is its DaemonSet's `status.desiredNumberScheduled` (not the pod count, which
  doubles during a surge), read every `DAEMONSET_READ_INTERVAL_SECONDS`; the share,
  and so the floor, falls as nodes are added;
- borrows above its share while exchanges have waited for `raise_interval_seconds`
  and STS does not throttle it: every `raise_interval_seconds` (whether or not a call went through meanwhile: a
  node whose share is one call every few seconds must still be able to borrow), its
  rate grows, first by a quarter, then by half, then doubling, up to the whole
  cluster rate; a few busy nodes get the quota idle ones leave within seconds, while
  the first step of many busy nodes overshoots the account by a quarter;
- on `Throttling` cuts its rate to `cut_to` of what it was (never below its share),
  keeps its bucket, and does not borrow again for a while: 1-2x `hold_first_seconds`,
  doubling with every wave of throttling up to `hold_max_seconds`, back to the first
  after `calm_seconds` without one. Throttling means the quota is in use: others need
  their share. (Falling straight back to the share would strand the busy nodes of a
  cluster that is mostly idle at a call every few seconds each for the whole hold.)
- when it had nothing to do for a while, starts again from its share (its borrowed
  rate halves every `raise_interval_seconds` of idleness).

`ClusterShare` is the policy, pure and on the caller's clock; `limiter.StsBudget`
asks it for its rate and tells it of throttles and successes. `follow_node_count`
keeps it told of the node count. Until the count is first read, a daemon uses its
per-node budget (`--sts-rate`), as without this flag.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon import metrics
from daemon.backoff import capped
from daemon.logs import describe

log = logging.getLogger(__name__)

FIRST_STEP = 0.25  # the first raise above the share: +25 %
MAX_STEP = 1.0  # then +50 %, then doubling at most


@dataclass(frozen=True, kw_only=True)
class SharePolicy:
    rate_per_second: float  # the whole cluster's
    burst: int  # the whole cluster's
    raise_interval_seconds: float = 0.5
    cut_to: float = 0.3  # on throttling, what is kept of the borrowing (never below the share)
    hold_first_seconds: float = 10.0
    hold_max_seconds: float = 300.0
    calm_seconds: float = 60.0
    wave_seconds: float = 1.0  # throttles this close together are one wave
    burst_fraction: float = 0.8  # of the node's part of the cluster's burst


class ClusterShare:
    """One node's part of the cluster's STS rate. Times are the caller's (the loop's)."""

    def __init__(self, policy: SharePolicy, *, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.nodes: int | None = None
        self.level = 1.0  # the rate is share * level
        self._step = FIRST_STEP
        self._rng = rng or random.Random()
        self._raised_at: float | None = None  # None: no exchange waiting yet since idle
        self._blocked_until = -math.inf
        self._hold = policy.hold_first_seconds
        self._last_throttle = -math.inf
        self.on_change: Callable[[], None] = lambda: None  # the node count changed

    @property
    def active(self) -> bool:
        return self.nodes is not None

    @property
    def share(self) -> float:
        """The guaranteed rate: the cluster's rate over the node count."""
        assert self.nodes is not None
        return self.policy.rate_per_second / self.nodes

    @property
    def rate(self) -> float:
        return min(self.policy.rate_per_second, self.share * self.level)

    @property
    def capacity(self) -> float:
        """Bucket size: the cluster's burst in the same part as the rate; at least one call."""
        part = self.policy.burst * self.policy.burst_fraction * self.rate / self.policy.rate_per_second
        return max(1.0, part)

    def initial_tokens(self) -> float:
        """What a node starts with: its part of the burst. Under one call, a random part of
        one, so that thousands of nodes do not all make their first call at the same moment."""
        part = self.policy.burst * self.policy.burst_fraction / self.nodes if self.nodes else 1.0
        return part if part >= 1.0 else self._rng.random()

    def set_nodes(self, nodes: int) -> None:
        if nodes < 1 or nodes == self.nodes:
            return
        self.nodes = nodes
        self.level = min(self.level, float(nodes))
        metrics.STS_CLUSTER_NODES.set(nodes)
        metrics.STS_BUDGET_SHARE.set(self.share)
        self.on_change()

    def throttled(self, now: float) -> None:
        """Back towards the share; no borrowing for a while, longer with every wave."""
        self._step = FIRST_STEP
        if now - self._last_throttle >= self.policy.calm_seconds:
            self._hold = self.policy.hold_first_seconds
        if now - self._last_throttle >= self.policy.wave_seconds:
            self.level = max(1.0, self.level * self.policy.cut_to)
            self._blocked_until = now + self._hold * (1.0 + self._rng.random())
            self._hold = min(self.policy.hold_max_seconds, self._hold * 2)
        self._last_throttle = now

    def succeeded(self, now: float, *, backlog: bool) -> None:
        """A call went through: borrow a step more if exchanges wait and nothing forbids it."""
        self.grow(now, backlog=backlog)

    def grow(self, now: float, *, backlog: bool) -> None:
        """Exchanges are waiting: borrow a step more if the last step is old enough and STS has
        not throttled lately. (Called on every grant round, not only on successes: a node whose
        share is a call every few seconds would otherwise borrow too slowly to matter.)"""
        if not backlog:
            return
        if self._raised_at is None:
            self._raised_at = now  # exchanges wait from now on: the first step comes an interval later
            return
        if now < self._blocked_until or now - self._raised_at < self.policy.raise_interval_seconds:
            return
        assert self.nodes is not None
        if self.level >= self.nodes:
            return
        self.level = min(float(self.nodes), self.level * (1.0 + self._step))
        self._step = min(self._step * 2, MAX_STEP)
        self._raised_at = now

    def resume(self, idle_seconds: float) -> None:
        """Work again after `idle_seconds` with nothing to do: borrowing decays meanwhile."""
        self._raised_at = None
        if idle_seconds > 0 and self.level > 1.0:
            halvings = idle_seconds / self.policy.raise_interval_seconds
            # Past 64 halvings nothing is left to borrow (and 2 ** halvings would overflow).
            self.level = 1.0 if halvings >= 64 else max(1.0, self.level / 2**halvings)
            self._step = FIRST_STEP


async def follow_node_count(*, api: Any, namespace: str, name: str, share: ClusterShare,
                            interval_seconds: float, timeout_seconds: float = 10.0) -> None:
    """Read the DaemonSet's `status.desiredNumberScheduled` now and every `interval_seconds`
    (jittered), until cancelled. A failed read keeps the last count; it never ends by itself.

    A GET of one named object: RBAC `get` on that DaemonSet alone (`resourceNames`)."""
    from kubernetes_asyncio import client

    apps = client.AppsV1Api(api)
    rng = random.Random()
    failures = 0
    while True:
        try:
            daemonset = await apps.read_namespaced_daemon_set(name, namespace, _request_timeout=timeout_seconds)
            desired = daemonset.status.desired_number_scheduled if daemonset.status is not None else None
            if not desired or desired < 1:
                raise ValueError(f"status.desiredNumberScheduled is {desired!r}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the API server's trouble must not stop the daemon
            failures += 1
            metrics.DAEMONSET_READS.labels(result="error").inc()
            log.warning("cannot read DaemonSet %s/%s for the STS budget's node count (%s); %s",
                        namespace, name, _describe(exc),
                        f"keeping {share.nodes} nodes" if share.active else "using the per-node budget meanwhile")
        else:
            failures = 0
            metrics.DAEMONSET_READS.labels(result="ok").inc()
            if desired != share.nodes:
                log.info("STS budget shared by %d nodes: %.3g calls/s each, %g for the cluster", desired,
                         share.policy.rate_per_second / desired, share.policy.rate_per_second)
            share.set_nodes(desired)
        # After a failure, try again sooner (but not in a tight loop): the count may be unknown.
        wait = interval_seconds if failures == 0 else capped(1.0, interval_seconds, failures)
        await asyncio.sleep(wait * rng.uniform(0.9, 1.1))


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return describe(exc)
