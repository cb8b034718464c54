"""Every Prometheus metric the daemon exports, defined once.

Label values come from small fixed sets and are created up front so that series
start at 0. Never a pod name, token or role as a label: role ARNs are unbounded.
Call sites use `metrics.NAME`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

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

REQUESTS = Counter(
    "requests",
    "Credential requests answered, by HTTP status code and outcome.",
    ["code", "outcome"],
    namespace=NAMESPACE,
)
REQUEST_DURATION = Histogram(
    "request_duration_seconds",
    "Time to answer a credential request, by outcome.",
    ["outcome"],
    namespace=NAMESPACE,
    buckets=_REQUEST_BUCKETS,
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
TOKEN_VERIFICATIONS = Counter(
    "token_verifications",
    "Token verifications, by result (valid, cached, or the failed check).",
    ["result"],
    namespace=NAMESPACE,
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
# by its label values on every call, and every credential request used three.


@functools.cache
def request_series(code: int, outcome: str) -> tuple[Counter, Histogram]:
    """The request counter and duration histogram for one HTTP status and outcome."""
    return REQUESTS.labels(code=str(code), outcome=outcome), REQUEST_DURATION.labels(outcome=outcome)


@functools.cache
def handoff_outcome(role: str, outcome: str) -> Counter:
    return HANDOFF_OUTCOMES.labels(role=role, outcome=outcome)


@functools.cache
def connections_refused(listener: str, reason: str) -> Counter:
    return CONNECTIONS_REFUSED.labels(listener=listener, reason=reason)


@functools.cache
def token_verification(result: str) -> Counter:
    return TOKEN_VERIFICATIONS.labels(result=result)


def _create_known_series() -> None:
    for outcome in REQUEST_OUTCOMES:
        REQUEST_DURATION.labels(outcome=outcome)
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
        TOKEN_VERIFICATIONS.labels(result=result)


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
