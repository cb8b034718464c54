"""Checks of the trust-policy link: does the role's trust policy, evaluated as IAM
evaluates it (policy.py), admit this provider, this action, this subject and audience?

When it does not, the message names the statement and the condition that rejects the
request, with the value the request carries: the value that would pass.
"""

from __future__ import annotations

import json

from daemon import config
from daemon.doctor import issuers, policy
from daemon.doctor.facts import WEB_IDENTITY_ACTION, Facts, subject_of_account
from daemon.doctor.model import Check, Finding, Link, failed, passed, skipped, warned
from daemon.doctor.policy import ConditionOutcome, Effect, StatementOutcome, Truth

# What `irsa-cache serve` asks STS for unless told otherwise (--session-duration).
DAEMON_SESSION_SECONDS = int(config.parse_duration(
    next(option.default for option in config.SERVE_OPTIONS if option.flag == "--session-duration") or "3600"))
LITERAL_OPERATORS = frozenset({"StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"})
PROBE_SUBJECT = subject_of_account("doctor-probe-namespace", "doctor-probe-account")
CLAIM_KEYS = frozenset({"sub", "aud", "amr", "azp", "oaud", "email"})


def _update_fix(facts: Facts, change: str) -> str:
    role = facts.role_name or "<role>"
    return (f"{change}, in the trust policy of role {role} "
            f"(aws iam update-assume-role-policy --role-name {role} --policy-document file://trust-policy.json)")


def _gate(facts: Facts) -> Finding | None:
    if facts.inputs.trust_policy is None:
        return skipped("not checked: no trust policy given (--trust-policy FILE from aws iam get-role, or --live)")
    if facts.policy is None:
        return skipped("not checked: the trust policy is not valid (see trust-policy.document)")
    if facts.inputs.providers is not None and facts.issuer is not None and facts.provider is None:
        return skipped("not checked: no provider is registered for the issuer (see provider.registered)")
    if facts.subject is None:
        return skipped("not checked: no identity known (give --token, --service-account or --pod)")
    if facts.issuer is None:
        return skipped("not checked: no issuer known (give --token or --cluster-issuer)")
    if facts.decision is None:
        return skipped("not checked: no provider ARN known (give --role-arn or --oidc-providers)")
    return None


def _trusting(facts: Facts) -> tuple[StatementOutcome, ...]:
    assert facts.decision is not None
    return tuple(s for s in facts.decision.statements if s.statement.effect == "Allow" and s.principal_matches)


def _candidates(facts: Facts) -> tuple[StatementOutcome, ...]:
    return tuple(s for s in _trusting(facts) if s.action_matches)


NO_CANDIDATE = skipped("not checked: no statement allows this provider the action (see trust-policy.principal)")


def _gated_candidates(facts: Facts) -> tuple[StatementOutcome, ...] | Finding:
    """The statements that trust the provider with the action, or why the check is skipped."""
    if (gate := _gate(facts)) is not None:
        return gate
    return _candidates(facts) or NO_CANDIDATE


def check_document(facts: Facts) -> Finding:
    if facts.inputs.trust_policy is None:
        return skipped("not checked: no trust policy given (--trust-policy FILE from aws iam get-role, or --live)")
    if facts.policy_problem is not None:
        return failed(f"the trust policy is not one IAM accepts: {facts.policy_problem}",
                      _update_fix(facts, "write a valid policy document"))
    assert facts.policy is not None
    return passed(f"{len(facts.policy.statements)} statement(s)")


def check_principal(facts: Facts) -> Finding:
    if (gate := _gate(facts)) is not None:
        return gate
    assert facts.request is not None and facts.policy is not None
    wanted = facts.request.principal
    trusting = _trusting(facts)
    if trusting:
        return passed(f"{trusting[0].statement.label} trusts {wanted}")
    named = [f"{kind} {value}" for s in facts.policy.statements if s.effect == "Allow"
             for kind, values in (s.principal or {}).items() for value in values]
    hint = ""
    wanted_url = issuers.provider_url_of_arn(wanted) or ""
    for statement in facts.policy.statements:
        for arn in statement.federated():
            url = issuers.provider_url_of_arn(arn)
            if url and wanted_url:
                difference = issuers.difference(f"https://{url}", f"https://{wanted_url}")
                if difference and difference != "another issuer":
                    hint = f" ({arn}: {difference})"
    return failed(f"no Allow statement trusts {wanted}; the role trusts {', '.join(named) or 'no one'}{hint}",
                  _update_fix(facts, f'set "Principal": {{"Federated": "{wanted}"}}'))


