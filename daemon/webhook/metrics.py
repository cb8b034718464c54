"""Every Prometheus metric the webhook exports, defined once.

The daemon's conventions: prefix `irsa_cache_` (here `irsa_cache_webhook_`), counters
end in `_total`, durations are `_seconds` histograms, label values come from small
fixed sets created up front so that series start at 0, and never a pod, namespace or
role as a label. The webhook has a registry of its own: its `/metrics` shows the
webhook's series and its process's, not the daemon's families at zero.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

from daemon.webhook.mutation import Outcome

NAMESPACE = "irsa_cache"
SUBSYSTEM = "webhook"

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

LOOKUP_RESULTS = ("found", "not_found", "error")
RELOAD_RESULTS = ("success", "error")

MUTATIONS = Counter(
    "mutations",
    "Pods admitted, by outcome (mutated, unchanged, opted_out, no_role, fargate, windows, daemon_namespace, error).",
    ["outcome"],
    namespace=NAMESPACE, subsystem=SUBSYSTEM, registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "request_duration_seconds",
    "Time to answer an AdmissionReview, ServiceAccount lookup included.",
    namespace=NAMESPACE, subsystem=SUBSYSTEM, registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SERVICE_ACCOUNT_LOOKUPS = Counter(
    "service_account_lookups",
    "ServiceAccount reads from the API server, by result (found, not_found after the grace, error).",
    ["result"],
    namespace=NAMESPACE, subsystem=SUBSYSTEM, registry=REGISTRY,
)
CERTIFICATE_RELOADS = Counter(
    "certificate_reloads",
    "Serving certificate reloads after its files changed, by result (error: the old one is kept).",
    ["result"],
    namespace=NAMESPACE, subsystem=SUBSYSTEM, registry=REGISTRY,
)
CERTIFICATE_EXPIRY = Gauge(
    "certificate_expiry_timestamp_seconds",
    "When the certificate being served expires (Unix time).",
    namespace=NAMESPACE, subsystem=SUBSYSTEM, registry=REGISTRY,
)


def _create_known_series() -> None:
    for outcome in Outcome:
        MUTATIONS.labels(outcome=outcome.value)
    for result in LOOKUP_RESULTS:
        SERVICE_ACCOUNT_LOOKUPS.labels(result=result)
    for result in RELOAD_RESULTS:
        CERTIFICATE_RELOADS.labels(result=result)


_create_known_series()
