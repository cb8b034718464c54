"""Reading a pod's ServiceAccount from the API server, to learn whether it has a role.

One GET per pod admitted, not an informer over every ServiceAccount: the webhook
needs only `get serviceaccounts`, an annotation added a second ago already counts,
and a pod's creation costs the API server several writes already. A ServiceAccount
created in the same `kubectl apply` as its pods may not be readable yet when the
first pod arrives (EKS's webhook, reading from a cache, leaves such pods without
credentials): a 404 is asked again every 0.2 s for up to a second before the
ServiceAccount is taken as missing.

The only module of the webhook that knows kubernetes-asyncio's client calls; its
failures leave as `ServiceAccountUnavailableError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from daemon.webhook import metrics

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class ServiceAccountUnavailableError(Exception):
    """The API server could not say whether the ServiceAccount exists."""


class ServiceAccounts:
    """`await accounts.get(namespace, name)`: the ServiceAccount as JSON, or None if it does not exist."""

    def __init__(
        self, *, api: client.ApiClient, grace_seconds: float, retry_seconds: float, request_seconds: float
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._grace = grace_seconds
        self._retry = retry_seconds
        self._request = request_seconds

    async def get(self, namespace: str, name: str) -> Obj | None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._grace
        while True:
            status, body = await self._read(namespace, name)
            if status == 200:
                metrics.SERVICE_ACCOUNT_LOOKUPS.labels(result="found").inc()
                try:
                    account: Obj = json.loads(body)
                except ValueError as exc:
                    raise ServiceAccountUnavailableError(
                        f"the API server's answer for ServiceAccount {namespace}/{name} is not JSON") from exc
                return account
            if status != 404:
                metrics.SERVICE_ACCOUNT_LOOKUPS.labels(result="error").inc()
                raise ServiceAccountUnavailableError(
                    f"reading ServiceAccount {namespace}/{name}: the API server answered {status} "
                    f"{_status_message(body)}".rstrip())
            if loop.time() + self._retry > give_up_at:
                metrics.SERVICE_ACCOUNT_LOOKUPS.labels(result="not_found").inc()
                return None
            await asyncio.sleep(self._retry)

    async def _read(self, namespace: str, name: str) -> tuple[int, bytes]:
        try:
            response: Any = await self._core.read_namespaced_service_account(
                name, namespace, _preload_content=False, _request_timeout=self._request)
            try:
                return response.status, await response.read()
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            metrics.SERVICE_ACCOUNT_LOOKUPS.labels(result="error").inc()
            raise ServiceAccountUnavailableError(
                f"reading ServiceAccount {namespace}/{name}: {type(exc).__name__}: {exc or 'timed out'}") from exc


def _status_message(body: bytes) -> str:
    """The `message` of a Kubernetes Status body, if that is what came back."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        return ""
    return f"({message})" if isinstance(message, str) else ""
