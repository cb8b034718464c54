"""What the webhook and `irsa-cache inject` change in a pod, and when they leave it alone.

One pure function, `mutate`, over a pod as plain JSON data (a Pod, or the pod template
of a workload: `metadata` and `spec`). It never edits its input and does no I/O: the
caller has already asked whether the pod's ServiceAccount carries a role.

A pod is left as it is, and the outcome says why, when:

- it opts out: the annotation `irsa-cache.io/inject: "false"`;
- it cannot reach a node's irsa-cache: a Fargate pod (label
  `eks.amazonaws.com/fargate-profile`, or the `fargate-scheduler`), a Windows pod
  (`spec.os.name`, a nodeSelector or a required node affinity on
  `kubernetes.io/os=windows`), or a pod in the daemon's own namespace;
- its ServiceAccount has no role: the daemon would refuse its token anyway.

Otherwise every container and init container (native sidecars are init containers
with `restartPolicy: Always`) gets the two container-provider variables and a
read-only mount of a projected service-account token, except the containers named in
a skip-containers annotation (irsa-cache's or EKS's) and those that already set a
container-provider variable of their own, which are left exactly as they are. From
the containers it points at the cache it removes `AWS_ROLE_ARN` and
`AWS_WEB_IDENTITY_TOKEN_FILE` (every SDK prefers them to the container provider) and
the mount of EKS's `aws-iam-token` volume, and it removes that volume once nothing
mounts it: so the result is the same whether EKS's webhook ran before or after. The
pod gets the label that keeps EKS's webhook away when it runs later.

Idempotent: a pod this function produced comes back unchanged (outcome `unchanged`).
Values the API server fills in later (a projected volume's `defaultMode`) do not
count as a difference.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

# What a pod gets: the node daemon's address and the token it presents.
CREDENTIALS_URI = "http://169.254.170.23/v1/credentials"
TOKEN_DIRECTORY = "/var/run/secrets/irsa-cache"
TOKEN_FILE_NAME = "token"
TOKEN_FILE = f"{TOKEN_DIRECTORY}/{TOKEN_FILE_NAME}"
VOLUME_NAME = "irsa-cache-token"
INJECTED_ENV = (
    ("AWS_CONTAINER_CREDENTIALS_FULL_URI", CREDENTIALS_URI),
    ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", TOKEN_FILE),
)

# Opting in and out. The label is what the MutatingWebhookConfiguration selects on
# (namespaces and pods); the annotation opts one pod out.
INJECT_KEY = "irsa-cache.io/inject"
INJECT_ENABLED = "enabled"
OPT_OUT_VALUES = frozenset({"false", "disabled"})
SKIP_CONTAINERS_ANNOTATIONS = ("irsa-cache.io/skip-containers", "eks.amazonaws.com/skip-containers")

# EKS's pod identity webhook: its configuration skips pods with this label (any value).
SKIP_POD_IDENTITY_LABEL = "eks.amazonaws.com/skip-pod-identity-webhook"
SKIP_POD_IDENTITY_VALUE = "true"
EKS_TOKEN_VOLUME = "aws-iam-token"
# Every SDK's credential chain tries web identity before the container provider.
WINNING_VARIABLES = frozenset({"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"})
CONTAINER_PROVIDER_VARIABLES = frozenset({
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
})

# Pods that cannot reach a node daemon.
FARGATE_PROFILE_LABEL = "eks.amazonaws.com/fargate-profile"
FARGATE_SCHEDULER = "fargate-scheduler"
OS_LABELS = ("kubernetes.io/os", "beta.kubernetes.io/os")

DEFAULT_AUDIENCE = "sts.amazonaws.com"
DEFAULT_TOKEN_EXPIRATION_SECONDS = 86400  # what EKS projects for IRSA
MIN_TOKEN_EXPIRATION_SECONDS = 600  # the API server refuses shorter projected tokens
MAX_TOKEN_EXPIRATION_SECONDS = 2**32  # the field's own bound (Kubernetes validation)


class Outcome(enum.Enum):
    """What became of one pod; the webhook's metric label."""

    MUTATED = "mutated"  # pointed at irsa-cache
    UNCHANGED = "unchanged"  # already pointed at it, or no container to point
    OPTED_OUT = "opted_out"  # annotation irsa-cache.io/inject: "false"
    NO_ROLE = "no_role"  # its ServiceAccount has no (valid) role annotation, or is missing
    FARGATE = "fargate"  # no node daemon on Fargate
    WINDOWS = "windows"  # no node daemon on Windows nodes
    DAEMON_NAMESPACE = "daemon_namespace"  # irsa-cache's own pods
    ERROR = "error"  # (webhook) the request was unusable or the ServiceAccount could not be read


