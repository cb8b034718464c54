"""The sts link: STS's own verdict on the exchange (only with --live), and the map from
each STS error to the link it points at.

STS's errors are terse ("Not authorized to perform sts:AssumeRoleWithWebIdentity");
doctor's other checks know why. So an error names the link it blames and, when one of
that link's checks failed, that check's finding and fix. The result's `link` is the
blamed link, so "the first broken link" reads the same offline and live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.doctor.checks import provider as provider_checks
from daemon.doctor.checks import token as token_checks
from daemon.doctor.checks import trust as trust_checks
from daemon.doctor.facts import Facts
from daemon.doctor.model import Check, Finding, Link, Status, passed, skipped, warned
from daemon.sts import THROTTLING_CODES

CheckFn = Callable[[Facts], Finding]
KEY_SET_REACHABLE = ("the issuer's /.well-known/openid-configuration and its jwks_uri must answer over HTTPS from "
                     "the internet (EKS serves them for you; a self-hosted issuer needs a public bucket or endpoint)")


@dataclass(frozen=True, kw_only=True)
class StsAnswer:
    """What STS answered doctor's AssumeRoleWithWebIdentity (see live.py)."""

    endpoint: str
    assumed_role_arn: str | None = None  # set on success
    expiration: str | None = None
    code: str | None = None  # STS's error code
    message: str | None = None
    unreachable: str | None = None  # no answer at all: why
    unusable: str | None = None  # an answer doctor cannot read: what kind


@dataclass(frozen=True, kw_only=True)
class Blame:
    """An STS error's meaning: the link it points at, the checks that would say why, and a
    fix for when none of them failed."""

    link: Link
    checks: Sequence[CheckFn]
    explanation: str
    fix: str


def blame(code: str, message: str) -> Blame:
    """The link an STS error points at. Codes and messages are STS's own."""
    text = message.lower()
    trust_fns: list[CheckFn] = [trust_checks.check_document, trust_checks.check_principal, trust_checks.check_action,
                                trust_checks.check_condition_issuer, trust_checks.check_literal_wildcard,
                                trust_checks.check_conditions]
    if code == "AccessDenied":
        if "explicit deny" in text:
            return Blame(link=Link.TRUST_POLICY, checks=trust_fns,
                         explanation="an explicit Deny: in the trust policy, or in an SCP or RCP of the organization",
                         fix="find the Deny: the trust policy's Deny statements, then the organization's service and "
                             "resource control policies")
        return Blame(link=Link.TRUST_POLICY, checks=trust_fns,
                     explanation="the role's trust policy does not admit this provider, subject or audience (or the "
                                 "role does not exist in this account)",
                     fix="give doctor the trust policy (--trust-policy, or --live with iam:GetRole) to see which "
                         "condition refuses")
    if code == "InvalidIdentityToken":
        if "no openidconnect provider found" in text:
            return Blame(link=Link.PROVIDER, checks=[provider_checks.check_registered],
                         explanation="IAM has no OIDC provider for the token's issuer",
                         fix="register the token's issuer as an OIDC provider in IAM (see provider.registered)")
        if "incorrect token audience" in text:
            return Blame(link=Link.PROVIDER, checks=[token_checks.check_audience, provider_checks.check_audience],
                         explanation="the token's aud is not among the provider's client IDs",
                         fix="add the audience to the provider's client IDs, or project the token with one of them")
        if "missing a required claim: aud" in text:
            return Blame(link=Link.TOKEN, checks=[token_checks.check_audience],
                         explanation="the token has no aud claim", fix="project the token with an audience")
        if "couldn't retrieve verification key" in text or "verification key" in text:
            return Blame(link=Link.PROVIDER, checks=[], explanation="STS could not fetch the issuer's key set",
                         fix=KEY_SET_REACHABLE)
        if "thumbprint" in text:
            return Blame(link=Link.PROVIDER, checks=[],
                         explanation="the issuer's TLS certificate does not match the provider's thumbprint",
                         fix="update the provider's thumbprint (aws iam update-open-id-connect-provider-thumbprint)")
        return Blame(link=Link.TOKEN, checks=[token_checks.check_jwt, token_checks.check_signature,
                                              token_checks.check_issuer, token_checks.check_audience],
                     explanation="STS refused the token itself",
                     fix="check the token against the issuer's key set (--jwks) and its claims")
    if code == "IDPCommunicationError":
        return Blame(link=Link.PROVIDER, checks=[],
                     explanation="STS could not reach the issuer to fetch its key set", fix=KEY_SET_REACHABLE)
    if code == "ExpiredTokenException":
        return Blame(link=Link.TOKEN, checks=[token_checks.check_expiry], explanation="the token has expired",
                     fix="use a fresh token: the kubelet rotates the projected one")
    if code == "IDPRejectedClaim":
        return Blame(link=Link.TOKEN, checks=[token_checks.check_subject, token_checks.check_audience],
                     explanation="the identity provider rejected a claim of the token",
                     fix="check the token's claims against what the provider expects")
    if code == "ValidationError" and "durationseconds" in text:
        return Blame(link=Link.TRUST_POLICY, checks=[trust_checks.check_max_session],
                     explanation="the session asked for is longer than the role's maximum",
                     fix="raise the role's MaxSessionDuration or lower the daemon's --session-duration")
    if code == "RegionDisabledException":
        return Blame(link=Link.STS, checks=[], explanation="STS is not activated in this region for the account",
                     fix="activate the region in IAM's account settings (Security Token Service regions), or use "
                         "another region (--region)")
    return Blame(link=Link.STS, checks=[], explanation="an STS error doctor has no map for",
                 fix="read STS's message; AssumeRoleWithWebIdentity's documentation lists its errors")


def check_assume_role(facts: Facts) -> Finding:
    live = facts.live
    if live is None:
        return skipped("not checked: STS's verdict is only known with --live (which calls AssumeRoleWithWebIdentity)")
    answer: StsAnswer | None = live.sts
    if answer is None:
        return skipped(f"not checked: {live.sts_skip}")
    if answer.unreachable is not None:
        return warned(f"no answer from STS at {answer.endpoint}: {answer.unreachable}",
                      "check the network path to STS, --region, or --sts-endpoint-url / AWS_ENDPOINT_URL_STS")
    if answer.unusable is not None:
        return warned(f"{answer.endpoint} answered, but {answer.unusable}: no verdict",
                      "check what answers there (a proxy in the way?), or --sts-endpoint-url / AWS_ENDPOINT_URL_STS")
    if answer.code is None:
        return passed(f"STS issued credentials for {answer.assumed_role_arn} (until {answer.expiration}); doctor "
                      "discarded them")
    said = f"STS answered {answer.code}: {answer.message}"
    if answer.code in THROTTLING_CODES:
        return warned(f"{said}: throttled, no verdict", "run doctor again in a minute")
    cause = blame(answer.code, answer.message or "")
    for check in cause.checks:
        finding = check(facts)
        if finding.status is Status.FAIL:
            return Finding(status=Status.FAIL, message=f"{said}; the broken link is {cause.link.value}: {finding.message}",
                           fix=finding.fix or cause.fix, points_at=cause.link)
    return Finding(status=Status.FAIL, message=f"{said}; the broken link is {cause.link.value}: {cause.explanation}",
                   fix=cause.fix, points_at=cause.link)


CHECKS = (
    Check(id="sts.assume-role", link=Link.STS, run=check_assume_role,
          catches="with --live, STS's own answer; each error is mapped to the link it points at (AccessDenied: the "
                  "trust-policy condition; no OpenIDConnect provider: provider; key set unreachable: provider; "
                  "expired: token; region disabled: sts)"),
)
