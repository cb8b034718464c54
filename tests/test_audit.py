"""The audit trail: one line per issuance (a pod token first given a set of credentials),
the answers that repeat one counted instead of logged."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest

from daemon.app import RunningDaemon
from daemon.audit import IssuanceTrail
from daemon.embedded import IRSA_AUDIENCE, Issuer
from daemon.models import Credentials, Identity, VerifiedToken, fingerprint
from tests.conftest import ROLE_A, SUBJECT_A, fetch, metric

AUDIT = "irsa_cache.audit"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [vars(record) for record in caplog.records if record.name == AUDIT]


async def test_each_issuance_writes_one_line_and_repeats_are_counted(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    first_pod = issuer.mint(SUBJECT_A, pod_name="app-1")
    second_pod = issuer.mint(SUBJECT_A, pod_name="app-2")
    issuances, repeats = metric("irsa_cache_issuances_total"), metric("irsa_cache_repeat_answers_total")

    answer = await fetch(http, daemon, first_pod)
    for _ in range(3):  # an SDK fetching again: the same token, the same credentials
        assert (await fetch(http, daemon, first_pod)).body == answer.body
    assert (await fetch(http, daemon, second_pod)).body == answer.body  # another pod: its own issuance

    key = answer.body["AccessKeyId"]
    lines = audit_lines(caplog)
    assert [(line["pod"], line["outcome"], line["access_key_id"]) for line in lines] == [
        ("app-1", "miss", key), ("app-2", "hit", key)]
    assert lines[0]["token_fingerprint"] == fingerprint(first_pod)
    assert lines[1]["token_fingerprint"] == fingerprint(second_pod)
    assert {(line["namespace"], line["service_account"], line["subject"], line["role_arn"]) for line in lines} == {
        ("team-a", "app", SUBJECT_A, ROLE_A)}
    assert metric("irsa_cache_issuances_total") == issuances + 2
    assert metric("irsa_cache_repeat_answers_total") == repeats + 3


async def test_new_credentials_for_a_token_are_a_new_issuance(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    token = issuer.mint(SUBJECT_A, pod_name="app-1")
    old = (await fetch(http, daemon, token)).body["AccessKeyId"]

    daemon.cache.drop(lambda key: True, "directory")  # the next answer comes from a new exchange
    new = (await fetch(http, daemon, token)).body["AccessKeyId"]
    await fetch(http, daemon, token)

    assert new != old
    assert [(line["access_key_id"], line["outcome"]) for line in audit_lines(caplog)] == [(old, "miss"), (new, "miss")]


async def test_a_refused_request_writes_no_audit_line(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    issuances = metric("irsa_cache_issuances_total")

    answer = await fetch(http, daemon, issuer.mint("system:serviceaccount:nobody:unmapped"))

    assert answer.status == 403
    assert audit_lines(caplog) == []
    assert metric("irsa_cache_issuances_total") == issuances


# --- the trail alone: bounded memory, never fewer lines than issuances ---


def verified(n: int) -> VerifiedToken:
    identity = Identity(issuer="https://issuer.test", subject=SUBJECT_A, audience=IRSA_AUDIENCE, pod_name=f"app-{n}")
    return VerifiedToken(identity=identity, raw=f"token-{n}", expires_at=2e9, fingerprint=fingerprint(f"token-{n}"))


def credentials(key: str) -> Credentials:
    return Credentials(access_key_id=key, secret_access_key="secret", session_token="session",
                       expiration=datetime.now(timezone.utc) + timedelta(hours=1), account_id="123456789012",
                       assumed_role_arn="arn:aws:sts::123456789012:assumed-role/app-a/team-a.app")


def test_the_trail_forgets_the_oldest_quarter_when_full_and_logs_a_forgotten_token_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    trail = IssuanceTrail(max_tokens=8)
    issued = credentials("ASIAFIRST")
    tokens = [verified(n) for n in range(9)]

    assert all(trail.answered(token, ROLE_A, issued, "hit") for token in tokens)
    assert len(trail) == 7  # the ninth made room by forgetting the two oldest
    assert not trail.answered(tokens[8], ROLE_A, issued, "hit")  # remembered: a repeat
    assert trail.answered(tokens[0], ROLE_A, issued, "hit")  # forgotten: logged again
    assert trail.answered(tokens[8], ROLE_A, credentials("ASIASECOND"), "refreshed")  # new credentials

    assert len(audit_lines(caplog)) == 11
    for n in range(1000):  # however many tokens come, the trail stays bounded
        trail.answered(verified(100 + n), ROLE_A, issued, "hit")
    assert len(trail) <= 8
