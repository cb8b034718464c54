"""The mutation itself (daemon/webhook/mutation.py) and the patch it becomes (patch.py),
without HTTP: every rule on its own, idempotence on every case, and the patch applied
by a real JSON-Patch library (jsonpatch) giving exactly the mutated pod."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from daemon.webhook import mutation, patch
from daemon.webhook.mutation import InjectionSettings, Outcome
from tests.webhook_cases import (
    CASE_IDS,
    CASES,
    ROLE,
    Case,
    account,
    admitted,
    assert_points_at_cache,
    container,
    eks_webhook,
    template,
)

SETTINGS = InjectionSettings()


def run(case: Case, pod: dict[str, Any] | None = None, settings: InjectionSettings = SETTINGS) -> mutation.Mutation:
    pod = pod if pod is not None else admitted(case.template, case.namespace)
    role_arn, why = mutation.role_arn_of(case.account, settings)
    return mutation.mutate(pod, namespace=case.namespace, role_arn=role_arn, settings=settings, no_role_reason=why)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_case(case: Case) -> None:
    pod = admitted(case.template, case.namespace)
    frozen = copy.deepcopy(pod)

    result = run(case, pod)

    assert pod == frozen, "the input is never edited"
    assert result.outcome is case.outcome, result.reason
    assert_points_at_cache(result.pod, case, frozen)
    assert sorted(result.injected) == sorted(case.injected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mutating_the_output_again_changes_nothing(case: Case) -> None:
    once = run(case).pod
    twice = run(case, copy.deepcopy(once))
    assert twice.pod == once
    assert twice.outcome in (Outcome.UNCHANGED, case.outcome) and not twice.changed
    assert patch.difference(once, twice.pod) == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_patch_applied_by_jsonpatch_gives_the_mutated_pod(case: Case) -> None:
    pod = admitted(case.template, case.namespace)
    result = run(case, pod)
    operations = patch.json_patch(patch.difference(pod, result.pod))
    assert jsonpatch.JsonPatch(operations).apply(pod) == result.pod
    assert bool(operations) is result.changed


def test_eks_webhook_after_irsa_cache_is_undone_by_the_reinvocation() -> None:
    case = CASES[0]
    ours = run(case).pod
    # EKS's webhook (one without the objectSelector) runs after ours and adds web identity back.
    theirs = eks_webhook(ours)
    assert {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} <= {
        v["name"] for v in theirs["spec"]["containers"][0]["env"]}

    again = run(case, theirs)

    assert again.outcome is Outcome.MUTATED
    env = {v["name"]: v["value"] for v in again.pod["spec"]["containers"][0]["env"]}
    assert not {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} & env.keys()
    assert env["AWS_REGION"] == "us-east-1", "what EKS adds that does not compete is kept"
    assert [v["name"] for v in again.pod["spec"]["volumes"]] == [v["name"] for v in ours["spec"]["volumes"]]
    assert_points_at_cache(again.pod, case, admitted(case.template))


def test_either_order_of_the_two_webhooks_ends_in_the_same_containers() -> None:
    case = CASES[0]
    pod = admitted(case.template)
    irsa_cache_first = run(case, eks_webhook(run(case, pod).pod)).pod
    eks_first = run(case, eks_webhook(pod)).pod
    assert irsa_cache_first["spec"]["containers"][0]["volumeMounts"] == eks_first["spec"]["containers"][0]["volumeMounts"]
    names = [[v["name"] for v in p["spec"]["containers"][0]["env"]] for p in (irsa_cache_first, eks_first)]
    assert sorted(names[0]) == sorted(names[1])


def test_a_skipped_container_keeps_eks_web_identity_and_its_volume() -> None:
    pod = eks_webhook(admitted(template(container("app"), container("legacy"))))
    pod["metadata"]["annotations"] = {"irsa-cache.io/skip-containers": "legacy"}
    result = mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    legacy = result.pod["spec"]["containers"][1]
    assert {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} <= {v["name"] for v in legacy["env"]}
    assert "aws-iam-token" in {v["name"] for v in result.pod["spec"]["volumes"]}, "still mounted by legacy"
    app = result.pod["spec"]["containers"][0]
    assert "aws-iam-token" not in {m["name"] for m in app["volumeMounts"]}


@pytest.mark.parametrize(("spec", "reason"), [
    pytest.param({"os": {"name": "windows"}}, "spec.os.name", id="spec.os"),
    pytest.param({"nodeSelector": {"beta.kubernetes.io/os": "windows"}}, "beta.kubernetes.io/os", id="beta label"),
    pytest.param({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]}]}}}},
        "affinity", id="required affinity"),
])
def test_windows_pods_in_every_spelling(spec: dict[str, Any], reason: str) -> None:
    pod = admitted(template(container("app"), **spec))
    result = mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    assert result.outcome is Outcome.WINDOWS and reason in result.reason


@pytest.mark.parametrize("spec", [
    pytest.param({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
            {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}}},
        id="windows or linux"),
    pytest.param({"nodeSelector": {"kubernetes.io/os": "linux"}}, id="linux"),
    pytest.param({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [
            {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]}}]}}}, id="only preferred"),
])
def test_pods_that_may_run_on_linux_are_injected(spec: dict[str, Any]) -> None:
    result = mutation.mutate(admitted(template(container("app"), **spec)), namespace="shop", role_arn=ROLE,
                             settings=SETTINGS)
    assert result.outcome is Outcome.MUTATED


@pytest.mark.parametrize("value", ["false", "False", "disabled"])
def test_opt_out_values(value: str) -> None:
    pod = admitted(template(container("app"), annotations={"irsa-cache.io/inject": value}))
    assert mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS).outcome is Outcome.OPTED_OUT


def test_the_opt_in_annotation_value_does_not_opt_out() -> None:
    pod = admitted(template(container("app"), annotations={"irsa-cache.io/inject": "enabled"}))
    assert mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS).outcome is Outcome.MUTATED


def test_fargate_by_scheduler_alone() -> None:
    pod = admitted(template(container("app"), schedulerName="fargate-scheduler"))
    assert mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS).outcome is Outcome.FARGATE


def test_a_container_with_something_else_at_the_token_path_is_left_alone() -> None:
    pod = admitted(template(
        container("app"),
        container("odd", volumeMounts=[{"name": "mine", "mountPath": "/var/run/secrets/irsa-cache"}]),
        volumes=[{"name": "mine", "emptyDir": {}}]))
    result = mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    assert result.injected == ("app",)
    assert result.pod["spec"]["containers"][1] == pod["spec"]["containers"][1]
    assert ("odd", "mounts volume 'mine' at /var/run/secrets/irsa-cache") in result.left_alone


def test_when_every_container_is_left_alone_the_pod_is_unchanged() -> None:
    pod = admitted(template(container("app"), annotations={"eks.amazonaws.com/skip-containers": "app"}))
    result = mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    assert result.outcome is Outcome.UNCHANGED and result.pod == pod
    assert "app is named in a skip-containers annotation" in result.reason


def test_volume_defaults_filled_in_by_the_api_server_are_no_difference() -> None:
    once = mutation.mutate(admitted(template(container("app"))), namespace="shop", role_arn=ROLE,
                           settings=SETTINGS).pod
    (volume,) = [v for v in once["spec"]["volumes"] if v["name"] == mutation.VOLUME_NAME]
    volume["projected"]["defaultMode"] = 420  # what the API server stores
    again = mutation.mutate(once, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    assert again.outcome is Outcome.UNCHANGED


def test_a_different_audience_or_lifetime_replaces_the_volume() -> None:
    once = mutation.mutate(admitted(template(container("app"))), namespace="shop", role_arn=ROLE,
                           settings=SETTINGS).pod
    other = InjectionSettings(audience="irsa-cache", token_expiration_seconds=3600)
    again = mutation.mutate(once, namespace="shop", role_arn=ROLE, settings=other)
    assert again.outcome is Outcome.MUTATED
    (volume,) = [v for v in again.pod["spec"]["volumes"] if v["name"] == mutation.VOLUME_NAME]
    assert volume["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "irsa-cache", "expirationSeconds": 3600, "path": "token"}


def test_a_pod_without_volumes_env_or_labels_gets_them() -> None:
    pod = {"metadata": {}, "spec": {"containers": [{"name": "app", "image": "x"}]}}
    result = mutation.mutate(pod, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    assert result.pod["spec"]["volumes"] == [SETTINGS.token_volume()]
    assert result.pod["metadata"]["labels"] == {"eks.amazonaws.com/skip-pod-identity-webhook": "true"}
    assert pod == {"metadata": {}, "spec": {"containers": [{"name": "app", "image": "x"}]}}


def test_service_account_defaults_to_default() -> None:
    assert mutation.service_account_of({"spec": {}}) == "default"
    assert mutation.service_account_of({"spec": {"serviceAccount": "legacy"}}) == "legacy"
    assert mutation.service_account_of({"spec": {"serviceAccountName": "new", "serviceAccount": "old"}}) == "new"


def test_role_annotation_follows_the_prefix() -> None:
    custom = InjectionSettings(annotation_prefix="irsa-cache.io")
    plain = account()
    assert mutation.role_arn_of(plain, custom)[0] is None
    assert "irsa-cache.io/role-arn" in mutation.role_arn_of(plain, custom)[1]
    assert mutation.role_arn_of(account(role=None, **{"irsa-cache.io/role-arn": ROLE}), custom)[0] == ROLE


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"token_expiration_seconds": 599}, "outside 600"),
    ({"audience": ""}, "audience"),
])
def test_settings_check_themselves(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InjectionSettings(**kwargs)


# --- patch.py ------------------------------------------------------------------------


def test_pointers_escape_tilde_then_slash() -> None:
    assert patch.pointer(("metadata", "labels", "eks.amazonaws.com/skip~it")) == (
        "/metadata/labels/eks.amazonaws.com~1skip~0it")


def test_difference_replaces_lists_whole_and_objects_key_by_key() -> None:
    before = {"metadata": {"labels": {"a": "1"}, "name": "x"}, "spec": {"volumes": [{"name": "v"}], "old": 1}}
    after = {"metadata": {"labels": {"a": "1", "b/c": "2"}, "name": "x"}, "spec": {"volumes": [{"name": "v"}, {"name": "w"}]}}
    operations = patch.json_patch(patch.difference(before, after))
    assert operations == [
        {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
        {"op": "remove", "path": "/spec/old"},
        {"op": "replace", "path": "/spec/volumes", "value": [{"name": "v"}, {"name": "w"}]},
    ]
    assert jsonpatch.JsonPatch(operations).apply(before) == after


def test_difference_of_equal_documents_is_empty_and_types_count() -> None:
    assert patch.difference({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}) == []
    assert patch.difference({"a": 1}, {"a": True}) == [patch.Operation(op="replace", path=("a",), value=True)]


def test_a_pod_template_without_containers_is_unchanged_and_says_so() -> None:
    result = mutation.mutate({"metadata": {}, "spec": {}}, namespace="shop", role_arn=ROLE, settings=SETTINGS)
    assert result.outcome is Outcome.UNCHANGED and result.reason == "no container to point at irsa-cache"
