"""The STS exchange: AssumeRoleWithWebIdentity through aiobotocore.

The only module that knows botocore. The call is unsigned (the node needs no AWS
credentials of its own) and goes to the regional endpoint. Each call is a single
attempt: retries go through the node's STS budget (`limiter.py`), so that every
request STS sees was paid for. This module decides, next to the client, which
failures are permanent and which are throttling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from datetime import datetime, timezone
from typing import Any

import aiohttp
from aiobotocore.session import get_session
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from daemon.errors import StsDeniedError, StsError, StsTimeoutError, StsUnavailableError
from daemon.models import Credentials, VerifiedToken

# Never worth a retry: the answer will not change until someone edits IAM or the token.
_DENIALS = {
    "AccessDenied",  # the role's trust policy does not admit this subject/audience
    "IDPRejectedClaim",
    "ExpiredTokenException",  # needs a newer token
    "RegionDisabledException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
}
# Refused, but possibly passing: STS could not fetch the issuer's keys. Callers see
# a 403 naming it; the cache keeps serving old credentials and retries later.
_PASSING_DENIALS = {"InvalidIdentityToken"}
THROTTLING_CODES = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}

CONNECT_TIMEOUT_SECONDS = 3.0
_SESSION_NAME_MAX = 64
_SESSION_NAME_BAD_CHARS = re.compile(r"[^\w+=,.-]", re.ASCII)  # STS's set, less '@': the digest's mark
# A Kubernetes namespace is a DNS label (no dots); a ServiceAccount name a DNS subdomain.
_READABLE_SUBJECT = re.compile(
    r"system:serviceaccount:([a-z0-9]([-a-z0-9]*[a-z0-9])?):([a-z0-9]([-.a-z0-9]*[a-z0-9])?)"
)
_DIGEST_HEX = 12


def session_name_for(subject: str) -> str:
    """The RoleSessionName CloudTrail shows for `subject`: distinct subjects, distinct names.

    A Kubernetes ServiceAccount whose `namespace.name` fits STS's 64 characters gets
    exactly that (`team-a.app`): the namespace holds no dot, so the name splits back
    into the subject at its first dot. Every other subject (another issuer's, too
    long, or with characters STS refuses) gets a readable head, `@` and a digest of
    the whole subject. `@` never occurs in the readable form, so the two forms never
    meet, and two subjects share a name only if their SHA-256 digests share 48 bits.
    """
    match = _READABLE_SUBJECT.fullmatch(subject)
    if match is not None and len(match.group(1)) + 1 + len(match.group(3)) <= _SESSION_NAME_MAX:
        return f"{match.group(1)}.{match.group(3)}"
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]
    head = subject.removeprefix("system:serviceaccount:").replace(":", ".")
    head = _SESSION_NAME_BAD_CHARS.sub("-", head)[: _SESSION_NAME_MAX - _DIGEST_HEX - 1]
    return f"{head}@{digest}"


def account_id_of(assumed_role_arn: str) -> str:
    # arn:aws:sts::123456789012:assumed-role/Role/session
    return assumed_role_arn.split(":")[4]


_MESSAGE_MAX_CHARS = 300
_JWT_LIKE = re.compile(r"eyJ[\w-]{8,}\.[\w-]*\.?[\w-]*")


def safe_text(text: str, token: str | None = None) -> str:
    """What an upstream said, fit to repeat in a log line or an error body: the caller's
    token and anything shaped like a JWT removed, control characters dropped, length capped.
    An STS message is short and never holds a secret, but a proxy in the way might echo the
    request, and the request holds the token."""
    if token:
        text = text.replace(token, "<token>")
    text = _JWT_LIKE.sub("<jwt>", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= _MESSAGE_MAX_CHARS else text[: _MESSAGE_MAX_CHARS - 3] + "..."


def error_of(exc: ClientError, token: str | None = None) -> tuple[str, str]:
    """STS's error code and message, fit to repeat (see `safe_text`)."""
    error = exc.response.get("Error", {})
    return safe_text(str(error.get("Code", "Unknown")))[:64], safe_text(str(error.get("Message", "")), token)


