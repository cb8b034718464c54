"""The metrics listener: Prometheus text, liveness and readiness, apart from the credentials port."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from daemon.embedded import Issuer
from tests.conftest import SUBJECT_A, fetch

EXPECTED_FAMILIES = {
    "irsa_cache_requests",
    "irsa_cache_request_duration_seconds",
    "irsa_cache_sts_calls",
    "irsa_cache_sts_call_duration_seconds",
    "irsa_cache_cache_entries",
    "irsa_cache_cache_nearest_expiry_seconds",
    "irsa_cache_refresh_failures",
    "irsa_cache_evictions",
    "irsa_cache_token_verifications",
    "irsa_cache_directory_ready",
    "irsa_cache_sts_budget_rate",
    "irsa_cache_sts_waiting",
    "irsa_cache_sts_budget_wait_seconds",
    "irsa_cache_sts_retries",
    "irsa_cache_watch_restarts",
}


async def test_metrics_probes_and_the_counts_of_a_request(daemon, issuer: Issuer, http: aiohttp.ClientSession) -> None:
    base = f"http://{daemon.metrics_listen}"
    async with http.get(f"{base}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{base}/readyz") as response:
        assert response.status == 200

    assert (await fetch(http, daemon, issuer.mint(SUBJECT_A))).status == 200
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        families = {family.name: family for family in text_string_to_metric_families(await response.text())}

    assert EXPECTED_FAMILIES <= set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("irsa_cache_sts_calls_total", (("reason", "cold"), ("result", "success")))] >= 1
    assert samples[("irsa_cache_requests_total", (("code", "200"), ("outcome", "miss")))] >= 1
    assert samples[("irsa_cache_directory_ready", ())] == 1
    # Known label values exist from the start, so rate() has a zero to start from.
    assert ("irsa_cache_sts_calls_total", (("reason", "refresh"), ("result", "throttled"))) in samples
    # No label carries a pod, a token or a role.
    label_names = {name for (sample, labels) in samples if sample.startswith("irsa_cache_") for name, _ in labels}
    assert label_names <= {"code", "outcome", "reason", "result", "priority", "informer", "listener", "kind",
                           "severity", "role", "direction", "le"}


async def test_the_credentials_port_does_not_serve_metrics(daemon, http: aiohttp.ClientSession) -> None:
    answer = await fetch(http, daemon, None, path="/metrics")
    assert answer.status == 404
    assert answer.body["code"] == "not_found"