@dataclass(frozen=True, kw_only=True)
class InjectionSettings:
    """What the projected token looks like, and where roles and the daemon are."""

    audience: str = DEFAULT_AUDIENCE
    token_expiration_seconds: int = DEFAULT_TOKEN_EXPIRATION_SECONDS
    annotation_prefix: str = "eks.amazonaws.com"
    daemon_namespace: str = "irsa-cache"

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("the audience must not be empty")
        if not MIN_TOKEN_EXPIRATION_SECONDS <= self.token_expiration_seconds <= MAX_TOKEN_EXPIRATION_SECONDS:
            raise ValueError(
                f"token expiration {self.token_expiration_seconds} s is outside "
                f"{MIN_TOKEN_EXPIRATION_SECONDS}..{MAX_TOKEN_EXPIRATION_SECONDS} s")

    @property
    def role_annotation(self) -> str:
        return f"{self.annotation_prefix}/role-arn"

    def token_volume(self) -> Obj:
        return {
            "name": VOLUME_NAME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": self.audience,
                "expirationSeconds": self.token_expiration_seconds,
                "path": TOKEN_FILE_NAME,
            }}]},
        }


TOKEN_MOUNT: Obj = {"name": VOLUME_NAME, "mountPath": TOKEN_DIRECTORY, "readOnly": True}


@dataclass(frozen=True, kw_only=True)
class Mutation:
    """The pod to admit (the input itself when nothing changed), and why."""

    pod: Obj
    outcome: Outcome
    reason: str
    injected: tuple[str, ...] = ()  # containers pointed at irsa-cache
    left_alone: tuple[tuple[str, str], ...] = field(default=())  # (container, why)

    @property
    def changed(self) -> bool:
        return self.outcome is Outcome.MUTATED


def service_account_of(pod: Mapping[str, Any]) -> str:
    """The pod's ServiceAccount, as the API server defaults it."""
    spec = pod.get("spec") or {}
    return spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"


