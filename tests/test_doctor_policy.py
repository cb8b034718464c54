"""The trust-policy evaluator, case by case against IAM's documented semantics.

Each table row is an example from IAM's documentation (the page is named in the id's
comment) or a rule those pages state, turned into (policy condition, request, verdict).
"""

from __future__ import annotations

from typing import Any

import pytest

from daemon.doctor import policy
from daemon.doctor.policy import Context, Effect, Truth

PROVIDER = "arn:aws:iam::111122223333:oidc-provider/oidc.eks.us-west-2.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
ISSUER_KEY = "oidc.eks.us-west-2.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
WEB_IDENTITY = "sts:AssumeRoleWithWebIdentity"
ABSENT = None


def condition_truth(block: dict[str, Any], values: dict[str, Any]) -> Truth:
    """Evaluate a whole Condition block (AND of everything in it) against a request context."""
    statement = policy.parse({"Version": "2012-10-17", "Statement": {
        "Effect": "Allow", "Principal": "*", "Action": "*", "Condition": block}}).statements[0]
    context = Context(values={k: tuple(v) if isinstance(v, list) else (v,) for k, v in values.items() if v is not None})
    return policy.all_of(policy.evaluate_condition(c, context).truth for c in statement.conditions)


T, F = Truth.TRUE, Truth.FALSE

# "Conditions with multiple context keys or values": operators AND, keys AND, values OR.
MULTIPLE_KEYS = {
    "StringEquals": {"aws:PrincipalTag/department": ["finance", "hr", "legal"],
                     "aws:PrincipalTag/role": ["audit", "security"]},
    "ArnLike": {"aws:PrincipalArn": ["arn:aws:iam::222222222222:user/Ana", "arn:aws:iam::222222222222:user/Mary"]},
}
# The same page, "Evaluation logic for negated matching condition operators": values NOR,
# and an absent key makes the negated condition true.
NEGATED_KEYS = {"StringNotEquals": {"aws:PrincipalTag/department": ["finance", "hr", "legal"],
                                    "aws:PrincipalTag/role": ["audit", "security"]}}
# "Single-valued context key policy examples", example 1.
SINGLE_VALUED = {"StringLike": {"aws:RequestTag/project": "*"},
                 "StringNotEquals": {"aws:ResourceTag/environment": "production"}}
# "Conditions with multiple context keys or values" (the DynamoDB examples).
ALL_ATTRIBUTES = {"ForAllValues:StringLike": {"dynamodb:requestedAttributes": ["PostDateTime", "Message", "Tags"]}}
ANY_ATTRIBUTE = {"ForAnyValue:StringLike": {"dynamodb:requestedAttributes": ["ID", "PostDateTime"]}}
# "Multivalued context key examples": Deny with ForAllValues:StringNotLike.
NOT_KEY1 = {"ForAllValues:StringNotLike": {"aws:TagKeys": "key1*"}}
NOT_KEY1_OR_KEY2 = {"ForAllValues:StringNotLike": {"aws:TagKeys": ["key1*", "key2*"]}}
ANY_NOT = {"ForAnyValue:StringNotEquals": {"aws:TagKeys": ["DataClass", "Owner"]}}
ALL_NOT_IF_EXISTS = {"ForAllValues:StringNotEqualsIfExists": {"aws:TagKeys": ["DataClass", "Owner"]}}
# "IAM JSON policy elements: Condition operators", ...IfExists and Null.
IF_EXISTS = {"StringLikeIfExists": {"ec2:InstanceType": ["t1.*", "t2.*", "m3.*"]}}
NULL_TRUE = {"Null": {"aws:TokenIssueTime": "true"}}
# The same page, policy variables: "home/${aws:username}/*".
HOME_PREFIX = {"StringLike": {"s3:prefix": ["home/${aws:username}/*"]}}


