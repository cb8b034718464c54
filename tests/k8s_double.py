"""A Kubernetes API server double that speaks the real wire format over plain HTTP.

The real kubernetes-asyncio client talks to it unmodified (nothing in the client is
mocked): it serves ServiceAccounts and Pods (list, watch, get), DaemonSets (apps/v1:
list, watch, get), the service-account issuer discovery documents, and TokenReview, and lets a test change objects, cut or
expire watches, take the server down and count what the client asked for.

Use: `double = await K8sApiDouble(issuer=..., jwks=...).start()` (or `async with
running(...)`), then `double.client_configuration()` or `double.write_kubeconfig(path)`
for the client; `await double.stop()` at the end.
- objects: `create/update/apply/delete` with the `service_account(...)`, `pod(...)` and
  `daemon_set(...)` factories (`set_desired_nodes(...)` changes a DaemonSet's status); each change bumps the one global `resource_version` and reaches live
  watches. `bump_resource_version()` advances it as other kinds' changes would.
- history: `compact(rv)`, `history_size`, `expired_as` ("event" or "status").
- watches: `send_bookmarks()`, `bookmark_interval`, `drop_watches(abrupt=True)`,
  `open_watches`, `await wait_for_watches(n)`.
- outages: `await go_down()` (connection refused; `refuse=False`: 503 Status) and
  `await come_up()` (same port).
- faults: `fault`, an async callable (request, call) -> response or None, answers
  instead of the server when it returns one; `plain_answer()`, `watch_lines()` and
  `silence()` build the misbehaviour of proxies and hung servers.
- records: `calls` (method, path, verb, query, status), `requests` Counter by
  (verb, path), `count(verb, path)`, `watch_calls(path)` (the resourceVersion etc. each
  watch asked for), `token_review_requests`.
- identity: `rotate_keys(jwks)`; `token_reviews` maps tokens to `TokenIdentity`
  (see `identity_for`), or is a callable returning the TokenReview status verbatim.
- tokens: with `minter=` (an object with `mint(subject, *, audience, lifetime_seconds,
  issuer, **claims)`, such as `daemon.embedded.Issuer`), TokenRequest
  (`POST .../serviceaccounts/NAME/token`) mints tokens of `issuer`, and TokenReview
  then knows them; `token_requests` records each request.

What the double copies from the real API server, and where that was read:

- List, then watch from the list's `metadata.resourceVersion`; a watch event is one
  JSON document per line, `{"type": ..., "object": ...}`, in a chunked
  `application/json` body, for changes after the given resourceVersion only.
  https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes
- `resourceVersion` on a watch: unset = "Get State and Start at Most Recent", "0" =
  "Get State and Start at Any" (both begin with synthetic ADDED events for every
  existing object), any other value = "Start at Exact" (no synthetic events).
  https://kubernetes.io/docs/reference/using-api/api-concepts/#semantics-for-watch
- BOOKMARK events only for `allowWatchBookmarks=true`; the object is of the watched
  kind and carries only `metadata.resourceVersion`.
  https://kubernetes.io/docs/reference/using-api/api-concepts/#watch-bookmarks
  The real watch cache sends one about every minute and 2 s before the watch's
  deadline (apiserver `storage/cacher/cache_watcher.go`, `nextBookmarkTime`); here
  `send_bookmarks()` sends one now, `bookmark_interval` periodically, and one is sent
  just before a watch times out.
- A watch from a resourceVersion older than the retained history: the watch cache
  answers HTTP 200 and one ERROR event whose object is a Status
  `{code: 410, reason: "Expired", message: "too old resource version: R (C)"}`
  (`cacher.go`: "other errors must fail with a watch event of type ERROR, rather
  than a directly returned error"; `watch_cache.go`: `NewResourceExpired`). That is
  the default here (`expired_as = "event"`); `expired_as = "status"` answers a plain
  HTTP 410 Status instead, as the docs' "410 Gone" wording suggests.
  https://kubernetes.io/docs/reference/using-api/api-concepts/#410-gone-responses
- Field selectors: Pods support metadata.name, metadata.namespace, spec.nodeName,
  spec.restartPolicy, spec.schedulerName, spec.serviceAccountName, spec.hostNetwork,
  status.phase, status.podIP, status.nominatedNodeName (and the legacy alias
  spec.host); ServiceAccounts only metadata.name and metadata.namespace; operators
  `=`, `==`, `!=`, comma-joined; anything else is 400 "field label not supported: X"
  (`pkg/apis/core/v1/conversion.go`).
  https://kubernetes.io/docs/concepts/overview/working-with-objects/field-selectors/
- A selector on a watch is applied to the object before AND after each change
  (`cache_watcher.go` `convertToWatchEvent`, and the etcd3 watcher's `transform`):
  matched only after -> ADDED; both -> MODIFIED; only before -> DELETED carrying the
  previous content stamped with the change's resourceVersion; neither -> nothing.
  So a pod that is bound to node-a (spec.nodeName "" -> "node-a") is ADDED for a
  `spec.nodeName=node-a` watcher, and an object that stops matching is DELETED for
  it even though it still exists (contrary to what was assumed when this double was
  requested; the apiserver source is explicit). A deleted object's DELETED event
  carries its last state with the deletion's resourceVersion.
- Discovery: `/.well-known/openid-configuration` (application/json) with issuer,
  jwks_uri, response_types_supported ["id_token"], subject_types_supported ["public"],
  id_token_signing_alg_values_supported; `/openid/v1/jwks` as
  `application/jwk-set+json`; both `Cache-Control: public, max-age=3600`
  (`pkg/routes/openidmetadata.go`, `pkg/serviceaccount/openidmetadata.go`).
- TokenReview (`authentication.k8s.io/v1`): 201 Created, the review echoed with
  `status.authenticated`, `status.user` {username `system:serviceaccount:NS:SA`, uid =
  the ServiceAccount's uid, groups, extra `authentication.kubernetes.io/pod-name` and
  `pod-uid` as lists}, `status.audiences` (the intersection of `spec.audiences`, or
  the server's API audiences, with the token's), or `status.error`. Like the bound
  token validator, a token whose ServiceAccount or Pod is gone (or has another uid) is
  not authenticated (`validate_bound_objects`); error strings are close, not exact.
  https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-review-v1/
  (extra keys: `staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go`).
- TokenRequest (`authentication.k8s.io/v1`, the `token` subresource of a
  ServiceAccount): 201 Created, the request echoed with `spec.audiences` defaulted to the
  API audiences and `status` {`token`, `expirationTimestamp`}; `expirationSeconds`
  defaults to 3600 and under 600 is 422 Invalid ("may not specify a duration less than
  10 minutes"); a `boundObjectRef` to a Pod needs the pod (404), its uid if given (409
  "the UID in the bound object reference (X) does not match the UID in record. The
  object might have been deleted and then recreated") and the same ServiceAccount (400
  "cannot bind token for serviceaccount \"NAME\" to pod running with different
  serviceaccount name."); other kinds than Pod are 400 here (the real server also binds
  Secrets and Nodes). The token carries `kubernetes.io` {namespace, serviceaccount
  {name, uid}, pod {name, uid}} (`pkg/registry/core/serviceaccount/storage/token.go`,
  `pkg/serviceaccount/claims.go`).
  https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-request-v1/
- Errors are `Status` objects (`kind: Status, status: Failure, reason, code`), e.g. 404
  `pods "x" not found` with details {name, kind}.

What kubernetes-asyncio 36.1.0 does with them (read from
`kubernetes_asyncio/watch/watch.py` and `client/rest.py`, and proven in
tests/test_k8s_double.py):

- `Watch.stream` forces `_preload_content=False`, so the REST layer never raises on
  the HTTP status of a watch; `Watch` reads the body line by line. A line without
  "type"/"object" but with "code" raises `ApiException(status=code)`; so both the
  ERROR event and a plain HTTP 410 Status surface as `ApiException(status=410,
  reason="Expired: too old resource version: ...")` (body and headers None). The same
  holds for 401/503 answers to a watch. The Status must be one line: a multi-line
  body would be handed back as a raw string instead.
- On 410 with `timeout_seconds` given, the exception is raised at once. Without
  `timeout_seconds` the Watch "watches forever": it retries a 410 once, reconnecting
  with the last resourceVersion it saw (for a stale one, the same rv), and raises on
  the second 410. It never re-lists: the caller must list and watch again.
- A stream that ends cleanly (timeoutSeconds elapsed, `drop_watches(abrupt=False)`):
  with `timeout_seconds`, the iteration just stops (StopAsyncIteration); without, the
  Watch silently reconnects from its last resourceVersion (bookmarks included).
- A stream cut mid-body (`drop_watches()`, `go_down()`): aiohttp raises
  `aiohttp.ClientPayloadError` out of the iteration; Watch does not catch it or
  reconnect. A refused connection raises `aiohttp.ClientConnectorError`; neither is
  an `ApiException`.
- Watch events are deserialized into models (`V1ServiceAccount`, `V1Pod`) with
  client-side validation on, so a Pod needs `spec.containers`; BOOKMARK objects are
  not deserialized (only `raw_object`), and update `Watch.resource_version`.
- `WellKnownApi`/`OpenidApi` must be called with `_preload_content=False`; the raw
  `aiohttp.ClientResponse` is returned. `await response.json()` refuses the JWKS
  (content type `application/jwk-set+json`): parse `await response.read()`.
- Query booleans are sent as `True`/`False`; like the apiserver, the double treats a
  present `watch` as true unless it is "0" or "false" (any case).

Deviations, on purpose: one global resourceVersion and history for both kinds (as
etcd has); lists ignore `resourceVersion`, `limit` and `continue` and return the
current state (servers may ignore `limit`); no labelSelector (400 if given), no
graceful deletion (deletionTimestamp), no too-large-resourceVersion 504, no
managedFields; a watch without timeoutSeconds lasts `max_watch_seconds` at most
(the real server picks 30-60 min).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from kubernetes_asyncio import client as k8s

Obj = dict[str, Any]

ROLE_ARN_ANNOTATION = "eks.amazonaws.com/role-arn"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
NODE_UID_KEY = "authentication.kubernetes.io/node-uid"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
DEFAULT_ISSUER = "https://oidc.k8s-double.test/id/DOUBLE"
DEFAULT_TOKEN = "k8s-double-bearer-token"

KINDS = {"serviceaccounts": "ServiceAccount", "pods": "Pod", "daemonsets": "DaemonSet"}
RESOURCES = {kind: resource for resource, kind in KINDS.items()}
# Where each resource is served: the core group under /api/v1, DaemonSets under /apis/apps/v1.
API_VERSIONS = {"serviceaccounts": "v1", "pods": "v1", "daemonsets": "apps/v1"}
API_ROOTS = {"v1": ["api", "v1"], "apps/v1": ["apis", "apps", "v1"]}
FIELDS = {
    "daemonsets": frozenset({"metadata.name", "metadata.namespace"}),
    "serviceaccounts": frozenset({"metadata.name", "metadata.namespace"}),
    "pods": frozenset({
        "metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
        "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
        "status.podIP", "status.nominatedNodeName",
    }),
}
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
CACHE_CONTROL = "public, max-age=3600"


def now_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def service_account(
    namespace: str, name: str, role_arn: str | None = None, annotations: Mapping[str, str] | None = None,
    *, uid: str | None = None, labels: Mapping[str, str] | None = None,
) -> Obj:
    """A ServiceAccount as the API server returns it (resourceVersion is set on create)."""
    notes = dict(annotations or {})
    if role_arn is not None:
        notes[ROLE_ARN_ANNOTATION] = role_arn
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
            "annotations": notes, "labels": dict(labels or {}),
        },
    }


def pod(
    namespace: str, name: str, node: str | None, service_account: str, uid: str | None = None,
    phase: str = "Running", *, labels: Mapping[str, str] | None = None,
) -> Obj:
    """A Pod as the API server returns it; `node=None` is a pod not yet scheduled."""
    spec: Obj = {
        "serviceAccountName": service_account,
        "serviceAccount": service_account,
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "containers": [{"name": "app", "image": "public.ecr.aws/docker/library/busybox:stable"}],
    }
    if node is not None:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
            "annotations": {}, "labels": dict(labels or {}),
        },
        "spec": spec,
        "status": {"phase": phase},
    }


def daemon_set(namespace: str, name: str, desired: int, *, labels: Mapping[str, str] | None = None) -> Obj:
    """A DaemonSet as the API server returns it, with `status.desiredNumberScheduled` = `desired`
    (the nodes it should run on; the controller's other counters follow it here)."""
    selector = dict(labels or {"app.kubernetes.io/name": name})
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "labels": dict(selector)},
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {"containers": [{"name": name, "image": "irsa-cache:test"}]},
            },
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
        },
        "status": {
            "currentNumberScheduled": desired, "desiredNumberScheduled": desired, "numberMisscheduled": 0,
            "numberReady": desired, "numberAvailable": desired, "updatedNumberScheduled": desired,
            "observedGeneration": 1,
        },
    }


