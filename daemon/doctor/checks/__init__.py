"""Every check, in the order doctor walks the chain: token, provider, trust policy,
service account, pod, STS. The order is the report's order, and the first failure in
it is "the broken link"."""

from __future__ import annotations

from daemon.doctor.checks import fetched, pod, provider, service_account, sts, token, trust
from daemon.doctor.facts import Facts
from daemon.doctor.model import Check, Result

CHECKS: tuple[Check, ...] = (
    *fetched.TOKEN, *token.CHECKS,
    *fetched.PROVIDER, *provider.CHECKS,
    *fetched.TRUST_POLICY, *trust.CHECKS,
    *fetched.SERVICE_ACCOUNT, *service_account.CHECKS,
    *fetched.POD, *pod.CHECKS,
    *sts.CHECKS,
)


def run(facts: Facts, *, live: bool) -> list[Result]:
    """Each check on the facts, in order; checks of live reads only with --live."""
    results = []
    for check in CHECKS:
        if check.live_only and not live:
            continue
        finding = check.run(facts)
        results.append(Result(id=check.id, link=finding.points_at or check.link, status=finding.status,
                              message=finding.message, fix=finding.fix))
    return results
