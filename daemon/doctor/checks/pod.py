"""Checks of the pod link: will the pod's SDKs ask irsa-cache, with a token it accepts?

What the SDKs do (read from their sources): `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`
win over the container-credentials provider in every SDK; over plain HTTP the SDKs
accept only 169.254.170.23, 169.254.170.2 and loopback hosts ([fd00:ec2::23] too, but
Java only with AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6); they re-read
`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` on each fetch and refuse a token with CR or
LF in it. The kubelet rotates a projected token in place, but never a file mounted
with `subPath`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from daemon.doctor.facts import Facts, account_of_subject, pod_account
from daemon.doctor.inputs import MIN_TOKEN_SECONDS
from daemon.doctor.model import Check, Finding, Link, failed, passed, skipped, warned
from daemon.server import CREDENTIALS_PATH
from daemon.webhook.mutation import DEFAULT_TOKEN_EXPIRATION_SECONDS

FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
TOKEN_FILE = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
TOKEN_VALUE = "AWS_CONTAINER_AUTHORIZATION_TOKEN"
WEB_IDENTITY = ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
PLAIN_HTTP_HOSTS = frozenset({"169.254.170.23", "169.254.170.2", "localhost"})
JAVA_IPV6_HOST = "fd00:ec2::23"
DEFAULT_TOKEN_SECONDS = 3600
DAEMON_URL = f"http://169.254.170.23{CREDENTIALS_PATH}"

NO_POD = "not checked: no pod given (--pod FILE, or --live --pod-name NS/NAME)"

Obj = dict[str, Any]


def containers(pod: Obj) -> list[Obj]:
    spec = pod.get("spec") or {}
    return [dict(c) for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
            if isinstance(c, Mapping)]


def environment(container: Obj) -> dict[str, str | None]:
    """Variables by name; None for a value doctor cannot see (valueFrom)."""
    return {item["name"]: item.get("value") if "valueFrom" not in item else None
            for item in container.get("env") or [] if isinstance(item, Mapping) and "name" in item}


def _users(pod: Obj) -> list[tuple[str, dict[str, str | None]]]:
    """Containers that use the container-credentials provider, with their environment."""
    out = []
    for container in containers(pod):
        env = environment(container)
        if FULL_URI in env:
            out.append((str(container.get("name")), env))
    return out


def _pod_name(pod: Obj) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def check_service_account(facts: Facts) -> Finding:
    pod = facts.inputs.pod
    if pod is None:
        return skipped(NO_POD)
    namespace, name = pod_account(pod)
    subject = facts.subject
    if subject is None or subject.source == "the pod's serviceAccountName":
        return passed(f"pod {_pod_name(pod)} runs as ServiceAccount {namespace}/{name}")
    wanted = account_of_subject(subject.value)
    if wanted != (namespace, name):
        return failed(f"pod {_pod_name(pod)} runs as ServiceAccount {namespace}/{name}, not the identity checked "
                      f"({subject.value}, from {subject.source})",
                      f"set spec.serviceAccountName: {wanted[1] if wanted else '<name>'} in the pod template, "
                      "or check the ServiceAccount the pod runs as")
    return passed(f"pod {_pod_name(pod)} runs as ServiceAccount {namespace}/{name}")


def check_web_identity_env(facts: Facts) -> Finding:
    pod = facts.inputs.pod
    if pod is None:
        return skipped(NO_POD)
    offenders = []
    for container in containers(pod):
        found = [name for name in WEB_IDENTITY if name in environment(container)]
        if found:
            offenders.append((str(container.get("name")), found))
    if offenders:
        names = ",".join(name for name, _ in offenders)
        listed = "; ".join(f"container {name} sets {', '.join(found)}" for name, found in offenders)
        return failed(
            f"{listed}: every SDK uses these before the container-credentials provider, so the pod calls STS "
            "itself and never asks irsa-cache",
            "remove them from the pod; on EKS the pod identity webhook injects them into pods whose "
            f"ServiceAccount has eks.amazonaws.com/role-arn: annotate the pod with "
            f"eks.amazonaws.com/skip-containers: \"{names}\", or run irsa-cache with an --annotation-prefix "
            "of your own and annotate the ServiceAccount with that",
        )
    return passed("no container sets AWS_ROLE_ARN or AWS_WEB_IDENTITY_TOKEN_FILE")


def _uri_problem(uri: str, env: Mapping[str, str | None]) -> tuple[str, str] | None:
    """(status, problem) for a FULL_URI value, None when every SDK takes it."""
    parts = urlsplit(uri)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return "fail", f"{uri!r} is not an http URL"
    if parts.scheme == "http":
        loopback = False
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if host == JAVA_IPV6_HOST:
            if (env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE") or "").lower() != "ipv6":
                return "warn", (f"{uri}: the Java SDK accepts [{JAVA_IPV6_HOST}] only with "
                                "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6 (botocore, JS and Go do)")
        elif host not in PLAIN_HTTP_HOSTS and not loopback:
            return "fail", (f"{uri}: the SDKs refuse plain HTTP to {host} (only 169.254.170.23, 169.254.170.2 "
                            "and loopback)")
    else:
        return "warn", f"{uri}: irsa-cache serves plain HTTP on its link-local address; https reaches it only through a proxy"
    if parts.path != CREDENTIALS_PATH:
        return "fail", f"{uri}: irsa-cache answers on {CREDENTIALS_PATH} only (404 elsewhere)"
    return None


def check_credentials_uri(facts: Facts) -> Finding:
    pod = facts.inputs.pod
    if pod is None:
        return skipped(NO_POD)
    users = _users(pod)
    fix = f"set {FULL_URI}={DAEMON_URL} in the container's env"
    if not users:
        return failed(f"no container of pod {_pod_name(pod)} sets {FULL_URI}: its SDKs never ask irsa-cache",
                      f"{fix}, with {TOKEN_FILE} pointing at a projected service-account token")
    worst: tuple[str, str] | None = None
    for name, env in users:
        uri = env[FULL_URI]
        problem: tuple[str, str] | None
        if uri is None:
            problem = ("warn", f"container {name}: {FULL_URI} comes from valueFrom, doctor cannot see it")
        else:
            trouble = _uri_problem(uri, env)
            problem = (trouble[0], f"container {name}: {trouble[1]}") if trouble else None
        if problem and (worst is None or (problem[0] == "fail" and worst[0] != "fail")):
            worst = problem
    if worst is not None:
        return (failed if worst[0] == "fail" else warned)(worst[1], fix)
    return passed(f"{FULL_URI} is {users[0][1][FULL_URI]} in {', '.join(name for name, _ in users)}")


@dataclass(frozen=True)
class TokenMount:
    """Where a container's token file comes from."""

    source: Mapping[str, Any] | None  # the projected serviceAccountToken source, when it is one
    problem: str | None  # why the file is not a rotated projected token
    kind: str = "projected"  # the volume kind, for a problem


