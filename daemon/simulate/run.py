"""One mode through one scenario: build the cluster on a fresh virtual loop, play the plan, count.

Modes never share state: each has its own loop, its own STS (the whole account quota)
and the same plan, so they are side by side as if each were the cluster's only way
to credentials. The simulated daemons' metrics are muted and their logs quieted for
the run (`metrics.muted()`), so nothing reaches this process's registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from daemon import metrics
from daemon.stats import nearest_rank
from daemon.simulate import adapter
from daemon.simulate.account import AccountSts, CallCounts
from daemon.simulate.direct import DirectFetcher
from daemon.simulate.inputs import MODES, Inputs, Plan
from daemon.simulate.irsa_cache import IrsaCacheEndpoint
from daemon.simulate.per_pod import PerPodEndpoint
from daemon.simulate.pods import ContainerClient, Fetcher, Fleet, Pod, Recorder
from daemon.simulate.vloop import VirtualTimeLoop


@dataclass(frozen=True, kw_only=True)
class ModeResult:
    """What one mode did, counted over the plan's measured window."""

    mode: str
    sts_calls: int  # admitted by STS: exchanges that returned credentials
    throttled: int  # attempts STS answered with Throttling
    failed_pods: int  # pods whose application saw a credentials error
    unserved_pods: int  # alive at the end and never served
    peak_calls_per_second: int  # the most calls STS received in one second, throttled ones included
    ttc_p50_seconds: float | None
    ttc_p99_seconds: float | None
    ttc_max_seconds: float | None
    calls_per_node_identity_hour: float | None  # steady state only
    pods: int
    fetches: int
    window_start: float
    window_end: float
    events: int  # callbacks the loop ran: what the run cost
    wall_seconds: float
    counts: CallCounts  # per second of the window, for the chart


def simulate(inputs: Inputs, plan: Plan, mode: str) -> ModeResult:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    started = time.perf_counter()
    loop = VirtualTimeLoop()
    with _quiet():
        try:
            run = _Run(inputs, plan, mode, loop)
            loop.schedule(0.0, run.begin, None)
            loop.run_forever()
            end = loop.time()
            _finish(loop)
        finally:
            loop.close()
    return run.result(end, time.perf_counter() - started)


