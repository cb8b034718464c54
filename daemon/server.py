"""HTTP: the credentials endpoint, and the one place that maps failures to answers.

    GET /v1/credentials   Authorization: <raw projected token>
      -> Host check -> tokens.verify -> directory.role_for -> cache.get -> 200 JSON

A request for credentials already cached, with a token verified before, is answered by
the shortcut (`shortcut.py`) the connection tries first: the same steps, each one that
needs no wait, and the same audit line and counters.

Every answer, a failure of ours or a wrong path or method, is the JSON body every
SDK parses, and is counted. Credentials are written to the audit log once per
issuance (see `audit.py`). The metrics listener is a separate app: /metrics,
/healthz, /readyz.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from aiohttp import hdrs, web
from prometheus_client.aiohttp import make_aiohttp_handler

from daemon import audit, doctor, metrics, shortcut
from daemon.logs import RateLimited
from daemon.cache import CredentialCache
from daemon.config import MAX_TOKEN_CHARS, VERIFIED_TOKENS_MAX, Address, ConnectionLimits
from daemon.directory.base import Directory
from daemon.errors import (
    DaemonError,
    IdentityNotAllowedError,
    OverloadedError,
    RequestError,
    StsError,
    TokenError,
    WrongHostError,
)
from daemon.models import CacheKey, Identity, VerifiedToken

log = logging.getLogger(__name__)
refusal_log = RateLimited(log)

CREDENTIALS_PATH = "/v1/credentials"
# Refusals whose broken link `irsa-cache doctor` finds: the trust policy, the provider,
# the ServiceAccount. (Not a pod on another node: that is a copied token, not a broken chain.)
DOCTOR_CODES = frozenset({"sts_denied", "sts_unavailable", "no_service_account", "no_role_annotation",
                          "bad_role_annotation"})


class Verifier(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str | None: ...

    async def run(self) -> None:
        """Load what verification needs (keys, the issuer), retrying until it has it."""

    async def verify(self, token: str) -> VerifiedToken: ...

    def verified_before(self, token: str) -> VerifiedToken | None:
        """The answer `verify` would give a token it has verified before, without a
        coroutine (the hot path), and not counted; None: call `verify`."""


def allowed_hosts(addresses: Iterable[Address]) -> frozenset[str]:
    """Host header values that name one of our listen addresses."""
    hosts: set[str] = set()
    for address in addresses:
        names = [f"[{address.host}]" if ":" in address.host else address.host]
        if address.is_loopback:
            names.append("localhost")
        for name in names:
            hosts.add(f"{name}:{address.port}".lower())
            if address.port == 80:
                hosts.add(name.lower())
    return frozenset(hosts)


def error_body(code: str, message: str) -> dict[str, str]:
    # Go reads either case, Java lower case, JS capitalised.
    return {"code": code, "message": message, "Code": code, "Message": message}


def error_json(code: str, message: str) -> bytes:
    return json.dumps(error_body(code, message)).encode()


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def raw_error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for the listeners to
    write before (or instead of) aiohttp parsing a request."""
    body = error_json(code, message)
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n")
    return head.encode() + body