def token_mount(pod: Obj, container: Obj, path: str) -> TokenMount:
    volumes = {v.get("name"): v for v in (pod.get("spec") or {}).get("volumes") or [] if isinstance(v, Mapping)}
    for mount in container.get("volumeMounts") or []:
        mount_path = str(mount.get("mountPath", "")).rstrip("/")
        sub_path = mount.get("subPath")
        if sub_path and path == mount_path:
            relative = str(sub_path)
        elif not sub_path and path.startswith(mount_path + "/"):
            relative = path[len(mount_path) + 1:]
        else:
            continue
        volume = volumes.get(mount.get("name")) or {}
        kind = next((k for k in volume if k != "name"), "unknown")
        if kind != "projected":
            return TokenMount(source=None, kind=kind,
                              problem=f"{path} is on a {kind} volume ({mount.get('name')}), not a projected "
                                      "service-account token: nothing rotates it")
        for source in (volume.get("projected") or {}).get("sources") or []:
            token = (source or {}).get("serviceAccountToken")
            if isinstance(token, Mapping) and token.get("path") == relative:
                if sub_path:
                    return TokenMount(source=token, problem=f"{path} is mounted with subPath: the kubelet never "
                                                            "updates it, so the token expires in the pod")
                return TokenMount(source=token, problem=None)
        return TokenMount(source=None, problem=f"volume {mount.get('name')} projects no serviceAccountToken at "
                                               f"{relative!r}")
    return TokenMount(source=None, kind="none", problem=f"{path} is on no volume the container mounts")


def _token_files(pod: Obj) -> list[tuple[str, str | None, TokenMount | None, str | None]]:
    """(container, path, mount, problem) for each container using the container provider."""
    out: list[tuple[str, str | None, TokenMount | None, str | None]] = []
    for container in containers(pod):
        env = environment(container)
        if FULL_URI not in env:
            continue
        name = str(container.get("name"))
        if TOKEN_FILE not in env:
            problem = (f"container {name} passes a fixed token in {TOKEN_VALUE}: it is never rotated and expires"
                       if TOKEN_VALUE in env else f"container {name} does not set {TOKEN_FILE}")
            out.append((name, None, None, problem))
        elif env[TOKEN_FILE] is None:
            out.append((name, None, None, None))
        else:
            path = str(env[TOKEN_FILE])
            out.append((name, path, token_mount(pod, container, path), None))
    return out


def _projection_fix(facts: Facts) -> str:
    return ("mount a projected token and point the variable at it: volumes: [{name: irsa-cache-token, projected: "
            f"{{sources: [{{serviceAccountToken: {{path: token, audience: {facts.audience}, expirationSeconds: "
            f"{DEFAULT_TOKEN_SECONDS}}}}}]}}}}], volumeMounts: [{{name: irsa-cache-token, mountPath: "
            f"/var/run/secrets/irsa-cache}}], {TOKEN_FILE}=/var/run/secrets/irsa-cache/token")


