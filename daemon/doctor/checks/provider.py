"""Checks of the provider link: is an OIDC provider registered in IAM for exactly the
token's issuer, and does it accept the audience?

STS picks the provider whose `https://` + URL equals the token's `iss`; a provider of
the same cluster in another region, or of the cluster before it was recreated, is
another provider. Those near misses are named, because they are the usual cause.
"""

from __future__ import annotations

from daemon.doctor import issuers
from daemon.doctor.facts import Facts
from daemon.doctor.model import Check, Finding, Link, failed, passed, skipped


def _register_fix(issuer: str, audience: str) -> str:
    eks = issuers.eks_parts(issuer)
    command = (f"aws iam create-open-id-connect-provider --url {issuer} --client-id-list {audience}"
               " --thumbprint-list <sha1 of the issuer's TLS root certificate>")
    if eks:
        command = (f"eksctl utils associate-iam-oidc-provider --region {eks[0]} --cluster <cluster> --approve, or "
                   + command)
    return f"register the issuer in IAM: {command}"


def check_registered(facts: Facts) -> Finding:
    providers = facts.inputs.providers
    if providers is None:
        return skipped("not checked: no providers given (--oidc-providers FILE from aws iam "
                       "list-open-id-connect-providers / get-open-id-connect-provider, or --live)")
    if facts.issuer is None:
        return skipped("not checked: no issuer known (give --token or --cluster-issuer)")
    issuer = facts.issuer.value
    if not issuer.startswith("https://"):
        return skipped("not checked: the issuer is not https, and IAM registers only https issuers (see token.issuer)")
    if facts.provider is not None:
        return passed(f"{facts.provider.arn} is registered for {issuer}")
    near = [(provider, issuers.difference(issuer, provider.issuer)) for provider in providers]
    close = [f"{provider.issuer} ({difference})" for provider, difference in near if difference != "another issuer"]
    registered = "; registered: " + ", ".join(close) if close else (
        f"; registered: {', '.join(p.issuer for p in providers)}" if providers else "; none is registered")
    fix = _register_fix(issuer, facts.audience)
    if any("recreated" in text or "region" in text for text in close):
        fix += "; then point the trust policies at the new provider (Principal and condition keys)"
    return failed(f"no OIDC provider in IAM for {issuer} (from {facts.issuer.source}){registered} "
                  f"(STS: \"No OpenIDConnect provider found in your account for {issuer}\")", fix)


def check_audience(facts: Facts) -> Finding:
    provider = facts.provider
    if facts.inputs.providers is None:
        return skipped("not checked: no providers given (--oidc-providers FILE, or --live)")
    if provider is None:
        return skipped("not checked: no provider for the issuer (see provider.registered)")
    if provider.client_ids is None:
        return skipped(f"not checked: the ClientIDList of {provider.arn} was not given")
    if facts.audience not in provider.client_ids:
        return failed(
            f"{provider.arn} accepts the client IDs {list(provider.client_ids)}, not {facts.audience!r} "
            "(STS: \"Incorrect token audience\")",
            f"aws iam add-client-id-to-open-id-connect-provider --open-id-connect-provider-arn {provider.arn} "
            f"--client-id {facts.audience}",
        )
    return passed(f"{provider.arn} accepts the audience {facts.audience!r}")


CHECKS = (
    Check(id="provider.registered", link=Link.PROVIDER, run=check_registered,
          catches="no IAM OIDC provider for the token's issuer; names near misses: another region, a recreated "
                  "cluster (new id), a trailing slash or scheme"),
    Check(id="provider.audience", link=Link.PROVIDER, run=check_audience,
          catches="the provider's client IDs lack the audience (STS: Incorrect token audience)"),
)
