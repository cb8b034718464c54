"""Doctor's checks one by one, on inputs built in the test: the cases the scenario
catalogue does not spell out (input shapes, warnings, undetermined verdicts)."""

from __future__ import annotations

import copy
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jwt
import pytest

from daemon.doctor import checks, facts, inputs
from daemon.doctor.inputs import Inputs, Role
from daemon.doctor.issuers import Provider
from daemon.doctor.model import InputError
from daemon.embedded import Issuer
from tests.doctor_scenario import scenarios

GOOD = next(s for s in scenarios() if s.name == "good")
ISSUER = GOOD.issuer
HOST = ISSUER.removeprefix("https://")
ROLE = "arn:aws:iam::123456789012:role/team-a-app"
PROVIDER = Provider(arn=f"arn:aws:iam::123456789012:oidc-provider/{HOST}", url=HOST, client_ids=("sts.amazonaws.com",))


@pytest.fixture(scope="module")
def key() -> Issuer:
    return Issuer()


def token_for(key: Issuer, **claims: Any) -> str:
    now = time.time()
    body = {**GOOD.spec["token"]["claims"], "iat": int(now), "nbf": int(now), "exp": int(now + 3600), **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key.private_key, algorithm="RS256", headers={"kid": key.kid})


def good_inputs(key: Issuer, **changes: Any) -> Inputs:
    pod = GOOD.yaml("pod.yaml")
    base = Inputs(
        token=token_for(key), key_set=key.jwks(), key_set_source="test keys",
        trust_policy=GOOD.json("trust-policy.json"), providers=(PROVIDER,),
        service_account=GOOD.yaml("service-account.yaml"), pod=pod, cluster_issuer=ISSUER, role_arn=ROLE,
    )
    return Inputs(**{**base.__dict__, **changes})


async def results(given: Inputs, *, now: float | None = None) -> dict[str, Any]:
    found = await facts.gather(given, now=time.time() if now is None else now)
    return {result.id: result for result in checks.run(found, live=False)}


def statuses(found: dict[str, Any]) -> dict[str, str]:
    return {check_id: result.status.value for check_id, result in found.items()
            if result.status.value in ("fail", "warn")}


async def test_the_good_inputs_pass(key: Issuer) -> None:
    assert statuses(await results(good_inputs(key))) == {}


# --- inputs in the shapes the usual tools print ------------------------------------------------

def test_get_role_output_with_an_url_encoded_document(tmp_path: Path) -> None:
    document = GOOD.json("trust-policy.json")
    path = tmp_path / "role.json"
    path.write_text(json.dumps({"Role": {"RoleName": "team-a-app", "Arn": ROLE, "MaxSessionDuration": 1800,
                                         "AssumeRolePolicyDocument": urllib.parse.quote(json.dumps(document))}}))
    policy, role = inputs.read_trust_policy(path)
    assert policy == document
    assert role == Role(arn=ROLE, max_session_seconds=1800)


def test_providers_as_list_output_a_single_object_or_a_list(tmp_path: Path) -> None:
    listed = inputs.providers_of({"OpenIDConnectProviderList": [{"Arn": PROVIDER.arn}]}, "test")
    assert listed == (Provider(arn=PROVIDER.arn, url=HOST, client_ids=None),)
    single = inputs.providers_of({"Url": ISSUER, "ClientIDList": ["sts.amazonaws.com"], "Arn": PROVIDER.arn}, "test")
    assert single == (PROVIDER,)
    with pytest.raises(InputError, match="provider 1 has neither Url nor"):
        inputs.providers_of([{"ClientIDList": []}], "test")


def test_a_deployment_stands_for_its_pods(tmp_path: Path) -> None:
    pod = GOOD.yaml("pod.yaml")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app", "namespace": "team-a"},
                  "spec": {"template": {"metadata": {"labels": {"app": "app"}}, "spec": pod["spec"]}}}
    path = tmp_path / "deployment.yaml"
    path.write_text(json.dumps(deployment))
    read, template = inputs.read_pod(path)
    assert template is True
    assert read["metadata"]["namespace"] == "team-a" and read["spec"] == pod["spec"]
    listed = tmp_path / "list.yaml"
    listed.write_text(json.dumps({"kind": "List", "items": [pod]}))
    assert inputs.read_pod(listed) == (pod, False)


