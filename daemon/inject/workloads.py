"""Where pods live in Kubernetes objects, and which ServiceAccounts an input declares.

A Pod is a pod; the workload kinds carry one as a template (Deployments, StatefulSets,
DaemonSets, ReplicaSets, ReplicationControllers, Jobs and PodTemplates under
`spec.template` or `template`, CronJobs under `spec.jobTemplate.spec.template`); a
`List` (what `kubectl get -o yaml` writes) holds objects in `items`. The kind is
matched with its API group and any version. Everything else is passed through.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Key = str | int

TEMPLATE_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): (),
    ("", "PodTemplate"): ("template",),
    ("", "ReplicationController"): ("spec", "template"),
    ("apps", "Deployment"): ("spec", "template"),
    ("apps", "StatefulSet"): ("spec", "template"),
    ("apps", "DaemonSet"): ("spec", "template"),
    ("apps", "ReplicaSet"): ("spec", "template"),
    ("batch", "Job"): ("spec", "template"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True, kw_only=True)
class PodTemplate:
    """A pod inside a document: where it is, and the object that holds it."""

    path: tuple[Key, ...]  # from the document's root to the pod (its metadata and spec)
    kind: str
    name: str
    namespace: str

    @property
    def label(self) -> str:
        return f"{self.kind.lower()}/{self.name} in {self.namespace}"


def api_group(api_version: Any) -> str:
    return api_version.rpartition("/")[0] if isinstance(api_version, str) else ""


def objects(content: Any, path: tuple[Key, ...] = ()) -> Iterator[tuple[tuple[Key, ...], Mapping[str, Any]]]:
    """Every object of a document, with its path: the document itself, or a List's items."""
    if not isinstance(content, Mapping):
        return
    kind = content.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(content.get("items"), list):
        for index, item in enumerate(content["items"]):
            yield from objects(item, (*path, "items", index))
        return
    yield path, content


def pod_templates(content: Any, *, default_namespace: str) -> Iterator[PodTemplate]:
    for path, obj in objects(content):
        template_path = TEMPLATE_PATHS.get((api_group(obj.get("apiVersion")), str(obj.get("kind"))))
        if template_path is None:
            continue
        node: Any = obj
        for key in template_path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if not isinstance(node, Mapping):
            continue
        metadata = obj.get("metadata") or {}
        yield PodTemplate(
            path=(*path, *template_path),
            kind=str(obj["kind"]),
            name=str(metadata.get("name") or metadata.get("generateName") or "(unnamed)"),
            namespace=str(metadata.get("namespace") or default_namespace),
        )


def service_accounts(content: Any, *, default_namespace: str) -> Iterator[tuple[tuple[str, str], Mapping[str, Any]]]:
    """((namespace, name), the ServiceAccount with its namespace filled in) for each in the document."""
    for _, obj in objects(content):
        if obj.get("kind") != "ServiceAccount" or api_group(obj.get("apiVersion")) != "":
            continue
        metadata = dict(obj.get("metadata") or {})
        metadata["namespace"] = metadata.get("namespace") or default_namespace
        if not metadata.get("name"):
            continue
        yield (str(metadata["namespace"]), str(metadata["name"])), {**obj, "metadata": metadata}