def skip_reason(pod: Mapping[str, Any], *, namespace: str, settings: InjectionSettings) -> tuple[Outcome, str] | None:
    """Why this pod is left alone whatever its ServiceAccount, or None. Cheap: the
    webhook asks it before it looks the ServiceAccount up."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    opt_out = annotations.get(INJECT_KEY)
    if isinstance(opt_out, str) and opt_out.strip().lower() in OPT_OUT_VALUES:
        return Outcome.OPTED_OUT, f"annotation {INJECT_KEY}: {opt_out!r}"
    if namespace == settings.daemon_namespace:
        return Outcome.DAEMON_NAMESPACE, f"namespace {namespace} is irsa-cache's own"
    if FARGATE_PROFILE_LABEL in labels:
        return Outcome.FARGATE, f"label {FARGATE_PROFILE_LABEL}: Fargate has no node daemon"
    if spec.get("schedulerName") == FARGATE_SCHEDULER:
        return Outcome.FARGATE, f"scheduler {FARGATE_SCHEDULER}: Fargate has no node daemon"
    windows = _windows_reason(spec)
    if windows:
        return Outcome.WINDOWS, f"{windows}: irsa-cache does not run on Windows nodes"
    return None


def mutate(
    pod: Mapping[str, Any], *, namespace: str, role_arn: str | None, settings: InjectionSettings,
    no_role_reason: str = "its ServiceAccount has no role",
) -> Mutation:
    """Point the pod at the node's irsa-cache, or say why not. `role_arn` is the role of
    the pod's ServiceAccount (None: none, the pod is left alone)."""
    skipped = skip_reason(pod, namespace=namespace, settings=settings)
    if skipped is not None:
        return Mutation(pod=dict(pod), outcome=skipped[0], reason=skipped[1])
    if role_arn is None:
        return Mutation(pod=dict(pod), outcome=Outcome.NO_ROLE, reason=no_role_reason)

    new: Obj = copy.deepcopy(dict(pod))
    spec = new.setdefault("spec", {})
    metadata = new.get("metadata") or {}
    skip_names = set(_skip_containers(metadata.get("annotations") or {}))
    injected: list[str] = []
    left_alone: list[tuple[str, str]] = []
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind) or []:
            name = str(container.get("name", ""))
            why = _leave_alone(container, skip_names)
            if why is not None:
                left_alone.append((name, why))
                continue
            _point_at_cache(container)
            injected.append(name)
    if not injected:
        reason = "no container to point at irsa-cache" + (
            ": " + "; ".join(f"{n} {w}" for n, w in left_alone) if left_alone else "")
        return Mutation(pod=dict(pod), outcome=Outcome.UNCHANGED, reason=reason, left_alone=tuple(left_alone))

    spec["volumes"] = _with_token_volume(spec.get("volumes") or [], settings)
    if not any(mount.get("name") == EKS_TOKEN_VOLUME for mount in _all_mounts(spec)):
        spec["volumes"] = [v for v in spec["volumes"] if v.get("name") != EKS_TOKEN_VOLUME]
    labels = new.setdefault("metadata", {}).get("labels") or {}
    if SKIP_POD_IDENTITY_LABEL not in labels:
        new["metadata"]["labels"] = {**labels, SKIP_POD_IDENTITY_LABEL: SKIP_POD_IDENTITY_VALUE}

    if new == pod:
        return Mutation(pod=dict(pod), outcome=Outcome.UNCHANGED, reason="already points at irsa-cache",
                        injected=tuple(injected), left_alone=tuple(left_alone))
    return Mutation(pod=new, outcome=Outcome.MUTATED, reason="pointed at irsa-cache: " + ", ".join(injected),
                    injected=tuple(injected), left_alone=tuple(left_alone))


def role_arn_of(account: Mapping[str, Any] | None, settings: InjectionSettings) -> tuple[str | None, str]:
    """The role a ServiceAccount carries, as the daemon would accept it, or None and why not."""
    from daemon.directory.kubernetes import ROLE_ARN  # the daemon's own rule for the annotation

    if account is None:
        return None, "its ServiceAccount does not exist"
    metadata = account.get("metadata") or {}
    where = f"ServiceAccount {metadata.get('namespace', '?')}/{metadata.get('name', '?')}"
    value = (metadata.get("annotations") or {}).get(settings.role_annotation)
    if value is None:
        return None, f"{where} has no {settings.role_annotation} annotation"
    if not isinstance(value, str) or not ROLE_ARN.fullmatch(value):
        return None, f"{where}: {settings.role_annotation} is {value!r}, not an IAM role ARN"
    return value, f"{where} has role {value}"


# --- helpers -------------------------------------------------------------------------


def _skip_containers(annotations: Mapping[str, Any]) -> Iterable[str]:
    for key in SKIP_CONTAINERS_ANNOTATIONS:
        value = annotations.get(key)
        if isinstance(value, str):
            # EKS reads a CSV record; names cannot hold commas or quotes, so a split will do.
            yield from (name.strip() for name in value.split(",") if name.strip())


