"""Issuer URLs as the four systems spell them, and how two of them differ.

A token says `iss: https://oidc.eks.us-west-2.amazonaws.com/id/ABC`; IAM registers
the provider as `oidc.eks.us-west-2.amazonaws.com/id/ABC` (no scheme) under
`arn:aws:iam::<account>:oidc-provider/oidc.eks.us-west-2.amazonaws.com/id/ABC`; a trust
policy's condition keys are `oidc.eks.us-west-2.amazonaws.com/id/ABC:sub`. STS finds
the provider by `https://` + its URL, character for character: a trailing slash or
another cluster's id is another provider.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EKS_ISSUER = re.compile(r"(?:https?://)?oidc\.eks\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/id/([^/]+)/?", re.IGNORECASE)
ROLE_ARN_PARTS = re.compile(r"arn:(aws[a-z-]*):iam::(\d{12}):role/(?:.*/)?([^/]+)")
PROVIDER_ARN = re.compile(r"arn:(aws[a-z-]*):iam::(\d{12}):oidc-provider/(.+)")


@dataclass(frozen=True, kw_only=True)
class Provider:
    """An IAM OIDC provider: its ARN, its URL as IAM stores it (no scheme), its client IDs
    (None when the input did not say)."""

    arn: str
    url: str
    client_ids: tuple[str, ...] | None

    @property
    def issuer(self) -> str:
        """The `iss` a token must carry for STS to pick this provider."""
        return f"https://{self.url}"


def without_scheme(url: str) -> str:
    return re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", url)


def provider_arn(*, partition: str, account: str, issuer: str) -> str:
    return f"arn:{partition}:iam::{account}:oidc-provider/{without_scheme(issuer)}"


def condition_prefix(issuer: str) -> str:
    """`oidc.eks.../id/ABC`: what trust-policy condition keys start with for this issuer."""
    return without_scheme(issuer)


def eks_parts(url: str) -> tuple[str, str] | None:
    """(region, cluster id) of an EKS issuer, else None."""
    found = EKS_ISSUER.fullmatch(url)
    return (found.group(1).lower(), found.group(2).upper()) if found else None


def role_parts(arn: str) -> tuple[str, str, str] | None:
    """(partition, account, role name) of a role ARN."""
    found = ROLE_ARN_PARTS.fullmatch(arn)
    return (found.group(1), found.group(2), found.group(3)) if found else None


def provider_url_of_arn(arn: str) -> str | None:
    found = PROVIDER_ARN.fullmatch(arn)
    return found.group(3) if found else None


def difference(actual: str, expected: str) -> str | None:
    """How issuer `actual` differs from `expected`, in words; None when they are equal."""
    if actual == expected:
        return None
    if not actual.startswith("https://"):
        scheme = actual.split("://", 1)[0] if "://" in actual else "no scheme"
        if without_scheme(actual).rstrip("/") == without_scheme(expected).rstrip("/"):
            return f"its scheme is {scheme}, IAM providers are https only"
    if actual.rstrip("/") == expected.rstrip("/"):
        return "they differ only by a trailing slash, which STS does not ignore"
    if actual.lower() == expected.lower():
        return "they differ only in letter case, which STS does not ignore"
    ours, theirs = eks_parts(actual), eks_parts(expected)
    if ours and theirs:
        if ours[0] != theirs[0] and ours[1] == theirs[1]:
            return f"another region: {ours[0]}, not {theirs[0]}"
        if ours[0] != theirs[0]:
            return f"another cluster in another region ({ours[0]}, not {theirs[0]})"
        return (f"another cluster id: {ours[1]}, not {theirs[1]} (a recreated cluster gets a new issuer "
                "and needs a new provider and new trust policies)")
    return "another issuer"
