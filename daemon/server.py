"""HTTP: the credentials endpoint, and the one place that maps failures to answers.

    GET /v1/credentials   Authorization: <raw projected token>
      -> Host check -> tokens.verify -> directory.role_for -> cache.get -> 200 JSON

Every failure, ours or aiohttp's 404/405, leaves through `error_middleware` as the
JSON body every SDK parses, and is counted there. The metrics
listener is a separate app: /metrics, /healthz, /readyz.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from daemon import doctor, metrics
from daemon.logs import RateLimited
from daemon.cache import CredentialCache
from daemon.config import MAX_TOKEN_CHARS, Address
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
from daemon.models import CacheKey, VerifiedToken

log = logging.getLogger(__name__)
refusal_log = RateLimited(log)
audit = logging.getLogger("irsa_cache.audit")

CREDENTIALS_PATH = "/v1/credentials"
OUTCOME = web.RequestKey("outcome", str)  # set by the handler, counted by the middleware
# Who asked and which role they got, for the doctor command that reproduces a refusal.
CALLER = web.RequestKey("caller", tuple)
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


def json_response(
    payload: dict[str, str] | bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # Bytes, not text: the Content-Type stays exactly "application/json" (no charset),
    # which is what the Go SDK checks before it parses an error body.
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error_body(code, message), status=status, headers=headers)


def _outcome_of(error: DaemonError) -> str:
    if isinstance(error, OverloadedError):
        return "overloaded"
    return "denied" if isinstance(error, (TokenError, IdentityNotAllowedError)) or error.status == 403 else "error"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    *,
    verifier: Verifier,
    directory: Directory,
    cache: CredentialCache,
    hosts: Callable[[], frozenset[str]],
) -> web.Application:
    """The credentials app. `hosts` is read per request: ports bound as 0 are known only after start."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = "error"
        connection = request.protocol
        connection.busy += 1  # type: ignore[attr-defined]  # a BoundedHandler: not evicted while answering
        try:
            check_host(request, hosts())
            response = await handler(request)
            outcome = request.get(OUTCOME, "error")
        except DaemonError as exc:
            outcome = _outcome_of(exc)
            headers = {"Retry-After": str(exc.retry_after_seconds)} if isinstance(exc, OverloadedError) else None
            response = error_response(exc.status, exc.code, exc.message + _doctor_hint(request, exc), headers=headers)
            log_failure(request, exc)
        except web.HTTPException as exc:  # aiohttp's own 404 and 405 (which carries Allow)
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            code = exc.reason.lower().replace(" ", "_")
            response = error_response(exc.status, code, f"{request.method} {request.path}: {exc.reason}", headers=allow)
        except asyncio.CancelledError:
            # The client went away while held (botocore gives up after 2 s): nothing to answer.
            requests, duration = metrics.request_series(499, "abandoned")
            requests.inc()
            duration.observe(time.perf_counter() - started)
            raise
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            response = error_response(500, "internal_error", "internal error; see the daemon's log")
        finally:
            connection.busy -= 1  # type: ignore[attr-defined]
        requests, duration = metrics.request_series(response.status, outcome)
        requests.inc()
        duration.observe(time.perf_counter() - started)
        return response

    async def get_credentials(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization")
        if not token:
            raise TokenError(
                "the Authorization header is missing; it must hold the token from AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                code="missing_token",
            )
        if not token.isascii():  # aiohttp keeps bytes that are not UTF-8 as surrogates
            raise RequestError("the Authorization header holds bytes that are not ASCII; a token is base64url text",
                               code="bad_header")
        token = token.removeprefix("Bearer ").strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(f"the token is {len(token)} characters; STS accepts at most {MAX_TOKEN_CHARS}", code="token_too_long")
        verified = await verifier.verify(token)
        request[CALLER] = (verified.identity, None)
        role_arn = await directory.role_for(verified.identity)
        request[CALLER] = (verified.identity, role_arn)
        credentials, outcome = await cache.get(CacheKey.of(role_arn, verified.identity), verified)
        request[OUTCOME] = outcome.value
        audit.info(
            "credentials issued",
            extra={
                "namespace": verified.identity.namespace,
                "service_account": verified.identity.service_account,
                "pod": verified.identity.pod_name,
                "subject": verified.identity.subject,
                "role_arn": role_arn,
                "outcome": outcome.value,
                "access_key_id": credentials.access_key_id,
                "token_fingerprint": verified.fingerprint,
            },
        )
        return json_response(credentials.container_json())  # encoded once per credentials

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get(CREDENTIALS_PATH, get_credentials)
    return app


def _doctor_hint(request: web.Request, error: DaemonError) -> str:
    caller = request.get(CALLER)
    if caller is None or error.code not in DOCTOR_CODES:
        return ""
    identity, role_arn = caller
    if not identity.namespace:
        return ""
    command = doctor.command_for(namespace=identity.namespace, service_account=identity.service_account,
                                 pod=identity.pod_name, role_arn=role_arn, audience=identity.audience)
    return f". To find the broken link: {command}"


def check_host(request: web.Request, hosts: frozenset[str]) -> None:
    """The Host header, and the authority of an absolute-form request target
    (`GET http://host/v1/credentials`), must name one of our listen addresses."""
    host = request.headers.get("Host", "").lower()
    if host not in hosts:
        raise WrongHostError(f"Host {host!r} is not an address this daemon listens on")
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

    @web.middleware
    async def busy(request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = request.protocol
        connection.busy += 1  # type: ignore[attr-defined]
        try:
            return await handler(request)
        finally:
            connection.busy -= 1  # type: ignore[attr-defined]

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        reasons = not_ready()
        metrics.DIRECTORY_READY.set(0 if reasons else 1)
        if reasons:
            return web.Response(status=503, text="not ready: " + "; ".join(reasons) + "\n")
        return web.Response(text="ready\n")

    app = web.Application(middlewares=[busy])
    app.router.add_get("/metrics", make_aiohttp_handler())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
