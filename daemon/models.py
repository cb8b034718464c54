"""Values that flow from the request to STS and back, and the seams between parts.

A leaf module: it imports nothing from the package, so every other module can
depend on it. Values are frozen and check themselves when built; secrets are
kept out of every repr. They have slots, no `__dict__`: each cached identity
holds several of them.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple, Protocol


def fingerprint(token: str) -> str:
    """A short SHA-256 fingerprint of a token: safe for logs, useless to an attacker."""
    return digest_fingerprint(hashlib.sha256(token.encode()).digest())


def digest_fingerprint(digest: bytes) -> str:
    """`fingerprint` of a token whose SHA-256 digest is at hand already."""
    return digest[:6].hex()


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    """Who a verified token says the caller is."""

    issuer: str
    subject: str
    audience: str
    namespace: str | None = None
    service_account: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedToken:
    """A token whose signature and claims checked out, with what it proves."""

    identity: Identity
    raw: str = field(repr=False)
    expires_at: float  # epoch seconds, from the `exp` claim
    fingerprint: str


class CacheKey(NamedTuple):
    """What an entry of the cache is for.

    Never the role alone: two identities may map to one role and only STS knows
    whether the trust policy admits both. Never the raw token: that defeats sharing.

    A named tuple, not a dataclass: every request builds one and looks it up, and a
    tuple is built, hashed and compared in C (a dataclass does each in Python).
    """

    role_arn: str
    issuer: str
    subject: str
    audience: str

    @classmethod
    def of(cls, role_arn: str, identity: Identity) -> CacheKey:
        return cls(role_arn, identity.issuer, identity.subject, identity.audience)


@dataclass(frozen=True, kw_only=True, slots=True)
class Credentials:
    """Temporary AWS credentials as STS issued them."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    account_id: str
    assumed_role_arn: str
    _container_json: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _served: bool = field(default=False, init=False, repr=False, compare=False)
    # `expiration` in epoch seconds, once: every cache hit asks how much time is left.
    _expires_at: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.expiration.tzinfo is None:
            raise ValueError("Credentials.expiration must carry a time zone")
        object.__setattr__(self, "_expires_at", self.expiration.timestamp())
        # One string per account, not one per cached identity.
        object.__setattr__(self, "account_id", sys.intern(self.account_id))

    @property
    def expires_at(self) -> float:
        return self._expires_at

    def remaining(self, now: float) -> float:
        return self._expires_at - now

    def to_container_response(self) -> dict[str, str]:
        """The body every SDK's container provider parses."""
        return {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            # The JS SDK rejects "+00:00" and zone-less times: always "...Z".
            "Expiration": self.expiration.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "AccountId": self.account_id,
        }

    def container_json(self) -> bytes:
        """`to_container_response()` as JSON bytes, kept from the second use on: every
        further cache hit answers these very bytes. Credentials served once (an identity
        with one pod fetches about once per lifetime) do not carry a copy of the body."""
        body = self._container_json
        if body is None:
            body = json.dumps(self.to_container_response()).encode()
            # Frozen: these two are a cache, not a change of value.
            if self._served:
                object.__setattr__(self, "_container_json", body)
            else:
                object.__setattr__(self, "_served", True)
        return body


class Clock(Protocol):
    """Wall-clock time in epoch seconds; injected so tests can move it."""

    def __call__(self) -> float: ...


system_clock: Clock = time.time


class CredentialSource(Protocol):
    """Exchanges a web-identity token for credentials: STS in production, fakes in tests."""

    async def assume_role(self, *, role_arn: str, token: VerifiedToken) -> Credentials: ...


class Priority(enum.IntEnum):
    CALLER = 0  # a pod is waiting for this exchange
    REFRESH = 1  # ahead of expiry; nobody waits yet


@dataclass(eq=False)
class Ticket:
    """An exchange's place in the STS budget's queue; its priority rises when a caller joins."""

    priority: Priority
    seq: int = 0
    granted: asyncio.Future[None] | None = field(default=None, repr=False)
    attempts: int = 0  # STS calls made for this exchange so far
    last_error: str | None = None  # what STS answered to the last of them, in a few words

    @property
    def queued(self) -> bool:
        return self.granted is None or not self.granted.done()


class ExchangeSource(Protocol):
    """What the cache calls: STS behind the node's budget (`limiter.BudgetedSource`)."""

    async def assume_role(self, *, role_arn: str, token: VerifiedToken, reason: str, ticket: Ticket) -> Credentials: ...

    def promote(self, ticket: Ticket) -> None: ...
