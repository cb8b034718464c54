"""What the operator gave doctor, read from files (or fetched live, see `live.py`).

Every input is optional. A file that was named but cannot be read or parsed raises
InputError with one line naming the flag and the file: doctor then exits 2 without
checking anything, since a half-read input would make every later verdict suspect.
Files are taken in the shapes the usual tools print them:

- `--trust-policy`: the policy document, `aws iam get-role` output, or its `Role`
  object (the document may be URL-encoded, as the raw IAM API returns it);
- `--oidc-providers`: a list of provider objects (`Arn`, `Url`, `ClientIDList`), one
  such object, or `aws iam list-open-id-connect-providers` output;
- `--service-account` / `--pod`: Kubernetes YAML or JSON; a Deployment, StatefulSet,
  DaemonSet, ReplicaSet, Job or CronJob stands for the pods of its template.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.doctor.issuers import Provider, provider_url_of_arn, without_scheme
from daemon.doctor.model import InputError

DEFAULT_AUDIENCE = "sts.amazonaws.com"
DEFAULT_ANNOTATION_PREFIX = "eks.amazonaws.com"
MIN_TOKEN_SECONDS = 600  # the API server mints no shorter token (TokenRequest, projected volumes)
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob",
                            "ReplicationController"})

Obj = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Role:
    """The role being checked, as far as the inputs tell."""

    arn: str | None
    max_session_seconds: int | None = None


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """Everything doctor was given or fetched; None is "not given"."""

    token: str | None = field(default=None, repr=False)  # as read: a trailing newline is kept
    token_source: str = "--token"
    key_set: Mapping[str, Any] | None = None
    key_set_source: str = "--jwks"
    trust_policy: Any = None  # the policy document (any JSON value: doctor judges it)
    role: Role | None = None  # from --trust-policy's get-role output, or GetRole
    providers: tuple[Provider, ...] | None = None
    service_account: Obj | None = None
    pod: Obj | None = None
    pod_is_template: bool = False  # --pod named a workload: its template, not a running pod
    cluster_issuer: str | None = None
    role_arn: str | None = None  # --role-arn
    audience: str = DEFAULT_AUDIENCE
    annotation_prefix: str = DEFAULT_ANNOTATION_PREFIX
    region: str | None = None


def _read(path: Path, flag: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{flag} {path}: is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag} {path}: cannot be read: {exc}") from None


def _parse(text: str, path: Path, flag: str, *, yaml_too: bool) -> Any:
    try:
        return yaml.safe_load(text) if yaml_too else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        what = "YAML or JSON" if yaml_too else "JSON"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{flag} {path}: not {what}: {detail}") from None


def read_token(path: Path) -> str:
    """The token file as the SDKs read it; bytes that are not text make it "not a JWT"
    (a failed check), not an unreadable input."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"--token {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--token {path}: is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"--token {path}: cannot be read: {exc}") from None


def read_key_set(path: Path) -> Any:
    return _parse(_read(path, "--jwks"), path, "--jwks", yaml_too=False)


def read_trust_policy(path: Path) -> tuple[Any, Role | None]:
    """The policy document, and the role when the file is `get-role` output."""
    document = _parse(_read(path, "--trust-policy"), path, "--trust-policy", yaml_too=False)
    return trust_policy_of(document, f"--trust-policy {path}")


def trust_policy_of(document: Any, where: str) -> tuple[Any, Role | None]:
    role_obj = document.get("Role") if isinstance(document, Mapping) else None
    if role_obj is None and isinstance(document, Mapping) and "AssumeRolePolicyDocument" in document:
        role_obj = document
    if not isinstance(role_obj, Mapping):
        return document, None
    policy = role_obj.get("AssumeRolePolicyDocument")
    if isinstance(policy, str):  # the raw API's URL-encoded JSON
        try:
            policy = json.loads(urllib.parse.unquote(policy))
        except ValueError:
            raise InputError(f"{where}: AssumeRolePolicyDocument is not JSON") from None
    max_session = role_obj.get("MaxSessionDuration")
    return policy, Role(arn=role_obj.get("Arn"), max_session_seconds=int(max_session) if max_session else None)


def read_providers(path: Path) -> tuple[Provider, ...]:
    document = _parse(_read(path, "--oidc-providers"), path, "--oidc-providers", yaml_too=False)
    return providers_of(document, f"--oidc-providers {path}")


def providers_of(document: Any, where: str) -> tuple[Provider, ...]:
    if isinstance(document, Mapping) and "OpenIDConnectProviderList" in document:
        document = document["OpenIDConnectProviderList"]
    items = [document] if isinstance(document, Mapping) else document
    if not isinstance(items, list):
        raise InputError(f"{where}: expected a list of providers (objects with Arn, Url, ClientIDList)")
    providers = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, Mapping):
            raise InputError(f"{where}: provider {number} is not an object")
        arn, url = item.get("Arn"), item.get("Url")
        if url is None and isinstance(arn, str):
            url = provider_url_of_arn(arn)
        if not isinstance(url, str) or not url:
            raise InputError(f"{where}: provider {number} has neither Url nor an oidc-provider Arn")
        client_ids = item.get("ClientIDList")
        providers.append(Provider(
            arn=str(arn) if arn else f"(ARN not given) oidc-provider/{without_scheme(url)}",
            url=without_scheme(url),
            client_ids=tuple(str(c) for c in client_ids) if isinstance(client_ids, list) else None,
        ))
    return tuple(providers)


def read_service_account(path: Path) -> Obj:
    document = _parse(_read(path, "--service-account"), path, "--service-account", yaml_too=True)
    return kubernetes_object(document, f"--service-account {path}", "ServiceAccount")[0]


def read_pod(path: Path) -> tuple[Obj, bool]:
    """The pod, and whether it is a workload's template rather than a pod that ran."""
    document = _parse(_read(path, "--pod"), path, "--pod", yaml_too=True)
    return kubernetes_object(document, f"--pod {path}", "Pod")


def kubernetes_object(document: Any, where: str, kind: str) -> tuple[Obj, bool]:
    """The object of `kind` (from a List of one too); for a Pod, a workload's template will do.
    The flag says the pod came from a template."""
    accepted = {kind} | (WORKLOAD_KINDS if kind == "Pod" else set())
    if isinstance(document, Mapping) and str(document.get("kind", "")).endswith("List"):
        matching = [item for item in document.get("items") or []
                    if isinstance(item, Mapping) and item.get("kind", kind) in accepted]
        if len(matching) != 1:
            raise InputError(f"{where}: a List with {len(matching)} {kind} objects; give one")
        document = matching[0]
    if not isinstance(document, Mapping):
        raise InputError(f"{where}: not a Kubernetes object")
    found = document.get("kind", kind)
    if found not in accepted:
        raise InputError(f"{where}: kind is {found}, not {kind}")
    if found != kind:
        return _pod_of_workload(dict(document), where), True
    return dict(document), False


def _pod_of_workload(workload: Obj, where: str) -> Obj:
    spec = workload.get("spec") or {}
    if workload.get("kind") == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template")
    if not isinstance(template, Mapping):
        raise InputError(f"{where}: {workload.get('kind')} without spec.template")
    meta = dict(template.get("metadata") or {})
    workload_meta = workload.get("metadata") or {}
    meta.setdefault("namespace", workload_meta.get("namespace"))
    meta.setdefault("name", f"{workload_meta.get('name', 'pod')} (template)")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": dict(template.get("spec") or {})}