@pytest.mark.parametrize(("name", "text", "words"), [
    pytest.param("pod.yaml", "kind: Pod\nspec: [unclosed", "not YAML or JSON", id="unparsable-yaml"),
    pytest.param("pod.yaml", json.dumps({"kind": "Service"}), "kind is Service, not Pod", id="wrong-kind"),
    pytest.param("pod.yaml", json.dumps({"kind": "List", "items": []}), "List with 0 Pod", id="empty-list"),
])
def test_unusable_files_are_input_errors(tmp_path: Path, name: str, text: str, words: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=words):
        inputs.read_pod(path)


# --- token ----------------------------------------------------------------------------------

async def test_a_key_set_of_hmac_keys_holds_nothing_the_daemon_trusts(key: Issuer) -> None:
    found = await results(good_inputs(key, key_set={"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}))
    assert found["token.key-set"].status.value == "fail"
    assert "not an asymmetric signing key" in found["token.key-set"].message
    assert found["token.signature"].status.value == "skip"


async def test_an_hmac_token_is_refused_by_the_daemons_verifier(key: Issuer) -> None:
    forged = jwt.encode({**jwt.decode(token_for(key), options={"verify_signature": False})}, "s" * 32,
                        algorithm="HS256")
    found = await results(good_inputs(key, token=forged))
    assert found["token.signature"].status.value == "fail"
    assert "algorithm_not_allowed" in found["token.signature"].message
    assert "RS256" in (found["token.signature"].fix or "")


async def test_a_token_without_sub_still_has_its_signature_judged(key: Issuer) -> None:
    found = await results(good_inputs(key, token=token_for(key, sub=None)))
    assert found["token.signature"].status.value == "pass"
    assert found["token.subject"].status.value == "fail"


async def test_a_token_not_yet_valid(key: Issuer) -> None:
    found = await results(good_inputs(key, token=token_for(key, nbf=int(time.time()) + 3600)))
    assert found["token.expiry"].status.value == "fail" and "not valid before" in found["token.expiry"].message


async def test_a_token_for_another_account_or_not_bound_to_a_pod(key: Issuer) -> None:
    other = await results(good_inputs(key, token=token_for(key, sub="system:serviceaccount:team-a:web")))
    assert other["token.subject"].status.value == "fail"
    assert "team-a/web" in other["token.subject"].message
    claims = copy.deepcopy(GOOD.spec["token"]["claims"]["kubernetes.io"])
    del claims["pod"]
    unbound = await results(good_inputs(key, token=token_for(key, **{"kubernetes.io": claims}), pod=None))
    assert unbound["token.subject"].status.value == "warn"
    assert "token_not_pod_bound" in unbound["token.subject"].message


# --- trust policy ---------------------------------------------------------------------------

async def test_a_condition_on_a_key_doctor_cannot_know_is_a_warning(key: Issuer) -> None:
    policy = GOOD.json("trust-policy.json")
    policy["Statement"][0]["Condition"]["IpAddress"] = {"aws:SourceIp": "10.0.0.0/8"}
    found = await results(good_inputs(key, trust_policy=policy))
    assert found["trust-policy.conditions"].status.value == "warn"
    assert "aws:SourceIp" in found["trust-policy.conditions"].message


async def test_a_short_maximum_session_is_a_warning(key: Issuer) -> None:
    found = await results(good_inputs(key, role=Role(arn=ROLE, max_session_seconds=1800)))
    assert found["trust-policy.max-session"].status.value == "warn"
    assert "--max-session-duration 3600" in (found["trust-policy.max-session"].fix or "")


async def test_an_invalid_policy_document_fails_and_stops_the_trust_checks(key: Issuer) -> None:
    found = await results(good_inputs(key, trust_policy={"Statement": [{"Effect": "Allow", "Action": "*"}]}))
    assert found["trust-policy.document"].status.value == "fail"
    assert found["trust-policy.conditions"].status.value == "skip"


async def test_without_a_role_the_provider_arn_comes_from_the_policy(key: Issuer) -> None:
    account = GOOD.yaml("service-account.yaml")
    account["metadata"]["annotations"] = {}
    found = await results(good_inputs(key, role_arn=None, providers=None, service_account=account))
    assert found["trust-policy.conditions"].status.value == "pass"


# --- service account ------------------------------------------------------------------------

async def test_the_annotation_prefix_is_the_daemons(key: Issuer) -> None:
    account = GOOD.yaml("service-account.yaml")
    account["metadata"]["annotations"] = {"irsa-cache.example/role-arn": ROLE}
    found = await results(good_inputs(key, service_account=account, annotation_prefix="irsa-cache.example"))
    assert found["service-account.annotation"].status.value == "pass"
    missing = await results(good_inputs(key, annotation_prefix="irsa-cache.example"))
    assert "irsa-cache.example/role-arn" in missing["service-account.annotation"].message


# --- pod ------------------------------------------------------------------------------------

def with_env(*env: dict[str, Any], volumes: list[dict[str, Any]] | None = None, mounts: list[dict[str, Any]] | None = None
             ) -> dict[str, Any]:
    pod = GOOD.yaml("pod.yaml")
    container = pod["spec"]["containers"][0]
    container["env"] = list(env)
    if volumes is not None:
        pod["spec"]["volumes"] = volumes
    if mounts is not None:
        container["volumeMounts"] = mounts
    return pod


URI = {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://169.254.170.23/v1/credentials"}
TOKEN_FILE = {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": "/var/run/secrets/irsa-cache/token"}


@pytest.mark.parametrize(("pod", "check_id", "status", "words"), [
    pytest.param(with_env({**URI, "value": "http://[fd00:ec2::23]/v1/credentials"}, TOKEN_FILE),
                 "pod.credentials-uri", "warn", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", id="ipv6-without-java-mode"),
    pytest.param(with_env({**URI, "value": "http://[fd00:ec2::23]/v1/credentials"}, TOKEN_FILE,
                          {"name": "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "value": "IPv6"}),
                 "pod.credentials-uri", "pass", "", id="ipv6-with-java-mode"),
    pytest.param(with_env({**URI, "value": "http://127.0.0.1:8080/v1/credentials"}, TOKEN_FILE),
                 "pod.credentials-uri", "pass", "", id="loopback"),
    pytest.param(with_env({**URI, "value": "https://irsa-cache.example/v1/credentials"}, TOKEN_FILE),
                 "pod.credentials-uri", "warn", "plain HTTP", id="https"),
    pytest.param(with_env({**URI, "value": "http://169.254.170.23/credentials"}, TOKEN_FILE),
                 "pod.credentials-uri", "fail", "/v1/credentials only", id="wrong-path"),
    pytest.param(with_env({"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "valueFrom": {"configMapKeyRef": {}}},
                          TOKEN_FILE), "pod.credentials-uri", "warn", "valueFrom", id="uri-from-configmap"),
    pytest.param(with_env(), "pod.credentials-uri", "fail", "never ask irsa-cache", id="no-uri"),
    pytest.param(with_env(URI, {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN", "value": "eyJ..."}),
                 "pod.token-file", "fail", "never rotated", id="fixed-token"),
    pytest.param(with_env(URI), "pod.token-file", "fail", "does not set", id="no-token-file"),
    pytest.param(with_env(URI, TOKEN_FILE, volumes=[{"name": "irsa-cache-token", "secret": {"secretName": "t"}}]),
                 "pod.token-file", "fail", "secret volume", id="token-from-secret"),
    pytest.param(with_env(URI, TOKEN_FILE, volumes=[{"name": "irsa-cache-token", "secret": {"secretName": "t"}}]),
                 "pod.token-newline", "warn", "newline", id="secret-token-may-hold-a-newline"),
    pytest.param(with_env(URI, {**TOKEN_FILE, "value": "/var/run/secrets/irsa-cache/other"}), "pod.token-file",
                 "fail", "projects no serviceAccountToken at 'other'", id="other-file-in-the-volume"),
])
async def test_pod_cases(key: Issuer, pod: dict[str, Any], check_id: str, status: str, words: str) -> None:
    found = await results(good_inputs(key, pod=pod))
    result = found[check_id]
    assert result.status.value == status, result
    assert words in f"{result.message} {result.fix}"


async def test_a_pod_of_another_account(key: Issuer) -> None:
    pod = GOOD.yaml("pod.yaml")
    pod["spec"]["serviceAccountName"] = "web"
    found = await results(good_inputs(key, pod=pod, token=None))
    assert found["pod.service-account"].status.value == "fail"
    assert "serviceAccountName: app" in (found["pod.service-account"].fix or "")


async def test_with_nothing_given_nothing_fails_and_everything_says_why(key: Issuer) -> None:
    found = await results(Inputs())
    assert all(r.status.value == "skip" and r.message.startswith("not checked") for r in found.values())
