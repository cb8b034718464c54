"""Per-pod caching: a node agent that caches credentials for each pod alone, applied to STS.

The model of EKS Pod Identity's node agent (aws/eks-pod-identity-agent,
`internal/credsretriever/refreshing_cache.go`), with STS in place of EKS Auth:

- the cache key is the pod's own service-account token, so every pod costs one call
  at start however many pods of its identity the node runs;
- a cached answer is served while more than 15 s are left; a miss calls STS at once,
  inside the pod's request, with the Go SDK's standard retries (`sdk.GO_STANDARD`, one
  retry token bucket per agent), and is abandoned when the pod hangs up (the request's
  context is cancelled);
- entries are refreshed in the background, at most 3 a second per node (the agent's
  `--max-service-qps`); a refresh that fails or is refused by that limiter is tried
  again 1-2 minutes later while the old credentials last. The agent renews at the
  credentials' expiry (EKS Auth's hours-long sessions leave the SDKs time); applied to
  one-hour STS sessions that would hand pods credentials inside their SDK's refresh
  window, so here it renews at the same point irsa-cache does (half the lifetime,
  +/- the jitter), which keeps the comparison about what is shared, not when;
- nothing paces cold calls, and a restarted agent starts empty.
"""

from __future__ import annotations

import math
import random

from daemon.simulate import sdk
from daemon.simulate.account import AccountSts
from daemon.simulate.pods import NO_ANSWER, Pod, Reply
from daemon.simulate.vloop import VirtualTimeLoop

MIN_TTL_SECONDS = 15.0
REFRESH_PER_SECOND = 3.0
REFRESH_RETRY_SECONDS = 60.0  # plus up to as much jitter


class _Entry:
    __slots__ = ("expires_at", "refresh_at", "refreshing")

    def __init__(self) -> None:
        self.expires_at = -math.inf
        self.refresh_at = math.inf
        self.refreshing = False


class _Exchange:
    """One call to STS with the Go SDK's retries; `reply` is None for a background refresh."""

    __slots__ = ("agent", "pod", "reply", "attempt", "cancelled")

    def __init__(self, agent: Agent, pod: Pod, reply: Reply | None) -> None:
        self.agent = agent
        self.pod = pod
        self.reply = reply
        self.attempt = 0
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def start(self, _: object = None) -> None:
        if self.cancelled or not self.agent.up:
            return
        self.attempt += 1
        agent = self.agent
        now = agent.loop.time()
        admitted = agent.sts.call(now)
        agent.loop.schedule(now + agent.sts.latency, self._answer, admitted)

    def _answer(self, admitted: bool) -> None:
        agent = self.agent
        if self.cancelled or not agent.up:
            return
        now = agent.loop.time()
        retries = agent.retries
        if admitted:
            agent.quota = min(retries.quota_tokens, agent.quota + (
                retries.retry_cost * (self.attempt - 1) if self.attempt > 1 else retries.success_increment))
            agent.stored(self.pod, now + agent.session_seconds)
            if self.reply is not None:
                self.reply(200, now + agent.session_seconds)
            return
        if self.attempt < retries.attempts and agent.quota >= retries.retry_cost:
            agent.quota -= retries.retry_cost
            agent.loop.schedule(now + retries.delay(self.attempt, agent.rng), self.start, None)
            return
        if self.reply is not None:
            self.reply(500, None)
        else:
            agent.refresh_failed(self.pod)