def check_action(facts: Facts) -> Finding:
    if (gate := _gate(facts)) is not None:
        return gate
    trusting = _trusting(facts)
    if not trusting:
        return skipped("not checked: no statement trusts the provider (see trust-policy.principal)")
    candidates = _candidates(facts)
    if candidates:
        return passed(f"{candidates[0].statement.label} allows {WEB_IDENTITY_ACTION}")
    statement = trusting[0].statement
    actions = list(statement.action or ()) or [f"everything but {list(statement.not_action or ())}"]
    return failed(f"{statement.label} trusts the provider for {actions}, not {WEB_IDENTITY_ACTION}",
                  _update_fix(facts, f'set "Action": "{WEB_IDENTITY_ACTION}" in {statement.label}'))


def _other_issuer_keys(statement: StatementOutcome, prefix: str) -> list[tuple[str, str]]:
    """(key, how its issuer differs) for condition keys that name an issuer other than `prefix`."""
    found = []
    for outcome in statement.conditions:
        key_prefix, _, claim = outcome.condition.key.rpartition(":")
        if claim.lower() not in CLAIM_KEYS or not key_prefix or key_prefix.lower().startswith(("aws", "sts")):
            continue
        if key_prefix.lower() != prefix.lower():
            found.append((outcome.condition.key,
                          issuers.difference(f"https://{key_prefix}", f"https://{prefix}") or "another issuer"))
    return found


def check_condition_issuer(facts: Facts) -> Finding:
    candidates = _gated_candidates(facts)
    if isinstance(candidates, Finding):
        return candidates
    prefix = facts.condition_prefix or ""
    for candidate in candidates:
        wrong = _other_issuer_keys(candidate, prefix)
        if wrong:
            keys = ", ".join(key for key, _ in wrong)
            renames = "; ".join(f'rename the key "{key}" to "{prefix}:{key.rpartition(":")[2]}"' for key, _ in wrong)
            return failed(
                f"{candidate.statement.label}: condition key(s) {keys} name another issuer than {prefix} "
                f"({wrong[0][1]}); STS puts no such key in the request, so the condition cannot hold",
                _update_fix(facts, renames),
            )
    return passed(f"condition keys name this issuer ({prefix})")


def _literal_wildcards(statement: StatementOutcome) -> list[ConditionOutcome]:
    return [c for c in statement.conditions
            if c.condition.base in LITERAL_OPERATORS and any(ch in v for v in c.condition.values for ch in "*?")]


def check_literal_wildcard(facts: Facts) -> Finding:
    candidates = _gated_candidates(facts)
    if isinstance(candidates, Finding):
        return candidates
    for candidate in candidates:
        for outcome in _literal_wildcards(candidate):
            condition = outcome.condition
            like = condition.base.replace("Equals", "Like").replace("IgnoreCase", "")
            fix = _update_fix(facts, f'use {like} instead of {condition.base} for "{condition.key}" (a pattern '
                                     "needs StringLike)")
            as_pattern = policy.evaluate_condition(
                policy.Condition(operator=like if not condition.qualifier else f"{condition.qualifier}:{like}",
                                 key=condition.key, values=condition.values),
                facts.request.context if facts.request else policy.Context())
            message = (f"{candidate.statement.label}: {condition.base} compares {json.dumps(list(condition.values))} "
                       "character for character: the * is a star, not a wildcard")
            if outcome.truth is Truth.FALSE and as_pattern.truth is Truth.TRUE:
                return failed(message + f", so it rejects {json.dumps(list(outcome.found or ()))}", fix)
            return warned(message, fix)
    return passed("no StringEquals value holds a * or ?")


