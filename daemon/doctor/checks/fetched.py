"""Checks that report a live read (with --live): the read itself is the finding.

A live input that could not be read is a finding of its link: a pod or ServiceAccount
that does not exist is a failure; a read refused for want of a permission, or an API
that does not answer, is a warning that names the permission, and the checks that
needed the input say they were not checked.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon.doctor.facts import Facts
from daemon.doctor.model import Check, Finding, Link, skipped


def _reader(check_id: str, what: str) -> Callable[[Facts], Finding]:
    def run(facts: Facts) -> Finding:
        found = facts.live.fetches.get(check_id) if facts.live is not None else None
        return found if found is not None else skipped(f"not read: {what}")

    return run


def fetched(check_id: str, link: Link, what: str, catches: str) -> Check:
    return Check(id=check_id, link=link, run=_reader(check_id, what), catches=catches, live_only=True)


TOKEN = (
    fetched("token.request", Link.TOKEN, "no ServiceAccount to ask a token for, or --token was given",
            "with --live: TokenRequest for the ServiceAccount fails (missing account, no create serviceaccounts/token)"),
    fetched("token.discovery", Link.TOKEN, "no cluster to ask, or --cluster-issuer and --jwks were given",
            "with --live: the API server's discovery document or key set cannot be read"),
)
PROVIDER = (
    fetched("provider.read", Link.PROVIDER, "--oidc-providers was given",
            "with --live: the providers cannot be listed (iam:ListOpenIDConnectProviders, GetOpenIDConnectProvider)"),
)
TRUST_POLICY = (
    fetched("trust-policy.read", Link.TRUST_POLICY, "no role known, or --trust-policy was given",
            "with --live: the role does not exist, or iam:GetRole is not allowed"),
)
SERVICE_ACCOUNT = (
    fetched("service-account.read", Link.SERVICE_ACCOUNT, "no ServiceAccount named, or --service-account was given",
            "with --live: the ServiceAccount does not exist, or get serviceaccounts is not allowed"),
)
POD = (
    fetched("pod.read", Link.POD, "no pod named (--pod-name), or --pod was given",
            "with --live: the pod does not exist, or get pods is not allowed"),
)