class _Run:
    def __init__(self, inputs: Inputs, plan: Plan, mode: str, loop: VirtualTimeLoop) -> None:
        self.inputs, self.plan, self.mode, self.loop = inputs, plan, mode, loop
        seed = inputs.seed * 1000 + MODES.index(mode)
        self.rng = random.Random(seed)
        self.account = AccountSts(rate_per_second=inputs.account_rate_per_second, burst=inputs.burst,
                                  latency_seconds=inputs.sts_latency_seconds)
        self.recorder = Recorder(measure_from=plan.measure_from)
        self.stopped = False
        self.stop_node: Callable[[int], None] = lambda node: None
        self.start_node: Callable[[int], None] = lambda node: None
        self.node_added: Callable[[int], None] = lambda node: None
        self.node_removed: Callable[[int], None] = lambda node: None
        on_start: Callable[[Pod], None] = lambda pod: None
        on_stop: Callable[[Pod], None] = lambda pod: None
        fetcher: Fetcher
        if mode == "direct":
            fetcher = DirectFetcher(loop=loop, sts=self.account, rng=self.rng)
        elif mode == "per-pod":
            agents = PerPodEndpoint(loop=loop, sts=self.account, rng=self.rng,
                                    session_seconds=inputs.daemon.session_duration_seconds,
                                    refresh_jitter=inputs.daemon.refresh_jitter)
            fetcher = ContainerClient(loop=loop, endpoint=agents)
            on_stop = agents.pod_stopped
            self.stop_node, self.start_node = agents.stop_node, agents.start_node
            self.node_removed = agents.stop_node
        else:
            sts = adapter.ModelledSts(loop=loop, account=self.account,
                                      session_seconds=inputs.daemon.session_duration_seconds)
            daemons = IrsaCacheEndpoint(loop=loop, knobs=inputs.daemon, sts=sts, identities=inputs.identities,
                                        nodes=inputs.nodes, seed=seed)
            fetcher = ContainerClient(loop=loop, endpoint=daemons)
            on_start, on_stop = daemons.pod_started, daemons.pod_stopped
            self.stop_node = daemons.stop_node
            self.start_node = lambda node: daemons.start_node(node, handoff=inputs.handoff)
            self.node_added, self.node_removed = daemons.node_added, daemons.node_removed
        self.fleet = Fleet(loop=loop, fetcher=fetcher, recorder=self.recorder, rng=self.rng,
                           on_start=on_start, on_stop=on_stop)
        self.fleet.on_settled = self._settled

    def begin(self, _: object) -> None:
        loop, plan = self.loop, self.plan
        for start in plan.starts:
            loop.schedule(start.at, self.fleet.start, start)
        for restart in plan.restarts:
            loop.schedule(restart.at, self.stop_node, restart.node)
            loop.schedule(restart.back_at, self.start_node, restart.node)
        for replacement in plan.replacements:
            loop.schedule(replacement.at, self.node_added, replacement.new)
            loop.schedule(replacement.pods_at, self._replace,
                          (replacement.old, replacement.new, replacement.spread_seconds))
        if plan.fixed_end is not None:
            loop.schedule(plan.fixed_end, self._stop, None)
        else:
            loop.schedule(plan.last_event_at, self._check_settled, None)
            loop.schedule(plan.last_event_at + plan.settle_limit, self._stop, None)

    def _replace(self, item: tuple[int, int, float]) -> None:
        old, new, spread = item
        self.fleet.drain(old, new, spread)
        self.node_removed(old)

    def _settled(self) -> None:
        if self.plan.fixed_end is None and self.loop.time() >= self.plan.last_event_at:
            self._stop(None)

    def _check_settled(self, _: object) -> None:
        if self.fleet.unserved == 0:
            self._stop(None)

    def _stop(self, _: object) -> None:
        if not self.stopped:
            self.stopped = True
            self.loop.stop()

    def result(self, end: float, wall_seconds: float) -> ModeResult:
        plan, recorder = self.plan, self.recorder
        ttc = list(recorder.ttc)
        unserved = [pod for pod in self.fleet.pods.values() if pod.alive and not pod.served]
        ttc += [end - pod.started_at for pod in unserved if pod.started_at >= plan.measure_from]  # still waiting
        ttc.sort()
        counts = self.account.counts().window(plan.measure_from, end)
        steady = None
        if plan.steady_from is not None and end > plan.steady_from:
            pairs = len({(start.node, start.identity) for start in plan.starts})
            admitted = self.account.counts().window(plan.steady_from, end).total_admitted
            steady = admitted / pairs / ((end - plan.steady_from) / 3600.0)
        return ModeResult(
            mode=self.mode, sts_calls=counts.total_admitted, throttled=counts.total_throttled,
            failed_pods=recorder.failed, unserved_pods=len(unserved),
            peak_calls_per_second=counts.peak_per_second(),
            ttc_p50_seconds=nearest_rank(ttc, 0.50), ttc_p99_seconds=nearest_rank(ttc, 0.99),
            ttc_max_seconds=ttc[-1] if ttc else None, calls_per_node_identity_hour=steady,
            pods=recorder.pods, fetches=recorder.fetches, window_start=plan.measure_from, window_end=end,
            events=self.loop.events, wall_seconds=wall_seconds, counts=counts,
        )


def _finish(loop: VirtualTimeLoop) -> None:
    """Cancel what is still under way (daemons' maintenance, exchanges, requests) and let it end;
    an error a callback raised during the run is raised here."""
    loop.freeze()
    while tasks := asyncio.all_tasks(loop):  # unwinding may start more (a cancelled wait's callbacks)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    if loop.errors:
        context = loop.errors[0]
        raise RuntimeError(f"the simulation hit an error: {context.get('message')}") from context.get("exception")


GC_THRESHOLD = 100_000  # allocations between young collections while simulating (Python's: 700)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute the daemons' metrics and their logs below errors: thousands of them run here.
    And collect garbage rarely: a big run holds millions of objects, and the default
    thresholds spend a third of its time scanning them."""
    logger = logging.getLogger("daemon")
    level = logger.level
    thresholds = gc.get_threshold()
    logger.setLevel(logging.ERROR)
    gc.set_threshold(GC_THRESHOLD, thresholds[1], thresholds[2])
    try:
        with metrics.muted():
            yield
    finally:
        gc.set_threshold(*thresholds)
        logger.setLevel(level)
