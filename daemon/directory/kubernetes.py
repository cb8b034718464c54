"""The production directory: everything from the Kubernetes API server.

- Roles: an informer over all ServiceAccounts; the role is the
  `<prefix>/role-arn` annotation (IRSA's own). When it changes or goes, or the
  account is deleted, the subject's cache entries are dropped at once.
- Liveness: an informer over this node's Pods (`spec.nodeName=<node>`). A token
  bound to a pod is honoured only while that pod is live here; a
  pod too new for the informer gets a short wait, then one direct read, shared by
  every request for that pod. A pod found absent (or on another node) is remembered
  for `absent_pod_seconds`, so that a stream of requests with a foreign token costs
  the API server one read, not one per request; the informer's sight of the pod
  on this node clears it at once. Only identities with a live pod here are refreshed.
- Trust: the issuer and key set from the API server's discovery endpoints, through
  the client's authenticated session; or TokenReview (`TokenReviewVerifier`).

The only module besides `informer.py` that knows kubernetes-asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from daemon import metrics
from daemon.config import TOKEN_REVIEWS_AT_ONCE, ApiTimeouts
from daemon.directory.informer import ApiError, Informer, Key, Obj, key_of, raw_json, total_timeout
from daemon.errors import DirectoryUnavailableError, IdentityNotAllowedError, TokenError
from daemon.logs import describe
from daemon.bounded import make_room
from daemon.models import CacheKey, Clock, Identity, VerifiedToken, digest_fingerprint
from daemon import jws
from daemon.refusals import Refusals
from daemon.sts import safe_text
from daemon.tokens import ALLOWED_ALGORITHMS, retry_until_done

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
        timeouts: ApiTimeouts,
        absent_pod_seconds: float = 30.0,
        max_absent_pods: int = 10_000,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._node = node_name
        self._annotation = f"{annotation_prefix}/role-arn"
        self._pod_wait = pod_wait_seconds
        self._timeouts = timeouts
        self._absent_pod_seconds = absent_pod_seconds
        self._pod_arrivals: dict[Key, asyncio.Event] = {}
        self._pod_reads: dict[Key, asyncio.Task[Obj | None]] = {}
        # Pods found absent from this node: (namespace, name) -> (until, the refusal), oldest first.
        self._absent: Refusals[Key, IdentityNotAllowedError] = Refusals(max_absent_pods, time.monotonic)
        self._live_pods_per_account: Counter[Key] = Counter()
        self.on_role_change: Callable[[str], None] = lambda subject: None  # wired to the cache
        self.accounts = Informer(
            name="serviceaccounts",
            list_call=self._core.list_service_account_for_all_namespaces,
            on_change=self._account_changed,
            timeouts=timeouts,
        )
        self.pods = Informer(
            name="pods",
            list_call=self._core.list_pod_for_all_namespaces,
            on_change=self._pod_changed,
            field_selector=f"spec.nodeName={node_name}",
            timeouts=timeouts,
        )

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    @property
    def not_ready_reason(self) -> str | None:
        reasons = [r for r in (self.accounts.not_ready_reason, self.pods.not_ready_reason) if r]
        return "; ".join(reasons) or None

    @property
    def api_server_available(self) -> bool:
        """False while an informer finds the API server unreachable, silent or failing (5xx)."""
        return self.accounts.server_available and self.pods.server_available

    async def run(self) -> None:
        """Both informers, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.accounts.run(), name="serviceaccount informer")
            group.create_task(self.pods.run(), name="pod informer")

    def role_now(self, identity: Identity) -> str | None:
        try:
            role_arn, pod_key = self._account_role(identity)
        except IdentityNotAllowedError:
            return None
        pod = self.pods.store.get(pod_key)
        if pod is None or self._pod_refusal(pod, identity, pod_key) is not None:
            return None  # not here yet, absent or refused: `role_for` waits, reads, or says why
        return role_arn

    async def role_for(self, identity: Identity) -> str:
        role_arn, pod_key = self._account_role(identity)
        await self._check_pod(identity, pod_key)
        return role_arn

    def _account_role(self, identity: Identity) -> tuple[str, Key]:
        """The role annotated on the identity's ServiceAccount, and the pod the token is
        bound to (it must be bound to one)."""
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
        role_arn = _field(account, "metadata", "annotations", self._annotation)
        if role_arn is None:
            raise IdentityNotAllowedError(
                f"service account {namespace}/{name} has no {self._annotation} annotation", code="no_role_annotation"
            )
        if not isinstance(role_arn, str) or not ROLE_ARN.fullmatch(role_arn):
            raise IdentityNotAllowedError(
                f"service account {namespace}/{name}: annotation {self._annotation} is {role_arn!r}, "
                "not an IAM role ARN", code="bad_role_annotation",
            )
        if identity.pod_name is None or identity.pod_uid is None:
            raise IdentityNotAllowedError(
                "the token is not bound to a pod; only pod-bound projected tokens are served", code="token_not_pod_bound"
            )
        return role_arn, (namespace, identity.pod_name)

    def in_use(self, key: CacheKey) -> bool:
        """An identity is refreshed only while a live pod of it runs on this node."""
        account_key = _account_of(key.subject)
        return account_key is not None and self._live_pods_per_account[account_key] > 0

    async def _check_pod(self, identity: Identity, key: Key) -> None:
        pod = self.pods.store.get(key)
        if pod is None:
            self._raise_if_remembered_absent(key)
            pod = await self._wait_for_arrival(key)
        if pod is None:
            self._raise_if_remembered_absent(key)  # another request's read found it absent meanwhile
            pod = await self._shared_read(key)
        if pod is None:
            raise self._remember_absent(key, IdentityNotAllowedError(
                f"pod {key[0]}/{key[1]} is not running on node {self._node}", code="pod_not_on_node"))
        refusal = self._pod_refusal(pod, identity, key)
        if refusal is not None:
            # A pod on another node stays away: remembered. The others may change here.
            raise self._remember_absent(key, refusal) if refusal.code == "pod_on_other_node" else refusal

    def _pod_refusal(self, pod: Obj, identity: Identity, key: Key) -> IdentityNotAllowedError | None:
        """Why the token may not be served, unless the pod it names runs here, is the very
        pod it was issued to, and is live."""
        where = f"pod {key[0]}/{key[1]}"
        node = _text(pod, "spec", "nodeName")
        if node != self._node:
            return IdentityNotAllowedError(f"{where} runs on node {node!r}, not on this node {self._node!r}",
                                           code="pod_on_other_node")
        uid = _text(pod, "metadata", "uid")
        if uid != identity.pod_uid:
            return IdentityNotAllowedError(f"{where} has uid {uid}, the token was issued to uid {identity.pod_uid} "
                                           "(a deleted pod's token)", code="pod_uid_mismatch")
        phase = _text(pod, "status", "phase")
        if phase not in LIVE_PHASES:
            return IdentityNotAllowedError(f"{where} is {phase}, no longer live", code="pod_not_live")
        return None

    def _raise_if_remembered_absent(self, key: Key) -> None:
        if not self.pods.healthy:
            return  # the informer may have missed the pod's arrival: read it again
        refusal = self._absent.get(key)
        if refusal is None:
            return
        metrics.REFUSALS_REMEMBERED.labels(kind="pod_absent").inc()
        raise refusal

    def _remember_absent(self, key: Key, refusal: IdentityNotAllowedError) -> IdentityNotAllowedError:
        return self._absent.remember(key, refusal, until=time.monotonic() + self._absent_pod_seconds)

    async def _wait_for_arrival(self, key: Key) -> Obj | None:
        """A starting pod may ask before the informer has it: wait for it briefly."""
        arrival = self._pod_arrivals.setdefault(key, asyncio.Event())
        try:
            async with asyncio.timeout(self._pod_wait):
                await arrival.wait()
            return self.pods.store.get(key)
        except TimeoutError:
            return None
        finally:
            if self._pod_arrivals.get(key) is arrival and not arrival.is_set():
                self._pod_arrivals.pop(key, None)

    async def _shared_read(self, key: Key) -> Obj | None:
        """One direct read of the pod, shared by every request for it meanwhile."""
        read = self._pod_reads.get(key)
        if read is None:
            read = asyncio.create_task(self._read_pod(key), name=f"read pod {key[0]}/{key[1]}")
            self._pod_reads[key] = read
            read.add_done_callback(lambda done: self._pod_reads.pop(key, None))
        return await asyncio.shield(read)

    async def _read_pod(self, key: Key) -> Obj | None:
        where = f"pod {key[0]}/{key[1]}"
        try:
            response = await self._core.read_namespaced_pod(
                key[1], key[0], _preload_content=False,
                _request_timeout=total_timeout(self._timeouts, self._timeouts.request_seconds),
            )
            pod = await raw_json(response, f"read {where}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise DirectoryUnavailableError(f"cannot read {where}: {exc}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DirectoryUnavailableError(f"cannot read {where}: {_unreachable(exc)}") from None
        if not isinstance(pod, dict) or not isinstance(pod.get("metadata"), dict):
            raise DirectoryUnavailableError(f"cannot read {where}: the API server answered JSON that is not a pod")
        return pod

    # The informers hand over objects with a name; any other field may be missing or of
    # the wrong type in what a broken API server sends, and must not stop the informer.

    def _account_changed(self, old: Obj | None, new: Obj | None) -> None:
        before = _field(old, "metadata", "annotations", self._annotation)
        after = _field(new, "metadata", "annotations", self._annotation)
        key = key_of(old)
        if key is not None and before != after:
            subject = f"system:serviceaccount:{key[0]}:{key[1]}"
            log.info("role of %s changed from %s to %s: dropping its cached credentials", subject, before, after)
            self.on_role_change(subject)

    def _pod_changed(self, old: Obj | None, new: Obj | None) -> None:
        for pod, delta in ((old, -1), (new, +1)):
            key = key_of(pod)
            if key is not None and _text(pod, "status", "phase") in LIVE_PHASES:
                account = (key[0], _text(pod, "spec", "serviceAccountName") or "default")
                self._live_pods_per_account[account] += delta
                if self._live_pods_per_account[account] <= 0:
                    del self._live_pods_per_account[account]
        key = key_of(new)
        if key is not None:
            self._absent.forget(key)  # here after all: served at once
            arrival = self._pod_arrivals.pop(key, None)
            if arrival is not None:
                arrival.set()


class ApiServerKeySource:
    """The service-account issuer's key set, read from the API server."""

    def __init__(self, api: client.ApiClient, timeouts: ApiTimeouts) -> None:
        self._openid = client.OpenidApi(api)
        self._well_known = client.WellKnownApi(api)
        self._timeout = total_timeout(timeouts, timeouts.request_seconds)
        self.description = "the API server's /openid/v1/jwks"

    async def issuer(self) -> str:
        # These two return str() of a dict unless asked for the raw body (kubernetes-asyncio 36).
        response = await self._well_known.get_service_account_issuer_open_id_configuration(
            _preload_content=False, _request_timeout=self._timeout)
        issuer = _field(await raw_json(response, "the discovery document"), "issuer")
        if not isinstance(issuer, str) or not issuer.startswith("https://"):
            raise ApiError(f"the discovery document's issuer is {issuer!r}, not an https:// URL")
        return issuer

    async def fetch(self) -> Mapping[str, Any]:
        response = await self._openid.get_service_account_issuer_open_id_keyset(
            _preload_content=False, _request_timeout=self._timeout)
        document = await raw_json(response, "the key set")
        if not isinstance(document, dict):
            raise ApiError("the key set is not a JSON object")
        return document


class TokenReviewVerifier:
    """Verification by the API server itself (TokenReview): it also proves the bound pod exists.

    Results are kept per token digest until the token's `exp`, which is read from the
    (already reviewed) payload. A rejected token is remembered for `rejected_seconds`,
    so that a stream of bad tokens costs the API server one review each, not one per
    request; and only a well-formed compact JWS with a signing algorithm of the
    allow-list and a future `exp` is sent for review, at most `max_reviews` at once
    (past that, 503), so that forged tokens cannot make the API server's load.

    The review must name our audience in `status.audiences`: an authenticator that is not
    audience-aware answers `authenticated: true` with no audience, which would let a token
    minted for another audience (or none) through.
    """

    def __init__(self, *, api: client.ApiClient, issuer: str | None, audience: str, clock: Clock, max_cached: int,
                 timeouts: ApiTimeouts, discover_issuer: Callable[[], Awaitable[str]] | None = None,
                 rejected_seconds: float = 30.0, max_reviews: int = TOKEN_REVIEWS_AT_ONCE) -> None:
        self._retry_max_seconds = timeouts.backoff_max_seconds
        self._max_reviews = max_reviews
        self._reviewing = 0
        self._auth = client.AuthenticationV1Api(api)
        self.issuer = issuer
        self._discover_issuer = discover_issuer
        self._discovery_error: str | None = None
        self.audience = audience
        self._clock = clock
        self._max_cached = max_cached
        self._timeout = total_timeout(timeouts, timeouts.request_seconds)
        self._rejected_seconds = rejected_seconds
        self._reviewed: dict[bytes, tuple[Identity, float, str]] = {}
        self._rejected: Refusals[bytes, TokenError] = Refusals(max_cached, clock)

    @property
    def ready(self) -> bool:
        return self.issuer is not None

    @property
    def not_ready_reason(self) -> str | None:
        if self.issuer is not None:
            return None
        return self._discovery_error or "the service-account issuer is not known yet"

    async def run(self) -> None:
        """Discover the issuer (the cache key's) if it was not given; nothing else to load."""

        async def discover() -> None:
            assert self._discover_issuer is not None
            self.issuer = await self._discover_issuer()

        def failed(reason: str) -> None:
            self._discovery_error = f"the service-account issuer is not known: {reason}"

        if self.issuer is None:
            await retry_until_done(discover, on_failure=failed, max_delay_seconds=self._retry_max_seconds)

    def verified_before(self, token: str) -> VerifiedToken | None:
        """What a review of `token` said, while the token is valid; None: call `verify`.
        Not counted: the caller counts the answer it uses."""
        return self._known(hashlib.sha256(token.encode()).digest(), token)

    def _known(self, digest: bytes, token: str) -> VerifiedToken | None:
        cached = self._reviewed.get(digest)
        if cached is None or self._clock() >= cached[1]:
            return None
        return VerifiedToken(identity=cached[0], raw=token, expires_at=cached[1], fingerprint=cached[2])

    async def verify(self, token: str) -> VerifiedToken:
        if not token.isascii():
            metrics.token_verification("malformed_token").inc()
            raise TokenError("the token holds characters that are not ASCII: not a JWT", code="malformed_token")
        digest = hashlib.sha256(token.encode()).digest()
        known = self._known(digest, token)
        if known is not None:
            metrics.token_verification("cached").inc()
            return known
        if self.issuer is None:
            raise DirectoryUnavailableError(f"cannot verify tokens yet: {self.not_ready_reason}; retry shortly",
                                            code="keys_unavailable")
        now = self._clock()
        rejected = self._rejected.get(digest)
        if rejected is not None:
            metrics.REFUSALS_REMEMBERED.labels(kind="token_review").inc()
            raise rejected
        expires_at = _unverified_expiry(token)
        if expires_at is None:
            metrics.token_verification("malformed_token").inc()
            raise TokenError("the token is not a signed JWT with a finite `exp` claim", code="malformed_token")
        if expires_at <= now:
            metrics.token_verification("expired_token").inc()
            raise TokenError("the token has expired", code="expired_token")
        if self._reviewing >= self._max_reviews:
            raise DirectoryUnavailableError(f"{self._reviewing} TokenReviews are under way already; retry shortly",
                                            code="directory_unavailable")
        self._reviewing += 1
        try:
            status = await self._review(token)
        finally:
            self._reviewing -= 1
        audiences = status.get("audiences")
        if status.get("authenticated") is True and not (isinstance(audiences, list) and self.audience in audiences):
            status = {"error": f"the review does not name the audience {self.audience!r} (an authenticator that "
                               "is not audience-aware)"}
        if status.get("authenticated") is not True:
            metrics.token_verification("token_review_rejected").inc()
            error = TokenError(
                "the API server's TokenReview rejected the token: "
                f"{safe_text(str(status.get('error') or 'not authenticated'), token)}",
                code="token_review_rejected",
            )
            raise self._rejected.remember(digest, error, until=now + self._rejected_seconds)
        username = _text(status, "user", "username") or ""
        account = _account_of(username) or (None, None)
        identity = Identity(
            issuer=self.issuer,
            subject=username,
            audience=self.audience,
            namespace=account[0],
            service_account=account[1],
            pod_name=_first(_field(status, "user", "extra", POD_NAME_EXTRA)),
            pod_uid=_first(_field(status, "user", "extra", POD_UID_EXTRA)),
        )
        metrics.token_verification("valid").inc()
        make_room(self._reviewed, self._max_cached, lambda review: review[1] <= now)
        print_ = digest_fingerprint(digest)
        self._reviewed[digest] = (identity, expires_at, print_)
        return VerifiedToken(identity=identity, raw=token, expires_at=expires_at, fingerprint=print_)

    async def _review(self, token: str) -> Mapping[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            response = await self._auth.create_token_review(body, _preload_content=False,
                                                            _request_timeout=self._timeout)
            status = _field(await raw_json(response, "TokenReview"), "status")
        except ApiError as exc:
            raise DirectoryUnavailableError(f"TokenReview failed: {exc}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DirectoryUnavailableError(f"TokenReview failed: {_unreachable(exc)}") from None
        return status if isinstance(status, dict) else {}


def _field(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]..., or None where a level is missing or not an object."""
    for name in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(name)
    return obj


def _text(obj: Any, *path: str) -> str | None:
    """A string field, or None where it is missing or of another type (a broken API server)."""
    value = _field(obj, *path)
    return value if isinstance(value, str) else None


def _first(values: Any) -> str | None:
    return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else None


def _unreachable(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "the API server did not answer in time"
    return f"the API server cannot be reached ({describe(exc)})"


def _unverified_expiry(token: str) -> float | None:
    """The `exp` of a token that at least looks like one the API server signed: a compact
    JWS whose header names an algorithm of the allow-list. (The API server checks the
    signature; this only keeps what is plainly not a token from reaching it.)"""
    try:
        compact = jws.parse(token)
        if compact.header.get("alg") not in ALLOWED_ALGORITHMS or not compact.signature:
            return None
        claims = jws.payload(compact)
    except jws.MalformedError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        return None
    return float(exp)