class Agent:
    """One node's agent."""

    def __init__(self, *, loop: VirtualTimeLoop, sts: AccountSts, rng: random.Random, session_seconds: float,
                 refresh_jitter: float, retries: sdk.GoStandardRetries = sdk.GO_STANDARD) -> None:
        self.loop = loop
        self.sts = sts
        self.rng = rng
        self.session_seconds = session_seconds
        self.refresh_jitter = refresh_jitter
        self.retries = retries
        self.quota = retries.quota_tokens
        self.up = True
        self.entries: dict[Pod, _Entry] = {}
        self._refresh_tokens = REFRESH_PER_SECOND
        self._refresh_at = 0.0

    def request(self, pod: Pod, reply: Reply) -> _Exchange | None:
        if not self.up:
            reply(NO_ANSWER, None)
            return None
        entry = self.entries.get(pod)
        now = self.loop.time()
        if entry is not None and entry.expires_at - now > MIN_TTL_SECONDS:
            reply(200, entry.expires_at)
            return None
        exchange = _Exchange(self, pod, reply)
        exchange.start()
        return exchange

    def stored(self, pod: Pod, expires_at: float) -> None:
        if not pod.alive:
            return  # the pod watcher dropped it meanwhile
        entry = self.entries.get(pod)
        if entry is None:
            entry = self.entries[pod] = _Entry()
        entry.expires_at = expires_at
        entry.refreshing = False
        now = self.loop.time()
        lifetime = expires_at - now
        entry.refresh_at = now + lifetime * (0.5 + self.rng.uniform(-self.refresh_jitter, self.refresh_jitter))
        self.loop.schedule(entry.refresh_at, self._due, (pod, entry))

    def _due(self, item: tuple[Pod, _Entry]) -> None:
        pod, entry = item
        if not self.up or self.entries.get(pod) is not entry or entry.refreshing or not pod.alive:
            return
        now = self.loop.time()
        if now < entry.refresh_at:
            return
        self._refresh_tokens = min(REFRESH_PER_SECOND,
                                   self._refresh_tokens + (now - self._refresh_at) * REFRESH_PER_SECOND)
        self._refresh_at = now
        if self._refresh_tokens < 1.0:
            self.refresh_failed(pod)
            return
        self._refresh_tokens -= 1.0
        entry.refreshing = True
        _Exchange(self, pod, None).start()

    def refresh_failed(self, pod: Pod) -> None:
        entry = self.entries.get(pod)
        if entry is None:
            return
        now = self.loop.time()
        entry.refreshing = False
        if entry.expires_at - now <= MIN_TTL_SECONDS:
            del self.entries[pod]
            return
        entry.refresh_at = now + REFRESH_RETRY_SECONDS + self.rng.uniform(0.0, REFRESH_RETRY_SECONDS)
        self.loop.schedule(entry.refresh_at, self._due, (pod, entry))

    def forget(self, pod: Pod) -> None:
        self.entries.pop(pod, None)

    def stop(self) -> None:
        """The agent's process ends: every entry and exchange in it is lost."""
        self.up = False
        self.entries = {}


class PerPodEndpoint:
    """Routes each pod's request to its node's agent."""

    def __init__(self, *, loop: VirtualTimeLoop, sts: AccountSts, rng: random.Random, session_seconds: float,
                 refresh_jitter: float) -> None:
        self._make = lambda: Agent(loop=loop, sts=sts, rng=rng, session_seconds=session_seconds,
                                   refresh_jitter=refresh_jitter)
        self.agents: dict[int, Agent] = {}
        self.down: set[int] = set()

    def agent(self, node: int) -> Agent:
        agent = self.agents.get(node)
        if agent is None:
            agent = self.agents[node] = self._make()
        return agent

    def request(self, pod: Pod, reply: Reply) -> _Exchange | None:
        if pod.node in self.down:
            reply(NO_ANSWER, None)
            return None
        return self.agent(pod.node).request(pod, reply)

    def stop_node(self, node: int) -> None:
        """The node's agent pod is replaced (or the node is gone): a new one starts empty."""
        agent = self.agents.pop(node, None)
        if agent is not None:
            agent.stop()
        self.down.add(node)

    def start_node(self, node: int) -> None:
        self.down.discard(node)

    def pod_stopped(self, pod: Pod) -> None:
        self.agent(pod.node).forget(pod)
