"""Live reads from IAM (the role and the OIDC providers, with the operator's credentials)
and the real AssumeRoleWithWebIdentity, for `doctor --live`.

The only doctor module that knows botocore. Endpoints follow botocore's own rules: an
explicit URL (the --iam-endpoint-url / --sts-endpoint-url flags), else
AWS_ENDPOINT_URL_IAM / AWS_ENDPOINT_URL_STS, else AWS's. AssumeRoleWithWebIdentity is
unsigned, exactly as the daemon calls it, with the daemon's session name; the
credentials STS returns are never printed and are dropped at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiobotocore.session import AioSession, get_session
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from botocore.parsers import ResponseParserError

from daemon import config
from daemon.sts import error_of, safe_text
from daemon.doctor import issuers
from daemon.doctor.checks.sts import StsAnswer
from daemon.doctor.inputs import Role, providers_of
from daemon.doctor.model import Finding, InputError, Read, failed, passed, warned

CALL_TIMEOUT_SECONDS = 15.0
DOCTOR_SESSION_SECONDS = config.STS_MIN_SESSION_SECONDS  # the shortest: doctor drops the credentials anyway
IAM_SIGNING_REGION = "us-east-1"  # IAM is global; its endpoint signs in us-east-1


def _config(**extra: Any) -> Config:
    return Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 2}, **extra)


def _iam_failure(exc: Exception, permission: str, what: str) -> Finding:
    if isinstance(exc, NoCredentialsError):
        return warned(f"no AWS credentials to read {what}: not checked",
                      "give credentials as for the AWS CLI (AWS_PROFILE, AWS_ACCESS_KEY_ID, SSO), or give the file")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
            return warned(f"IAM refused {permission} ({code}): {what} not checked",
                          f"allow {permission} to your AWS identity, or give the file instead")
        return warned(f"IAM answered {code} for {what}: {error.get('Message', '')}",
                      "check your AWS credentials and --iam-endpoint-url")
    return warned(f"cannot reach IAM for {what}: {type(exc).__name__}: {exc}",
                  "check the network path to IAM, or --iam-endpoint-url / AWS_ENDPOINT_URL_IAM")


def session() -> AioSession:
    """One session per doctor run: botocore loads each service's model once per session."""
    return get_session()


async def read_role(role_arn: str, *, session: AioSession, endpoint_url: str | None) -> Read:
    """The role's trust policy and MaxSessionDuration, by iam:GetRole."""
    parts = issuers.role_parts(role_arn)
    if parts is None:
        return Read(value=None, finding=failed(f"{role_arn!r} is not a role ARN: GetRole needs one",
                                               "give --role-arn arn:aws:iam::<account>:role/<name>"))
    name = parts[2]
    try:
        async with session.create_client("iam", region_name=IAM_SIGNING_REGION, endpoint_url=endpoint_url,
                                               config=_config()) as iam:
            async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                role = (await iam.get_role(RoleName=name))["Role"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchEntity":
            return Read(value=None, finding=failed(
                f"role {name} does not exist in the account of your AWS credentials (STS answers AccessDenied "
                "for a missing role)",
                f"create the role, or fix the ServiceAccount's annotation; if {role_arn} is in another account, "
                "run doctor with that account's credentials"))
        return Read(value=None, finding=_iam_failure(exc, "iam:GetRole", f"role {name}"))
    except (BotoCoreError, TimeoutError, OSError) as exc:
        return Read(value=None, finding=_iam_failure(exc, "iam:GetRole", f"role {name}"))
    document = role.get("AssumeRolePolicyDocument")
    limit = role.get("MaxSessionDuration")
    found = Role(arn=role.get("Arn", role_arn), max_session_seconds=int(limit) if limit else None)
    return Read(value=(document, found), finding=passed(f"read role {found.arn} and its trust policy"))


async def read_providers(*, session: AioSession, endpoint_url: str | None) -> Read:
    """Every OIDC provider of the account, with its URL and client IDs."""
    what = "the OIDC providers"
    permission = "iam:ListOpenIDConnectProviders and iam:GetOpenIDConnectProvider"
    try:
        async with session.create_client("iam", region_name=IAM_SIGNING_REGION, endpoint_url=endpoint_url,
                                               config=_config()) as iam:
            async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                listed = (await iam.list_open_id_connect_providers())["OpenIDConnectProviderList"]
                found = []
                for item in listed:
                    detail = await iam.get_open_id_connect_provider(OpenIDConnectProviderArn=item["Arn"])
                    found.append({"Arn": item["Arn"], "Url": detail.get("Url"),
                                  "ClientIDList": detail.get("ClientIDList", [])})
    except (ClientError, BotoCoreError, TimeoutError, OSError) as exc:
        return Read(value=None, finding=_iam_failure(exc, permission, what))
    try:
        providers = providers_of(found, "IAM")
    except InputError as exc:
        return Read(value=None, finding=warned(f"IAM's answer is not usable: {exc}", "check --iam-endpoint-url"))
    return Read(value=providers, finding=passed(f"read {len(providers)} OIDC provider(s) from IAM"))


async def assume_role(*, role_arn: str, token: str, session_name: str, region: str, session: AioSession,
                      endpoint_url: str | None) -> StsAnswer:
    """The real AssumeRoleWithWebIdentity, unsigned, one attempt; STS's answer as data."""
    config = _config(signature_version=UNSIGNED)
    endpoint = endpoint_url or f"the STS endpoint of {region}"
    try:
        async with session.create_client("sts", region_name=region, endpoint_url=endpoint_url,
                                               config=config) as sts:
            endpoint = sts.meta.endpoint_url
            async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                try:
                    answer = await sts.assume_role_with_web_identity(
                        RoleArn=role_arn, RoleSessionName=session_name, WebIdentityToken=token,
                        DurationSeconds=DOCTOR_SESSION_SECONDS)
                    expiration, assumed = answer["Credentials"]["Expiration"], answer["AssumedRoleUser"]["Arn"]
                except (ResponseParserError, KeyError, ValueError, TypeError) as exc:
                    # botocore's parser raises what it meets on a body it cannot read, quoting
                    # the body, which may hold credentials: only what happened is said.
                    return StsAnswer(endpoint=endpoint, unusable=f"an answer doctor cannot read ({type(exc).__name__})")
    except ClientError as exc:
        # Repeated as the daemon repeats it: a proxy in the way may echo the request, token and all.
        code, message = error_of(exc, token)
        return StsAnswer(endpoint=endpoint, code=code, message=message)
    except (BotoCoreError, NoRegionError, TimeoutError, OSError) as exc:
        return StsAnswer(endpoint=endpoint, unreachable=safe_text(f"{type(exc).__name__}: {exc}", token))
    return StsAnswer(endpoint=endpoint, assumed_role_arn=assumed,
                     expiration=expiration.strftime("%Y-%m-%dT%H:%M:%SZ"))
