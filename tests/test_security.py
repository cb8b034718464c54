"""Hostile and broken requests over real HTTP: the client contract and the security invariants.

Every bad input must get its status and the JSON error body every SDK parses,
must not leak the token or a secret, and must leave the daemon serving: after
each one, a valid caller is still answered 200.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from daemon.app import RunningDaemon
from daemon.config import MAX_TOKEN_CHARS
from daemon.embedded import IRSA_AUDIENCE, Issuer
from tests.conftest import ROLE_A, ROLE_B, SUBJECT_A, SUBJECT_B, StartDaemon, fetch
from tests.sts_double import StsDouble

CREDENTIALS_KEYS = {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "AccountId"}
OTHER_ISSUER = "https://oidc.other-cluster.test/id/OTHER"
UNMAPPED_SUBJECT = "system:serviceaccount:intruder:app"
BOUND_SECONDS = 30  # no single exchange in this file may take longer


@dataclass
class Reply:
    status: int
    content_type: str
    text: str
    headers: Any

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.text) if self.text else {}


async def ask(
    http: aiohttp.ClientSession,
    daemon: RunningDaemon,
    token: str | None,
    *,
    host: str | None = None,
    path: str = "/v1/credentials",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> Reply:
    """Like conftest.fetch, but keeps the raw body text so that leaks can be searched for."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = token
    if host is not None:
        sent["Host"] = host
    async with http.request(method, f"http://{daemon.listen[0]}{path}", headers=sent) as response:
        text = await asyncio.wait_for(response.text(), BOUND_SECONDS)
        return Reply(response.status, response.headers.get("Content-Type", ""), text, response.headers)


def assert_refused(reply: Reply, status: int, code: str, *mentions: str) -> str:
    """The error contract every SDK parses; returns the message."""
    assert reply.status == status, reply.text
    assert reply.content_type == "application/json"  # exactly: the Go SDK parses only then
    body = reply.body
    assert set(body) == {"code", "message", "Code", "Message"}, body
    assert body["code"] == body["Code"] == code, body
    assert body["message"] == body["Message"]
    assert isinstance(body["message"], str) and body["message"]
    for text in mentions:
        assert text in body["message"], (text, body["message"])
    return str(body["message"])


async def assert_still_serving(http: aiohttp.ClientSession, daemon: RunningDaemon, issuer: Issuer) -> dict[str, str]:
    """A well-behaved caller, with a fresh token, is still answered 200 with credentials."""
    answer = await asyncio.wait_for(fetch(http, daemon, issuer.mint(SUBJECT_A, pod_name="healthy")), BOUND_SECONDS)
    assert answer.status == 200, answer.body
    assert answer.content_type == "application/json"
    assert set(answer.body) == CREDENTIALS_KEYS
    return answer.body  # type: ignore[no-any-return]


def assert_nothing_leaks(text: str, token: str | None, secrets: dict[str, str]) -> None:
    """Neither the token, nor a segment of it, nor a served secret, in `text`."""
    if token:
        assert token not in text
        for segment in token.split("."):
            if len(segment) >= 16:
                assert segment not in text
    for name in ("SecretAccessKey", "Token"):
        assert secrets[name] not in text, name


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{record.getMessage()} {vars(record)!r}" for record in caplog.records)


# --- minting hostile tokens ---


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(issuer: Issuer, subject: str = SUBJECT_A) -> dict[str, Any]:
    return jwt.decode(issuer.mint(subject), options={"verify_signature": False})


def alg_none(issuer: Issuer) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT', 'kid': issuer.kid})}.{b64json(claims(issuer))}."


def hmac_with_public_key(issuer: Issuer) -> str:
    pem = issuer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid})}.{b64json(claims(issuer))}"
    return f"{signing_input}.{b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def tampered(issuer: Issuer) -> str:
    header, _, signature = issuer.mint(SUBJECT_A).split(".")
    return f"{header}.{b64json({**claims(issuer), 'sub': 'system:serviceaccount:kube-system:admin'})}.{signature}"


_stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def unknown_kid(issuer: Issuer) -> str:
    return jwt.encode(claims(issuer), _stranger, algorithm="RS256", headers={"kid": "stranger"})


