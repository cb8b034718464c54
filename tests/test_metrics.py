"""The counters kept as plain numbers (metrics.RequestStats, metrics.PlainCounter): the
families Prometheus scrapes from them are what prometheus_client's own would be."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from daemon import metrics


def samples(collector: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def test_request_stats_match_prometheus_clients_counter_and_histogram() -> None:
    ours = metrics.RequestStats()
    registry = CollectorRegistry()
    requests = Counter("irsa_cache_requests", "x", ["code", "outcome"], registry=registry)
    duration = Histogram("irsa_cache_request_duration_seconds", "x", ["outcome"], registry=registry,
                         buckets=metrics._REQUEST_BUCKETS)
    for outcome in metrics.REQUEST_OUTCOMES:
        duration.labels(outcome=outcome)
    answers = [(200, "hit", 0.0005), (200, "hit", 0.0007), (200, "miss", 3.0), (503, "overloaded", 10.0),
               (200, "hit", 0.0), (401, "denied", 0.25)]
    for code, outcome, seconds in answers:
        ours.count(code, outcome, seconds)
        requests.labels(code=str(code), outcome=outcome).inc()
        duration.labels(outcome=outcome).observe(seconds)

    theirs = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}
    assert samples(ours) == theirs
    # A bound is inclusive ("le"): 0.0005 s falls in the 0.0005 bucket.
    assert samples(ours)[("irsa_cache_request_duration_seconds_bucket", (("le", "0.0005"), ("outcome", "hit")))] == 2


def test_a_plain_counter_counts_by_labels_and_refuses_the_wrong_ones() -> None:
    family = metrics.PlainCounter("things", "Things.", ("kind",))
    family.child("a").inc()
    family.child("a").inc(2)
    family.child("b")
    unlabelled = metrics.PlainCounter("events", "Events.")
    unlabelled.inc()

    assert samples(family) == {("irsa_cache_things_total", (("kind", "a"),)): 3,
                               ("irsa_cache_things_total", (("kind", "b"),)): 0}
    assert samples(unlabelled) == {("irsa_cache_events_total", ()): 1}
    with pytest.raises(ValueError):
        family.child()
    with pytest.raises(ValueError):
        family.inc()