def _remedy(outcome: ConditionOutcome, facts: Facts) -> str:
    condition = outcome.condition
    prefix = facts.condition_prefix or ""
    key_prefix, _, claim = condition.key.rpartition(":")
    if outcome.found is None:
        if claim.lower() in CLAIM_KEYS and key_prefix.lower() != prefix.lower():
            return f'rename the key "{condition.key}" to "{prefix}:{claim}"'
        return f'drop the condition on "{condition.key}": STS puts no such key in this request'
    value = outcome.found[0] if len(outcome.found) == 1 else list(outcome.found)
    if condition.negated:
        return f"remove {json.dumps(list(outcome.matched))} from {condition.operator} \"{condition.key}\""
    if condition.base in LITERAL_OPERATORS and any("*" in v or "?" in v for v in condition.values):
        return f'use StringLike for "{condition.key}" (its value is a pattern)'
    return f'admit {json.dumps(value)}: set {condition.operator} "{condition.key}" to it, or add it to the list'


def _describe(outcome: ConditionOutcome) -> str:
    condition = outcome.condition
    wanted = json.dumps(list(condition.values)) if len(condition.values) > 1 else json.dumps(condition.values[0])
    if outcome.found is None:
        return f'{condition.operator} "{condition.key}": the request has no such key'
    found = json.dumps(outcome.found[0] if len(outcome.found) == 1 else list(outcome.found))
    if outcome.truth is Truth.TRUE:
        return f'{condition.operator} "{condition.key}" matches {found}'
    if condition.negated:
        return f'{condition.operator} "{condition.key}" excludes {found} (it matches {json.dumps(list(outcome.matched))})'
    return f'{condition.operator} "{condition.key}" wants {wanted}, the request has {found}'


def check_conditions(facts: Facts) -> Finding:
    if (gate := _gate(facts)) is not None:
        return gate
    decision, request = facts.decision, facts.request
    assert decision is not None and request is not None
    sub = request.context.lookup(f"{facts.condition_prefix}:sub")
    aud = request.context.lookup(f"{facts.condition_prefix}:aud")
    identity = f"sub {sub[0]!r}, aud {aud[0]!r}" if isinstance(sub, tuple) and isinstance(aud, tuple) else "the request"
    if decision.effect is Effect.ALLOW:
        allowing = decision.applying("Allow")[0]
        return passed(f"{allowing.statement.label} admits {identity}")
    if decision.effect is Effect.EXPLICIT_DENY:
        deny = decision.applying("Deny")[0]
        why = "; ".join(_describe(c) for c in deny.conditions) or "it has no condition"
        return failed(f"{deny.statement.label} denies {identity} ({why}); a Deny wins over every Allow",
                      _update_fix(facts, f"narrow or remove {deny.statement.label}"))
    if decision.effect is Effect.UNDETERMINED:
        unknown = sorted({c.condition.key for s in decision.statements for c in s.undetermined})
        return warned(f"the decision for {identity} depends on keys doctor cannot know: {', '.join(unknown)}",
                      "check those conditions against where STS is called from, or run doctor with --live "
                      "to let STS decide")
    candidates = _candidates(facts)
    if not candidates:
        return NO_CANDIDATE
    closest = min(candidates, key=lambda s: len(s.failing))
    reasons = "; ".join(_describe(c) for c in closest.failing)
    remedies = "; ".join(dict.fromkeys(_remedy(c, facts) for c in closest.failing))
    return failed(f"{closest.statement.label} rejects {identity}: {reasons} (STS: AccessDenied, \"Not authorized "
                  f"to perform sts:AssumeRoleWithWebIdentity\")",
                  _update_fix(facts, remedies))


def _names_audience(statement: StatementOutcome, prefix: str) -> bool:
    return any(c.condition.key.lower() == f"{prefix}:aud".lower() for c in statement.conditions)


def check_audience_condition(facts: Facts) -> Finding:
    candidates = _gated_candidates(facts)
    if isinstance(candidates, Finding):
        return candidates
    prefix = facts.condition_prefix or ""
    if any(_other_issuer_keys(candidate, prefix) for candidate in candidates):
        return skipped("not checked: condition keys name another issuer (see trust-policy.condition-issuer)")
    unpinned = [s for s in candidates if not _names_audience(s, prefix)]
    if unpinned:
        return warned(f"{unpinned[0].statement.label} has no condition on {prefix}:aud: a token for any of the "
                      "provider's client IDs is admitted",
                      _update_fix(facts, f'add "StringEquals": {{"{prefix}:aud": "{facts.audience}"}}'))
    return passed(f"{prefix}:aud is pinned")


