"""Doctor's values: the links of the chain, a check, and what a check found.

A leaf of the doctor package. A check is data (id, link, what it catches, a pure
function of the gathered facts), so the list of checks is both what runs and what
the README documents.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.doctor.facts import Facts


class Link(enum.Enum):
    """The systems an IRSA exchange crosses, in the order doctor walks them."""

    TOKEN = "token"  # the projected service-account token and its issuer's key set
    PROVIDER = "provider"  # the OIDC provider registered in IAM for that issuer
    TRUST_POLICY = "trust-policy"  # the role and its trust policy
    SERVICE_ACCOUNT = "service-account"  # the ServiceAccount and its role annotation
    POD = "pod"  # the pod's environment and projected token volume
    STS = "sts"  # AssumeRoleWithWebIdentity itself (only with --live)


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"  # works, but fragile or broader than it should be
    FAIL = "fail"  # this link is broken
    SKIP = "skip"  # not checked: its input was not given (or an earlier link is broken)

    @property
    def mark(self) -> str:
        return {"pass": "✓", "warn": "!", "fail": "✗", "skip": "-"}[self.value]


class InputError(Exception):
    """An input doctor was asked to read cannot be read at all: exit status 2, one line."""


@dataclass(frozen=True, kw_only=True)
class Finding:
    """What one check found; `fix` is required for a warning or a failure."""

    status: Status
    message: str
    fix: str | None = None
    points_at: Link | None = None  # the link an STS answer blames, when not the check's own

    def __post_init__(self) -> None:
        if self.status in (Status.WARN, Status.FAIL) and not self.fix:
            raise ValueError(f"a {self.status.value} needs a fix: {self.message}")


def passed(message: str) -> Finding:
    return Finding(status=Status.PASS, message=message)


def warned(message: str, fix: str) -> Finding:
    return Finding(status=Status.WARN, message=message, fix=fix)


def failed(message: str, fix: str) -> Finding:
    return Finding(status=Status.FAIL, message=message, fix=fix)


def skipped(message: str) -> Finding:
    return Finding(status=Status.SKIP, message=message)


@dataclass(frozen=True, kw_only=True)
class Read:
    """A live read (--live): what it gave, None when it failed, and the finding that reports it."""

    value: Any
    finding: Finding


@dataclass(frozen=True, kw_only=True)
class Check:
    """One check: a stable id users script against, its link, and what it catches."""

    id: str
    link: Link
    catches: str  # for the README's list and `--list-checks`
    run: Callable[[Facts], Finding]
    live_only: bool = False  # listed only with --live (a fetch of a live input)


@dataclass(frozen=True, kw_only=True)
class Result:
    """A check's finding, ready to print."""

    id: str
    link: Link
    status: Status
    message: str
    fix: str | None

    def to_json(self) -> dict[str, str | None]:
        return {"id": self.id, "link": self.link.value, "status": self.status.value,
                "message": self.message, "fix": self.fix}
