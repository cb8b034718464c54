"""The pods: when they need credentials, what their SDK does to get them, what they experience.

Every mode shares this side. A pod fetches at start and again when its SDK's refresh
window comes (`sdk.REFRESH`); a fetch is one `Fetcher.fetch`, the SDK's retries
included. A pod whose first fetch fails exits and is restarted by the kubelet
(`sdk.CRASH_LOOP`) until it gets credentials. The `ContainerClient` is botocore's
container provider against a node-local `Endpoint` (a per-pod agent, or irsa-cache).

Everything runs as plain callbacks on the virtual loop (`loop.schedule`), not as
coroutines: a cluster has hundreds of thousands of pods, and a coroutine each would
cost more than the rest of the simulation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Protocol

from daemon.simulate import sdk
from daemon.simulate.inputs import PodStart
from daemon.simulate.vloop import VirtualTimeLoop

NO_ANSWER = 0  # the status a `reply` gets when the endpoint is down (connection refused)


class Pod:
    """One pod incarnation: a pod moved to another node is a new pod."""

    __slots__ = ("number", "identity", "node", "started_at", "need_since", "expires_at", "served",
                 "restarts", "fetch", "alive", "failed")

    def __init__(self, *, number: int, identity: int, node: int, now: float) -> None:
        self.number = number
        self.identity = identity
        self.node = node
        self.started_at = now
        self.need_since = now  # when the fetch under way began
        self.expires_at = -math.inf
        self.served = False  # has had credentials
        self.restarts = 0
        self.fetch = 0  # the current fetch's number: late answers to older ones are dropped
        self.alive = True
        self.failed = False


Done = Callable[[Pod, int, float | None], None]  # (pod, fetch number, expiry or None if the SDK gave up)
Reply = Callable[[int, float | None], None]  # (HTTP status, expiry of the credentials if 200)


class Fetcher(Protocol):
    """One credential fetch by a pod's SDK, its own retries included."""

    def fetch(self, pod: Pod, number: int, done: Done) -> None: ...


class Request(Protocol):
    def cancel(self) -> None: ...


class Endpoint(Protocol):
    """What answers `GET <container credentials URI>` on a pod's node."""

    def request(self, pod: Pod, reply: Reply) -> Request | None: ...


class Recorder:
    """What the pods experienced, from `measure_from` on."""

    def __init__(self, *, measure_from: float) -> None:
        self.measure_from = measure_from
        self.ttc: list[float] = []  # seconds from needing credentials to having them, per fetch
        self.failed = 0  # pods whose application saw a credentials error
        self.pods = 0  # pods alive in the window
        self.fetches = 0

    def fetched(self, pod: Pod, waited: float, since: float) -> None:
        if since >= self.measure_from:
            self.ttc.append(waited)
            self.fetches += 1

    def failure(self, pod: Pod, now: float) -> None:
        if now >= self.measure_from and not pod.failed:
            pod.failed = True
            self.failed += 1