def check_subject_scope(facts: Facts) -> Finding:
    candidates = _gated_candidates(facts)
    if isinstance(candidates, Finding):
        return candidates
    assert facts.request is not None and facts.policy is not None
    prefix = facts.condition_prefix or ""
    subject = facts.subject.value if facts.subject else "system:serviceaccount:<namespace>:<name>"
    probe = policy.Request(
        principal_type=facts.request.principal_type, principal=facts.request.principal, action=facts.request.action,
        context=facts.request.context.with_value(f"{prefix}:sub", PROBE_SUBJECT))
    for candidate in candidates:
        outcome = policy.evaluate_statement(candidate.statement, probe, version=facts.policy.version)
        if outcome.truth is Truth.TRUE:
            return warned(
                f"{candidate.statement.label} admits every ServiceAccount of the cluster (it admits a made-up "
                f"{PROBE_SUBJECT}): any pod can take this role",
                _update_fix(facts, f'pin "{prefix}:sub" with StringEquals to "{subject}" (or StringLike '
                                   '"system:serviceaccount:<namespace>:*" for one namespace)'),
            )
    return passed("the subject condition admits only chosen ServiceAccounts")


def check_max_session(facts: Facts) -> Finding:
    role = facts.inputs.role
    if role is None or role.max_session_seconds is None:
        return skipped("not checked: the role's MaxSessionDuration is known only from get-role output or --live")
    if role.max_session_seconds < DAEMON_SESSION_SECONDS:
        name = facts.role_name or "<role>"
        return warned(f"the role's maximum session is {role.max_session_seconds} s; irsa-cache asks "
                      f"{DAEMON_SESSION_SECONDS} s by default and STS refuses more than the maximum "
                      "(ValidationError)",
                      f"aws iam update-role --role-name {name} --max-session-duration {DAEMON_SESSION_SECONDS}, or "
                      f"run the daemon with --session-duration {role.max_session_seconds}")
    return passed(f"the role's maximum session is {role.max_session_seconds} s")


CHECKS = (
    Check(id="trust-policy.document", link=Link.TRUST_POLICY, run=check_document,
          catches="the trust policy is not a policy IAM accepts (no Statement, bad Effect, unknown operator)"),
    Check(id="trust-policy.principal", link=Link.TRUST_POLICY, run=check_principal,
          catches="no Allow statement names this OIDC provider as Federated principal (ARN or list); names "
                  "a provider of another cluster or region"),
    Check(id="trust-policy.action", link=Link.TRUST_POLICY, run=check_action,
          catches="the statement trusting the provider does not allow sts:AssumeRoleWithWebIdentity"),
    Check(id="trust-policy.condition-issuer", link=Link.TRUST_POLICY, run=check_condition_issuer,
          catches="condition keys (…:sub, …:aud) that name another issuer than the provider's"),
    Check(id="trust-policy.literal-wildcard", link=Link.TRUST_POLICY, run=check_literal_wildcard,
          catches="StringEquals with a * or ? in it: a literal character, not a wildcard (use StringLike)"),
    Check(id="trust-policy.conditions", link=Link.TRUST_POLICY, run=check_conditions,
          catches="IAM's verdict on this sub and aud: which condition rejects them and the value that would pass; "
                  "an explicit Deny"),
    Check(id="trust-policy.audience-condition", link=Link.TRUST_POLICY, run=check_audience_condition,
          catches="no condition on …:aud (warning)"),
    Check(id="trust-policy.subject-scope", link=Link.TRUST_POLICY, run=check_subject_scope,
          catches="a subject condition (or none) that admits every ServiceAccount of the cluster (warning)"),
    Check(id="trust-policy.max-session", link=Link.TRUST_POLICY, run=check_max_session,
          catches="the role's MaxSessionDuration is below the session irsa-cache asks for (warning)"),
)