def classify(exc: ClientError, role_arn: str, token: str | None = None) -> StsError:
    code, message = error_of(exc, token)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    said = f"{code}: {message}" if message else code
    if status:
        said = f"{said} (HTTP {status})"
    if code in _DENIALS:
        return StsDeniedError(f"STS refused AssumeRoleWithWebIdentity for {role_arn}: {said}", sts_code=code)
    if code in _PASSING_DENIALS:
        return StsDeniedError(
            f"STS refused AssumeRoleWithWebIdentity for {role_arn}: {said}", sts_code=code, permanent=False
        )
    if code in THROTTLING_CODES or status in (429, 503) or status >= 500 or code == "IDPCommunicationError":
        return StsUnavailableError(
            f"STS answered AssumeRoleWithWebIdentity for {role_arn} with {said}",
            sts_code=code,
            throttled=code in THROTTLING_CODES or status in (429, 503),
        )
    # ValidationError and the like: our request is wrong (e.g. a session longer than the
    # role allows). Retrying cannot help; the operator must change a setting.
    return StsUnavailableError(
        f"STS rejected the AssumeRoleWithWebIdentity request for {role_arn}: {said}", sts_code=code, permanent=True
    )


def credentials_from(response: Any) -> Credentials:
    """The credentials of a parsed AssumeRoleWithWebIdentity answer; StsUnavailableError
    naming the missing part if it is not one (a proxy's page, a truncated body)."""
    issued = response.get("Credentials") if isinstance(response, dict) else None
    user = response.get("AssumedRoleUser") if isinstance(response, dict) else None
    if not isinstance(issued, dict) or not isinstance(user, dict):
        raise _malformed("without Credentials and AssumedRoleUser")
    for name in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        if not isinstance(issued.get(name), str) or not issued[name]:
            raise _malformed(f"without Credentials.{name}")
    expiration = issued.get("Expiration")
    if not isinstance(expiration, datetime) or expiration.tzinfo is None:
        raise _malformed("without a usable Credentials.Expiration")
    arn = user.get("Arn")
    if not isinstance(arn, str) or not _ASSUMED_ROLE_ARN.fullmatch(arn):
        raise _malformed("without a usable AssumedRoleUser.Arn")
    return Credentials(
        access_key_id=issued["AccessKeyId"],
        secret_access_key=issued["SecretAccessKey"],
        session_token=issued["SessionToken"],
        # botocore gives a dateutil tzlocal(), a new one per answer: a few hundred bytes
        # kept with every cached identity, and a slow timestamp() on every hit.
        expiration=expiration.astimezone(timezone.utc),
        account_id=account_id_of(arn),
        assumed_role_arn=arn,
    )


_ASSUMED_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:sts::\d{12}:assumed-role/\S+", re.ASCII)


def _malformed(what: str) -> StsUnavailableError:
    return StsUnavailableError(
        f"STS answered AssumeRoleWithWebIdentity {what}: not an answer it gives (a proxy in the way?)",
        sts_code="MalformedResponse",
    )


class StsSource:
    """Exchanges verified tokens for credentials; one aiobotocore client for the daemon's life."""

    def __init__(self, *, region: str, endpoint_url: str, session_duration_seconds: int, timeout_seconds: float) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        self._duration = session_duration_seconds
        self._timeout = timeout_seconds
        # connect + read, each bounded by botocore; this is the backstop.
        self._deadline = timeout_seconds * 2 + 1.0
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> StsSource:
        config = Config(
            signature_version=UNSIGNED,
            # A refused or black-holed STS shows in seconds; a slow answer is waited for.
            connect_timeout=min(self._timeout, CONNECT_TIMEOUT_SECONDS),
            read_timeout=self._timeout,
            retries={"mode": "standard", "total_max_attempts": 1},  # retries are limiter.py's
            user_agent_extra="irsa-cache",
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "sts", region_name=self._region, endpoint_url=self._endpoint_url, config=config
            )
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def assume_role(self, *, role_arn: str, token: VerifiedToken) -> Credentials:
        # Every exception is translated here, and never chained: botocore's parse errors
        # quote the body they could not parse, and an answer's body holds the secret key.
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._client.assume_role_with_web_identity(
                    RoleArn=role_arn,
                    RoleSessionName=session_name_for(token.identity.subject),
                    WebIdentityToken=token.raw,
                    DurationSeconds=self._duration,
                )
        except ClientError as exc:
            raise classify(exc, role_arn, token.raw) from None
        except (TimeoutError, ConnectTimeoutError, ReadTimeoutError):
            raise StsTimeoutError(
                f"STS did not answer within {self._timeout:g} s ({self._endpoint_url})", sts_code="Timeout"
            ) from None
        except EndpointConnectionError:
            raise StsUnavailableError(
                f"cannot connect to STS at {self._endpoint_url}", sts_code="ConnectionError"
            ) from None
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StsUnavailableError(
                f"STS call to {self._endpoint_url} failed: {type(exc).__name__}", sts_code="ConnectionError"
            ) from None
        except Exception:
            # botocore's parser raises what it meets on a body it cannot read: its own
            # ResponseParserError, but also KeyError, ValueError (a bad timestamp) and more.
            raise _malformed("with a body that does not parse") from None
        return credentials_from(response)