class Fleet:
    """Every pod of the cluster, on one loop, against one mode's `Fetcher`."""

    def __init__(self, *, loop: VirtualTimeLoop, fetcher: Fetcher, recorder: Recorder, rng: random.Random,
                 on_start: Callable[[Pod], None] = lambda pod: None,
                 on_stop: Callable[[Pod], None] = lambda pod: None,
                 refresh: sdk.Refresh = sdk.REFRESH, crash_loop: sdk.CrashLoop = sdk.CRASH_LOOP) -> None:
        self._loop = loop
        self._fetcher = fetcher
        self._recorder = recorder
        self._rng = rng
        self._on_start = on_start
        self._on_stop = on_stop
        self._refresh = refresh
        self._crash_loop = crash_loop
        self.pods: dict[int, Pod] = {}  # by pod number (the same number on its new node)
        self.on_node: dict[int, set[int]] = {}  # node -> numbers of its live pods
        self.unserved = 0  # alive and never served
        self.on_settled: Callable[[], None] = lambda: None  # called when `unserved` drops to 0

    def start(self, start: PodStart) -> None:
        self._start(start.pod, start.identity, start.node)

    def drain(self, node: int, onto: int, spread_seconds: float = 0.0) -> None:
        """Every pod of `node` is deleted and starts anew on `onto` (the node is replaced),
        each at a random moment within `spread_seconds`."""
        now = self._loop.time()
        for number in sorted(self.on_node.pop(node, ())):
            old = self.pods[number]
            self._stop(old)
            self._loop.schedule(now + self._rng.uniform(0.0, spread_seconds), self._restart_on,
                                (number, old.identity, onto))

    def _restart_on(self, item: tuple[int, int, int]) -> None:
        self._start(*item)

    def _start(self, number: int, identity: int, node: int) -> None:
        now = self._loop.time()
        pod = Pod(number=number, identity=identity, node=node, now=now)
        self.pods[number] = pod
        self.on_node.setdefault(node, set()).add(number)
        self.unserved += 1
        if now >= self._recorder.measure_from:
            self._recorder.pods += 1
        self._on_start(pod)
        self._begin(pod)

    def _stop(self, pod: Pod) -> None:
        pod.alive = False
        self.on_node.get(pod.node, set()).discard(pod.number)
        if not pod.served:
            self.unserved -= 1
        self._on_stop(pod)

    def _begin(self, pod: Pod) -> None:
        pod.fetch += 1
        if pod.served:
            pod.need_since = self._loop.time()
        self._fetcher.fetch(pod, pod.fetch, self._done)

    def _done(self, pod: Pod, number: int, expires_at: float | None) -> None:
        if not pod.alive or number != pod.fetch:
            return
        now = self._loop.time()
        if expires_at is not None:
            since = pod.need_since if pod.served else pod.started_at
            self._recorder.fetched(pod, now - since, since)
            if not pod.served:
                pod.served = True
                self.unserved -= 1
                if self.unserved == 0:
                    self.on_settled()
            pod.expires_at = expires_at
            self._next_call_after(pod, max(now, expires_at - self._refresh.advisory_seconds))
        elif not pod.served:
            self._recorder.failure(pod, now)  # the application could not start: the container exits
            pod.restarts += 1
            pod.fetch += 1  # nothing may answer the failed fetch now
            self._loop.schedule(now + self._crash_loop.delay(pod.restarts), self._restart, (pod, pod.fetch))
        else:
            if pod.expires_at - now < self._refresh.mandatory_seconds:
                self._recorder.failure(pod, now)  # a signed call failed for want of credentials
            self._next_call_after(pod, now)

    def _next_call_after(self, pod: Pod, at: float) -> None:
        """The SDK fetches again at the pod's first signed call after `at`."""
        self._loop.schedule(at + self._rng.uniform(0.0, self._refresh.call_gap_seconds), self._refetch,
                            (pod, pod.fetch))

    def _refetch(self, item: tuple[Pod, int]) -> None:
        pod, number = item
        if pod.alive and number == pod.fetch:
            self._begin(pod)

    def _restart(self, item: tuple[Pod, int]) -> None:
        pod, number = item
        if pod.alive and number == pod.fetch:
            self._begin(pod)


class ContainerClient:
    """botocore's container provider: `attempts` requests of at most `timeout` each, 1 s apart."""

    def __init__(self, *, loop: VirtualTimeLoop, endpoint: Endpoint,
                 policy: sdk.ContainerProvider = sdk.CONTAINER_PROVIDER) -> None:
        self._loop = loop
        self._endpoint = endpoint
        self._policy = policy

    def fetch(self, pod: Pod, number: int, done: Done) -> None:
        _ContainerFetch(self, pod, number, done).attempt()


class _ContainerFetch:
    __slots__ = ("client", "pod", "number", "done", "attempts", "request", "open")

    def __init__(self, client: ContainerClient, pod: Pod, number: int, done: Done) -> None:
        self.client = client
        self.pod = pod
        self.number = number
        self.done = done
        self.attempts = 0
        self.request: Request | None = None
        self.open = False  # an attempt is waiting for its answer

    def attempt(self, _: object = None) -> None:
        if not self.pod.alive or self.number != self.pod.fetch:
            return  # the pod is gone: its SDK with it
        self.attempts += 1
        self.open = True
        loop = self.client._loop
        attempt = self.attempts
        loop.schedule(loop.time() + self.client._policy.timeout_seconds, self._timeout, attempt)
        self.request = self.client._endpoint.request(self.pod, self._reply)

    def _reply(self, status: int, expires_at: float | None) -> None:
        if not self.open:
            return  # answered after the client's timeout: nobody reads it
        self.open = False
        self.request = None
        if status == 200:
            self.done(self.pod, self.number, expires_at)
        else:
            self._failed()

    def _timeout(self, attempt: int) -> None:
        if self.open and attempt == self.attempts:
            self.open = False
            if self.request is not None:
                self.request.cancel()  # the client closes the connection
                self.request = None
            self._failed()

    def _failed(self) -> None:
        loop = self.client._loop
        if self.attempts < self.client._policy.attempts:
            loop.schedule(loop.time() + self.client._policy.sleep_seconds, self.attempt, None)
        else:  # botocore sleeps after the last failure too, then raises
            loop.schedule(loop.time() + self.client._policy.sleep_seconds, self._give_up, None)

    def _give_up(self, _: object) -> None:
        self.done(self.pod, self.number, None)
