"""The production directory: everything from the Kubernetes API server.

- Roles: an informer over all ServiceAccounts; the role is the
  `<prefix>/role-arn` annotation (IRSA's own). When it changes or goes, or the
  account is deleted, the subject's cache entries are dropped at once.
- Liveness: an informer over this node's Pods (`spec.nodeName=<node>`). A token
  bound to a pod is honoured only while that pod is live here; a
  pod too new for the informer gets a short wait, then one direct read. Only
  identities with a live pod here are refreshed.
- Trust: the issuer and key set from the API server's discovery endpoints, through
  the client's authenticated session; or TokenReview (`TokenReviewVerifier`).

The only module besides `informer.py` that knows kubernetes-asyncio.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from daemon import metrics
from daemon.directory.informer import Informer, Key, Obj, raw_json
from daemon.errors import DirectoryUnavailableError, IdentityNotAllowedError, TokenError
from daemon.models import CacheKey, Clock, Identity, VerifiedToken, fingerprint

log = logging.getLogger(__name__)

ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}", re.ASCII)
SUBJECT = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")
LIVE_PHASES = frozenset({"Pending", "Running", "Unknown"})
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


def _account_of(subject: str) -> Key | None:
    match = SUBJECT.fullmatch(subject)
    return (match.group(1), match.group(2)) if match else None


class KubernetesDirectory:
    """Roles from ServiceAccount annotations; callers checked against this node's live pods."""

    def __init__(
        self,
        *,
        api: client.ApiClient,
        node_name: str,
        annotation_prefix: str,
        pod_wait_seconds: float,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._node = node_name
        self._annotation = f"{annotation_prefix}/role-arn"
        self._pod_wait = pod_wait_seconds
        self._pod_arrivals: dict[Key, asyncio.Event] = {}
        self._live_pods_per_account: Counter[Key] = Counter()
        self.on_role_change: Callable[[str], None] = lambda subject: None  # wired to the cache
        self.accounts = Informer(
            name="serviceaccounts",
            list_call=self._core.list_service_account_for_all_namespaces,
            on_change=self._account_changed,
        )
        self.pods = Informer(
            name="pods",
            list_call=self._core.list_pod_for_all_namespaces,
            on_change=self._pod_changed,
            field_selector=f"spec.nodeName={node_name}",
        )

    @property
    def ready(self) -> bool:
        return self.accounts.synced.is_set() and self.pods.synced.is_set() and self.accounts.healthy and self.pods.healthy

    async def run(self) -> None:
        """Both informers, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.accounts.run(), name="serviceaccount informer")
            group.create_task(self.pods.run(), name="pod informer")

    async def wait_synced(self) -> None:
        await self.accounts.synced.wait()
        await self.pods.synced.wait()

    async def role_for(self, identity: Identity) -> str:
        account_key = _account_of(identity.subject)
        if account_key is None:
            raise IdentityNotAllowedError(
                f"subject {identity.subject!r} is not a Kubernetes service account", code="not_a_service_account"
            )
        namespace, name = account_key
        account = self.accounts.store.get(account_key)
        if account is None:
            raise IdentityNotAllowedError(
                f"service account {namespace}/{name} does not exist", code="no_service_account"
            )
        role_arn = (account["metadata"].get("annotations") or {}).get(self._annotation)
        if role_arn is None:
            raise IdentityNotAllowedError(
                f"service account {namespace}/{name} has no {self._annotation} annotation", code="no_role_annotation"
            )
        if not ROLE_ARN.fullmatch(role_arn):
            raise IdentityNotAllowedError(
                f"service account {namespace}/{name}: annotation {self._annotation} is {role_arn!r}, "
                "not an IAM role ARN", code="bad_role_annotation",
            )
        await self._check_pod(identity, namespace)
        return role_arn

    def in_use(self, key: CacheKey) -> bool:
        """An identity is refreshed only while a live pod of it runs on this node."""
        account_key = _account_of(key.subject)
        return account_key is not None and self._live_pods_per_account[account_key] > 0

    async def _check_pod(self, identity: Identity, namespace: str) -> None:
        if identity.pod_name is None or identity.pod_uid is None:
            raise IdentityNotAllowedError(
                "the token is not bound to a pod; only pod-bound projected tokens are served", code="token_not_pod_bound"
            )
        key = (namespace, identity.pod_name)
        pod = self.pods.store.get(key)
        if pod is None:
            pod = await self._wait_for_new_pod(key)
        where = f"pod {namespace}/{identity.pod_name}"
        if pod is None:
            raise IdentityNotAllowedError(f"{where} is not running on node {self._node}", code="pod_not_on_node")
        node = (pod.get("spec") or {}).get("nodeName")
        if node != self._node:
            raise IdentityNotAllowedError(
                f"{where} runs on node {node!r}, not on this node {self._node!r}", code="pod_on_other_node"
            )
        if pod["metadata"].get("uid") != identity.pod_uid:
            raise IdentityNotAllowedError(
                f"{where} has uid {pod['metadata'].get('uid')}, the token was issued to uid {identity.pod_uid} "
                "(a deleted pod's token)", code="pod_uid_mismatch",
            )
        phase = (pod.get("status") or {}).get("phase")
        if phase not in LIVE_PHASES:
            raise IdentityNotAllowedError(f"{where} is {phase}, no longer live", code="pod_not_live")

    async def _wait_for_new_pod(self, key: Key) -> Obj | None:
        """A starting pod may ask before the informer has it: wait briefly, then read it once."""
        arrival = self._pod_arrivals.setdefault(key, asyncio.Event())
        try:
            async with asyncio.timeout(self._pod_wait):
                await arrival.wait()
            return self.pods.store.get(key)
        except TimeoutError:
            pass
        finally:
            if self._pod_arrivals.get(key) is arrival and not arrival.is_set():
                self._pod_arrivals.pop(key, None)
        try:
            return await raw_json(await self._core.read_namespaced_pod(key[1], key[0], _preload_content=False))  # type: ignore[no-any-return]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise DirectoryUnavailableError(f"cannot read pod {key[0]}/{key[1]}: API server answered {exc.status}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DirectoryUnavailableError(f"cannot read pod {key[0]}/{key[1]}: {type(exc).__name__}") from exc

    def _account_changed(self, old: Obj | None, new: Obj | None) -> None:
        before = ((old or {}).get("metadata", {}).get("annotations") or {}).get(self._annotation)
        after = ((new or {}).get("metadata", {}).get("annotations") or {}).get(self._annotation)
        if old is not None and before != after:
            meta = old["metadata"]
            subject = f"system:serviceaccount:{meta['namespace']}:{meta['name']}"
            log.info("role of %s changed from %s to %s: dropping its cached credentials", subject, before, after)
            self.on_role_change(subject)

    def _pod_changed(self, old: Obj | None, new: Obj | None) -> None:
        for pod, delta in ((old, -1), (new, +1)):
            if pod is not None and (pod.get("status") or {}).get("phase") in LIVE_PHASES:
                meta, spec = pod["metadata"], pod.get("spec") or {}
                account = (meta["namespace"], spec.get("serviceAccountName") or "default")
                self._live_pods_per_account[account] += delta
                if self._live_pods_per_account[account] <= 0:
                    del self._live_pods_per_account[account]
        if new is not None:
            arrival = self._pod_arrivals.pop((new["metadata"]["namespace"], new["metadata"]["name"]), None)
            if arrival is not None:
                arrival.set()


class ApiServerKeySource:
    """The service-account issuer's key set, read from the API server."""

    def __init__(self, api: client.ApiClient) -> None:
        self._openid = client.OpenidApi(api)
        self._well_known = client.WellKnownApi(api)
        self.description = "the API server's /openid/v1/jwks"

    async def issuer(self) -> str:
        # These two return str() of a dict unless asked for the raw body (kubernetes-asyncio 36).
        response = await self._well_known.get_service_account_issuer_open_id_configuration(_preload_content=False)
        return str((await raw_json(response))["issuer"])

    async def fetch(self) -> Mapping[str, Any]:
        response = await self._openid.get_service_account_issuer_open_id_keyset(_preload_content=False)
        return await raw_json(response)  # type: ignore[no-any-return]


class TokenReviewVerifier:
    """Verification by the API server itself (TokenReview): it also proves the bound pod exists.

    Results are kept per token digest until the token's `exp`, which is read from the
    (already reviewed) payload.
    """

    def __init__(self, *, api: client.ApiClient, issuer: str, audience: str, clock: Clock, max_cached: int) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self.issuer = issuer
        self.audience = audience
        self._clock = clock
        self._max_cached = max_cached
        self._reviewed: dict[bytes, tuple[Identity, float, str]] = {}

    @property
    def ready(self) -> bool:
        return True

    async def verify(self, token: str) -> VerifiedToken:
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        cached = self._reviewed.get(digest)
        if cached is not None and now < cached[1]:
            metrics.TOKEN_VERIFICATIONS.labels(result="cached").inc()
            return VerifiedToken(identity=cached[0], raw=token, expires_at=cached[1], fingerprint=cached[2])
        expires_at = _unverified_expiry(token)
        if expires_at is None:
            metrics.TOKEN_VERIFICATIONS.labels(result="malformed_token").inc()
            raise TokenError("the token is not a JWT with an `exp` claim", code="malformed_token")
        if expires_at <= now:
            metrics.TOKEN_VERIFICATIONS.labels(result="expired_token").inc()
            raise TokenError("the token has expired", code="expired_token")
        status = await self._review(token)
        if not status.get("authenticated"):
            metrics.TOKEN_VERIFICATIONS.labels(result="token_review_rejected").inc()
            raise TokenError(
                f"the API server's TokenReview rejected the token: {status.get('error') or 'not authenticated'}",
                code="token_review_rejected",
            )
        user = status.get("user") or {}
        extra = user.get("extra") or {}
        identity = Identity(
            issuer=self.issuer,
            subject=user.get("username", ""),
            audience=self.audience,
            namespace=(_account_of(user.get("username", "")) or (None, None))[0],
            service_account=(_account_of(user.get("username", "")) or (None, None))[1],
            pod_name=(extra.get(POD_NAME_EXTRA) or [None])[0],
            pod_uid=(extra.get(POD_UID_EXTRA) or [None])[0],
        )
        metrics.TOKEN_VERIFICATIONS.labels(result="valid").inc()
        if len(self._reviewed) >= self._max_cached:
            self._reviewed = {d: v for d, v in self._reviewed.items() if v[1] > now}
        print_ = fingerprint(token)
        self._reviewed[digest] = (identity, expires_at, print_)
        return VerifiedToken(identity=identity, raw=token, expires_at=expires_at, fingerprint=print_)

    async def _review(self, token: str) -> Mapping[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            response = await self._auth.create_token_review(body, _preload_content=False)
            return (await raw_json(response)).get("status") or {}
        except ApiException as exc:
            raise DirectoryUnavailableError(f"TokenReview failed: API server answered {exc.status}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DirectoryUnavailableError(f"TokenReview failed: {type(exc).__name__}") from exc


def _unverified_expiry(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, AttributeError):
        return None