@pytest.mark.parametrize(("block", "request_values", "expected"), [
    pytest.param(MULTIPLE_KEYS, {"aws:PrincipalTag/department": "finance", "aws:PrincipalTag/role": "audit",
                                 "aws:PrincipalArn": "arn:aws:iam::222222222222:user/Mary"}, T, id="multi-keys-all-match"),
    pytest.param(MULTIPLE_KEYS, {"aws:PrincipalTag/department": "hr", "aws:PrincipalTag/role": "security",
                                 "aws:PrincipalArn": "arn:aws:iam::222222222222:user/John"}, F, id="multi-keys-arn-fails"),
    pytest.param(MULTIPLE_KEYS, {"aws:PrincipalTag/department": "legal",
                                 "aws:PrincipalArn": "arn:aws:iam::222222222222:user/Ana"}, F, id="multi-keys-role-absent"),
    pytest.param(MULTIPLE_KEYS, {"aws:PrincipalTag/department": "sales", "aws:PrincipalTag/role": "audit",
                                 "aws:PrincipalArn": "arn:aws:iam::222222222222:user/Ana"}, F, id="multi-keys-no-value-or"),
    pytest.param(NEGATED_KEYS, {"aws:PrincipalTag/department": "legal", "aws:PrincipalTag/role": "audit"}, F,
                 id="negated-value-listed"),
    pytest.param(NEGATED_KEYS, {"aws:PrincipalTag/department": "sales", "aws:PrincipalTag/role": "dev"}, T,
                 id="negated-values-nor"),
    pytest.param(NEGATED_KEYS, {"aws:PrincipalTag/department": "sales", "aws:PrincipalTag/role": "security"}, F,
                 id="negated-keys-and"),
    pytest.param(NEGATED_KEYS, {}, T, id="negated-keys-absent"),
    pytest.param(SINGLE_VALUED, {"aws:RequestTag/project": "Feature3", "aws:ResourceTag/environment": "QA"}, T,
                 id="single-valued-allowed"),
    pytest.param(SINGLE_VALUED, {"aws:ResourceTag/environment": "QA"}, F, id="single-valued-project-absent"),
    pytest.param(SINGLE_VALUED, {"aws:RequestTag/project": "Feature3", "aws:ResourceTag/environment": "production"}, F,
                 id="single-valued-production"),
    pytest.param(SINGLE_VALUED, {"aws:RequestTag/project": "Feature3"}, T, id="single-valued-environment-absent"),
    pytest.param(ALL_ATTRIBUTES, {"dynamodb:requestedAttributes": ["PostDateTime", "Message"]}, T,
                 id="forallvalues-all-listed"),
    pytest.param(ALL_ATTRIBUTES, {"dynamodb:requestedAttributes": ["PostDateTime", "UserName"]}, F,
                 id="forallvalues-one-unlisted"),
    pytest.param(ALL_ATTRIBUTES, {}, T, id="forallvalues-empty-is-true"),
    pytest.param(ANY_ATTRIBUTE, {"dynamodb:requestedAttributes": ["UserName", "Message", "PostDateTime"]}, T,
                 id="foranyvalue-one-listed"),
    pytest.param(ANY_ATTRIBUTE, {"dynamodb:requestedAttributes": ["UserName"]}, F, id="foranyvalue-none-listed"),
    pytest.param(ANY_ATTRIBUTE, {}, F, id="foranyvalue-empty-is-false"),
    pytest.param(NOT_KEY1, {"aws:TagKeys": ["key1:legal"]}, F, id="forall-notlike-key1-legal"),
    pytest.param(NOT_KEY1, {"aws:TagKeys": ["key1:hr", "key1:personnel"]}, F, id="forall-notlike-key1-two"),
    pytest.param(NOT_KEY1, {"aws:TagKeys": ["key2:audit"]}, T, id="forall-notlike-key2"),
    pytest.param(NOT_KEY1, {}, T, id="forall-notlike-absent"),
    pytest.param(NOT_KEY1_OR_KEY2, {"aws:TagKeys": ["key1:hr", "key2:audit"]}, F, id="forall-notlike-nor-two"),
    pytest.param(NOT_KEY1_OR_KEY2, {"aws:TagKeys": ["key3:legal"]}, T, id="forall-notlike-nor-none"),
    pytest.param(ANY_NOT, {}, F, id="foranyvalue-notequals-absent"),
    pytest.param(ANY_NOT, {"aws:TagKeys": ["DataClass", "Owner"]}, F, id="foranyvalue-notequals-all-listed"),
    pytest.param(ANY_NOT, {"aws:TagKeys": ["Dept", "DataClass"]}, T, id="foranyvalue-notequals-one-unlisted"),
    pytest.param(ALL_NOT_IF_EXISTS, {}, T, id="forallvalues-ifexists-absent"),
    pytest.param(ALL_NOT_IF_EXISTS, {"aws:TagKeys": ["DataClass", "Dept"]}, F, id="forallvalues-notequals-one-listed"),
    pytest.param(ALL_NOT_IF_EXISTS, {"aws:TagKeys": ["Dept"]}, T, id="forallvalues-notequals-none-listed"),
    pytest.param({"ForAnyValue:StringEqualsIfExists": {"aws:TagKeys": "Dept"}}, {}, F,
                 id="foranyvalue-ignores-ifexists"),
    pytest.param(IF_EXISTS, {"ec2:InstanceType": "t2.micro"}, T, id="ifexists-present-matching"),
    pytest.param(IF_EXISTS, {"ec2:InstanceType": "c5.large"}, F, id="ifexists-present-not-matching"),
    pytest.param(IF_EXISTS, {}, T, id="ifexists-absent"),
    pytest.param({"StringLike": {"ec2:InstanceType": ["t1.*", "t2.*", "m3.*"]}}, {}, F, id="without-ifexists-absent"),
    pytest.param(NULL_TRUE, {}, T, id="null-true-absent"),
    pytest.param(NULL_TRUE, {"aws:TokenIssueTime": "2026-01-01T00:00:00Z"}, F, id="null-true-present"),
    pytest.param({"Null": {"aws:TokenIssueTime": "false"}}, {}, F, id="null-false-absent"),
    pytest.param(HOME_PREFIX, {"aws:username": "David", "s3:prefix": "home/David/photos"}, T, id="variable-expanded"),
    pytest.param(HOME_PREFIX, {"aws:username": "David", "s3:prefix": "home/Ana/photos"}, F, id="variable-other-user"),
    pytest.param(HOME_PREFIX, {"s3:prefix": "home//photos"}, F, id="variable-absent-matches-nothing"),
    pytest.param({"StringLike": {"k": "a${*}b"}}, {"k": "a*b"}, T, id="variable-literal-star-matches-star"),
    pytest.param({"StringLike": {"k": "a${*}b"}}, {"k": "axb"}, F, id="variable-literal-star-is-no-wildcard"),
    pytest.param({"StringLike": {"k": "${aws:missing, 'x'}-*"}}, {"k": "x-1"}, T, id="variable-default"),
    pytest.param({"StringEquals": {"aws:username": "johndoe"}}, {"aws:username": "JohnDoe"}, F, id="equals-case-sensitive"),
    pytest.param({"StringEqualsIgnoreCase": {"aws:username": "johndoe"}}, {"aws:username": "JohnDoe"}, T,
                 id="equals-ignore-case"),
    pytest.param({"StringEquals": {"AWS:SourceIP": "x"}}, {"aws:SourceIp": "x"}, T, id="key-names-ignore-case"),
    pytest.param({"StringEquals": {"k": "team-a:*"}}, {"k": "team-a:app"}, F, id="equals-star-is-literal"),
    pytest.param({"StringLike": {"k": "team-a:*"}}, {"k": "team-a:app"}, T, id="like-star-is-wildcard"),
    pytest.param({"StringLike": {"k": "app-?"}}, {"k": "app-12"}, F, id="like-question-mark-one-char"),
    pytest.param({"Bool": {"aws:SecureTransport": "true"}}, {"aws:SecureTransport": "True"}, T, id="bool"),
    pytest.param({"Bool": {"aws:SecureTransport": True}}, {"aws:SecureTransport": "false"}, F, id="bool-json-true"),
    pytest.param({"NumericLessThanEquals": {"s3:max-keys": "10"}}, {"s3:max-keys": "10"}, T, id="numeric"),
    pytest.param({"NumericLessThanEquals": {"s3:max-keys": "10"}}, {"s3:max-keys": "11"}, F, id="numeric-above"),
    pytest.param({"DateGreaterThan": {"aws:CurrentTime": "2020-04-01T00:00:01Z"}}, {"aws:CurrentTime": "2026-01-01T00:00:00Z"},
                 T, id="date"),
    pytest.param({"DateLessThan": {"aws:EpochTime": "1600000000"}}, {"aws:EpochTime": "1700000000"}, F, id="date-epoch"),
    pytest.param({"IpAddress": {"aws:SourceIp": "203.0.113.0/24"}}, {"aws:SourceIp": "203.0.113.7"}, T, id="ip"),
    pytest.param({"NotIpAddress": {"aws:SourceIp": "203.0.113.0/24"}}, {"aws:SourceIp": "203.0.113.7"}, F, id="not-ip"),
    pytest.param({"ArnLike": {"aws:SourceArn": "arn:aws:sns:*:111122223333:*"}},
                 {"aws:SourceArn": "arn:aws:sns:us-east-1:111122223333:topic"}, T, id="arn-like"),
    pytest.param({"ArnLike": {"aws:SourceArn": "arn:aws:sns:*:111122223333:*"}},
                 {"aws:SourceArn": "arn:aws:sns:us-east-1:444455556666:topic"}, F, id="arn-like-other-account"),
    pytest.param({"ArnEquals": {"aws:SourceArn": "arn:aws:sns:us-east-1:111122223333:*"}}, {"aws:SourceArn": "not-an-arn"},
                 F, id="arn-not-an-arn"),
])
def test_condition_semantics(block: dict[str, Any], request_values: dict[str, Any], expected: Truth) -> None:
    assert condition_truth(block, request_values) is expected


