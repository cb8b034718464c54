"""Checks of the service-account link: the role annotation the daemon reads.

The rule for a valid role ARN is the daemon's own (`directory.kubernetes.ROLE_ARN`):
what it refuses with 403 bad_role_annotation, doctor fails here.
"""

from __future__ import annotations

from daemon.directory.kubernetes import ROLE_ARN
from daemon.doctor.facts import Facts, annotation
from daemon.doctor.model import Check, Finding, Link, failed, passed, skipped


def _account(facts: Facts) -> tuple[str, str] | None:
    account = facts.inputs.service_account
    if account is None:
        return None
    meta = account.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or "?"


def _annotate_fix(facts: Facts, namespace: str, name: str, value: str) -> str:
    return f"kubectl annotate --overwrite serviceaccount -n {namespace} {name} {facts.role_annotation}={value}"


def check_annotation(facts: Facts) -> Finding:
    account = _account(facts)
    if account is None:
        return skipped("not checked: no ServiceAccount given (--service-account FILE, or --live)")
    value = annotation(facts.inputs.service_account, facts.role_annotation)
    if value is None:
        role = facts.role_arn.value if facts.role_arn else "arn:aws:iam::<account>:role/<role>"
        return failed(f"ServiceAccount {account[0]}/{account[1]} has no {facts.role_annotation} annotation: "
                      "the daemon has no role for it (403 no_role_annotation)",
                      _annotate_fix(facts, *account, role))
    return passed(f"ServiceAccount {account[0]}/{account[1]} has {facts.role_annotation}: {value}")


def check_role_arn(facts: Facts) -> Finding:
    account = _account(facts)
    value = annotation(facts.inputs.service_account, facts.role_annotation)
    if account is None or value is None:
        return skipped("not checked: no role annotation (see service-account.annotation)")
    if not ROLE_ARN.fullmatch(value):
        return failed(f"{facts.role_annotation} is {value!r}, not an IAM role ARN (403 bad_role_annotation)",
                      _annotate_fix(facts, *account, "arn:aws:iam::<account>:role/<role name>"))
    return passed(f"{value} is a role ARN")


def check_role_match(facts: Facts) -> Finding:
    account = _account(facts)
    value = annotation(facts.inputs.service_account, facts.role_annotation)
    if account is None or value is None or not ROLE_ARN.fullmatch(value):
        return skipped("not checked: no valid role annotation (see service-account.role-arn)")
    checked = facts.role_arn
    if checked is None or checked.source == "the ServiceAccount's annotation":
        return skipped("not checked: no other role given to compare with (--role-arn or --trust-policy get-role output)")
    if value != checked.value:
        return failed(f"{facts.role_annotation} names {value}, not the role checked, {checked.value} "
                      f"(from {checked.source})",
                      f"{_annotate_fix(facts, *account, checked.value)}, or check the annotated role instead "
                      f"(--role-arn {value})")
    return passed(f"the annotation names the role checked ({checked.value})")


CHECKS = (
    Check(id="service-account.annotation", link=Link.SERVICE_ACCOUNT, run=check_annotation,
          catches="the ServiceAccount has no eks.amazonaws.com/role-arn annotation (or <--annotation-prefix>/role-arn)"),
    Check(id="service-account.role-arn", link=Link.SERVICE_ACCOUNT, run=check_role_arn,
          catches="the annotation is not an IAM role ARN"),
    Check(id="service-account.role-match", link=Link.SERVICE_ACCOUNT, run=check_role_match,
          catches="the annotation names another role than the one checked"),
)