def too_long(issuer: Issuer) -> str:
    # Validly signed by the trusted key: only its length is wrong (STS takes at most 20000),
    # by a little: far longer, the header limit refuses it first (see below).
    base = len(issuer.mint(SUBJECT_A, padding=""))
    token = issuer.mint(SUBJECT_A, padding="x" * ((MAX_TOKEN_CHARS + 600 - base) * 3 // 4))
    assert MAX_TOKEN_CHARS < len(token) < MAX_TOKEN_CHARS + 1000
    return token


TokenFactory = Callable[[Issuer], "str | None"]

BAD_TOKENS = [
    pytest.param(lambda issuer: None, 401, "missing_token", ["Authorization"], id="missing-authorization"),
    pytest.param(lambda issuer: "", 401, "missing_token", ["Authorization"], id="empty-authorization"),
    pytest.param(lambda issuer: "garbage-that-is-not-a-jwt", 401, "malformed_token", [], id="garbage"),
    pytest.param(lambda issuer: "Bearer ", 401, "malformed_token", [], id="bearer-and-nothing"),
    pytest.param(alg_none, 401, "algorithm_not_allowed", ["'none'"], id="alg-none"),
    pytest.param(hmac_with_public_key, 401, "algorithm_not_allowed", ["'HS256'"], id="hmac-keyed-with-public-key"),
    pytest.param(
        lambda issuer: issuer.mint(SUBJECT_A, issuer=OTHER_ISSUER), 401, "wrong_issuer",
        [OTHER_ISSUER, "{issuer}"], id="other-issuer",
    ),
    pytest.param(
        lambda issuer: issuer.mint(SUBJECT_A, audience="vault"), 401, "wrong_audience",
        ["vault", IRSA_AUDIENCE], id="other-audience",
    ),
    pytest.param(
        lambda issuer: issuer.mint(SUBJECT_A, now=time.time() - 7200, lifetime_seconds=3600), 401, "expired_token",
        ["expired at"], id="expired",
    ),
    pytest.param(
        lambda issuer: issuer.mint(SUBJECT_A, now=time.time() + 3600), 401, "token_not_yet_valid",
        ["not valid before"], id="not-yet-valid",
    ),
    pytest.param(unknown_kid, 401, "unknown_key", ["'stranger'"], id="unknown-kid"),
    pytest.param(tampered, 401, "bad_signature", [], id="tampered-payload"),
    pytest.param(too_long, 401, "token_too_long", [str(MAX_TOKEN_CHARS)], id="token-over-20000-chars"),
    pytest.param(
        lambda issuer: issuer.mint(UNMAPPED_SUBJECT), 403, "no_role", [UNMAPPED_SUBJECT], id="subject-with-no-role"
    ),
]


@pytest.mark.parametrize(("make_token", "status", "code", "mentions"), BAD_TOKENS)
async def test_a_bad_token_is_refused_with_its_reason_and_leaks_nothing(
    daemon: RunningDaemon,
    issuer: Issuer,
    sts: StsDouble,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    make_token: TokenFactory,
    status: int,
    code: str,
    mentions: list[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon")
    caplog.set_level(logging.DEBUG, logger="irsa_cache")
    secrets = await assert_still_serving(http, daemon, issuer)
    calls_before = len(sts.assume_calls)
    token = make_token(issuer)

    reply = await ask(http, daemon, token)

    assert_refused(reply, status, code, *(m.format(issuer=issuer.url) for m in mentions))
    assert_nothing_leaks(reply.text, token, secrets)
    assert_nothing_leaks(str(dict(reply.headers)), token, secrets)
    assert len(sts.assume_calls) == calls_before  # refused before STS
    # 6.5: not in the logs (where the refusal is recorded), and not in the metrics either.
    assert "request refused" in logged_text(caplog)
    assert_nothing_leaks(logged_text(caplog), token, secrets)
    async with http.get(f"http://{daemon.metrics_listen}/metrics") as metrics:
        assert_nothing_leaks(await metrics.text(), token, secrets)
    await assert_still_serving(http, daemon, issuer)


async def test_a_trusted_token_with_a_non_object_kubernetes_claim_is_a_401_not_a_500(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    token = issuer.mint(SUBJECT_A, **{"kubernetes.io": "team-a"})

    reply = await ask(http, daemon, token)

    assert_refused(reply, 401, "malformed_token")
    await assert_still_serving(http, daemon, issuer)


async def test_a_token_of_exactly_the_limit_is_served(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    base = len(issuer.mint(SUBJECT_A, padding=""))
    token = ""
    for pad in range((MAX_TOKEN_CHARS - base) * 3 // 4 - 8, (MAX_TOKEN_CHARS - base) * 3 // 4 + 8):
        token = issuer.mint(SUBJECT_A, padding="x" * pad)
        if len(token) == MAX_TOKEN_CHARS:
            break
    assert len(token) == MAX_TOKEN_CHARS

    answer = await fetch(http, daemon, token)

    assert answer.status == 200, answer.body
    over = await ask(http, daemon, token + "x")
    assert_refused(over, 401, "token_too_long", str(MAX_TOKEN_CHARS + 1))


# --- the Host header (6.7) ---


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("evil.example:{port}", id="foreign-name"),
        pytest.param("169.254.170.23", id="link-local-not-listened-on"),
        pytest.param("169.254.170.23:{port}", id="link-local-with-our-port"),
        pytest.param("127.0.0.1", id="loopback-without-port"),
        pytest.param("127.0.0.1:{other}", id="loopback-other-port"),
        pytest.param("localhost.evil.example:{port}", id="localhost-prefix"),
        pytest.param("127.0.0.1:{port}.evil.example", id="our-address-as-prefix"),
        pytest.param("[::1]:{port}", id="ipv6-loopback-not-listened-on"),
    ],
)
async def test_a_host_we_do_not_listen_on_is_refused_before_the_token_is_looked_at(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession, host: str
) -> None:
    port = daemon.listen[0].port
    host = host.format(port=port, other=port + 1 if port < 65535 else port - 1)
    secrets = await assert_still_serving(http, daemon, issuer)
    calls_before = len(sts.assume_calls)
    token = issuer.mint(SUBJECT_B)  # valid, and not yet cached: a pass would cost an STS call

    reply = await ask(http, daemon, token, host=host)

    assert_refused(reply, 400, "wrong_host", host)
    assert_nothing_leaks(reply.text, token, secrets)
    assert len(sts.assume_calls) == calls_before
    await assert_still_serving(http, daemon, issuer)


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("127.0.0.1:{port}", id="the-listen-address"),
        pytest.param("localhost:{port}", id="localhost-for-a-loopback-listener"),
        pytest.param("LocalHost:{port}", id="case-insensitive"),
    ],
)
async def test_the_hosts_that_name_a_loopback_listener_are_accepted(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, host: str
) -> None:
    answer = await fetch(http, daemon, issuer.mint(SUBJECT_A), host=host.format(port=daemon.listen[0].port))

    assert answer.status == 200, answer.body
    assert set(answer.body) == CREDENTIALS_KEYS


# --- oversized requests, wrong paths and methods ---


@pytest.mark.parametrize("size", [pytest.param(40_000, id="40kB"), pytest.param(1_000_000, id="1MB")])
async def test_an_oversized_authorization_header_is_refused_with_a_json_431(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, size: int
) -> None:
    address = daemon.listen[0]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), 5)
    request = (
        f"GET /v1/credentials HTTP/1.1\r\nHost: {address}\r\nAuthorization: ".encode()
        + b"a" * size
        + b"\r\n\r\n"
    )

    async def send() -> None:
        try:
            writer.write(request)
            await writer.drain()
        except ConnectionError:
            pass  # the server may stop reading once it has refused the line

    sender = asyncio.create_task(send())
    try:
        head = await asyncio.wait_for(reader.read(4096), 10)
        await asyncio.wait_for(sender, 10)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except ConnectionError:
            pass

    assert re.match(rb"HTTP/1\.[01] 431 ", head), head[:200]
    assert b"Content-Type: application/json\r\n" in head
    assert b'"code": "header_too_large"' in head
    await assert_still_serving(http, daemon, issuer)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        pytest.param("GET", "/", 404, "not_found", id="root"),
        pytest.param("GET", "/v1/credentials/", 404, "not_found", id="trailing-slash"),
        pytest.param("GET", "/v2/credentials", 404, "not_found", id="other-version"),
        pytest.param("GET", "/latest/meta-data/iam/security-credentials/", 404, "not_found", id="imds-path"),
        pytest.param("POST", "/v1/credentials", 405, "method_not_allowed", id="POST"),
        pytest.param("PUT", "/v1/credentials", 405, "method_not_allowed", id="PUT"),
        pytest.param("DELETE", "/v1/credentials", 405, "method_not_allowed", id="DELETE"),
    ],
)
async def test_wrong_paths_and_methods_get_json_errors(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession,
    method: str, path: str, status: int, code: str,
) -> None:
    secrets = await assert_still_serving(http, daemon, issuer)
    calls_before = len(sts.assume_calls)
    token = issuer.mint(SUBJECT_B)

    reply = await ask(http, daemon, token, method=method, path=path)

    assert_refused(reply, status, code, path)
    if status == 405:
        assert reply.headers["Allow"] == "GET,HEAD"
    assert_nothing_leaks(reply.text, token, secrets)
    assert len(sts.assume_calls) == calls_before
    await assert_still_serving(http, daemon, issuer)