def _windows_reason(spec: Mapping[str, Any]) -> str | None:
    if (spec.get("os") or {}).get("name") == "windows":
        return "spec.os.name: windows"
    selector = spec.get("nodeSelector") or {}
    for key in OS_LABELS:
        if selector.get(key) == "windows":
            return f"nodeSelector {key}: windows"
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
    terms = (affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    # Terms are alternatives: the pod is Windows-only when every one of them requires it.
    if terms and all(_term_requires_windows(term) for term in terms):
        return "required node affinity kubernetes.io/os In [windows]"
    return None


def _term_requires_windows(term: Mapping[str, Any]) -> bool:
    return any(
        expression.get("key") in OS_LABELS and expression.get("operator") == "In"
        and set(expression.get("values") or []) == {"windows"}
        for expression in term.get("matchExpressions") or []
    )


def _env_names(container: Mapping[str, Any]) -> set[str]:
    return {str(variable.get("name")) for variable in container.get("env") or []}


def _is_ours(container: Mapping[str, Any]) -> bool:
    """Its container-provider variables are exactly the ones this module sets."""
    values = {variable.get("name"): variable.get("value") for variable in container.get("env") or []}
    return (_env_names(container) & CONTAINER_PROVIDER_VARIABLES) == {name for name, _ in INJECTED_ENV} and all(
        values.get(name) == value for name, value in INJECTED_ENV)


def _leave_alone(container: Mapping[str, Any], skip_names: set[str]) -> str | None:
    if container.get("name") in skip_names:
        return "is named in a skip-containers annotation"
    if _env_names(container) & CONTAINER_PROVIDER_VARIABLES and not _is_ours(container):
        return "sets AWS_CONTAINER_* variables of its own"
    for mount in container.get("volumeMounts") or []:
        if mount.get("mountPath", "").rstrip("/") == TOKEN_DIRECTORY and mount.get("name") != VOLUME_NAME:
            return f"mounts volume {mount.get('name')!r} at {TOKEN_DIRECTORY}"
    return None


def _point_at_cache(container: Obj) -> None:
    env = [v for v in container.get("env") or [] if v.get("name") not in WINNING_VARIABLES]
    present = {variable.get("name") for variable in env}
    env.extend({"name": name, "value": value} for name, value in INJECTED_ENV if name not in present)
    container["env"] = env

    mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") != EKS_TOKEN_VOLUME]
    ours = [index for index, mount in enumerate(mounts) if mount.get("name") == VOLUME_NAME]
    if not (len(ours) == 1 and _is_token_mount(mounts[ours[0]])):
        at = ours[0] if ours else len(mounts)
        mounts = [m for m in mounts if m.get("name") != VOLUME_NAME]
        mounts.insert(min(at, len(mounts)), dict(TOKEN_MOUNT))
    container["volumeMounts"] = mounts


def _is_token_mount(mount: Mapping[str, Any]) -> bool:
    return (mount.get("mountPath", "").rstrip("/") == TOKEN_DIRECTORY and mount.get("readOnly") is True
            and not mount.get("subPath") and not mount.get("subPathExpr"))


def _with_token_volume(volumes: list[Obj], settings: InjectionSettings) -> list[Obj]:
    wanted = settings.token_volume()
    result: list[Obj] = []
    placed = False
    for volume in volumes:
        if volume.get("name") != VOLUME_NAME:
            result.append(volume)
        elif not placed:
            result.append(volume if _same_token_volume(volume, wanted) else wanted)
            placed = True
    if not placed:
        result.append(wanted)
    return result


def _same_token_volume(volume: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """The same token source; `defaultMode`, which the API server fills in, does not matter."""
    keys = set(volume) - {"name"}
    projected = volume.get("projected") or {}
    return keys == {"projected"} and set(projected) <= {"sources", "defaultMode"} and (
        projected.get("sources") == wanted["projected"]["sources"])


def _all_mounts(spec: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(kind) or []:
            yield from container.get("volumeMounts") or []
