"""The webhook's manifests (deploy/components/webhook, webhook-cert-manager), rendered by
`kubectl kustomize` in both webhook overlays, checked against the webhook they deploy:

- the container's args parse with the webhook's own flag parser, with the environment
  and the Secret volume the manifest gives it;
- its ClusterRole grants exactly the API calls the webhook makes, recorded against the
  API double while it admits pods;
- the names that tie Deployment, Service, PodDisruptionBudget, certificate and
  MutatingWebhookConfiguration together match, and the configuration says what the
  README promises (selectors, failurePolicy, reinvocation, time-out);
- the pods are hardened like the DaemonSet's.

Schema validation of the rendered objects is in tests/test_deploy.py, with every other
kustomization.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.webhook import app, server, settings
from tests.certificates import authority, install, issue
from tests.k8s_double import K8sApiDouble
from tests.test_deploy import DEPLOY, _dockerfile_user, _expand, base, find, granted_by, permission_of, rendered
from tests.test_webhook import admission_review
from tests.webhook_cases import account, admitted, container, template

WEBHOOK_OVERLAY = DEPLOY / "overlays" / "webhook"
OWN_CERTIFICATE_OVERLAY = DEPLOY / "overlays" / "webhook-own-certificate"
NAME = "irsa-cache-webhook"


def docs() -> list[dict[str, Any]]:
    return rendered(WEBHOOK_OVERLAY)


def deployment() -> dict[str, Any]:
    return find(docs(), "Deployment", NAME)


def webhook_container() -> dict[str, Any]:
    (item,) = deployment()["spec"]["template"]["spec"]["containers"]
    return item


def environment(item: dict[str, Any], namespace: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for variable in item.get("env", []):
        if "value" in variable:
            env[variable["name"]] = _expand(variable["value"], env)
        else:
            assert variable["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, variable
            env[variable["name"]] = namespace
    return env


def test_the_args_parse_with_the_webhooks_own_flags(tmp_path: Path) -> None:
    spec = deployment()["spec"]["template"]["spec"]
    item = webhook_container()
    assert "command" not in item, "the image's ENTRYPOINT (irsa-cache) runs the args"
    assert item["image"] == find(base(), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    namespace = deployment()["metadata"]["namespace"]
    env = environment(item, namespace)
    args = [_expand(arg, env) for arg in item["args"]]
    assert args[0] == "webhook"
    # What the kubelet mounts: the Secret's keys as files under the mount path.
    (mount,) = item["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True
    secret_dir = tmp_path / "secret"
    install(issue(authority()), secret_dir)
    args = [arg.replace(mount["mountPath"], str(secret_dir)) for arg in args]

    parsed = settings.parse_webhook_args(args[1:], environ=env)

    assert parsed.tls_cert.parent == parsed.tls_key.parent == secret_dir
    assert parsed.kubeconfig is None  # in-cluster service account
    assert parsed.injection.daemon_namespace == find(base(), "DaemonSet")["metadata"]["namespace"] == namespace
    ports = {p["name"]: p["containerPort"] for p in item["ports"]}
    assert parsed.listen.port == ports["https"] and parsed.metrics_listen.port == ports["metrics"]
    assert parsed.drain_seconds < spec["terminationGracePeriodSeconds"]
    assert item["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert item["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    certificate = find(docs(), "Certificate", NAME)
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]


async def test_the_cluster_role_grants_exactly_what_the_webhook_calls(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        k8s = await K8sApiDouble().start()
        stack.push_async_callback(k8s.stop)
        k8s.create(account())
        ca = authority()
        cert, key = install(issue(ca), tmp_path / "tls")
        webhook = await stack.enter_async_context(app.running(settings.parse_webhook_args(
            ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--tls-cert", str(cert),
             "--tls-key", str(key), "--kubeconfig", str(k8s.write_kubeconfig(tmp_path / "kubeconfig"))], environ={})))
        https = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ca.client_context())))
        for namespace in ("shop", "elsewhere"):  # a ServiceAccount there, and one missing
            async with https.post(webhook.url, json=admission_review(
                    admitted(template(container("app")), namespace), namespace)) as response:
                assert response.status == 200
        used = {permission_of(call.verb, call.path) for call in k8s.calls}

    role = find(docs(), "ClusterRole", NAME)
    assert used == granted_by(role) == {("", "serviceaccounts", "get")}
    binding = find(docs(), "ClusterRoleBinding", NAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": deployment()["spec"]["template"]["spec"][
        "serviceAccountName"], "namespace": deployment()["metadata"]["namespace"]}]


def test_service_disruption_budget_and_replicas() -> None:
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert deployment()["spec"]["replicas"] == 2
    assert deployment()["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    budget = find(docs(), "PodDisruptionBudget", NAME)
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1
    service = find(docs(), "Service", NAME)
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "https" and port["port"] == 443
    # The DaemonSet's Prometheus job and PodMonitor select the daemon only.
    assert labels["app.kubernetes.io/name"] != find(base(), "DaemonSet")["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/name"]


def test_the_configuration_calls_the_service_as_the_readme_says() -> None:
    configuration = find(docs(), "MutatingWebhookConfiguration", "irsa-cache")
    service = find(docs(), "Service", NAME)
    by_name = {hook["name"]: hook for hook in configuration["webhooks"]}
    assert set(by_name) == {"namespace.inject.irsa-cache.io", "pod.inject.irsa-cache.io"}
    for hook in by_name.values():
        assert hook["clientConfig"]["service"] == {
            "name": service["metadata"]["name"], "namespace": service["metadata"]["namespace"],
            "path": server.MUTATE_PATH, "port": service["spec"]["ports"][0]["port"]}
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["sideEffects"] == "None"
        assert hook["failurePolicy"] == "Ignore"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["timeoutSeconds"] > settings.ADMISSION_DEADLINE_SECONDS
        assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["irsa-cache", "kube-system"]} in (
            hook["namespaceSelector"]["matchExpressions"])
    # The two select disjoint namespaces on the label, so no pod is sent twice.
    opt_in = {"key": "irsa-cache.io/inject", "values": ["enabled"]}
    assert {**opt_in, "operator": "In"} in by_name["namespace.inject.irsa-cache.io"]["namespaceSelector"]["matchExpressions"]
    assert "objectSelector" not in by_name["namespace.inject.irsa-cache.io"]
    assert {**opt_in, "operator": "NotIn"} in by_name["pod.inject.irsa-cache.io"]["namespaceSelector"]["matchExpressions"]
    assert by_name["pod.inject.irsa-cache.io"]["objectSelector"] == {"matchLabels": {"irsa-cache.io/inject": "enabled"}}
    # Named to come before EKS's configuration.
    assert configuration["metadata"]["name"] < "pod-identity-webhook"


def test_cert_manager_issues_the_secret_for_the_service_name_and_injects_its_ca() -> None:
    objects = docs()
    service = find(objects, "Service", NAME)
    certificate = find(objects, "Certificate", NAME)
    namespace = service["metadata"]["namespace"]
    assert f"{service['metadata']['name']}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["metadata"]["namespace"] == namespace
    configuration = find(objects, "MutatingWebhookConfiguration", "irsa-cache")
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{namespace}/{NAME}"
    # The issuer chain resolves: serving certificate <- CA issuer <- CA certificate <- self-signed issuer.
    issuers = {d["metadata"]["name"]: d for d in objects if d["kind"] == "Issuer"}
    ca_issuer = issuers[certificate["spec"]["issuerRef"]["name"]]
    ca_certificate = find(objects, "Certificate", "irsa-cache-webhook-ca")
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_certificate["spec"]["secretName"]
    assert ca_certificate["spec"]["isCA"] is True
    assert "selfSigned" in issuers[ca_certificate["spec"]["issuerRef"]["name"]]["spec"]
    hours = {key: int(certificate["spec"][key].removesuffix("h")) for key in ("renewBefore", "duration")}
    assert 0 < hours["renewBefore"] < hours["duration"]


def test_the_own_certificate_overlay_is_the_same_without_cert_manager() -> None:
    own = rendered(OWN_CERTIFICATE_OVERLAY)
    assert not [d for d in own if d["apiVersion"].startswith("cert-manager.io/")]
    configuration = find(own, "MutatingWebhookConfiguration", "irsa-cache")
    assert "annotations" not in configuration["metadata"]
    with_cert_manager = [d for d in docs() if not d["apiVersion"].startswith("cert-manager.io/")]
    find(with_cert_manager, "MutatingWebhookConfiguration", "irsa-cache")["metadata"].pop("annotations")
    assert sorted(map(repr, own)) == sorted(map(repr, with_cert_manager))


def test_security_context_like_the_daemonsets() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork")
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": _dockerfile_user(),
                                       "runAsGroup": _dockerfile_user(), "seccompProfile": {"type": "RuntimeDefault"}}
    context = webhook_container()["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == _dockerfile_user()
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    # NET_BIND_SERVICE only so that the image's interpreter (file capability) can be exec'd.
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    resources = webhook_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


@pytest.mark.parametrize("overlay", [WEBHOOK_OVERLAY, OWN_CERTIFICATE_OVERLAY], ids=lambda p: p.name)
def test_the_overlays_keep_the_base(overlay: Path) -> None:
    objects = rendered(overlay)
    for obj in base():
        assert obj in objects, f"{obj['kind']} {obj['metadata']['name']} changed by the overlay"
