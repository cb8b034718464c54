"""Every Prometheus metric the daemon exports, defined once.

Label values come from small fixed sets and are created up front so that series
start at 0. Never a pod name, token or role as a label: role ARNs are unbounded.
Call sites use `metrics.NAME`.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import sys
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

NAMESPACE = "irsa_cache"

REQUEST_OUTCOMES = ("hit", "miss", "coalesced", "stale", "denied", "overloaded", "error", "abandoned")
LISTENERS = ("credentials", "metrics")
CONNECTION_REFUSALS = ("full", "evicted", "head_timeout", "head_too_large", "unparsable")
PRIORITIES = ("caller", "refresh")
STS_REASONS = ("cold", "refresh")
INFORMERS = ("serviceaccounts", "pods")
REFUSAL_KINDS = ("sts_refusal", "pod_absent", "token_review")
WATCH_RESTART_REASONS = ("expired", "silent", "error")
STS_RESULTS = ("success", "throttled", "denied", "error")
EVICTION_REASONS = ("idle", "capacity", "expired", "denied", "directory")
TOKEN_RESULTS = (
    "valid", "cached", "malformed_token", "algorithm_not_allowed", "unknown_key",
    "bad_signature", "wrong_issuer", "wrong_audience", "expired_token", "token_not_yet_valid",
    "token_review_rejected",
)

# Latency buckets: the hot path answers in well under a millisecond, STS in tens to hundreds.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)



class RequestStats:
    """`irsa_cache_requests_total` {code, outcome} and `irsa_cache_request_duration_seconds`
    {outcome}, kept as plain numbers and turned into metric families when scraped.

    Every credential request updates both, and prometheus_client's own Counter and
    Histogram take a lock and walk the buckets in Python on each update; here an update
    is a dictionary increment and one bisection (in C). Updates come from the event loop
    only; a scrape reads a copy, so it sees each series whole."""

    def __init__(self) -> None:
        self._counts: dict[tuple[int, str], int] = {}
        self._buckets = {outcome: [0] * (len(_REQUEST_BUCKETS) + 1) for outcome in REQUEST_OUTCOMES}
        self._sums = dict.fromkeys(REQUEST_OUTCOMES, 0.0)
        self._created = time.time()
        self._bounds = [*(floatToGoString(bound) for bound in _REQUEST_BUCKETS), "+Inf"]

    def count(self, code: int, outcome: str, seconds: float) -> None:
        """One request answered `code` with `outcome` (from REQUEST_OUTCOMES) after `seconds`."""
        key = (code, outcome)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        # bisect_left: the first bucket whose upper bound is at least `seconds` (`le`).
        self._buckets[outcome][bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1
        self._sums[outcome] += seconds

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(f"{NAMESPACE}_requests", _REQUESTS_HELP, labels=["code", "outcome"])
        yield HistogramMetricFamily(f"{NAMESPACE}_request_duration_seconds", _DURATION_HELP, labels=["outcome"])

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{NAMESPACE}_requests", _REQUESTS_HELP, labels=["code", "outcome"])
        for (code, outcome), value in sorted(self._counts.copy().items()):
            requests.add_metric([str(code), outcome], value, created=self._created)
        yield requests
        duration = HistogramMetricFamily(f"{NAMESPACE}_request_duration_seconds", _DURATION_HELP, labels=["outcome"])
        for outcome in REQUEST_OUTCOMES:
            counts, total = self._buckets[outcome].copy(), self._sums[outcome]
            cumulative = list(itertools.accumulate(counts))
            duration.add_metric([outcome], list(zip(self._bounds, cumulative, strict=True)), total)
        yield duration


_REQUESTS_HELP = "Credential requests answered, by HTTP status code and outcome."
_DURATION_HELP = "Time to answer a credential request, by outcome."
REQUESTS = RequestStats()
REGISTRY.register(REQUESTS)


class _Cell:
    """One series of a PlainCounter: `inc()` is an addition, no lock (the event loop is
    the only writer)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class PlainCounter:
    """A counter family kept as plain integers, for what every request counts (see
    RequestStats); `child(*label_values)` is the series to `inc()`."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self._name = f"{NAMESPACE}_{name}"
        self._documentation = documentation
        self._labelnames = labelnames
        self._cells: dict[tuple[str, ...], _Cell] = {}
        self._created = time.time()
        self._unlabelled = self.child() if not labelnames else None

    def child(self, *labels: str) -> _Cell:
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, not {labels}")
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = _Cell()
        return cell

    def inc(self, amount: int = 1) -> None:
        """For a family without labels: its one series."""
        if self._unlabelled is None:
            raise ValueError(f"{self._name} has labels {self._labelnames}: inc() a child()")
        self._unlabelled.value += amount

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, cell in sorted(self._cells.copy().items()):
            family.add_metric(list(labels), cell.value, created=self._created)
        yield family


def _plain_counter(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> PlainCounter:
    counter = PlainCounter(name, documentation, labelnames)
    REGISTRY.register(counter)
    return counter


TOKEN_VERIFICATIONS = _plain_counter(
    "token_verifications", "Token verifications, by result (valid, cached, or the failed check).", ("result",))
ISSUANCES = _plain_counter(
    "issuances",
    "Credentials given to a pod token for the first time (a new token, or new credentials after a refresh): "
    "each writes one audit line.",
)
REPEAT_ANSWERS = _plain_counter(
    "repeat_answers",
    "Credential answers that repeated what the pod token had already been given (an SDK fetching again): "
    "counted, not written to the audit log line by line.",
)
STS_CALLS = Counter(
    "sts_calls",
    "AssumeRoleWithWebIdentity calls (every attempt), by reason (cold: no credentials yet; refresh) and result.",
    ["reason", "result"],
    namespace=NAMESPACE,
)
STS_CALL_DURATION = Histogram(
    "sts_call_duration_seconds",
    "Duration of one AssumeRoleWithWebIdentity call, by result.",
    ["result"],
    namespace=NAMESPACE,
    buckets=_STS_BUCKETS,
)
CACHE_ENTRIES = Gauge("cache_entries", "Identities in the cache.", namespace=NAMESPACE)
NEAREST_EXPIRY = Gauge(
    "cache_nearest_expiry_seconds",
    "Seconds until the soonest-expiring cached credentials expire (absent entries: 0).",
    namespace=NAMESPACE,
)
REFRESH_FAILURES = Counter(
    "refresh_failures", "Background refreshes that failed.", namespace=NAMESPACE
)
EVICTIONS = Counter(
    "evictions", "Cache entries dropped, by reason.", ["reason"], namespace=NAMESPACE
)
KEY_SET_FETCHES = Counter(
    "key_set_fetches", "Refetches of the signing key set on an unknown key id.", namespace=NAMESPACE
)
REFUSALS_REMEMBERED = Counter(
    "refusals_remembered",
    "Requests refused from memory without asking upstream again, by kind (sts_refusal: an STS "
    "refusal of the identity or token; pod_absent: "
    "a pod found absent from this node; token_review: a token TokenReview rejected).",
    ["kind"],
    namespace=NAMESPACE,
)
CLOCK_SKEW = Counter(
    "sts_clock_skew",
    "STS answers whose credentials had (expired: at most a minute, refused) or (short: under the serve "
    "floor, served) left by this node's clock on arrival: the node's clock or STS's is off.",
    ["severity"],
    namespace=NAMESPACE,
)
KEY_SET_FAILURES = Counter(
    "key_set_failures",
    "Signing key set loads and refetches that failed (unreachable, not a key set, no usable key).",
    namespace=NAMESPACE,
)
STS_BUDGET_RATE = Gauge(
    "sts_budget_rate",
    "Current STS budget in calls per second: the configured rate, less while recovering from throttling.",
    namespace=NAMESPACE,
)
STS_WAITING = Gauge(
    "sts_waiting",
    "Exchanges waiting for the STS budget, by priority (caller: a pod waits; refresh: ahead of expiry).",
    ["priority"],
    namespace=NAMESPACE,
)
STS_BUDGET_WAIT = Histogram(
    "sts_budget_wait_seconds",
    "Time an STS attempt waited for the budget, by priority.",
    ["priority"],
    namespace=NAMESPACE,
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
STS_BUDGET_SHARE = Gauge(
    "sts_budget_share",
    "With --sts-cluster-rate: this node's guaranteed STS rate, the cluster's rate over the node count "
    "(0: the per-node budget).",
    namespace=NAMESPACE,
)
STS_CLUSTER_NODES = Gauge(
    "sts_cluster_nodes",
    "With --sts-cluster-rate: the nodes sharing the cluster's STS rate (the DaemonSet's "
    "desiredNumberScheduled; 0 until read).",
    namespace=NAMESPACE,
)
DAEMONSET_READS = Counter(
    "daemonset_reads",
    "Reads of the daemon's own DaemonSet for the shared STS budget's node count, by result (ok, error).",
    ["result"],
    namespace=NAMESPACE,
)
STS_RETRIES = Counter(
    "sts_retries", "STS attempts retried after a passing failure, by reason.", ["reason"], namespace=NAMESPACE
)
WATCH_RESTARTS = Counter(
    "watch_restarts",
    "Kubernetes list/watch restarts, by informer and reason (expired: 410 Gone, relisted; "
    "silent: no event or bookmark within the silence deadline, relisted; error: backed off, relisted).",
    ["informer", "reason"],
    namespace=NAMESPACE,
)
WATCH_SKIPPED = Counter(
    "watch_skipped_objects",
    "Objects from the API server skipped because they were malformed (no name), by informer.",
    ["informer"],
    namespace=NAMESPACE,
)
CONNECTIONS = Gauge(
    "connections", "Connections open, by listener (credentials, metrics).", ["listener"], namespace=NAMESPACE
)
CONNECTIONS_REFUSED = Counter(
    "connections_refused",
    "Connections closed or refused by the listener's bounds, by listener and reason (full: every "
    "connection answering a request; evicted: the oldest idle one made room; head_timeout: no whole "
    "request head in time; head_too_large; unparsable: not HTTP/1.1).",
    ["listener", "reason"],
    namespace=NAMESPACE,
)
HANDOFF_OUTCOMES = Counter(
    "handoffs",
    "Warm handoffs between generations, by role (predecessor, successor) and outcome (handed_over; warm: "
    "sockets and cache taken; sockets_only: sockets taken, cache cold; no_predecessor; failed).",
    ["role", "outcome"],
    namespace=NAMESPACE,
)
HANDOFF_ENTRIES = Counter(
    "handoff_entries", "Cache entries in warm handoffs, by direction (sent, received).", ["direction"],
    namespace=NAMESPACE,
)
HANDOFF_DURATION = Histogram(
    "handoff_duration_seconds", "Time a handoff took, by role (predecessor, successor).", ["role"],
    namespace=NAMESPACE, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
GENERATION_STARTED = Gauge(
    "generation_start_time_seconds", "When this process (generation) started, epoch seconds.", namespace=NAMESPACE
)
DIRECTORY_READY = Gauge(
    "directory_ready", "1 when ready (/readyz 200): the directory synced and reachable, the signing keys "
    "loaded, not draining.", namespace=NAMESPACE
)
API_SERVER_AVAILABLE = Gauge(
    "api_server_available",
    "--directory kubernetes: 0 while the API server is unreachable, silent or answering 5xx (an outage "
    "of the control plane, not of this daemon; 401/403 leave it 1).",
    namespace=NAMESPACE,
)
API_SERVER_AVAILABLE.set(1)  # static mode has none to lose


# Series of the hot path, resolved once: labels() takes a lock and looks the child up
# by its label values on every call.


@functools.cache
def handoff_outcome(role: str, outcome: str) -> Counter:
    return HANDOFF_OUTCOMES.labels(role=role, outcome=outcome)


@functools.cache
def connections_refused(listener: str, reason: str) -> Counter:
    return CONNECTIONS_REFUSED.labels(listener=listener, reason=reason)


@functools.cache
def token_verification(result: str) -> _Cell:
    return TOKEN_VERIFICATIONS.child(result)


def _create_known_series() -> None:
    for reason in STS_REASONS:
        for result in STS_RESULTS:
            STS_CALLS.labels(reason=reason, result=result)
    for result in STS_RESULTS:
        STS_CALL_DURATION.labels(result=result)
    for priority in PRIORITIES:
        STS_WAITING.labels(priority=priority)
        STS_BUDGET_WAIT.labels(priority=priority)
    for reason in STS_REASONS:
        STS_RETRIES.labels(reason=reason)
    for informer in INFORMERS:
        WATCH_SKIPPED.labels(informer=informer)
        for reason in WATCH_RESTART_REASONS:
            WATCH_RESTARTS.labels(informer=informer, reason=reason)
    for reason in EVICTION_REASONS:
        EVICTIONS.labels(reason=reason)
    for listener in LISTENERS:
        CONNECTIONS.labels(listener=listener)
        for reason in CONNECTION_REFUSALS:
            CONNECTIONS_REFUSED.labels(listener=listener, reason=reason)
    for role, outcomes in (("predecessor", ("handed_over", "failed")),
                           ("successor", ("warm", "sockets_only", "no_predecessor", "failed"))):
        HANDOFF_DURATION.labels(role=role)
        for outcome in outcomes:
            HANDOFF_OUTCOMES.labels(role=role, outcome=outcome)
    for direction in ("sent", "received"):
        HANDOFF_ENTRIES.labels(direction=direction)
    for kind in REFUSAL_KINDS:
        REFUSALS_REMEMBERED.labels(kind=kind)
    for severity in ("expired", "short"):
        CLOCK_SKEW.labels(severity=severity)
    for result in ("ok", "error"):
        DAEMONSET_READS.labels(result=result)
    for result in TOKEN_RESULTS:
        TOKEN_VERIFICATIONS.child(result)


_create_known_series()


class _Mute:
    """Stands in for any metric or series: every update does nothing."""

    def labels(self, *args: object, **kwargs: object) -> _Mute:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Within: every metric of this module is a no-op (restored on exit).

    For `irsa-cache simulate`, which runs thousands of the daemon's caches and budgets in
    one process: their updates must not reach this process's registry, and on the hot
    path of a simulation they cost time for nothing. Call sites read `metrics.NAME` when
    they update, so swapping the module's attributes reaches them all. Not for a process
    that also serves requests: the swap is process-wide.
    """
    module = sys.modules[__name__]
    saved = {name: value for name, value in vars(module).items() if isinstance(value, MetricWrapperBase)}
    mute = _Mute()
    try:
        for name in saved:
            setattr(module, name, mute)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
