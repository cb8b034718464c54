"""The whole path over real HTTP: real SDK clients, the daemon, moto as STS."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp

from daemon.embedded import DEMO_ACCOUNT, Issuer
from tests.conftest import (
    ROLE_A,
    SUBJECT_A,
    SUBJECT_B,
    StartDaemon,
    boto3_caller_identity,
    fetch,
    token_file,
)
from tests.sts_double import StsDouble


async def test_boto3_configured_only_by_environment_gets_the_mapped_role(
    daemon, issuer: Issuer, sts: StsDouble, tmp_path: Path
) -> None:
    token = token_file(tmp_path, issuer.mint(SUBJECT_A, pod_name="app-1"))

    arn = await boto3_caller_identity(daemon.credentials_url, token, sts.url)

    assert arn == f"arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/app-a/team-a.app"
    assert [call.role_arn for call in sts.assume_calls] == [ROLE_A]


async def test_success_body_is_what_every_sdk_parses(daemon, issuer: Issuer, http: aiohttp.ClientSession) -> None:
    answer = await fetch(http, daemon, issuer.mint(SUBJECT_A))

    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert set(answer.body) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "AccountId"}
    assert all(isinstance(value, str) and value for value in answer.body.values())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", answer.body["Expiration"])
    assert answer.body["AccountId"] == DEMO_ACCOUNT


async def test_500_concurrent_callers_of_one_identity_cost_one_sts_call(
    daemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    sts.delay_seconds = 0.2  # keep the exchange open while the callers pile up
    tokens = [issuer.mint(SUBJECT_A, pod_name=f"app-{n}") for n in range(500)]

    answers = await asyncio.gather(*(fetch(http, daemon, token) for token in tokens))

    assert {answer.status for answer in answers} == {200}
    assert len({answer.body["AccessKeyId"] for answer in answers}) == 1
    assert len(sts.assume_calls) == 1


async def test_two_identities_of_one_role_get_two_exchanges_and_never_each_others_entry(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    daemon = await start_daemon(identities={SUBJECT_A: ROLE_A, SUBJECT_B: ROLE_A})
    tokens_a = [issuer.mint(SUBJECT_A) for _ in range(50)]
    tokens_b = [issuer.mint(SUBJECT_B) for _ in range(50)]
    mixed = [token for pair in zip(tokens_a, tokens_b) for token in pair]

    answers = await asyncio.gather(*(fetch(http, daemon, token) for token in mixed))
    keys_a = {answer.body["AccessKeyId"] for answer in answers[0::2]}
    keys_b = {answer.body["AccessKeyId"] for answer in answers[1::2]}

    assert len(keys_a) == len(keys_b) == 1
    assert keys_a != keys_b
    assert sorted(call.session_name for call in sts.assume_calls) == ["team-a.app", "team-b.app"]
    # And the SDK proves which session each identity holds.
    arn_b = await boto3_caller_identity(daemon.credentials_url, token_file(tmp_path, tokens_b[0]), sts.url)
    assert arn_b.endswith("assumed-role/app-a/team-b.app")


async def test_a_glob_rule_maps_every_matching_subject(
    daemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    first = await fetch(http, daemon, issuer.mint("system:serviceaccount:batch:nightly"))
    second = await fetch(http, daemon, issuer.mint("system:serviceaccount:batch:hourly"))

    assert first.status == second.status == 200
    assert [call.role_arn.split("/")[-1] for call in sts.assume_calls] == ["batch", "batch"]
    assert first.body["AccessKeyId"] != second.body["AccessKeyId"]
