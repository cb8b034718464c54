"""What a simulation is asked: the cluster's shape, the scenario, STS's quota, the daemon's knobs.

Pure values and pure functions: `plan()` turns the inputs into when and where every pod
starts and what happens to the daemons, with no clock and no I/O, so that a scenario
can be checked on its own and every mode replays exactly the same cluster.

Policy numbers that describe the world rather than the daemon (how Kubernetes restarts a
crashed container, how long a DaemonSet pod takes to come back) are named here, once.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from daemon import config

PLACEMENTS = ("spread", "packed", "random")
SCENARIOS = ("steady", "scale-out", "rollout", "node-replacement", "cold-start")
MODES = ("direct", "per-pod", "irsa-cache")

# Kubernetes' default `maxPods` per node: how `packed` fills a node before the next.
MAX_PODS_PER_NODE = 110
# Defaults per scenario: a scale-out starts its pods over a minute, or at 100 a second
# if that takes longer (about the most a cluster's control plane starts; --ramp asks
# for faster); a cold start starts them all at once; a steady state runs six hours, the
# others until every pod has credentials, at most this long after their last event.
SCALE_OUT_RAMP_SECONDS = 60.0
POD_STARTS_PER_SECOND = 100.0
STEADY_DURATION_SECONDS = 6 * 3600.0
SETTLE_LIMIT_SECONDS = 3600.0
# Rollout and node replacement begin once the cluster has run a while with warm caches.
WARM_UP_SECONDS = 900.0
# A DaemonSet pod replaced on a node: the old one stops, the new one serves again after
# this (container start, informers synced); the rollout moves on `minReadySeconds` later.
DAEMON_RESTART_SECONDS = 5.0
DAEMONSET_MIN_READY_SECONDS = 10.0
# Node replacement: the new nodes of a wave are ready and the old ones drained within
# this; the evicted pods start on the new nodes from `POD_RESCHEDULE_SECONDS` after the
# drain, at most POD_STARTS_PER_SECOND of them a second (the control plane recreates them).
NODE_WAVE_SECONDS = 60.0
POD_RESCHEDULE_SECONDS = 5.0
# Rollout and node replacement go `surge` nodes at a time; by default a tenth of them.
DEFAULT_SURGE_FRACTION = 0.1


@dataclass(frozen=True, kw_only=True)
class DaemonKnobs:
    """The daemon's own cache and budget settings: `irsa-cache serve` flags, their defaults read from it."""

    session_duration_seconds: float = config.serve_default("--session-duration")
    serve_floor_seconds: float = config.serve_default("--serve-floor")
    refresh_jitter: float = config.serve_default("--refresh-jitter")
    request_hold_seconds: float = config.serve_default("--request-hold")
    refresh_wait_seconds: float = config.serve_default("--refresh-wait")
    idle_evict_seconds: float = config.serve_default("--idle-evict")
    max_entries: int = config.serve_default("--max-entries")
    sts_rate_per_second: float = config.serve_default("--sts-rate")
    sts_burst: int = config.serve_default("--sts-burst")
    sts_concurrency: int = config.serve_default("--sts-concurrency")
    sts_queue: int = config.serve_default("--sts-queue")
    cluster_rate_per_second: float | None = None
    cluster_burst: int | None = None


