"""The audit trail: one log line per issuance of credentials to a pod.

CloudTrail sees only the session a node shares among the pods of an identity, so the
daemon's log is what ties an AWS call back to a pod. An issuance is a pod token (by
its fingerprint) given a set of credentials (by access key id) for the first time:
that writes one line, on logger `irsa_cache.audit`, with the namespace, service
account, pod, subject, role, outcome, access key id and the token's fingerprint.

An SDK fetches again and again (botocore on every client it builds, and whenever
its credentials near expiry); the answers that repeat what that token already holds
are counted (`irsa_cache_repeat_answers_total`), not logged line by line: the line
would say nothing new, and writing it was the largest single cost of a cached
answer. New credentials after a refresh are a new issuance, and so is a new token
(the kubelet rotates it): each gets its line.

What was issued is remembered per fingerprint, at most `max_tokens` of them (the
verification cache's bound); past it the oldest quarter is forgotten. A forgotten
token that asks again gets a line again: never fewer lines than issuances.
"""

from __future__ import annotations

import logging

from daemon import metrics
from daemon.bounded import make_room
from daemon.models import Credentials, VerifiedToken

audit = logging.getLogger("irsa_cache.audit")


class IssuanceTrail:
    """Writes the audit line of each issuance; counts the answers that repeat one."""

    def __init__(self, *, max_tokens: int) -> None:
        self._max_tokens = max_tokens
        # token fingerprint -> access key id last issued to it. Both strings are shared
        # with the verification cache and the credentials: an entry costs its slot only.
        self._issued: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._issued)

    def answered(self, verified: VerifiedToken, role_arn: str, credentials: Credentials, outcome: str) -> bool:
        """Record that `verified` was answered `credentials`; True if that was an issuance
        (and its line was written)."""
        fingerprint = verified.fingerprint
        if self._issued.get(fingerprint) == credentials.access_key_id:
            metrics.REPEAT_ANSWERS.inc()
            return False
        if fingerprint not in self._issued:
            make_room(self._issued, self._max_tokens)
        self._issued[fingerprint] = credentials.access_key_id
        metrics.ISSUANCES.inc()
        identity = verified.identity
        audit.info(
            "credentials issued",
            extra={
                "namespace": identity.namespace,
                "service_account": identity.service_account,
                "pod": identity.pod_name,
                "subject": identity.subject,
                "role_arn": role_arn,
                "outcome": outcome,
                "access_key_id": credentials.access_key_id,
                "token_fingerprint": fingerprint,
            },
        )
        return True
