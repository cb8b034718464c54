"""What the server asks of a directory, whatever backs it.

A directory answers two questions: which issuer and keys to trust (`Trust`), and
which role a verified identity may use (`Directory.role_for`). The role comes from
the directory, never from the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from collections.abc import Callable

from daemon.models import CacheKey, Identity
from daemon.tokens import KeySource

DEFAULT_AUDIENCE = "sts.amazonaws.com"


@dataclass(frozen=True, kw_only=True)
class Trust:
    """The token issuer to trust, the audience to require, and where its keys are."""

    issuer: str | None  # None: discovered from the key source's cluster (Kubernetes)
    audience: str
    key_source: KeySource


class Directory(Protocol):
    @property
    def ready(self) -> bool:
        """True once the directory can answer."""
        ...

    @property
    def not_ready_reason(self) -> str | None:
        """Why it cannot answer (for /readyz), or None."""
        ...

    async def role_for(self, identity: Identity) -> str:
        """The role ARN for this identity; raises IdentityNotAllowedError naming why not."""
        ...

    def role_now(self, identity: Identity) -> str | None:
        """The role `role_for` would return, when that needs no wait (everything it checks
        is at hand), without a coroutine: the hot path. None: call `role_for`, which also
        names the refusal."""
        ...

    def in_use(self, key: CacheKey) -> bool:
        """Whether the identity still has a caller here, so its credentials are worth refreshing."""
        ...

    async def run(self) -> None:
        """Keep the directory current until cancelled."""
        ...


RoleChanged = Callable[[str], None]
"""Told the subject whose role changed or went away; the cache drops its entries."""