def check_token_file(facts: Facts) -> Finding:
    pod = facts.inputs.pod
    if pod is None:
        return skipped(NO_POD)
    files = _token_files(pod)
    if not files:
        return skipped(f"not checked: no container sets {FULL_URI} (see pod.credentials-uri)")
    for name, path, mount, problem in files:
        if problem is not None:
            return failed(problem + ": irsa-cache needs the pod's projected token", _projection_fix(facts))
        if path is None:
            return warned(f"container {name}: {TOKEN_FILE} comes from valueFrom, doctor cannot see it",
                          f"set {TOKEN_FILE} to the projected token's path as a plain value")
        assert mount is not None
        if mount.problem is not None:
            return failed(f"container {name}: {mount.problem}", _projection_fix(facts))
    return passed(f"{TOKEN_FILE} is a projected service-account token in {', '.join(f[0] for f in files)}")


def _sources(pod: Obj) -> list[tuple[str, Mapping[str, Any]]]:
    return [(name, mount.source) for name, _, mount, _ in _token_files(pod) if mount and mount.source is not None]


def _projected_sources(facts: Facts) -> tuple[list[tuple[str, Mapping[str, Any]]], Finding | None]:
    """The pod's projected token sources by container, or why the check is skipped."""
    if facts.inputs.pod is None:
        return [], skipped(NO_POD)
    sources = _sources(facts.inputs.pod)
    if not sources:
        return [], skipped("not checked: no projected token found (see pod.token-file)")
    return sources, None


def check_token_audience(facts: Facts) -> Finding:
    sources, skip = _projected_sources(facts)
    if skip is not None:
        return skip
    for name, source in sources:
        audience = source.get("audience")
        if audience != facts.audience:
            shown = repr(audience) if audience else "not set, so the API server's default (its own issuer)"
            return failed(f"container {name}: the projected token's audience is {shown}, not {facts.audience!r}: "
                          "the daemon refuses it (401 wrong_audience) and STS too",
                          f"set serviceAccountToken.audience: {facts.audience} in the pod's projected volume")
    return passed(f"the projected token's audience is {facts.audience!r}")


def check_token_expiration(facts: Facts) -> Finding:
    sources, skip = _projected_sources(facts)
    if skip is not None:
        return skip
    for name, source in sources:
        seconds = source.get("expirationSeconds", DEFAULT_TOKEN_SECONDS)
        if not isinstance(seconds, int) or seconds < MIN_TOKEN_SECONDS:
            return failed(f"container {name}: the projected token lives {seconds} s, under 10 minutes: the API "
                          "server refuses it, and a token so short may expire between the kubelet's refreshes",
                          f"set serviceAccountToken.expirationSeconds to at least {MIN_TOKEN_SECONDS} "
                          f"(IRSA uses {DEFAULT_TOKEN_EXPIRATION_SECONDS})")
    first = sources[0][1].get("expirationSeconds", DEFAULT_TOKEN_SECONDS)
    return passed(f"the projected token lives {first} s; the kubelet refreshes it at 80 % of that")


def check_token_newline(facts: Facts) -> Finding:
    token = facts.token
    if token is not None and token.problem is None and facts.inputs.token_source == "--token":
        if token.line_break:
            return failed(f"the token file {facts.inputs.token_source} holds a line break (CR or LF): botocore and "
                          "the JS SDK refuse such a token, so the pod gets no credentials",
                          "write the token without a newline (printf '%s' \"$TOKEN\" > token, or echo -n); the "
                          "kubelet's projected files have none")
    pod = facts.inputs.pod
    if pod is not None:
        for name, path, mount, _ in _token_files(pod):
            if mount is not None and mount.kind in ("secret", "configMap"):
                return warned(f"container {name} reads {path} from a {mount.kind}: a token written there by hand "
                              "often ends with a newline, which the SDKs refuse", _projection_fix(facts))
    if token is not None and token.problem is None and facts.inputs.token_source == "--token":
        return passed("the token file has no line break")
    if pod is not None:
        return passed("the kubelet writes projected tokens without a newline")
    return skipped("not checked: no token file or pod given")


CHECKS = (
    Check(id="pod.service-account", link=Link.POD, run=check_service_account,
          catches="the pod runs as another ServiceAccount than the one checked"),
    Check(id="pod.web-identity-env", link=Link.POD, run=check_web_identity_env,
          catches="AWS_ROLE_ARN / AWS_WEB_IDENTITY_TOKEN_FILE in a container: they win over the container provider"),
    Check(id="pod.credentials-uri", link=Link.POD, run=check_credentials_uri,
          catches="AWS_CONTAINER_CREDENTIALS_FULL_URI missing, a host the SDKs refuse over plain HTTP, "
                  "[fd00:ec2::23] without Java's IPv6 mode, or another path than /v1/credentials"),
    Check(id="pod.token-file", link=Link.POD, run=check_token_file,
          catches="AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE missing, on no mounted projected token, on a Secret/"
                  "ConfigMap, or mounted with subPath (never rotated)"),
    Check(id="pod.token-audience", link=Link.POD, run=check_token_audience,
          catches="the projected token's audience is not the one STS and the daemon are given"),
    Check(id="pod.token-expiration", link=Link.POD, run=check_token_expiration,
          catches="the projected token's expirationSeconds is under 10 minutes"),
    Check(id="pod.token-newline", link=Link.POD, run=check_token_newline,
          catches="a token file with a trailing newline (the SDKs refuse it), or a token file from a Secret/ConfigMap"),
)
