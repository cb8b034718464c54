"""The STS exchange: session names, error classification, and StsSource over real HTTP.

The integration tests talk to moto through the recording, fault-injecting proxy
(`sts` fixture), so botocore's real retry and timeout behaviour is exercised.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from daemon.sts import StsSource, account_id_of, classify, session_name_for
from daemon.embedded import DEMO_ACCOUNT, IRSA_AUDIENCE, Issuer, free_port
from daemon.errors import StsDeniedError, StsError, StsTimeoutError, StsUnavailableError
from daemon.models import Credentials, Identity, VerifiedToken, fingerprint
from tests.sts_double import StsDouble, sts_error

ROLE = f"arn:aws:iam::{DEMO_ACCOUNT}:role/app-a"
SUBJECT = "system:serviceaccount:ns:sa"
# What STS accepts as a RoleSessionName. STS's `\w` is ASCII (letters, digits, underscore).
SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
CALL_BOUND_SECONDS = 30.0  # no single exchange in these tests may take longer


# --- session_name_for ---


def digest(subject: str) -> str:
    return hashlib.sha256(subject.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("subject", "name"),
    [
        pytest.param("system:serviceaccount:ns:sa", "ns.sa", id="service-account"),
        pytest.param("system:serviceaccount:team-a:app", "team-a.app", id="dashes-kept"),
        pytest.param("system:serviceaccount:kube-system:aws-node", "kube-system.aws-node", id="kube-system"),
        pytest.param("system:serviceaccount:ns:my.dotted.sa", "ns.my.dotted.sa", id="dots-kept"),
        pytest.param("repo:org/app:ref:refs/heads/main",
                     "repo.org-app.ref.refs-heads-main@" + digest("repo:org/app:ref:refs/heads/main"),
                     id="non-kubernetes"),
        pytest.param("user@example.com", "user-example.com@" + digest("user@example.com"), id="email"),
        pytest.param("a b+c=d,e", "a-b+c=d,e@" + digest("a b+c=d,e"), id="space-replaced"),
    ],
)
def test_session_name_for(subject: str, name: str) -> None:
    assert session_name_for(subject) == name


SUBJECTS = [
    pytest.param("", id="empty"),
    pytest.param("x", id="one-char"),
    pytest.param("system:serviceaccount:", id="prefix-only"),
    pytest.param("system:serviceaccount:ns:sa", id="service-account"),
    pytest.param("::::", id="colons"),
    pytest.param("!#$%^&*()[]{}<>?/\\|~`'\"", id="punctuation"),
    pytest.param("a\tb\nc\x00d", id="control-chars"),
    pytest.param("x" * 64, id="64-chars"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("system:serviceaccount:" + "n" * 63 + ":" + "s" * 253, id="longest-kubernetes"),
    pytest.param("€" * 300, id="300-symbols"),
    pytest.param("system:serviceaccount:ns:café", id="non-ascii-letter"),
    pytest.param("web\udc80", id="lone-surrogate"),
]


@pytest.mark.parametrize("subject", SUBJECTS)
def test_session_name_always_fits_sts(subject: str) -> None:
    name = session_name_for(subject)

    assert SESSION_NAME.fullmatch(name), name


COLLIDING_WHEN_SANITISED = [
    # Each group sanitised alike under the old rule (bad characters to '-'): one session
    # name, and so one CloudTrail identity, for subjects STS and IAM tell apart.
    pytest.param(["web ", "web\u200b", "web\x00", "web-", "web"], id="invisible-suffixes"),
    pytest.param(["system:serviceaccount:a:b.c", "system:serviceaccount:a.b:c", "a.b.c", "a:b:c"], id="dots-and-colons"),
    pytest.param(["system:serviceaccount:ns:café", "system:serviceaccount:ns:caf-", "system:serviceaccount:ns:cafe"],
                 id="non-ascii"),
    pytest.param(["x" * 70 + "1", "x" * 70 + "2", "x" * 51 + "@" + "0" * 12], id="long-and-lookalike"),
    pytest.param(["system:serviceaccount:ns:sa", "ns.sa", "ns:sa"], id="readable-vs-other-issuer"),
]


@pytest.mark.parametrize("subjects", COLLIDING_WHEN_SANITISED)
def test_distinct_subjects_never_share_a_session_name(subjects: list[str]) -> None:
    names = [session_name_for(subject) for subject in subjects]

    assert len(set(names)) == len(subjects), names
    assert all(SESSION_NAME.fullmatch(name) for name in names)


def test_a_readable_name_splits_back_into_its_subject() -> None:
    for subject in ("system:serviceaccount:team-a:app", "system:serviceaccount:ns:my.dotted.sa"):
        namespace, _, name = session_name_for(subject).partition(".")
        assert f"system:serviceaccount:{namespace}:{name}" == subject


def test_a_long_subject_keeps_a_readable_head_and_a_digest() -> None:
    subject = "system:serviceaccount:" + "a" * 300
    name = session_name_for(subject)

    assert len(name) == 64
    assert name.startswith("a" * 40)  # a readable head
    assert re.fullmatch(r"a+@[0-9a-f]{12}", name)


def test_two_long_subjects_differing_only_at_the_end_get_different_names() -> None:
    head = "system:serviceaccount:ns:" + "s" * 280
    first, second = session_name_for(head + "1"), session_name_for(head + "2")

    assert first != second
    assert len(first) == len(second) == 64
    assert first[:50] == second[:50]


def test_a_short_subject_still_has_two_characters() -> None:
    assert session_name_for("x") == "x@" + digest("x")
    assert len(session_name_for("")) >= 2


# --- account_id_of ---


@pytest.mark.parametrize(
    ("arn", "account"),
    [
        pytest.param("arn:aws:sts::123456789012:assumed-role/Role/ns.sa", "123456789012", id="aws"),
        pytest.param("arn:aws-cn:sts::000011112222:assumed-role/Role/s", "000011112222", id="china"),
        pytest.param("arn:aws-us-gov:sts::999988887777:assumed-role/path/Role/s", "999988887777", id="govcloud"),
    ],
)
def test_account_id_of(arn: str, account: str) -> None:
    assert account_id_of(arn) == account


# --- classify ---


def client_error(code: str, status: int, message: str = "something went wrong") -> ClientError:
    response = {
        "Error": {"Type": "Sender", "Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "req-1"},
    }
    return ClientError(response, "AssumeRoleWithWebIdentity")  # type: ignore[arg-type]


CLASSIFY = [
    # code, HTTP status, expected class, permanent, throttled, status the caller sees
    pytest.param("AccessDenied", 403, StsDeniedError, True, False, 403, id="AccessDenied"),
    pytest.param("IDPRejectedClaim", 403, StsDeniedError, True, False, 403, id="IDPRejectedClaim"),
    pytest.param("ExpiredTokenException", 400, StsDeniedError, True, False, 403, id="ExpiredTokenException"),
    pytest.param("RegionDisabledException", 403, StsDeniedError, True, False, 403, id="RegionDisabledException"),
    pytest.param("MalformedPolicyDocument", 400, StsDeniedError, True, False, 403, id="MalformedPolicyDocument"),
    pytest.param("InvalidIdentityToken", 400, StsDeniedError, False, False, 403, id="InvalidIdentityToken"),
    pytest.param("Throttling", 400, StsUnavailableError, False, True, 502, id="Throttling"),
    pytest.param("ThrottlingException", 400, StsUnavailableError, False, True, 502, id="ThrottlingException"),
    pytest.param("TooManyRequests", 429, StsUnavailableError, False, True, 502, id="http-429"),
    pytest.param("IDPCommunicationError", 400, StsUnavailableError, False, False, 502, id="IDPCommunicationError"),
    pytest.param("InternalFailure", 500, StsUnavailableError, False, False, 502, id="http-500"),
    pytest.param("ServiceUnavailable", 503, StsUnavailableError, False, True, 502, id="http-503"),
    pytest.param("ValidationError", 400, StsUnavailableError, True, False, 502, id="ValidationError"),
]


@pytest.mark.parametrize(("code", "http_status", "kind", "permanent", "throttled", "status"), CLASSIFY)
def test_classify(
    code: str, http_status: int, kind: type[StsError], permanent: bool, throttled: bool, status: int
) -> None:
    error = classify(client_error(code, http_status, "details here"), ROLE)

    assert type(error) is kind
    assert error.permanent is permanent
    assert error.throttled is throttled
    assert error.status == status
    assert error.sts_code == code
    assert code in error.message
    assert ROLE in error.message
    assert "details here" in error.message
    assert str(http_status) in error.message


def test_classify_never_repeats_the_token_or_any_jwt() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    other = "eyJraWQiOiJvdGhlciJ9.eyJpc3MiOiJ5In0.b3RoZXI"
    error = classify(client_error("InternalFailure", 500, f"echo: WebIdentityToken={token} and {other}\r\n"), ROLE, token)

    assert token not in error.message and other not in error.message
    assert "\r" not in error.message and "\n" not in error.message
    assert "<token>" in error.message


def test_classify_caps_a_long_message() -> None:
    error = classify(client_error("InternalFailure", 500, "x" * 100_000), ROLE)

    assert len(error.message) < 600


def test_classify_tolerates_a_response_without_error_details() -> None:
    error = classify(ClientError({}, "AssumeRoleWithWebIdentity"), ROLE)  # type: ignore[arg-type]

    assert isinstance(error, StsError)
    assert ROLE in error.message


# --- StsSource over HTTP, through the recording proxy to moto ---


def verified_token(issuer: Issuer, subject: str = SUBJECT) -> VerifiedToken:
    raw = issuer.mint(subject)
    namespace, service_account = subject.split(":")[2:4]
    identity = Identity(
        issuer=issuer.url, subject=subject, audience=IRSA_AUDIENCE,
        namespace=namespace, service_account=service_account,
    )
    return VerifiedToken(identity=identity, raw=raw, expires_at=time.time() + 3600, fingerprint=fingerprint(raw))


Exchange = Callable[..., Awaitable[Credentials]]


@pytest.fixture
def exchange(issuer: Issuer) -> Exchange:
    """One exchange with a fresh StsSource, bounded in time."""

    async def run(
        endpoint_url: str, *, duration: int = 1800, timeout_seconds: float = 5.0,
        role_arn: str = ROLE, subject: str = SUBJECT,
    ) -> Credentials:
        source = StsSource(
            region="us-east-1", endpoint_url=endpoint_url,
            session_duration_seconds=duration, timeout_seconds=timeout_seconds,
        )
        async with asyncio.timeout(CALL_BOUND_SECONDS):
            async with source:
                return await source.assume_role(role_arn=role_arn, token=verified_token(issuer, subject))

    return run


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node has no AWS credentials of its own: nothing botocore could sign with."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_success_returns_credentials_for_the_assumed_role(
    exchange: Exchange, sts: StsDouble, no_aws_credentials: None
) -> None:
    before = time.time()
    credentials = await exchange(sts.url, duration=1800)

    assert credentials.access_key_id and credentials.secret_access_key and credentials.session_token
    assert credentials.expiration.tzinfo is not None
    assert credentials.expiration.utcoffset() == timezone.utc.utcoffset(None)
    assert before + 1800 - 60 <= credentials.expires_at <= time.time() + 1800 + 60
    assert credentials.account_id == DEMO_ACCOUNT
    assert credentials.assumed_role_arn == f"arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/app-a/ns.sa"
    [call] = sts.assume_calls
    assert call.role_arn == ROLE
    assert call.session_name == "ns.sa"
    assert call.duration_seconds == "1800"


async def test_duration_is_what_was_configured(exchange: Exchange, sts: StsDouble) -> None:
    credentials = await exchange(sts.url, duration=43200)

    assert sts.assume_calls[0].duration_seconds == "43200"
    assert credentials.remaining(time.time()) == pytest.approx(43200, abs=60)


async def test_the_call_is_unsigned_even_when_the_node_has_credentials(
    exchange: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Credentials in the environment must not be used: the request carries no signature.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "node-session-token")
    seen: list[dict[str, str]] = []
    bodies: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        bodies.append(await request.read())
        return sts_error("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        with pytest.raises(StsDeniedError):
            await exchange(f"http://{host}:{port}")
    finally:
        await runner.cleanup()

    [headers] = seen
    assert "authorization" not in headers
    assert "x-amz-security-token" not in headers
    assert not any(name.startswith("x-amz-content-sha256") for name in headers)
    assert b"Action=AssumeRoleWithWebIdentity" in bodies[0]
    assert b"WebIdentityToken=" in bodies[0]
    assert "irsa-cache" in headers.get("user-agent", "")


@pytest.mark.parametrize(
    ("code", "status", "throttled"),
    [
        pytest.param("Throttling", 400, True, id="Throttling"),
        pytest.param("IDPCommunicationError", 400, False, id="IDPCommunicationError"),
        pytest.param("InternalFailure", 500, False, id="http-500"),
    ],
)
async def test_a_passing_failure_is_one_attempt_retrying_is_the_budgets(
    exchange: Exchange, sts: StsDouble, code: str, status: int, throttled: bool
) -> None:
    # botocore must not retry on its own: every attempt has to be paid for by limiter.py.
    sts.fail_with(code, "try again", status=status)

    with pytest.raises(StsUnavailableError) as caught:
        await exchange(sts.url)

    assert caught.value.permanent is False
    assert caught.value.throttled is throttled
    assert caught.value.sts_code == code
    assert len(sts.assume_calls) == 1


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("AccessDenied", id="AccessDenied"),
        pytest.param("IDPRejectedClaim", id="IDPRejectedClaim"),
        pytest.param("ExpiredTokenException", id="ExpiredTokenException"),
    ],
)
async def test_a_denial_is_never_retried(exchange: Exchange, sts: StsDouble, code: str) -> None:
    sts.fail_with(code, "Not authorized to perform sts:AssumeRoleWithWebIdentity", status=403)

    with pytest.raises(StsDeniedError) as caught:
        await exchange(sts.url)

    assert caught.value.permanent is True
    assert caught.value.sts_code == code
    assert ROLE in caught.value.message
    assert len(sts.assume_calls) == 1


async def test_a_slow_sts_times_out_within_a_bound(exchange: Exchange, sts: StsDouble) -> None:
    sts.delay_seconds = 2.0
    started = time.monotonic()

    with pytest.raises(StsTimeoutError) as caught:
        await exchange(sts.url, timeout_seconds=0.3)

    elapsed = time.monotonic() - started
    # One attempt, never past StsSource's backstop (2 x timeout + 1 s), whatever STS does.
    assert elapsed < 0.3 * 2 + 1 + 0.5, elapsed
    assert caught.value.status == 504
    assert caught.value.permanent is False
    assert len(sts.assume_calls) == 1, sts.assume_calls


async def test_connection_refused_is_unavailable(exchange: Exchange) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    started = time.monotonic()

    with pytest.raises(StsUnavailableError) as caught:
        await exchange(closed, timeout_seconds=1.0)

    assert time.monotonic() - started < 10
    assert caught.value.permanent is False
    assert closed in caught.value.message


async def test_one_source_serves_many_exchanges(issuer: Issuer, sts: StsDouble) -> None:
    source = StsSource(region="us-east-1", endpoint_url=sts.url, session_duration_seconds=900, timeout_seconds=5.0)
    subjects = [f"system:serviceaccount:ns:sa-{n}" for n in range(5)]

    async with asyncio.timeout(CALL_BOUND_SECONDS), source:
        results = await asyncio.gather(
            *(source.assume_role(role_arn=ROLE, token=verified_token(issuer, subject)) for subject in subjects)
        )

    assert len({credentials.access_key_id for credentials in results}) == 5
    assert sorted(call.session_name for call in sts.assume_calls) == [f"ns.sa-{n}" for n in range(5)]
    assert {call.duration_seconds for call in sts.assume_calls} == {"900"}


def test_expiration_of_credentials_is_aware() -> None:
    # Credentials refuse a naive time, so StsSource can only hand out aware ones.
    with pytest.raises(ValueError):
        Credentials(
            access_key_id="AKIA", secret_access_key="s", session_token="t",
            expiration=datetime(2030, 1, 1), account_id=DEMO_ACCOUNT, assumed_role_arn="arn",
        )


# --- answers that are not answers: nothing of them may travel on ---

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETzKEY"
SESSION = "FwoGZXIvYXdzEBYaDSESSIONzTOKENzSECRET"
GOOD_ANSWER = (
    '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
    "<AssumeRoleWithWebIdentityResult>"
    "<Credentials><AccessKeyId>ASIAEXAMPLEKEYID0001</AccessKeyId>"
    f"<SecretAccessKey>{SECRET}</SecretAccessKey><SessionToken>{SESSION}</SessionToken>"
    "<Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>"
    f"<AssumedRoleUser><Arn>arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/app-a/ns.sa</Arn>"
    "<AssumedRoleId>AROAEXAMPLE:ns.sa</AssumedRoleId></AssumedRoleUser>"
    "</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
)
GARBAGE_ANSWERS = [
    pytest.param(200, GOOD_ANSWER[: len(GOOD_ANSWER) // 2], "text/xml", id="truncated-xml"),
    pytest.param(200, GOOD_ANSWER.replace("</Credentials>", "<Credentials>"), "text/xml", id="garbled-xml"),
    pytest.param(200, GOOD_ANSWER.replace("<SessionToken>", "<X>").replace("</SessionToken>", "</X>"),
                 "text/xml", id="no-session-token"),
    pytest.param(200, GOOD_ANSWER.replace("2099-01-01T00:00:00Z", "soon"), "text/xml", id="bad-expiration"),
    pytest.param(200, GOOD_ANSWER.replace(f"arn:aws:sts::{DEMO_ACCOUNT}", "nonsense"), "text/xml", id="bad-arn"),
    pytest.param(200, f"<html><body>{SECRET} {SESSION}</body></html>", "text/html", id="html-200"),
    pytest.param(200, "\x00\xff garbage " + SECRET, "application/octet-stream", id="binary-200"),
    pytest.param(200, GOOD_ANSWER + "x" * 2_000_000, "text/xml", id="oversized"),
    pytest.param(500, f"<html>Internal error while handling {SECRET}</html>", "text/html", id="html-500"),
    pytest.param(503, "upstream connect error or disconnect/reset before headers", "text/plain", id="proxy-503"),
]


@pytest.mark.parametrize(("status", "body", "content_type"), GARBAGE_ANSWERS)
async def test_an_unusable_answer_is_a_passing_error_that_carries_no_secret(
    exchange: Exchange, sts: StsDouble, status: int, body: str, content_type: str
) -> None:
    sts.fault = lambda call: web.Response(status=status, body=body.encode("latin-1"), content_type=content_type)

    with pytest.raises(StsError) as caught:
        await exchange(sts.url)

    error = caught.value
    assert error.permanent is False
    assert error.status in (502, 504)
    rendered = "".join(traceback.format_exception(error))
    for secret in (SECRET, SESSION):
        assert secret not in error.message
        assert secret not in rendered
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