def status_body(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    body: Obj = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


Fault = Callable[[web.Request, "Call"], Awaitable["web.StreamResponse | None"]]


def plain_answer(status: int, body: str, content_type: str = "text/html") -> Fault:
    """A proxy's answer: any status, any body, not a Kubernetes Status."""

    async def fault(request: web.Request, call: Call) -> web.StreamResponse:
        return web.Response(status=status, text=body, content_type=content_type)

    return fault


def watch_lines(*lines: bytes, only_watches: bool = True) -> Fault:
    """A 200 chunked stream of these raw lines on watches (lists are served as usual)."""

    async def fault(request: web.Request, call: Call) -> web.StreamResponse | None:
        if only_watches and call.verb != "watch":
            return None
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        await response.write_eof()
        return response

    return fault


def silence(*, after_headers: bool = False, verbs: tuple[str, ...] = ("list", "watch", "get", "create")) -> Fault:
    """A hung server: accepts the request and never answers (or answers headers, then nothing)."""

    async def fault(request: web.Request, call: Call) -> web.StreamResponse | None:
        if call.verb not in verbs:
            return None
        if after_headers:
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
        await asyncio.Event().wait()  # until the client gives up (handler_cancellation)
        raise AssertionError("unreachable")

    return fault


def dumps(value: Any) -> bytes:
    """Compact JSON and a newline, as the apiserver writes it (kubernetes-asyncio reads lines)."""
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


def json_response(body: Any, *, status: int = 200, content_type: str = "application/json",
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type=content_type, headers=headers)


def status_response(code: int, reason: str, message: str, details: Obj | None = None) -> web.Response:
    return json_response(status_body(code, reason, message, details), status=code)


def field_values(resource: str, obj: Obj) -> dict[str, str]:
    """The selectable fields of an object, with Go's zero value ("") for absent ones."""
    meta = obj.get("metadata") or {}
    values = {"metadata.name": meta.get("name") or "", "metadata.namespace": meta.get("namespace") or ""}
    if resource == "pods":
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        values.update({
            "spec.nodeName": spec.get("nodeName") or "",
            "spec.restartPolicy": spec.get("restartPolicy") or "",
            "spec.schedulerName": spec.get("schedulerName") or "",
            "spec.serviceAccountName": spec.get("serviceAccountName") or "",
            "spec.hostNetwork": "true" if spec.get("hostNetwork") else "false",
            "status.phase": status.get("phase") or "",
            "status.podIP": status.get("podIP") or "",
            "status.nominatedNodeName": status.get("nominatedNodeName") or "",
        })
    return values


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Term:
    field: str
    value: str
    negate: bool

    def matches(self, values: Mapping[str, str]) -> bool:
        return (values.get(self.field, "") == self.value) != self.negate


def parse_field_selector(text: str, resource: str) -> tuple[Term, ...]:
    terms: list[Term] = []
    for part in text.split(","):
        if not part.strip():
            continue
        for operator in ("!=", "==", "="):
            if operator in part:
                key, value = part.split(operator, 1)
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        key = key.strip()
        if resource == "pods" and key == "spec.host":
            key = "spec.nodeName"
        if key not in FIELDS[resource]:
            raise SelectorError(f"field label not supported: {key}")
        terms.append(Term(key, value.strip(), operator == "!="))
    return tuple(terms)


def query_bool(value: str | None) -> bool:
    """The apiserver's query-string bool: present means true, unless "0" or "false"."""
    return value is not None and value != "0" and value.lower() != "false"


@dataclass
class Call:
    """One request the double answered: its verb in Kubernetes terms (list, watch, get, create)."""

    method: str
    path: str
    verb: str
    query: dict[str, str]
    status: int | None = None


@dataclass(frozen=True)
class WatchCall:
    path: str
    resource_version: str | None
    allow_watch_bookmarks: bool
    timeout_seconds: int | None
    field_selector: str | None
    query: Mapping[str, str]


@dataclass(frozen=True)
class TokenReviewCall:
    token: str
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class TokenRequestCall:
    namespace: str
    service_account: str
    spec: Obj
    status: int


@dataclass(frozen=True)
class TokenIdentity:
    """What the API server would find in a bound service-account token."""

    namespace: str
    service_account: str
    service_account_uid: str | None = None
    audiences: tuple[str, ...] = ("sts.amazonaws.com",)
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    node_uid: str | None = None

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def identity_for(account: Obj, bound_pod: Obj | None = None, *,
                 audiences: tuple[str, ...] = ("sts.amazonaws.com",)) -> TokenIdentity:
    """The identity of a token projected for `bound_pod` running as `account`."""
    meta = account["metadata"]
    pod_meta = (bound_pod or {}).get("metadata") or {}
    return TokenIdentity(
        namespace=meta["namespace"], service_account=meta["name"], service_account_uid=meta.get("uid"),
        audiences=audiences, pod_name=pod_meta.get("name"), pod_uid=pod_meta.get("uid"),
        node_name=((bound_pod or {}).get("spec") or {}).get("nodeName"),
    )


TokenReviewer = Callable[[str, list[str]], Mapping[str, Any]]
"""Given (spec.token, spec.audiences), the TokenReview status to answer, verbatim."""


@dataclass(frozen=True)
class Change:
    resource_version: int
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    resource: str
    object: Obj
    previous: Obj | None


@dataclass(frozen=True)
class _Bookmark:
    resource_version: int
    initial_events_end: bool = False


@dataclass(frozen=True)
class _End:
    pass


_Item = Change | _Bookmark | _End


def selects(obj: Obj, resource: str, namespace: str | None, name: str | None, selector: tuple[Term, ...]) -> bool:
    """Does a request for `resource` (in `namespace`, named `name`, with `selector`) cover `obj`?"""
    meta = obj.get("metadata") or {}
    if namespace is not None and meta.get("namespace") != namespace:
        return False
    if name is not None and meta.get("name") != name:
        return False
    values = field_values(resource, obj)
    return all(term.matches(values) for term in selector)


@dataclass(eq=False)
class _OpenWatch:
    path: str
    resource: str
    namespace: str | None
    name: str | None
    selector: tuple[Term, ...]
    bookmarks: bool
    request: web.Request
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)

    def matches(self, obj: Obj) -> bool:
        return selects(obj, self.resource, self.namespace, self.name, self.selector)

    def event(self, change: Change) -> tuple[str, Obj] | None:
        """What this watcher sees of a change: the apiserver's before/after selector rule."""
        if change.resource != self.resource:
            return None
        now = change.type != "DELETED" and self.matches(change.object)
        before = change.previous is not None and self.matches(change.previous)
        if now:
            return ("MODIFIED" if before else "ADDED"), change.object
        if before:
            assert change.previous is not None
            gone = copy.deepcopy(change.previous)
            gone["metadata"]["resourceVersion"] = str(change.resource_version)
            return "DELETED", gone
        return None


