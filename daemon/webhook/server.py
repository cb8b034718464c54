"""HTTP for the webhook: `POST /mutate` (over TLS), and the metrics listener.

    POST /mutate   AdmissionReview v1 -> AdmissionReview v1 (always allowed; a JSONPatch when the pod changes)
    GET /metrics   Prometheus (the webhook's own registry)
    GET /healthz   the process answers
    GET /readyz    200 while a valid certificate is served and the process is not draining

Every answer to /mutate is counted by outcome and timed here, and logged as one line
(namespace, pod, ServiceAccount, outcome, reason). A body that is not an
AdmissionReview v1 request gets 400 with the reason: the API server then applies the
configuration's failurePolicy, as for any failed call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from daemon.webhook import metrics, mutation
from daemon.webhook.admission import Answer, BadReviewError, Reviewer
from daemon.webhook.mutation import Outcome
from daemon.webhook.settings import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

MUTATE_PATH = "/mutate"


def create_app(*, reviewer: Reviewer) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            try:
                body = await request.json()
            except ValueError as exc:
                raise BadReviewError(f"the body is not JSON ({exc})") from exc
            result = await reviewer.review(body)
        except BadReviewError as exc:
            metrics.MUTATIONS.labels(outcome=Outcome.ERROR.value).inc()
            log.warning("not an AdmissionReview v1 request: %s", exc)
            return web.json_response({"code": "bad_request", "message": str(exc)}, status=400)
        except web.HTTPException:  # aiohttp's own: a body over the size limit (413)
            metrics.MUTATIONS.labels(outcome=Outcome.ERROR.value).inc()
            raise
        except Exception:  # a bug: counted and logged; the API server applies failurePolicy
            metrics.MUTATIONS.labels(outcome=Outcome.ERROR.value).inc()
            log.exception("unhandled error answering an AdmissionReview")
            return web.json_response({"code": "internal_error", "message": "see the webhook's log"}, status=500)
        finally:
            metrics.REQUEST_DURATION.observe(time.perf_counter() - started)
        metrics.MUTATIONS.labels(outcome=result.outcome.value).inc()
        _log_answer(body, result)
        return web.json_response(result.review)

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_post(MUTATE_PATH, mutate)
    return app


def _log_answer(body: Any, result: Answer) -> None:
    request = body.get("request") or {}
    pod = request.get("object") or {}
    metadata = pod.get("metadata") or {}
    level = logging.WARNING if result.outcome is Outcome.ERROR else logging.INFO
    log.log(level, "pod %s: %s", result.outcome.value, result.reason, extra={
        "namespace": request.get("namespace"),
        "pod": metadata.get("name") or metadata.get("generateName"),
        "service_account": mutation.service_account_of(pod),
        "outcome": result.outcome.value,
        "dry_run": bool(request.get("dryRun")),
    })


def create_metrics_app(*, ready: Callable[[], bool]) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        is_ready = ready()
        return web.Response(status=200 if is_ready else 503, text="ready\n" if is_ready else "not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.REGISTRY))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
