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
from datetime import timezone
from typing import Any

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

_SESSION_NAME_MAX = 64
_SESSION_NAME_BAD_CHARS = re.compile(r"[^\w+=,.@-]", re.ASCII)  # STS takes ASCII only


def session_name_for(subject: str) -> str:
    """A RoleSessionName that CloudTrail readers recognise: `namespace.serviceaccount`.

    STS allows 2-64 characters of `[\\w+=,.@-]`; longer names keep a readable head and a
    hash of the whole subject so that two long subjects never share a session name.
    """
    name = subject.removeprefix("system:serviceaccount:").replace(":", ".")
    name = _SESSION_NAME_BAD_CHARS.sub("-", name)
    if len(name) > _SESSION_NAME_MAX:
        digest = hashlib.sha256(subject.encode()).hexdigest()[:8]
        name = f"{name[: _SESSION_NAME_MAX - 9]}-{digest}"
    return name.ljust(2, "-")


def account_id_of(assumed_role_arn: str) -> str:
    # arn:aws:sts::123456789012:assumed-role/Role/session
    return assumed_role_arn.split(":")[4]


def classify(exc: ClientError, role_arn: str) -> StsError:
    error = exc.response.get("Error", {})
    code = error.get("Code", "Unknown")
    message = error.get("Message", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    text = f"STS refused AssumeRoleWithWebIdentity for {role_arn}: {code}: {message}"
    if code in _DENIALS:
        return StsDeniedError(text, sts_code=code)
    if code in _PASSING_DENIALS:
        return StsDeniedError(text, sts_code=code, permanent=False)
    if code in THROTTLING_CODES or status in (429, 503) or status >= 500 or code == "IDPCommunicationError":
        return StsUnavailableError(
            f"STS failed AssumeRoleWithWebIdentity for {role_arn}: {code}: {message}",
            sts_code=code,
            throttled=code in THROTTLING_CODES or status in (429, 503),
        )
    # ValidationError and the like: our request is wrong (e.g. a session longer than the
    # role allows). Retrying cannot help; the operator must change a setting.
    return StsUnavailableError(text, sts_code=code, permanent=True)


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
            connect_timeout=self._timeout,
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
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._client.assume_role_with_web_identity(
                    RoleArn=role_arn,
                    RoleSessionName=session_name_for(token.identity.subject),
                    WebIdentityToken=token.raw,
                    DurationSeconds=self._duration,
                )
        except ClientError as exc:
            raise classify(exc, role_arn) from exc
        except (TimeoutError, ConnectTimeoutError, ReadTimeoutError) as exc:
            raise StsTimeoutError(f"STS did not answer within {self._timeout:g} s ({self._endpoint_url})") from exc
        except EndpointConnectionError as exc:
            raise StsUnavailableError(f"cannot reach STS at {self._endpoint_url}: {exc}") from exc
        except BotoCoreError as exc:
            raise StsUnavailableError(f"STS call failed: {exc}") from exc
        issued = response["Credentials"]
        assumed_role_arn = response["AssumedRoleUser"]["Arn"]
        return Credentials(
            access_key_id=issued["AccessKeyId"],
            secret_access_key=issued["SecretAccessKey"],
            session_token=issued["SessionToken"],
            # botocore gives a dateutil tzlocal(), a new one per answer: a few hundred bytes
            # kept with every cached identity, and a slow timestamp() on every hit.
            expiration=issued["Expiration"].astimezone(timezone.utc),
            account_id=account_id_of(assumed_role_arn),
            assumed_role_arn=assumed_role_arn,
        )
