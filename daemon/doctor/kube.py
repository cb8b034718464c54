"""Live reads from the cluster for `doctor --live`: the pod, its ServiceAccount, the
issuer and key set from the discovery endpoints, and a fresh token by TokenRequest.

The only doctor module that knows kubernetes-asyncio. Every call is bounded in time.
A read that fails is a finding, not an exception: an object that does not exist is a
failure of its link; a refused permission or an unreachable API server is a warning
naming what doctor needs (the README lists the RBAC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from daemon.doctor.inputs import MIN_TOKEN_SECONDS
from daemon.doctor.model import Finding, InputError, Read, failed, passed, warned

CALL_TIMEOUT_SECONDS = 10.0
TOKEN_SECONDS = MIN_TOKEN_SECONDS  # the shortest token the API server mints: doctor needs it once

T = TypeVar("T")
Obj = dict[str, Any]


@contextlib.asynccontextmanager
async def connect(kubeconfig: Path | None, context: str | None) -> AsyncIterator[Cluster]:
    """An authenticated client from the kubeconfig (or in-cluster); InputError when none loads."""
    configuration = client.Configuration()
    try:
        await kube_config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None,
                                           context=context, client_configuration=configuration)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        if kubeconfig is not None or context is not None:
            raise InputError(f"--kubeconfig {kubeconfig or '(default)'}: cannot load: {exc}") from None
        try:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except ConfigException:
            raise InputError(f"no kubeconfig to load ({exc}); give --kubeconfig, or set KUBECONFIG") from None
    async with client.ApiClient(configuration) as api:
        yield Cluster(api, configuration.host or "(no server)")


class Cluster:
    def __init__(self, api: client.ApiClient, host: str) -> None:
        self._core = client.CoreV1Api(api)
        self._well_known = client.WellKnownApi(api)
        self._openid = client.OpenidApi(api)
        self.host = host

    async def _call(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
            return await call

    def _failure(self, exc: BaseException, what: str, verb: str, *, missing: str) -> Finding:
        if isinstance(exc, ApiException):
            if exc.status == 404:
                return failed(f"{what} does not exist in {self.host}", missing)
            if exc.status in (401, 403):
                return warned(f"the API server refused to let doctor {verb} ({exc.status}): {what} not checked",
                              f"grant your kubeconfig's user the right to {verb} (see the README's --live permissions)")
            return warned(f"the API server answered {exc.status} for {what}: {_reason(exc)}",
                          "try again; if it persists, check the API server's health")
        if isinstance(exc, ValueError):
            return warned(f"the API server's answer for {what} is not JSON", "check --kubeconfig's server URL")
        return warned(f"cannot reach the API server at {self.host} for {what}: {type(exc).__name__}: {exc}",
                      "check --kubeconfig / --context and the network path to the API server")

    async def _get(self, call: Awaitable[Any]) -> Obj:
        response = await self._call(call)
        body = await self._call(response.read())
        if not 200 <= response.status <= 299:  # _preload_content=False does not raise on a status
            raise ApiException(status=response.status, reason=body.decode(errors="replace"))
        return json.loads(body)  # type: ignore[no-any-return]

    async def read_pod(self, namespace: str, name: str) -> Read:
        what = f"pod {namespace}/{name}"
        try:
            pod = await self._get(self._core.read_namespaced_pod(name, namespace, _preload_content=False))
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return Read(value=None, finding=self._failure(
                exc, what, "get pods", missing=f"check the name: kubectl get pods -n {namespace}"))
        node = (pod.get("spec") or {}).get("nodeName") or "no node yet"
        phase = (pod.get("status") or {}).get("phase")
        return Read(value=pod, finding=passed(f"read {what} ({phase}, on {node})"))

    async def read_service_account(self, namespace: str, name: str) -> Read:
        what = f"ServiceAccount {namespace}/{name}"
        try:
            account = await self._get(self._core.read_namespaced_service_account(name, namespace,
                                                                                 _preload_content=False))
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return Read(value=None, finding=self._failure(
                exc, what, "get serviceaccounts",
                missing=f"create it (kubectl create serviceaccount -n {namespace} {name}) or fix the pod's "
                        "serviceAccountName; the daemon answers such pods 403 no_service_account"))
        return Read(value=account, finding=passed(f"read {what}"))

    async def discovery(self) -> Read:
        """(issuer, key set) from the endpoints the daemon reads them from: the discovery
        document and /openid/v1/jwks (raw bodies: preloaded, the client returns str() of a dict)."""
        try:
            document = await self._get(
                self._well_known.get_service_account_issuer_open_id_configuration(_preload_content=False))
            key_set = await self._get(self._openid.get_service_account_issuer_open_id_keyset(_preload_content=False))
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return Read(value=None, finding=self._failure(
                exc, "the issuer discovery document", "get /.well-known/openid-configuration and /openid/v1/jwks",
                missing="the API server serves no issuer discovery: set its --service-account-issuer"))
        issuer = document.get("issuer") if isinstance(document, dict) else None
        if not isinstance(issuer, str) or not isinstance(key_set, dict):
            return Read(value=None, finding=warned(
                "the API server's discovery document has no issuer, or its key set is not a JSON object",
                "check the API server's --service-account-issuer and --service-account-jwks-uri"))
        return Read(value=(issuer, key_set), finding=passed(
            f"read the cluster's issuer {issuer} and {len(key_set.get('keys') or [])} key(s) from {self.host}"))

    async def request_token(self, namespace: str, name: str, audience: str, pod: Obj | None) -> Read:
        """A fresh token for the ServiceAccount, bound to the pod when there is one: what the
        kubelet would project, but short-lived."""
        spec: Obj = {"audiences": [audience], "expirationSeconds": TOKEN_SECONDS}
        bound = ""
        if pod is not None:
            meta = pod.get("metadata") or {}
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": meta.get("name"),
                                      "uid": meta.get("uid")}
            bound = f", bound to pod {meta.get('name')}"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        what = f"a token for {namespace}/{name}"
        try:
            answer = await self._get(self._core.create_namespaced_service_account_token(
                name, namespace, body, _preload_content=False))  # type: ignore[arg-type]  # a dict body is sent as is
            token = answer["status"]["token"]
        except ApiException as exc:
            if exc.status in (400, 409, 422):
                return Read(value=None, finding=failed(
                    f"TokenRequest for {namespace}/{name} refused ({exc.status}): {_reason(exc)}",
                    "the pod and its ServiceAccount disagree (recreated pod, another account): check both"))
            return Read(value=None, finding=self._failure(exc, what, "create serviceaccounts/token",
                                                          missing=f"the ServiceAccount {namespace}/{name} is gone"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return Read(value=None, finding=self._failure(exc, what, "create serviceaccounts/token", missing=""))
        except (KeyError, TypeError):
            return Read(value=None, finding=warned("TokenRequest answered without status.token",
                                                   "check the API server's service-account token signing"))
        return Read(value=str(token), finding=passed(
            f"minted {what} by TokenRequest (audience {audience}, {TOKEN_SECONDS} s{bound})"))


def _reason(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.reason or "")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason or "")[:200]