# --- STS failing ---


async def test_sts_access_denied_is_a_403_naming_the_sts_code(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    sts.fail_with("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", status=403)
    token = issuer.mint(SUBJECT_A)

    reply = await ask(http, daemon, token)

    assert_refused(reply, 403, "sts_denied", "AccessDenied", ROLE_A)
    assert token not in reply.text
    assert len(sts.assume_calls) == 1  # never retried
    sts.heal()
    # Remembered: until the window ends, the identity is refused without asking STS...
    again = await ask(http, daemon, issuer.mint(SUBJECT_A))
    assert_refused(again, 403, "sts_denied", "AccessDenied", ROLE_A)
    assert len(sts.assume_calls) == 1
    # ...while every other identity is served.
    answer = await fetch(http, daemon, issuer.mint(SUBJECT_B))
    assert answer.status == 200, answer.body


async def test_sts_internal_failure_is_a_502(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    # A caller patient enough to see the exchange's end (by default it would get a 503
    # after 1.5 s while the retries go on).
    daemon = await start_daemon("--request-hold", str(BOUND_SECONDS))
    sts.fail_with("InternalFailure", "An internal error occurred", status=500)
    token = issuer.mint(SUBJECT_A)

    reply = await asyncio.wait_for(ask(http, daemon, token), BOUND_SECONDS)

    assert_refused(reply, 502, "sts_unavailable", "InternalFailure")
    assert token not in reply.text
    assert len(sts.assume_calls) == 5  # the budget's retries, bounded
    sts.heal()
    await assert_still_serving(http, daemon, issuer)


async def test_sts_slower_than_the_timeout_is_a_504(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await start_daemon("--sts-timeout", "0.3", "--request-hold", str(BOUND_SECONDS))
    sts.delay_seconds = 2
    token = issuer.mint(SUBJECT_A)

    started = time.monotonic()
    reply = await asyncio.wait_for(ask(http, daemon, token), BOUND_SECONDS)

    assert_refused(reply, 504, "sts_timeout", "0.3")
    assert token not in reply.text
    assert time.monotonic() - started < 15
    assert len(sts.assume_calls) == 5  # one per attempt: the budget retries timeouts, bounded
    sts.heal()
    await assert_still_serving(http, daemon, issuer)


# --- the security invariants ---


async def test_the_role_comes_from_the_directory_never_from_the_request(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    """6.3: role, session name and duration in the query, headers or token claims are all ignored."""
    token = issuer.mint(
        SUBJECT_A,
        role_arn=ROLE_B,
        RoleArn=ROLE_B,
        **{"https://aws.amazon.com/tags": {"principal_tags": {"role": [ROLE_B]}}},
    )
    hostile = {
        "X-Role-Arn": ROLE_B,
        "X-Amz-Role-Arn": ROLE_B,
        "RoleArn": ROLE_B,
        "X-Aws-Role-Session-Name": "admin",
        "X-Amz-Duration-Seconds": "43200",
    }
    query = f"?RoleArn={ROLE_B}&role_arn={ROLE_B}&RoleSessionName=admin&DurationSeconds=43200"

    reply = await ask(http, daemon, token, path=f"/v1/credentials{query}", headers=hostile)

    assert reply.status == 200, reply.text
    assert [(call.role_arn, call.session_name, call.duration_seconds) for call in sts.assume_calls] == [
        (ROLE_A, "team-a.app", "3600")
    ]


async def test_an_unmapped_subject_cannot_name_its_own_role(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    token = issuer.mint(UNMAPPED_SUBJECT, role_arn=ROLE_B)

    reply = await ask(
        http, daemon, token, path=f"/v1/credentials?RoleArn={ROLE_B}", headers={"X-Role-Arn": ROLE_B}
    )

    assert_refused(reply, 403, "no_role", UNMAPPED_SUBJECT)
    assert sts.assume_calls == []
    await assert_still_serving(http, daemon, issuer)


async def test_two_tokens_of_one_subject_share_one_sts_call(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    """6.2: the cache key is the identity, not the raw token."""
    first_token = issuer.mint(SUBJECT_A, pod_name="app-1")
    second_token = issuer.mint(SUBJECT_A, pod_name="app-2")
    assert first_token != second_token

    first = await fetch(http, daemon, first_token)
    second = await fetch(http, daemon, second_token)

    assert first.status == second.status == 200
    assert first.body["AccessKeyId"] == second.body["AccessKeyId"]
    assert len(sts.assume_calls) == 1


async def test_a_stream_of_bad_inputs_never_disturbs_a_valid_caller(
    daemon: RunningDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    """All the bad inputs at once, interleaved with valid callers: each is refused, each valid caller served."""
    bad = [alg_none(issuer), hmac_with_public_key(issuer), tampered(issuer), unknown_kid(issuer), "garbage",
           issuer.mint(SUBJECT_A, issuer=OTHER_ISSUER), issuer.mint(UNMAPPED_SUBJECT)] * 10
    good = [issuer.mint(SUBJECT_A, pod_name=f"app-{n}") for n in range(len(bad))]

    replies = await asyncio.wait_for(
        asyncio.gather(*(ask(http, daemon, token) for pair in zip(bad, good) for token in pair)), BOUND_SECONDS
    )

    assert {reply.status for reply in replies[0::2]} <= {401, 403}
    assert {reply.status for reply in replies[1::2]} == {200}
    assert len({reply.body["AccessKeyId"] for reply in replies[1::2]}) == 1
    assert len(sts.assume_calls) == 1