@dataclass(frozen=True)
class _Route:
    kind: Literal["collection", "object", "discovery", "jwks", "tokenreviews", "token", "unknown"]
    resource: str = ""
    namespace: str | None = None
    name: str | None = None


def parse_route(path: str) -> _Route:
    if path == DISCOVERY_PATH:
        return _Route("discovery")
    if path == JWKS_PATH:
        return _Route("jwks")
    if path == TOKEN_REVIEW_PATH:
        return _Route("tokenreviews")
    parts = path.strip("/").split("/")
    version = next((v for v, root in API_ROOTS.items() if parts[:len(root)] == root), None)
    if version is None:
        return _Route("unknown")
    rest = parts[len(API_ROOTS[version]):]
    served = {resource for resource, v in API_VERSIONS.items() if v == version}
    if len(rest) == 1 and rest[0] in served:
        return _Route("collection", rest[0])
    if len(rest) == 5 and rest[0] == "namespaces" and rest[2] == "serviceaccounts" and rest[4] == "token" and rest[3]:
        return _Route("token", "serviceaccounts", rest[1], rest[3])
    if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] in served and rest[1]:
        if len(rest) == 3:
            return _Route("collection", rest[2], rest[1])
        return _Route("object", rest[2], rest[1], rest[3])
    return _Route("unknown")


