"""`irsa-cache webhook` as the API server meets it: AdmissionReview v1 requests over real
HTTPS (certificates made in the test), ServiceAccounts read by the real
kubernetes-asyncio client from the API double (tests/k8s_double.py), every returned
JSONPatch applied by jsonpatch and the pod that results validated against the
Kubernetes schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest

from daemon.webhook import app, metrics, settings
from daemon.webhook.mutation import Outcome
from tests.certificates import Authority, authority, install, issue
from tests.k8s_double import K8sApiDouble
from tests.webhook_cases import (
    CASE_IDS,
    CASES,
    NAMESPACE,
    Case,
    account,
    admitted,
    assert_points_at_cache,
    container,
    eks_webhook,
    template,
)

KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


@pytest.fixture
def ca() -> Authority:
    return authority()


@pytest.fixture
async def k8s() -> AsyncIterator[K8sApiDouble]:
    double = await K8sApiDouble().start()
    yield double
    await double.stop()


def webhook_settings(tmp_path: Path, ca: Authority, k8s: K8sApiDouble, *extra: str) -> settings.WebhookSettings:
    cert, key = install(issue(ca), tmp_path / "tls")
    return settings.parse_webhook_args(
        ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key),
         "--kubeconfig", str(k8s.write_kubeconfig(tmp_path / "kubeconfig")), *extra],
        environ={})


@pytest.fixture
async def webhook(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> AsyncIterator[app.RunningWebhook]:
    async with app.running(webhook_settings(tmp_path, ca, k8s)) as running:
        yield running


@pytest.fixture
async def https(ca: Authority) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def admission_review(pod: dict[str, Any], namespace: str = NAMESPACE, operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview v1 request as the API server sends it for a pod creation."""
    resource = {"group": "", "version": "v1", "resource": "pods"}
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": kind, "resource": resource, "requestKind": kind,
        "requestResource": resource, "namespace": namespace, "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "uid": str(uuid.uuid4()), "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": pod, "oldObject": None, "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}}}


