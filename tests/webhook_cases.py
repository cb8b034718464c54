"""Pods as users write them, for the webhook's and `irsa-cache inject`'s tests alike.

Each case is a Deployment's pod template, the ServiceAccount it runs as (or none),
and what must become of it. `admitted()` turns a template into the Pod the API server
hands a mutating webhook: defaults filled in, the ServiceAccount admission plugin's
`kube-api-access-*` volume and mounts added, a generated name. `eks_webhook()` does
what EKS's pod identity webhook does to a pod (its handler, read from
aws/amazon-eks-pod-identity-webhook `pkg/handler/handler.go`), for the cases where it
runs before or after irsa-cache's.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.webhook import mutation
from daemon.webhook.mutation import Outcome

Obj = dict[str, Any]

NAMESPACE = "shop"
ROLE = "arn:aws:iam::111122223333:role/checkout"
EKS_TOKEN_PATH = "/var/run/secrets/eks.amazonaws.com/serviceaccount"


def account(name: str = "checkout", namespace: str = NAMESPACE, role: str | None = ROLE, **annotations: str) -> Obj:
    notes = dict(annotations)
    if role is not None:
        notes["eks.amazonaws.com/role-arn"] = role
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "annotations": notes}}


def container(name: str, image: str = "public.ecr.aws/docker/library/busybox:stable", **extra: Any) -> Obj:
    return {"name": name, "image": image, **extra}


def template(*containers: Obj, init: tuple[Obj, ...] = (), labels: Mapping[str, str] | None = None,
             annotations: Mapping[str, str] | None = None, service_account: str | None = "checkout",
             **spec: Any) -> Obj:
    metadata: Obj = {"labels": {"app": "checkout", **(labels or {})}}
    if annotations:
        metadata["annotations"] = dict(annotations)
    body: Obj = {}
    if service_account is not None:
        body["serviceAccountName"] = service_account
    if init:
        body["initContainers"] = list(init)
    body["containers"] = list(containers)
    body.update(spec)
    return {"metadata": metadata, "spec": body}


def eks_webhook(pod: Obj, *, role: str = ROLE, region: str = "us-east-1") -> Obj:
    """EKS's pod identity webhook applied to `pod` (it ignores irsa-cache's label, as a
    self-installed copy without its objectSelector would)."""
    new = copy.deepcopy(pod)
    spec = new["spec"]
    skip = set(filter(None, ((new.get("metadata") or {}).get("annotations") or {})
                      .get("eks.amazonaws.com/skip-containers", "").split(",")))
    for kind in ("initContainers", "containers"):
        for item in spec.get(kind) or []:
            if item["name"] in skip:
                continue
            env = item.setdefault("env", [])
            names = {variable["name"] for variable in env}
            if "AWS_STS_REGIONAL_ENDPOINTS" not in names:
                env.append({"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"})
            if not names & {"AWS_REGION", "AWS_DEFAULT_REGION"}:
                env += [{"name": "AWS_DEFAULT_REGION", "value": region}, {"name": "AWS_REGION", "value": region}]
            if not names & {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"}:
                env += [{"name": "AWS_ROLE_ARN", "value": role},
                        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{EKS_TOKEN_PATH}/token"}]
            mounts = item.setdefault("volumeMounts", [])
            if not any(mount["name"] == "aws-iam-token" for mount in mounts):
                mounts.append({"name": "aws-iam-token", "readOnly": True, "mountPath": EKS_TOKEN_PATH})
    volumes = spec.setdefault("volumes", [])
    if not any(volume["name"] == "aws-iam-token" for volume in volumes):
        volumes.insert(0, {"name": "aws-iam-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": "token"}}]}})
    return new


@dataclass(frozen=True)
class Case:
    id: str
    template: Obj
    account: Obj | None
    outcome: Outcome
    injected: tuple[str, ...] = ()  # containers that end up pointed at irsa-cache
    untouched: tuple[str, ...] = ()  # containers that must come out exactly as they went in
    namespace: str = NAMESPACE
    extra: Obj = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("plain deployment", template(container("app", ports=[{"containerPort": 8080}])),
         account(), Outcome.MUTATED, injected=("app",)),
    Case("mutated by EKS's webhook first", eks_webhook(template(container("app"))),
         account(), Outcome.MUTATED, injected=("app",)),
    Case("native sidecar", template(
        container("app"),
        init=(container("migrate", command=["migrate"]),
              container("log-shipper", restartPolicy="Always"))),
         account(), Outcome.MUTATED, injected=("migrate", "log-shipper", "app")),
    Case("skip-containers, both annotations", template(
        container("app"), container("istio-proxy"), container("metrics"),
        annotations={"irsa-cache.io/skip-containers": "istio-proxy",
                     "eks.amazonaws.com/skip-containers": "metrics"}),
         account(), Outcome.MUTATED, injected=("app",), untouched=("istio-proxy", "metrics")),
    Case("a container with its own container provider", template(
        container("app", env=[{"name": "LOG_LEVEL", "value": "info"}]),
        container("agent", env=[{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:9911/creds"},
                                {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN", "value": "local"}])),
         account(), Outcome.MUTATED, injected=("app",), untouched=("agent",)),
    Case("ServiceAccount without a role", template(container("app")),
         account(role=None), Outcome.NO_ROLE, untouched=("app",)),
    Case("ServiceAccount missing", template(container("app")), None, Outcome.NO_ROLE, untouched=("app",)),
    Case("role annotation that is no role ARN", template(container("app")),
         account(role="checkout-role"), Outcome.NO_ROLE, untouched=("app",)),
    Case("Fargate", template(container("app"), labels={"eks.amazonaws.com/fargate-profile": "fp-default"},
                             schedulerName="fargate-scheduler"),
         account(), Outcome.FARGATE, untouched=("app",)),
    Case("Windows", template(container("app", image="mcr.microsoft.com/windows/nanoserver:ltsc2022"),
                             nodeSelector={"kubernetes.io/os": "windows"}),
         account(), Outcome.WINDOWS, untouched=("app",)),
    Case("opted out", template(container("app"), annotations={"irsa-cache.io/inject": "false"}),
         account(), Outcome.OPTED_OUT, untouched=("app",)),
    Case("the daemon's own namespace", template(container("app")),
         account(namespace="irsa-cache"), Outcome.DAEMON_NAMESPACE, untouched=("app",), namespace="irsa-cache"),
)

CASE_IDS = [case.id for case in CASES]


def admitted(pod_template: Obj, namespace: str = NAMESPACE) -> Obj:
    """The Pod a mutating webhook receives for `pod_template` (made by a ReplicaSet)."""
    pod = copy.deepcopy(pod_template)
    metadata = pod.setdefault("metadata", {})
    metadata.update(generateName="checkout-7d4b9c6f5d-", namespace=namespace,
                    ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-7d4b9c6f5d",
                                      "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}])
    metadata.setdefault("labels", {})["pod-template-hash"] = "7d4b9c6f5d"
    spec = pod["spec"]
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    spec.setdefault("tolerations", [
        {"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        for taint in ("not-ready", "unreachable")])
    api_access = "kube-api-access-x7k2p"
    for kind in ("initContainers", "containers"):
        for item in spec.get(kind) or []:
            item.setdefault("imagePullPolicy", "IfNotPresent")
            item.setdefault("resources", {})
            item.setdefault("terminationMessagePath", "/dev/termination-log")
            item.setdefault("terminationMessagePolicy", "File")
            item.setdefault("volumeMounts", []).append(
                {"name": api_access, "readOnly": True, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
    spec.setdefault("volumes", []).append({"name": api_access, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
            "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}})
    return {"apiVersion": "v1", "kind": "Pod", **pod, "status": {}}


def containers_by_name(pod: Mapping[str, Any]) -> dict[str, Obj]:
    spec = pod["spec"]
    return {item["name"]: item for kind in ("initContainers", "containers") for item in spec.get(kind) or []}


def assert_points_at_cache(pod: Mapping[str, Any], case: Case, original: Mapping[str, Any],
                           settings: mutation.InjectionSettings | None = None) -> None:
    """What every injected pod must look like, and what must be as it was."""
    settings = settings or mutation.InjectionSettings()
    after, before = containers_by_name(pod), containers_by_name(original)
    assert list(after) == list(before), "containers are neither added, removed nor reordered"
    for name in case.untouched:
        assert after[name] == before[name], f"{name} changed"
    if case.outcome is not Outcome.MUTATED:
        assert pod == original
        return
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert len(volumes) == len(pod["spec"]["volumes"]), "volume names are unique"
    (source,) = volumes[mutation.VOLUME_NAME]["projected"]["sources"]
    assert source == {"serviceAccountToken": {"audience": settings.audience,
                                              "expirationSeconds": settings.token_expiration_seconds,
                                              "path": "token"}}
    assert pod["metadata"]["labels"]["eks.amazonaws.com/skip-pod-identity-webhook"] == "true"
    for name in case.injected:
        item = after[name]
        env = {variable["name"]: variable.get("value") for variable in item["env"]}
        assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == "http://169.254.170.23/v1/credentials"
        assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] == "/var/run/secrets/irsa-cache/token"
        assert not {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} & env.keys(), f"{name} keeps web identity"
        assert len(env) == len(item["env"]), f"{name}: a variable is set twice"
        mounts = item["volumeMounts"]
        assert {"name": mutation.VOLUME_NAME, "mountPath": "/var/run/secrets/irsa-cache", "readOnly": True} in mounts
        assert not [m for m in mounts if m["name"] == "aws-iam-token"]
        assert len({m["mountPath"] for m in mounts}) == len(mounts), f"{name}: two mounts at one path"
        for mount in mounts:
            assert mount["name"] in volumes, f"{name} mounts a volume the pod lacks: {mount['name']}"
        # Everything else about the container is as the user wrote it.
        original_env = [v for v in before[name].get("env") or [] if v["name"] not in (
            "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")]
        assert item["env"][:len(original_env)] == original_env
        rest = {k: v for k, v in item.items() if k not in ("env", "volumeMounts")}
        assert rest == {k: v for k, v in before[name].items() if k not in ("env", "volumeMounts")}
    if not any(m["name"] == "aws-iam-token" for c in after.values() for m in c.get("volumeMounts") or []):
        assert "aws-iam-token" not in volumes