def error_response(status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    # Bytes, not text: the Content-Type stays exactly "application/json" (no charset),
    # which is what the Go SDK checks before it parses an error body.
    return web.Response(status=status, body=error_json(code, message), content_type="application/json",
                        headers=headers)


def _outcome_of(error: DaemonError) -> str:
    if isinstance(error, OverloadedError):
        return "overloaded"
    return "denied" if isinstance(error, (TokenError, IdentityNotAllowedError)) or error.status == 403 else "error"


SHORTCUT: web.AppKey[shortcut.ShortcutFor] = web.AppKey("shortcut")


def create_app(
    *,
    verifier: Verifier,
    directory: Directory,
    cache: CredentialCache,
    hosts: Callable[[], frozenset[str]],
) -> web.Application:
    """The credentials app. `hosts` is read per request: ports bound as 0 are known only after start.

    Two handlers and no middleware: `credentials` does the whole request (the Host
    check, the answer or the error, counting it), and
    `elsewhere` answers every other path and method with the same JSON errors. A
    middleware chain would cost every cached answer a few coroutine frames more.
    `app[SHORTCUT]`, given the listener's limits, answers the cached case straight from a
    request head (declining what aiohttp's parser, under those limits, would refuse)."""
    trail = audit.IssuanceTrail(max_tokens=VERIFIED_TOKENS_MAX)
    count = metrics.REQUESTS.count
    verified_before = verifier.verified_before
    count_cached_verification = metrics.token_verification("cached").inc
    role_now, hit = directory.role_now, cache.hit
    ok_head = shortcut.OkHead()
    line = shortcut.request_line(CREDENTIALS_PATH)

    def cached_answer_for(limits: ConnectionLimits) -> shortcut.Shortcut:
        max_headers, max_field_bytes = limits.max_headers, limits.max_field_bytes

        def cached_answer(head: bytes) -> bytes | None:
            fields = shortcut.plain_get(head, line, max_headers=max_headers, max_field_bytes=max_field_bytes)
            return None if fields is None else answer_at_once(*fields)

        return cached_answer

    def answer_at_once(host: str, authorization: str) -> bytes | None:
        """`credentials` for a plain request that needs no wait, as response bytes; None
        for anything else. Declining has no effect: the full way does it all again."""
        started = time.perf_counter()
        if not host_allowed(host, hosts()):
            return None
        token = bare_token(authorization)
        if len(token) > MAX_TOKEN_CHARS:
            return None
        verified = verified_before(token)
        if verified is None:
            return None
        identity = verified.identity
        role_arn = role_now(identity)
        if role_arn is None:
            return None
        issued = hit(CacheKey.of(role_arn, identity), verified)
        if issued is None:
            return None
        body = issued.container_json()
        answer = ok_head(len(body)) + body
        # Answered: counted and audited last, so that nothing is counted twice should a
        # step above fail and the full way answer instead.
        count_cached_verification()
        trail.answered(verified, role_arn, issued, "hit")
        count(200, "hit", time.perf_counter() - started)
        return answer

    async def credentials(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        identity: Identity | None = None
        role_arn: str | None = None
        try:
            check_host(request, hosts())
            token = request.headers.get(hdrs.AUTHORIZATION)
            if not token:
                raise TokenError(
                    "the Authorization header is missing; it must hold the token from "
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                    code="missing_token",
                )
            if not token.isascii():  # aiohttp keeps bytes that are not UTF-8 as surrogates
                raise RequestError("the Authorization header holds bytes that are not ASCII; a token is base64url "
                                   "text", code="bad_header")
            token = bare_token(token)
            if len(token) > MAX_TOKEN_CHARS:
                raise TokenError(f"the token is {len(token)} characters; STS accepts at most {MAX_TOKEN_CHARS}",
                                 code="token_too_long")
            verified = await verifier.verify(token)  # a token verified before: at once, counted "cached"
            identity = verified.identity
            role_arn = await directory.role_for(identity)
            issued, outcome = await cache.get(CacheKey.of(role_arn, identity), verified)
            kind = outcome.value
            trail.answered(verified, role_arn, issued, kind)
            # Bytes encoded once per credentials; no charset: the Go SDK wants exactly this type.
            response = web.Response(body=issued.container_json(), content_type="application/json")
        except DaemonError as exc:
            kind = _outcome_of(exc)
            headers = {"Retry-After": str(exc.retry_after_seconds)} if isinstance(exc, OverloadedError) else None
            response = error_response(exc.status, exc.code, exc.message + _doctor_hint(identity, role_arn, exc),
                                      headers=headers)
            log_failure(request, exc)
        except asyncio.CancelledError:
            # The client went away while held (botocore gives up after 2 s): nothing to answer.
            count(499, "abandoned", time.perf_counter() - started)
            raise
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            kind = "error"
            response = error_response(500, "internal_error", "internal error; see the daemon's log")
        count(response.status, kind, time.perf_counter() - started)
        return response

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        """Any other path (404) or method (405): the JSON error every SDK parses."""
        started = time.perf_counter()
        try:
            check_host(request, hosts())
            if request.path == CREDENTIALS_PATH:
                status, reason, headers = 405, "Method Not Allowed", {"Allow": "GET,HEAD"}
            else:
                status, reason, headers = 404, "Not Found", None
            response = error_response(status, reason.lower().replace(" ", "_"),
                                      f"{request.method} {request.path}: {reason}", headers=headers)
        except DaemonError as exc:
            response = error_response(exc.status, exc.code, exc.message)
            log_failure(request, exc)
        count(response.status, "error", time.perf_counter() - started)
        return response

    app = web.Application()
    app.router.add_get(CREDENTIALS_PATH, credentials)  # and HEAD
    app.router.add_route("*", "/{path:.*}", elsewhere)  # other methods on CREDENTIALS_PATH too
    app[SHORTCUT] = cached_answer_for
    return app


def _doctor_hint(identity: Identity | None, role_arn: str | None, error: DaemonError) -> str:
    """Who asked and which role they got, for the doctor command that reproduces a refusal."""
    if identity is None or error.code not in DOCTOR_CODES or not identity.namespace:
        return ""
    command = doctor.command_for(namespace=identity.namespace, service_account=identity.service_account,
                                 pod=identity.pod_name, role_arn=role_arn, audience=identity.audience)
    return f". To find the broken link: {command}"


def host_allowed(host: str, hosts: frozenset[str]) -> bool:
    return host in hosts or host.lower() in hosts  # SDKs send it lower case: lower() only if not


def bare_token(authorization: str) -> str:
    """The token an Authorization header holds (the SDKs send it bare; a Bearer prefix is taken too)."""
    return authorization.removeprefix("Bearer ").strip()


def check_host(request: web.Request, hosts: frozenset[str]) -> None:
    """The Host header, and the authority of an absolute-form request target
    (`GET http://host/v1/credentials`), must name one of our listen addresses."""
    host = request.headers.get(hdrs.HOST, "")
    if not host_allowed(host, hosts):
        raise WrongHostError(f"Host {host.lower()!r} is not an address this daemon listens on")
    target = request.raw_path
    if not target.startswith("/"):
        authority = target.partition("://")[2].partition("/")[0].lower()
        if not target.lower().startswith("http://") or authority not in hosts:
            raise WrongHostError(f"the request names {authority or target[:60]!r}, not an address this daemon "
                                 "listens on")


def log_failure(request: web.Request, error: DaemonError) -> None:
    """A refused request, at a bounded rate: any pod can send bad tokens all day."""
    extra = {"status": error.status, "code": error.code, "path": request.path}
    if isinstance(error, StsError):
        extra["sts_code"] = error.sts_code
    level = logging.WARNING if error.status >= 500 or isinstance(error, (StsError, RequestError)) else logging.INFO
    refusal_log.log(level, "request refused: %s", error.message, extra=extra)


def create_metrics_app(*, not_ready: Callable[[], list[str]]) -> web.Application:
    """/metrics, /healthz (the process answers) and /readyz (200, or 503 naming every
    reason it is not ready: keys not loaded, an informer cut off, draining)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        reasons = not_ready()
        if reasons:
            return web.Response(status=503, text="not ready: " + "; ".join(reasons) + "\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