CALL_KEY = web.RequestKey("k8s_double_call", Call)
ROUTE_KEY = web.RequestKey("k8s_double_route", _Route)


def verb_of(method: str, route: _Route, query: Mapping[str, str]) -> str:
    if method == "POST":
        return "create"
    if method != "GET":
        return method.lower()
    if route.kind in ("collection", "object") and query_bool(query.get("watch")):
        return "watch"
    return "list" if route.kind == "collection" else "get"


class K8sApiDouble:
    """An API server on 127.0.0.1 for the real kubernetes-asyncio client; see the module docstring."""

    def __init__(
        self,
        *,
        issuer: str = DEFAULT_ISSUER,
        jwks: Mapping[str, Any] | None = None,
        jwks_uri: str | None = None,
        token: str | None = DEFAULT_TOKEN,
        token_reviews: Mapping[str, TokenIdentity] | TokenReviewer | None = None,
        api_audiences: tuple[str, ...] | None = None,
        minter: Any = None,
        history_size: int | None = None,
        max_watch_seconds: float = 60.0,
        bookmark_interval: float | None = None,
        initial_resource_version: int = 1000,
    ) -> None:
        self.issuer = issuer
        self.jwks: dict[str, Any] = dict(jwks or {"keys": []})
        self.jwks_uri = jwks_uri
        self.token = token
        self.token_reviews: dict[str, TokenIdentity] | TokenReviewer = (
            token_reviews if callable(token_reviews) else dict(token_reviews or {})
        )
        self.api_audiences = api_audiences if api_audiences is not None else (issuer,)
        self.minter = minter
        self.validate_bound_objects = True
        self.history_size = history_size
        self.max_watch_seconds = max_watch_seconds
        self.bookmark_interval = bookmark_interval
        self.bookmark_on_timeout = True
        self.expired_as: Literal["event", "status"] = "event"

        self.calls: list[Call] = []
        self.watches: list[WatchCall] = []
        self.token_review_requests: list[TokenReviewCall] = []
        self.token_requests: list[TokenRequestCall] = []

        self._rv = initial_resource_version
        self._compacted = initial_resource_version
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._history: list[Change] = []
        self._open: list[_OpenWatch] = []
        self._unavailable = False
        self.fault: Fault | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> K8sApiDouble:
        await self._serve(port=0)
        return self

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self, *, refuse: bool = True) -> None:
        """Fail every request: refuse connections (site stopped), or answer 503 if not `refuse`.

        Open watch streams are cut mid-body either way.
        """
        self.drop_watches()
        if refuse:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
        else:
            self._unavailable = True

    async def come_up(self) -> None:
        """Serve again, on the same port."""
        self._unavailable = False
        if self._runner is None:
            await self._serve(port=self.port)

    @property
    def is_down(self) -> bool:
        return self._runner is None or self._unavailable

    async def _serve(self, *, port: int) -> None:
        app = web.Application(middlewares=[self._front])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, self.port = runner.addresses[0][:2]
        self.url = f"http://{host}:{self.port}"

    # -- clients -----------------------------------------------------------------

    def client_configuration(self, token: str | None = None) -> k8s.Configuration:
        """A kubernetes-asyncio Configuration pointing at the double, with its bearer token."""
        configuration = k8s.Configuration(host=self.url)
        bearer = token if token is not None else self.token
        if bearer is not None:
            configuration.api_key = {"BearerToken": bearer}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return configuration

    def write_kubeconfig(self, path: Path, token: str | None = None, namespace: str = "default") -> Path:
        """A kubeconfig (JSON, which YAML loaders read) for the double."""
        bearer = token if token is not None else self.token
        user: Obj = {"token": bearer} if bearer is not None else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k8s-double", "cluster": {"server": self.url}}],
            "users": [{"name": "k8s-double", "user": user}],
            "contexts": [{"name": "k8s-double", "context": {
                "cluster": "k8s-double", "user": "k8s-double", "namespace": namespace}}],
            "current-context": "k8s-double",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # -- objects -----------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion (what a list now returns)."""
        return self._rv

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        stored = self._objects.get((RESOURCES[kind], namespace, name))
        return copy.deepcopy(stored) if stored is not None else None

    def objects(self, kind: str) -> list[Obj]:
        resource = RESOURCES[kind]
        return [copy.deepcopy(obj) for key, obj in sorted(self._objects.items()) if key[0] == resource]

    def create(self, obj: Obj) -> Obj:
        """Store a new object (uid, creationTimestamp, resourceVersion filled in); emits ADDED."""
        key = self._key(obj)
        if key in self._objects:
            raise ValueError(f'{key[0]} "{key[2]}" already exists')
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_timestamp())
        rv = self._bump()
        meta["resourceVersion"] = str(rv)
        self._objects[key] = stored
        self._publish(Change(rv, "ADDED", key[0], stored, None))
        return copy.deepcopy(stored)

    def update(self, obj: Obj) -> Obj:
        """Replace an object (uid and creationTimestamp kept); emits MODIFIED."""
        key = self._key(obj)
        previous = self._objects.get(key)
        if previous is None:
            raise KeyError(f'{key[0]} "{key[2]}" not found')
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        meta["uid"] = previous["metadata"]["uid"]
        meta["creationTimestamp"] = previous["metadata"]["creationTimestamp"]
        rv = self._bump()
        meta["resourceVersion"] = str(rv)
        self._objects[key] = stored
        self._publish(Change(rv, "MODIFIED", key[0], stored, previous))
        return copy.deepcopy(stored)

    def set_desired_nodes(self, namespace: str, name: str, desired: int) -> Obj:
        """The DaemonSet controller's view changed (nodes joined or left): a new status."""
        stored = self.get("DaemonSet", namespace, name)
        if stored is None:
            raise KeyError(f'daemonsets "{name}" not found')
        stored["status"].update(desiredNumberScheduled=desired, currentNumberScheduled=desired,
                                numberReady=desired, numberAvailable=desired, updatedNumberScheduled=desired)
        return self.update(stored)

    def apply(self, obj: Obj) -> Obj:
        return self.update(obj) if self._key(obj) in self._objects else self.create(obj)

    def delete(self, obj_or_kind: Obj | str, namespace: str | None = None, name: str | None = None) -> Obj:
        """Remove an object; emits DELETED carrying its last state at the deletion's resourceVersion."""
        if isinstance(obj_or_kind, str):
            assert namespace is not None and name is not None
            key = (RESOURCES[obj_or_kind], namespace, name)
        else:
            key = self._key(obj_or_kind)
        previous = self._objects.pop(key, None)
        if previous is None:
            raise KeyError(f'{key[0]} "{key[2]}" not found')
        rv = self._bump()
        gone = copy.deepcopy(previous)
        gone["metadata"]["resourceVersion"] = str(rv)
        self._publish(Change(rv, "DELETED", key[0], gone, previous))
        return copy.deepcopy(gone)

    def bump_resource_version(self, count: int = 1) -> int:
        """Advance the resourceVersion as changes to other kinds would (no events, no history)."""
        for _ in range(count):
            self._bump()
        return self._rv

    def compact(self, resource_version: int | None = None) -> None:
        """Forget changes up to `resource_version` (default: all); older watches get 410 Expired."""
        upto = self._rv if resource_version is None else resource_version
        self._history = [change for change in self._history if change.resource_version > upto]
        self._compacted = max(self._compacted, upto)

    @property
    def compacted_resource_version(self) -> int:
        """Watches from a resourceVersion below this one are answered 410 Expired."""
        return self._compacted

    def _key(self, obj: Obj) -> tuple[str, str, str]:
        meta = obj.get("metadata") or {}
        return RESOURCES[obj["kind"]], meta["namespace"], meta["name"]

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _publish(self, change: Change) -> None:
        self._history.append(change)
        if self.history_size is not None:
            while len(self._history) > self.history_size:
                dropped = self._history.pop(0)
                self._compacted = max(self._compacted, dropped.resource_version)
        for watch in self._open:
            if watch.resource == change.resource:
                watch.queue.put_nowait(change)

    # -- watches -----------------------------------------------------------------

    @property
    def open_watches(self) -> int:
        return len(self._open)

    def open_watch_paths(self) -> list[str]:
        return [watch.path for watch in self._open]

    async def wait_for_watches(self, count: int = 1, *, path: str | None = None, timeout: float = 5.0) -> None:
        """Wait until at least `count` watch streams (on `path`, if given) are open."""
        async with asyncio.timeout(timeout):
            while sum(1 for w in self._open if path is None or w.path == path) < count:
                await asyncio.sleep(0.01)

    def send_bookmarks(self) -> None:
        """A BOOKMARK at the current resourceVersion to every watch that allowed bookmarks."""
        for watch in self._open:
            if watch.bookmarks:
                watch.queue.put_nowait(_Bookmark(self._rv))

    def drop_watches(self, *, abrupt: bool = True) -> int:
        """End every open watch: cut the connection mid-body, or (not `abrupt`) end the body cleanly."""
        dropped = list(self._open)
        for watch in dropped:
            transport = watch.request.transport
            if abrupt and transport is not None:
                transport.abort()
            else:
                watch.queue.put_nowait(_End())
        return len(dropped)

    # -- records -----------------------------------------------------------------

    @property
    def requests(self) -> Counter[tuple[str, str]]:
        """How many requests per (verb, path)."""
        return Counter((call.verb, call.path) for call in self.calls)

    def count(self, verb: str, path: str | None = None) -> int:
        return sum(1 for call in self.calls if call.verb == verb and (path is None or call.path == path))

    def watch_calls(self, path: str | None = None) -> list[WatchCall]:
        return [watch for watch in self.watches if path is None or watch.path == path]

    # -- keys and tokens ---------------------------------------------------------

    def rotate_keys(self, jwks: Mapping[str, Any]) -> None:
        self.jwks = dict(jwks)

    def discovery_document(self) -> Obj:
        algorithms = sorted({key.get("alg") or _default_alg(key) for key in self.jwks.get("keys", [])})
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri or f"{self.url}{JWKS_PATH}",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algorithms,
        }

    def review(self, token: str, audiences: list[str]) -> Obj:
        """The TokenReview status the double answers for (token, spec.audiences)."""
        reviewer = self.token_reviews
        if callable(reviewer):
            return dict(reviewer(token, audiences))
        identity = reviewer.get(token)
        if identity is None:
            return {"user": {}, "error": "invalid bearer token"}
        wanted = list(audiences) or list(self.api_audiences)
        shared = [audience for audience in wanted if audience in identity.audiences]
        if not shared:
            return {"user": {}, "error": (
                f"[invalid bearer token, token audiences {_go_list(identity.audiences)} "
                f"is invalid for the target audiences {_go_list(wanted)}]")}
        problem = self._bound_object_problem(identity) if self.validate_bound_objects else None
        if problem is not None:
            return {"user": {}, "error": f"[invalid bearer token, {problem}]"}
        extra: dict[str, list[str]] = {}
        if identity.pod_name and identity.pod_uid:
            extra[POD_NAME_KEY] = [identity.pod_name]
            extra[POD_UID_KEY] = [identity.pod_uid]
        if identity.node_name:
            extra[NODE_NAME_KEY] = [identity.node_name]
            if identity.node_uid:
                extra[NODE_UID_KEY] = [identity.node_uid]
        user: Obj = {
            "username": identity.username,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{identity.namespace}",
                       "system:authenticated"],
        }
        account = self._objects.get(("serviceaccounts", identity.namespace, identity.service_account))
        uid = identity.service_account_uid or (account or {}).get("metadata", {}).get("uid")
        if uid:
            user["uid"] = uid
        if extra:
            user["extra"] = extra
        return {"authenticated": True, "user": user, "audiences": shared}

    def _bound_object_problem(self, identity: TokenIdentity) -> str | None:
        account = self._objects.get(("serviceaccounts", identity.namespace, identity.service_account))
        if account is None:
            return "service account token has been invalidated"
        if identity.service_account_uid and account["metadata"]["uid"] != identity.service_account_uid:
            return "service account token has been invalidated"
        if identity.pod_name:
            bound = self._objects.get(("pods", identity.namespace, identity.pod_name))
            if bound is None:
                return "service account token has been invalidated"
            if identity.pod_uid and bound["metadata"]["uid"] != identity.pod_uid:
                return (f"pod UID ({bound['metadata']['uid']}) does not match service account "
                        f"pod ref claim ({identity.pod_uid})")
        return None

    # -- HTTP --------------------------------------------------------------------

    @web.middleware
    async def _front(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        route = parse_route(request.path)
        query = dict(request.query)
        call = Call(request.method, request.path, verb_of(request.method, route, query), query)
        self.calls.append(call)
        request[CALL_KEY] = call
        request[ROUTE_KEY] = route
        answer = await self.fault(request, call) if self.fault is not None else None
        if answer is not None:
            call.status = answer.status
            return answer
        if self._unavailable:
            response: web.StreamResponse = status_response(
                503, "ServiceUnavailable", "the server is currently unable to handle the request")
        elif self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            response = status_response(401, "Unauthorized", "Unauthorized")
        else:
            response = await handler(request)
        call.status = response.status
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        route: _Route = request[ROUTE_KEY]
        query: dict[str, str] = request[CALL_KEY].query
        if route.kind == "unknown":
            return status_response(404, "NotFound", "the server could not find the requested resource", {})
        if request.method != ("POST" if route.kind in ("tokenreviews", "token") else "GET"):
            return status_response(405, "MethodNotAllowed",
                                   "the server does not allow this method on the requested resource")
        if route.kind == "tokenreviews":
            return await self._token_review(request)
        if route.kind == "token":
            return await self._token_request(request, route)
        if route.kind == "discovery":
            return json_response(self.discovery_document(), headers={"Cache-Control": CACHE_CONTROL})
        if route.kind == "jwks":
            return json_response(self.jwks, content_type="application/jwk-set+json",
                                 headers={"Cache-Control": CACHE_CONTROL})
        if query.get("labelSelector"):
            return status_response(400, "BadRequest", "labelSelector is not supported by the k8s double")
        try:
            selector = parse_field_selector(query.get("fieldSelector", ""), route.resource)
        except SelectorError as error:
            return status_response(400, "BadRequest", str(error))
        if request[CALL_KEY].verb == "watch":
            return await self._watch(request, route, selector, query)
        if route.kind == "object":
            assert route.namespace is not None and route.name is not None
            stored = self._objects.get((route.resource, route.namespace, route.name))
            if stored is None:
                return status_response(404, "NotFound", f'{route.resource} "{route.name}" not found',
                                       {"name": route.name, "kind": route.resource})
            return json_response(stored)
        return json_response({
            "kind": f"{KINDS[route.resource]}List",
            "apiVersion": API_VERSIONS[route.resource],
            "metadata": {"resourceVersion": str(self._rv)},
            "items": self._current(route.resource, route.namespace, None, selector),
        })

    def _current(self, resource: str, namespace: str | None, name: str | None,
                 selector: tuple[Term, ...]) -> list[Obj]:
        return [obj for key, obj in sorted(self._objects.items())
                if key[0] == resource and selects(obj, resource, namespace, name, selector)]

    async def _watch(self, request: web.Request, route: _Route, selector: tuple[Term, ...],
                     query: Mapping[str, str]) -> web.StreamResponse:
        asked = query.get("resourceVersion")
        try:
            timeout = int(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
            since = int(asked) if asked not in (None, "", "0") else None
        except ValueError as error:
            return status_response(400, "BadRequest", f"invalid watch parameter: {error}")
        bookmarks = query_bool(query.get("allowWatchBookmarks"))
        self.watches.append(WatchCall(request.path, asked, bookmarks, timeout, query.get("fieldSelector"), query))

        if since is not None and since < self._compacted:
            expired = status_body(410, "Expired", f"too old resource version: {since} ({self._compacted})")
            if self.expired_as == "status":
                return json_response(expired, status=410)
            response = await self._open_stream(request)
            await response.write(dumps({"type": "ERROR", "object": expired}))
            await response.write_eof()
            return response

        watch = _OpenWatch(request.path, route.resource, route.namespace, route.name, selector, bookmarks, request)
        initial_events = since is None or query_bool(query.get("sendInitialEvents"))
        backlog: list[_Item]
        if initial_events:
            backlog = [Change(int(obj["metadata"]["resourceVersion"]), "ADDED", route.resource, obj, None)
                       for obj in self._current(route.resource, route.namespace, route.name, selector)]
            if query_bool(query.get("sendInitialEvents")) and bookmarks:
                backlog.append(_Bookmark(self._rv, initial_events_end=True))
        else:
            assert since is not None
            backlog = [change for change in self._history if change.resource_version > since]
        self._open.append(watch)  # no await since the backlog was taken: nothing falls between
        response = web.StreamResponse()
        try:
            response = await self._open_stream(request)
            for item in backlog:
                await self._emit(response, watch, item)
            await self._stream(response, watch, min(timeout or self.max_watch_seconds, self.max_watch_seconds))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away: nothing more to write
        finally:
            self._open.remove(watch)
        return response

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        request[CALL_KEY].status = 200
        return response

    async def _stream(self, response: web.StreamResponse, watch: _OpenWatch, seconds: float) -> None:
        """Forward changes until the deadline or an _End; bookmarks every `bookmark_interval`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        interval = self.bookmark_interval
        next_bookmark = loop.time() + interval if interval else None
        while (now := loop.time()) < deadline:
            if interval and next_bookmark is not None and now >= next_bookmark:
                if watch.bookmarks:
                    await self._emit(response, watch, _Bookmark(self._rv))
                next_bookmark = now + interval
                continue
            until = deadline if next_bookmark is None else min(deadline, next_bookmark)
            try:
                item = await asyncio.wait_for(watch.queue.get(), until - now)
            except TimeoutError:
                continue
            if isinstance(item, _End):
                return
            await self._emit(response, watch, item)
        if self.bookmark_on_timeout and watch.bookmarks:
            await self._emit(response, watch, _Bookmark(self._rv))

    async def _emit(self, response: web.StreamResponse, watch: _OpenWatch, item: _Item) -> None:
        if isinstance(item, _Bookmark):
            metadata: Obj = {"resourceVersion": str(item.resource_version)}
            if item.initial_events_end:
                metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
            kind = KINDS[watch.resource]
            await response.write(dumps({"type": "BOOKMARK",
                                        "object": {"kind": kind, "apiVersion": API_VERSIONS[watch.resource],
                                                   "metadata": metadata}}))
        elif isinstance(item, Change):
            event = watch.event(item)
            if event is not None:
                await response.write(dumps({"type": event[0], "object": event[1]}))

    async def _token_review(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return status_response(400, "BadRequest", "the body of the request was in an unknown format")
        spec = (body or {}).get("spec") or {}
        token = spec.get("token") or ""
        audiences = list(spec.get("audiences") or [])
        self.token_review_requests.append(TokenReviewCall(token, tuple(audiences)))
        if not token:
            return status_response(400, "BadRequest", "token is required for TokenReview in authentication")
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": self.review(token, audiences),
        }
        return json_response(review, status=201)


    async def _token_request(self, request: web.Request, route: _Route) -> web.Response:
        assert route.namespace is not None and route.name is not None
        try:
            body = await request.json()
        except ValueError:
            return status_response(400, "BadRequest", "the body of the request was in an unknown format")
        spec = dict((body or {}).get("spec") or {})
        answer = self._answer_token_request(route.namespace, route.name, spec)
        self.token_requests.append(TokenRequestCall(route.namespace, route.name, spec, answer.status))
        return answer

    def _answer_token_request(self, namespace: str, name: str, spec: Obj) -> web.Response:
        account = self._objects.get(("serviceaccounts", namespace, name))
        if account is None:
            return status_response(404, "NotFound", f'serviceaccounts "{name}" not found',
                                   {"name": name, "kind": "serviceaccounts"})
        seconds = spec.get("expirationSeconds", 3600)
        if not isinstance(seconds, int) or seconds < 600:
            return status_response(
                422, "Invalid", f'TokenRequest.authentication.k8s.io "{name}" is invalid: spec.expirationSeconds: '
                f"Invalid value: {seconds}: may not specify a duration less than 10 minutes")
        audiences = list(spec.get("audiences") or self.api_audiences)
        bound_pod: Obj | None = None
        ref = spec.get("boundObjectRef")
        if ref:
            if ref.get("kind") != "Pod":
                return status_response(400, "BadRequest", f"cannot bind token to object of type {ref.get('kind')}")
            bound_pod = self._objects.get(("pods", namespace, ref.get("name", "")))
            if bound_pod is None:
                return status_response(404, "NotFound", f'pods "{ref.get("name")}" not found',
                                       {"name": ref.get("name"), "kind": "pods"})
            if ref.get("uid") and ref["uid"] != bound_pod["metadata"]["uid"]:
                return status_response(
                    409, "Conflict", f'Operation cannot be fulfilled on Pod "{ref.get("name")}": the UID in the bound '
                    f"object reference ({ref['uid']}) does not match the UID in record. The object might have been "
                    "deleted and then recreated")
            if (bound_pod.get("spec") or {}).get("serviceAccountName", "default") != name:
                return status_response(400, "BadRequest", f'cannot bind token for serviceaccount "{name}" to pod '
                                                          "running with different serviceaccount name.")
        if self.minter is None:
            return status_response(500, "InternalError", "the k8s double was started without a minter")
        subject = f"system:serviceaccount:{namespace}:{name}"
        kubernetes: Obj = {"namespace": namespace,
                           "serviceaccount": {"name": name, "uid": account["metadata"]["uid"]}}
        if bound_pod is not None:
            kubernetes["pod"] = {"name": bound_pod["metadata"]["name"], "uid": bound_pod["metadata"]["uid"]}
        issued = datetime.now(UTC)
        token = self.minter.mint(subject, audience=audiences, lifetime_seconds=seconds, issuer=self.issuer,
                                 now=issued.timestamp(), **{"kubernetes.io": kubernetes})
        if isinstance(self.token_reviews, dict):
            self.token_reviews[token] = identity_for(account, bound_pod, audiences=tuple(audiences))
        expires = datetime.fromtimestamp(int(issued.timestamp() + seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answer = {
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": now_timestamp()},
            "spec": {**spec, "audiences": audiences, "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": expires},
        }
        return json_response(answer, status=201)


def _default_alg(key: Mapping[str, Any]) -> str:
    if key.get("kty") == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(key.get("crv", ""), "ES256")
    return "RS256"


def _go_list(values: tuple[str, ...] | list[str]) -> str:
    """A string list as Go's %q prints it: ["a" "b"]."""
    return "[" + " ".join(json.dumps(value) for value in values) + "]"


@contextlib.asynccontextmanager
async def running(**kwargs: Any) -> Any:
    """`async with running(...) as double:` starts a K8sApiDouble and stops it after."""
    double = await K8sApiDouble(**kwargs).start()
    try:
        yield double
    finally:
        await double.stop()