def test_a_key_doctor_cannot_know_gives_unknown_and_null_still_answers() -> None:
    context = Context(values={}, unknown_prefixes=("aws:",))
    [ip] = policy.parse({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*",
                                       "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}}).statements
    assert policy.evaluate_condition(ip.conditions[0], context).truth is Truth.UNKNOWN
    [null] = policy.parse({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*",
                                         "Condition": {"Null": {"aws:SourceIp": "false"}}}}).statements
    assert policy.evaluate_condition(null.conditions[0], context).truth is Truth.TRUE


# --- whole trust policies -----------------------------------------------------------------

def irsa_statement(sub: str | list[str] = "system:serviceaccount:my-namespace:my-service-account", *,
                   operator: str = "StringEquals", principal: Any = None, action: Any = WEB_IDENTITY,
                   effect: str = "Allow", aud: bool = True, sid: str | None = None) -> dict[str, Any]:
    """The trust policy statement of the EKS user guide ("Assign IAM roles to Kubernetes service accounts")."""
    condition: dict[str, Any] = {operator: {f"{ISSUER_KEY}:sub": sub}}
    if aud:
        condition.setdefault("StringEquals", {})[f"{ISSUER_KEY}:aud"] = "sts.amazonaws.com"
    statement: dict[str, Any] = {"Effect": effect, "Principal": principal or {"Federated": PROVIDER},
                                 "Action": action, "Condition": condition}
    if sid:
        statement["Sid"] = sid
    return statement


def web_identity(sub: str = "system:serviceaccount:my-namespace:my-service-account", aud: str = "sts.amazonaws.com",
                 principal: str = PROVIDER, action: str = WEB_IDENTITY) -> policy.Request:
    return policy.Request(principal_type="Federated", principal=principal, action=action, context=Context(values={
        f"{ISSUER_KEY}:sub": (sub,), f"{ISSUER_KEY}:aud": (aud,)}, unknown_prefixes=("aws:",)))


def decide(*statements: dict[str, Any], request: policy.Request | None = None) -> policy.Decision:
    return policy.evaluate(policy.parse({"Version": "2012-10-17", "Statement": list(statements)}),
                           request or web_identity())


@pytest.mark.parametrize(("statements", "request_", "effect"), [
    pytest.param([irsa_statement()], web_identity(), Effect.ALLOW, id="eks-guide-policy-admits-its-account"),
    pytest.param([irsa_statement()], web_identity(sub="system:serviceaccount:my-namespace:other"),
                 Effect.IMPLICIT_DENY, id="other-service-account"),
    pytest.param([irsa_statement()], web_identity(aud="https://kubernetes.default.svc"), Effect.IMPLICIT_DENY,
                 id="other-audience"),
    pytest.param([irsa_statement("system:serviceaccount:*:my-service-account", operator="StringLike")],
                 web_identity(sub="system:serviceaccount:other-ns:my-service-account"), Effect.ALLOW,
                 id="eks-guide-any-namespace-pattern"),
    pytest.param([irsa_statement(["system:serviceaccount:a:x", "system:serviceaccount:my-namespace:my-service-account"])],
                 web_identity(), Effect.ALLOW, id="several-values-or"),
    pytest.param([irsa_statement(principal={"Federated": ["arn:aws:iam::111122223333:oidc-provider/other", PROVIDER]})],
                 web_identity(), Effect.ALLOW, id="federated-list"),
    pytest.param([irsa_statement(principal={"Federated": "arn:aws:iam::111122223333:oidc-provider/other"})],
                 web_identity(), Effect.IMPLICIT_DENY, id="another-provider"),
    pytest.param([irsa_statement(principal={"AWS": "arn:aws:iam::111122223333:root"})], web_identity(),
                 Effect.IMPLICIT_DENY, id="aws-principal-is-not-federated"),
    pytest.param([irsa_statement(principal="*")], web_identity(), Effect.ALLOW, id="principal-star"),
    pytest.param([irsa_statement(action="sts:AssumeRole")], web_identity(), Effect.IMPLICIT_DENY, id="wrong-action"),
    pytest.param([irsa_statement(action=["sts:TagSession", "STS:assumerolewith*"])], web_identity(), Effect.ALLOW,
                 id="action-wildcard-any-case"),
    pytest.param([{**irsa_statement(), "NotAction": "sts:AssumeRole", "Action": None}], web_identity(),
                 Effect.ALLOW, id="not-action"),
    pytest.param([irsa_statement(), irsa_statement("system:serviceaccount:my-namespace:*", operator="StringLike",
                                                   effect="Deny", aud=False)],
                 web_identity(), Effect.EXPLICIT_DENY, id="deny-wins"),
    pytest.param([irsa_statement(), {"Effect": "Deny", "Principal": "*", "Action": "*",
                                     "Condition": {"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}],
                 web_identity(), Effect.UNDETERMINED, id="deny-on-unknown-key"),
    pytest.param([{**irsa_statement(), "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}],
                 web_identity(), Effect.UNDETERMINED, id="allow-on-unknown-key"),
    pytest.param([irsa_statement(), {"Effect": "Deny", "Principal": "*", "Action": "*",
                                     "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}, "StringEquals": {
                                         f"{ISSUER_KEY}:sub": "system:serviceaccount:x:y"}}}],
                 web_identity(), Effect.ALLOW, id="deny-false-on-known-key-wins-over-unknown"),
])
def test_trust_policy_decisions(statements: list[dict[str, Any]], request_: policy.Request, effect: Effect) -> None:
    cleaned = [{k: v for k, v in s.items() if v is not None} for s in statements]
    assert decide(*cleaned, request=request_).effect is effect


def test_the_failing_condition_is_named_with_the_value_seen() -> None:
    decision = decide(irsa_statement("system:serviceaccount:my-namespace:web"))
    [outcome] = decision.statements
    [failing] = outcome.failing
    assert failing.condition.key.endswith(":sub")
    assert failing.found == ("system:serviceaccount:my-namespace:my-service-account",)
    assert "matches none of" in failing.why


def test_a_negated_condition_names_the_values_that_exclude() -> None:
    decision = decide({**irsa_statement(), "Condition": {"StringNotLike": {
        f"{ISSUER_KEY}:sub": ["system:serviceaccount:kube-system:*", "system:serviceaccount:my-namespace:*"]}}})
    [failing] = decision.statements[0].failing
    assert failing.matched == ("system:serviceaccount:my-namespace:*",)


@pytest.mark.parametrize(("document", "words"), [
    pytest.param([], "JSON object", id="not-an-object"),
    pytest.param({"Version": "2012-10-17"}, "no Statement", id="no-statement"),
    pytest.param({"Statement": {"Effect": "Permit", "Principal": "*", "Action": "*"}}, "Effect", id="bad-effect"),
    pytest.param({"Statement": {"Effect": "Allow", "Action": "*"}}, "Principal", id="no-principal"),
    pytest.param({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*",
                                "Condition": {"StringEqualz": {"k": "v"}}}}, "StringEqualz", id="unknown-operator"),
    pytest.param({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*",
                                "Condition": {"NullIfExists": {"k": "true"}}}}, "NullIfExists", id="null-if-exists"),
    pytest.param({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*",
                                "Condition": {"ForSomeValues:StringLike": {"k": "v"}}}}, "ForSomeValues",
                 id="unknown-qualifier"),
    pytest.param({"Version": "2024-01-01", "Statement": []}, "Version", id="bad-version"),
])
def test_documents_iam_would_refuse_are_named(document: Any, words: str) -> None:
    with pytest.raises(policy.PolicyError, match=words):
        policy.parse(document)