@dataclass(frozen=True, kw_only=True)
class Inputs:
    nodes: int
    identities: int
    pods_per_identity: int
    placement: str = "spread"
    scenario: str = "scale-out"
    duration_seconds: float | None = None  # None: the scenario's own
    ramp_seconds: float | None = None  # None: the scenario's own
    surge: int | None = None  # None: a tenth of the nodes
    handoff: bool = True
    account_rate_per_second: float = 600.0
    account_burst: int | None = None  # None: one second of the rate
    sts_latency_seconds: float = 0.05
    seed: int = 1
    daemon: DaemonKnobs = field(default_factory=DaemonKnobs)

    def __post_init__(self) -> None:
        problems = []
        for name in ("nodes", "identities", "pods_per_identity"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: must be at least 1")
        if self.placement not in PLACEMENTS:
            problems.append(f"--placement: {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.scenario not in SCENARIOS:
            problems.append(f"--scenario: {self.scenario!r} is not one of {', '.join(SCENARIOS)}")
        if self.placement == "packed" and self.pods > self.nodes * MAX_PODS_PER_NODE:
            problems.append(
                f"--placement packed: {self.pods} pods do not fit on {self.nodes} nodes of "
                f"{MAX_PODS_PER_NODE} pods each"
            )
        if self.surge is not None and self.surge < 1:
            problems.append("--surge: must be at least 1")
        if self.account_rate_per_second <= 0:
            problems.append("--account-rate: must be above 0")
        if self.account_burst is not None and self.account_burst < 1:
            problems.append("--account-burst: must be at least 1")
        if problems:
            raise ValueError("\n".join(problems))

    @property
    def pods(self) -> int:
        return self.identities * self.pods_per_identity

    @property
    def ramp(self) -> float:
        if self.ramp_seconds is not None:
            return self.ramp_seconds
        if self.scenario == "cold-start":
            return 0.0
        return max(SCALE_OUT_RAMP_SECONDS, self.pods / POD_STARTS_PER_SECOND)

    @property
    def wave_size(self) -> int:
        return self.surge if self.surge is not None else max(1, math.ceil(self.nodes * DEFAULT_SURGE_FRACTION))

    @property
    def burst(self) -> int:
        return self.account_burst if self.account_burst is not None else max(1, round(self.account_rate_per_second))


@dataclass(frozen=True, kw_only=True, slots=True)
class PodStart:
    pod: int
    identity: int
    node: int
    at: float


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonRestart:
    """The DaemonSet pod of `node` stops at `at` and serves again at `back_at`."""

    node: int
    at: float
    back_at: float


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeReplacement:
    """At `at`, `new` joins; at `pods_at`, `old` is drained and its pods start again on `new`,
    spread over `spread_seconds`."""

    old: int
    new: int
    at: float
    pods_at: float
    spread_seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything that happens to the cluster, the same for every mode."""

    starts: tuple[PodStart, ...]
    restarts: tuple[DaemonRestart, ...] = ()
    replacements: tuple[NodeReplacement, ...] = ()
    measure_from: float = 0.0  # figures count what happens from here on
    last_event_at: float = 0.0  # no pod starts and no daemon changes after this
    fixed_end: float | None = None  # run exactly until here; None: until every pod is served
    settle_limit: float = SETTLE_LIMIT_SECONDS  # ...but at most this long after `last_event_at`
    steady_from: float | None = None  # steady state: calls per node-identity-hour counted from here
    total_nodes: int = 0  # nodes that ever exist (node replacement adds some)


def placement(inputs: Inputs, rng: random.Random) -> list[int]:
    """The node of every pod, pods numbered identity by identity."""
    nodes, per_identity = inputs.nodes, inputs.pods_per_identity
    if inputs.placement == "spread":
        # Round-robin over all nodes, continuing from one identity to the next, so that an
        # identity with fewer pods than nodes does not pile onto the same first nodes.
        return [(identity * per_identity + replica) % nodes
                for identity in range(inputs.identities) for replica in range(per_identity)]
    if inputs.placement == "packed":
        # Deployments scaled together: their pods arrive interleaved, and each node is
        # filled before the next, so every busy node runs every identity.
        identities = inputs.identities
        return [(replica * identities + identity) // MAX_PODS_PER_NODE
                for identity in range(identities) for replica in range(per_identity)]
    return [rng.randrange(nodes) for _ in range(inputs.pods)]


def plan(inputs: Inputs) -> Plan:
    """The scenario's timeline: pure, seeded, shared by every mode."""
    rng = random.Random(inputs.seed)
    where = placement(inputs, rng)
    per_identity = inputs.pods_per_identity
    ramp = inputs.ramp
    starts = tuple(
        PodStart(pod=n, identity=n // per_identity, node=where[n], at=rng.uniform(0.0, ramp) if ramp else 0.0)
        for n in range(inputs.pods)
    )
    scenario = inputs.scenario
    if scenario == "steady":
        end = inputs.duration_seconds or STEADY_DURATION_SECONDS
        # The first session is the warm-up: cold exchanges and their first refreshes.
        steady_from = min(inputs.daemon.session_duration_seconds, end / 2)
        return Plan(starts=starts, last_event_at=ramp, fixed_end=end, steady_from=steady_from,
                    total_nodes=inputs.nodes)
    if scenario in ("scale-out", "cold-start"):
        return Plan(starts=starts, last_event_at=ramp, settle_limit=_settle(inputs), total_nodes=inputs.nodes)
    begin = ramp + WARM_UP_SECONDS
    waves = [list(range(first, min(first + inputs.wave_size, inputs.nodes)))
             for first in range(0, inputs.nodes, inputs.wave_size)]
    if scenario == "rollout":
        period = DAEMON_RESTART_SECONDS + DAEMONSET_MIN_READY_SECONDS
        restarts = tuple(
            DaemonRestart(node=node, at=begin + k * period, back_at=begin + k * period + DAEMON_RESTART_SECONDS)
            for k, wave in enumerate(waves) for node in wave
        )
        last = restarts[-1].back_at
        # Pods ask again only when their credentials near expiry: watch one whole session.
        end = inputs.duration_seconds or last + inputs.daemon.session_duration_seconds
        return Plan(starts=starts, restarts=restarts, measure_from=begin, last_event_at=last, fixed_end=end,
                    total_nodes=inputs.nodes)
    pods_on = Counter(where)
    spreads = [sum(pods_on[node] for node in wave) / POD_STARTS_PER_SECOND for wave in waves]
    replacements = tuple(
        NodeReplacement(old=node, new=inputs.nodes + node, at=begin + k * NODE_WAVE_SECONDS,
                        pods_at=begin + k * NODE_WAVE_SECONDS + POD_RESCHEDULE_SECONDS, spread_seconds=spreads[k])
        for k, wave in enumerate(waves) for node in wave
    )
    last = max(r.pods_at + r.spread_seconds for r in replacements)
    return Plan(starts=starts, replacements=replacements, measure_from=begin,
                last_event_at=last, settle_limit=_settle(inputs), total_nodes=2 * inputs.nodes)


def _settle(inputs: Inputs) -> float:
    return inputs.duration_seconds if inputs.duration_seconds is not None else SETTLE_LIMIT_SECONDS
