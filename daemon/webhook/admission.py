"""One AdmissionReview v1 in, one out: the webhook's whole job for one pod.

The answer always admits the pod (`allowed: true`): this webhook only mutates, and a
pod it cannot judge is better created as it is than refused. When the pod changes,
the answer carries the change as a JSONPatch computed by `patch.difference` from
`mutation.mutate`'s result. A pod left alone because something failed (the API server
could not be asked about its ServiceAccount) gets a warning, which `kubectl` prints.

`review()` is I/O-free apart from the ServiceAccount source it is given (a Protocol:
the API server in production, anything in tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.webhook import mutation, patch
from daemon.webhook.accounts import ServiceAccountUnavailableError
from daemon.webhook.mutation import Outcome

log = logging.getLogger(__name__)

Obj = dict[str, Any]

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
WARNING_PREFIX = "irsa-cache"


class AccountSource(Protocol):
    async def get(self, namespace: str, name: str) -> Obj | None: ...


class BadReviewError(ValueError):
    """The body is not an AdmissionReview v1 request; the message says what is wrong."""


@dataclass(frozen=True, kw_only=True)
class Request:
    uid: str
    namespace: str
    pod: Obj
    is_pod_creation: bool


@dataclass(frozen=True, kw_only=True)
class Answer:
    review: Obj  # the AdmissionReview to send back
    outcome: Outcome
    reason: str
    patch: list[Obj] | None = None


def parse_review(body: Any) -> Request:
    if not isinstance(body, Mapping):
        raise BadReviewError("the body is not a JSON object")
    if body.get("apiVersion") != API_VERSION or body.get("kind") != KIND:
        raise BadReviewError(
            f"expected {KIND} {API_VERSION}, got {body.get('kind')!r} {body.get('apiVersion')!r} "
            "(the MutatingWebhookConfiguration must list admissionReviewVersions [v1])")
    request = body.get("request")
    if not isinstance(request, Mapping):
        raise BadReviewError("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReviewError("the AdmissionReview request has no uid")
    pod = request.get("object")
    if not isinstance(pod, Mapping):
        raise BadReviewError("the AdmissionReview request has no object")
    kind = request.get("kind") or {}
    is_pod_creation = (
        request.get("operation") == "CREATE" and kind.get("group", "") == "" and kind.get("kind") == "Pod"
        and not request.get("subResource"))
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or ""
    return Request(uid=uid, namespace=str(namespace), pod=dict(pod), is_pod_creation=is_pod_creation)


def answer(request: Request, *, outcome: Outcome, reason: str, before: Obj | None = None,
           after: Obj | None = None, warning: str | None = None) -> Answer:
    response: Obj = {"uid": request.uid, "allowed": True}
    operations = patch.json_patch(patch.difference(before, after)) if before is not None and after is not None else []
    if operations:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(operations, separators=(",", ":")).encode()).decode()
    if warning:
        response["warnings"] = [f"{WARNING_PREFIX}: {warning}"]
    return Answer(review={"apiVersion": API_VERSION, "kind": KIND, "response": response},
                  outcome=outcome, reason=reason, patch=operations or None)


class Reviewer:
    """Decides for one AdmissionReview: skip cheaply, else read the ServiceAccount, then mutate."""

    def __init__(self, *, accounts: AccountSource, settings: mutation.InjectionSettings, deadline_seconds: float) -> None:
        self._accounts = accounts
        self._settings = settings
        self._deadline = deadline_seconds

    async def review(self, body: Any) -> Answer:
        """Raises BadReviewError for a body that is no AdmissionReview v1 request."""
        request = parse_review(body)
        if not request.is_pod_creation:
            return answer(request, outcome=Outcome.UNCHANGED, reason="not a pod creation")
        settings = self._settings
        skipped = mutation.skip_reason(request.pod, namespace=request.namespace, settings=settings)
        if skipped is not None:  # no ServiceAccount read for a pod that is skipped anyway
            return answer(request, outcome=skipped[0], reason=skipped[1])
        account_name = mutation.service_account_of(request.pod)
        try:
            async with asyncio.timeout(self._deadline):
                account = await self._accounts.get(request.namespace, account_name)
        except (ServiceAccountUnavailableError, TimeoutError) as exc:
            why = str(exc) or f"reading ServiceAccount {request.namespace}/{account_name} took over {self._deadline:g} s"
            return answer(request, outcome=Outcome.ERROR, reason=why,
                          warning=f"the pod was created without irsa-cache credentials: {why}")
        role_arn, why = mutation.role_arn_of(account, settings)
        if account is None:
            why = f"ServiceAccount {request.namespace}/{account_name} does not exist"
        result = mutation.mutate(request.pod, namespace=request.namespace, role_arn=role_arn, settings=settings,
                                 no_role_reason=why)
        return answer(request, outcome=result.outcome, reason=result.reason, before=request.pod, after=result.pod)