async def review(https: aiohttp.ClientSession, webhook: app.RunningWebhook, pod: dict[str, Any],
                 namespace: str = NAMESPACE, operation: str = "CREATE") -> dict[str, Any]:
    body = admission_review(pod, namespace, operation)
    async with https.post(webhook.url, json=body) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        answer = await response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == body["request"]["uid"]
    assert answer["response"]["allowed"] is True
    return answer["response"]


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The pod the API server stores: the JSONPatch applied, then checked against the schema."""
    if "patch" not in response:
        assert "patchType" not in response
        return pod
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    result = jsonpatch.JsonPatch(operations).apply(copy.deepcopy(pod))
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(result, version, strict=True)
    return result


def count(outcome: Outcome) -> float:
    return metrics.REGISTRY.get_sample_value("irsa_cache_webhook_mutations_total", {"outcome": outcome.value}) or 0.0


def account_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_each_case_over_https(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession, case: Case
) -> None:
    if case.account is not None:
        k8s.create(case.account)
    pod = admitted(case.template, case.namespace)
    before = count(case.outcome)

    response = await review(https, webhook, pod, case.namespace)

    result = patched(pod, response)
    assert_points_at_cache(result, case, pod)
    assert count(case.outcome) == before + 1
    asked = k8s.count("get", account_path(case.namespace, "checkout"))
    if case.outcome in (Outcome.FARGATE, Outcome.WINDOWS, Outcome.OPTED_OUT, Outcome.DAEMON_NAMESPACE):
        assert asked == 0, "a pod skipped anyway costs the API server nothing"
    else:
        assert asked >= 1


async def test_the_patch_replaces_whole_lists_and_adds_the_label(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    k8s.create(account())
    response = await review(https, webhook, admitted(template(container("app"))))
    operations = json.loads(base64.b64decode(response["patch"]))
    assert {(op["op"], op["path"]) for op in operations} == {
        ("add", "/metadata/labels/eks.amazonaws.com~1skip-pod-identity-webhook"),
        ("replace", "/spec/containers"),
        ("replace", "/spec/volumes"),
    }


async def test_its_own_output_gets_no_patch(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    k8s.create(account())
    for case in (c for c in CASES if c.outcome is Outcome.MUTATED):
        once = patched(admitted(case.template), await review(https, webhook, admitted(case.template)))
        response = await review(https, webhook, once)
        assert "patch" not in response, case.id


async def test_reinvoked_after_eks_webhook_removes_what_it_added(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    k8s.create(account())
    pod = admitted(template(container("app"), init=(container("log-shipper", restartPolicy="Always"),)))
    ours = patched(pod, await review(https, webhook, pod))
    # EKS's webhook runs next (one installed without the objectSelector on our label) and
    # changes the pod, so the API server calls ours again (reinvocationPolicy: IfNeeded).
    theirs = eks_webhook(ours)

    again = patched(theirs, await review(https, webhook, theirs))

    for item in [*again["spec"]["initContainers"], *again["spec"]["containers"]]:
        names = {v["name"] for v in item["env"]}
        assert not names & {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"}
        assert "aws-iam-token" not in {m["name"] for m in item["volumeMounts"]}
    assert "aws-iam-token" not in {v["name"] for v in again["spec"]["volumes"]}
    assert_points_at_cache(again, Case("sidecar", template=pod, account=None, outcome=Outcome.MUTATED,
                                       injected=("log-shipper", "app")), pod)
    assert "patch" not in await review(https, webhook, again), "and then it is stable"


async def test_a_service_account_created_with_its_pods_is_waited_for(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(0.4, k8s.create, account())  # `kubectl apply` of both; the pod was first

    response = await review(https, webhook, admitted(template(container("app"))))

    assert "patch" in response
    assert k8s.count("get", account_path(NAMESPACE, "checkout")) >= 2


async def test_a_missing_service_account_is_given_up_after_the_grace(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await review(https, webhook, admitted(template(container("app"))))
    elapsed = loop.time() - started
    assert "patch" not in response and "warnings" not in response
    assert settings.SERVICE_ACCOUNT_GRACE_SECONDS - settings.SERVICE_ACCOUNT_RETRY_SECONDS <= elapsed
    assert elapsed < settings.ADMISSION_DEADLINE_SECONDS


async def test_api_server_down_admits_the_pod_unchanged_with_a_warning(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    await k8s.go_down()
    before = count(Outcome.ERROR)

    response = await review(https, webhook, admitted(template(container("app"))))

    assert "patch" not in response
    (warning,) = response["warnings"]
    assert warning.startswith("irsa-cache: the pod was created without irsa-cache credentials: ")
    assert "ServiceAccount shop/checkout" in warning
    assert count(Outcome.ERROR) == before + 1

    await k8s.come_up()
    k8s.create(account())
    assert "patch" in await review(https, webhook, admitted(template(container("app"))))


async def test_api_server_refusing_the_read_is_an_error_not_a_missing_account(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    await k8s.go_down(refuse=False)  # 503 Status answers
    response = await review(https, webhook, admitted(template(container("app"))))
    assert "answered 503" in response["warnings"][0]


async def test_anything_but_a_pod_creation_is_allowed_untouched(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    k8s.create(account())
    response = await review(https, webhook, admitted(template(container("app"))), operation="UPDATE")
    assert "patch" not in response
    assert k8s.count("get") == 0


@pytest.mark.parametrize(("body", "message"), [
    pytest.param(b"not json", "the body is not JSON", id="not JSON"),
    pytest.param(json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                             "request": {"uid": "1"}}).encode(), "admissionReviewVersions [v1]", id="v1beta1"),
    pytest.param(json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                             "request": {"object": {}}}).encode(), "no uid", id="no uid"),
    pytest.param(b"[]", "not a JSON object", id="a list"),
])
async def test_a_body_that_is_no_admission_review_is_400_with_the_reason(
    webhook: app.RunningWebhook, https: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    before = count(Outcome.ERROR)
    async with https.post(webhook.url, data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert message in (await response.json())["message"]
    assert count(Outcome.ERROR) == before + 1


async def test_an_oversized_body_is_refused(webhook: app.RunningWebhook, https: aiohttp.ClientSession) -> None:
    body = io.BytesIO(b" " * (settings.MAX_REQUEST_BYTES + 1))
    async with https.post(webhook.url, data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413


async def test_metrics_and_probes(
    k8s: K8sApiDouble, webhook: app.RunningWebhook, https: aiohttp.ClientSession
) -> None:
    k8s.create(account())
    await review(https, webhook, admitted(template(container("app"))))
    async with aiohttp.ClientSession() as plain:
        base = f"http://{webhook.metrics_listen}"
        async with plain.get(f"{base}/metrics") as response:
            text = await response.text()
        for outcome in Outcome:
            assert f'irsa_cache_webhook_mutations_total{{outcome="{outcome.value}"}}' in text
        assert 'irsa_cache_webhook_service_account_lookups_total{result="found"}' in text
        assert "irsa_cache_webhook_certificate_expiry_timestamp_seconds " in text
        assert "irsa_cache_webhook_request_duration_seconds_count" in text
        assert "process_resident_memory_bytes" in text
        assert "irsa_cache_requests_total" not in text, "the daemon's families stay out"
        for path in ("/healthz", "/readyz"):
            async with plain.get(f"{base}{path}") as response:
                assert response.status == 200
        webhook.draining = True
        async with plain.get(f"{base}/readyz") as response:
            assert response.status == 503
        async with plain.get(f"{base}/healthz") as response:
            assert response.status == 200


async def test_injection_flags_reach_the_pod(
    tmp_path: Path, ca: Authority, k8s: K8sApiDouble, https: aiohttp.ClientSession
) -> None:
    k8s.create(account(role=None, **{"irsa-cache.io/role-arn": "arn:aws:iam::111122223333:role/x"}))
    webhook_config = webhook_settings(tmp_path, ca, k8s, "--audience", "irsa-cache", "--token-expiration", "2h",
                                      "--annotation-prefix", "irsa-cache.io", "--daemon-namespace", "credentials")
    async with app.running(webhook_config) as webhook:
        pod = admitted(template(container("app")))
        result = patched(pod, await review(https, webhook, pod))
        (volume,) = [v for v in result["spec"]["volumes"] if v["name"] == "irsa-cache-token"]
        assert volume["projected"]["sources"][0]["serviceAccountToken"] == {
            "audience": "irsa-cache", "expirationSeconds": 7200, "path": "token"}
        assert "patch" not in await review(https, webhook, admitted(template(container("app")), "credentials"),
                                           "credentials")


async def test_the_answer_comes_within_the_deadline_when_the_api_server_hangs(
    tmp_path: Path, ca: Authority, k8s: K8sApiDouble, https: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "ADMISSION_DEADLINE_SECONDS", 0.5)

    class Hanging:
        async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
            await asyncio.sleep(3600)
            return None

    config = webhook_settings(tmp_path, ca, k8s)
    async with app.running(config, accounts=Hanging()) as webhook:
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await review(https, webhook, admitted(template(container("app"))))
        assert 0.5 <= loop.time() - started < 1.5
        assert "reading ServiceAccount shop/checkout took over 0.5 s" in response["warnings"][0]


def test_settings_reject_what_cannot_work(tmp_path: Path) -> None:
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        settings.parse_webhook_args(["--tls-key", str(tmp_path / "missing.key"), "--token-expiration", "5m",
                                     "--listen", "nowhere"], environ={})
    problems = caught.value.problems
    assert any(p.startswith("--listen: 'nowhere' is not HOST:PORT") for p in problems)
    assert any(p.startswith("--token-expiration: '5m' must be whole seconds from 600") for p in problems)
    with pytest.raises(ConfigError) as caught:
        settings.parse_webhook_args(["--tls-key", str(tmp_path / "missing.key")], environ={})
    assert caught.value.problems == [
        "--tls-cert: required (the webhook serves HTTPS only; the API server calls nothing else)",
        f"--tls-key: {tmp_path / 'missing.key'} is not a readable file"]


def test_flags_come_from_the_environment_too(tmp_path: Path) -> None:
    cert, key = install(issue(authority()), tmp_path)
    parsed = settings.parse_webhook_args([], environ={
        "IRSA_CACHE_TLS_CERT": str(cert), "IRSA_CACHE_TLS_KEY": str(key), "IRSA_CACHE_AUDIENCE": "x.example"})
    assert parsed.tls_cert == cert and parsed.injection.audience == "x.example"
    assert str(parsed.listen) == "0.0.0.0:8443" and dataclasses.asdict(parsed)["drain_seconds"] == 5.0


async def test_listens_on_ipv6(tmp_path: Path, ca: Authority, k8s: K8sApiDouble) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    k8s.create(account())
    cert, key = install(issue(ca, names=("localhost", "::1")), tmp_path / "tls6")
    config = settings.parse_webhook_args(
        ["--listen", "[::1]:0", "--metrics-listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key),
         "--kubeconfig", str(k8s.write_kubeconfig(tmp_path / "kubeconfig"))], environ={})
    async with app.running(config) as webhook, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ca.client_context())) as https:
        assert webhook.url.startswith("https://[::1]:")
        assert "patch" in await review(https, webhook, admitted(template(container("app"))))


async def test_a_failure_inside_the_webhook_is_a_counted_500(
    tmp_path: Path, ca: Authority, k8s: K8sApiDouble, https: aiohttp.ClientSession
) -> None:
    class Broken:
        async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
            raise RuntimeError("a bug")

    async with app.running(webhook_settings(tmp_path, ca, k8s), accounts=Broken()) as webhook:
        before = count(Outcome.ERROR)
        async with https.post(webhook.url, json=admission_review(admitted(template(container("app"))))) as response:
            assert response.status == 500
            assert (await response.json())["code"] == "internal_error"
        assert count(Outcome.ERROR) == before + 1
        async with https.post(webhook.url, json=admission_review(admitted(template(container("app")),
                                                                          "irsa-cache"), "irsa-cache")) as response:
            assert response.status == 200, "and it goes on answering"
