"""A directory from a YAML file: for standalone hosts, any OIDC issuer, and the demo.

    issuer: https://oidc.example.test/id/EXAMPLE
    audience: sts.amazonaws.com        # default
    jwks_file: jwks.json               # relative to this file; or jwks_url: https://...
    identities:
      - subject: system:serviceaccount:my-app:default
        role_arn: arn:aws:iam::123456789012:role/MyAppS3ReadOnlyRole
      - subject: "system:serviceaccount:batch:*"   # * matches any run of characters

An exact subject wins over a pattern; among patterns, the first in the file wins.
"""

from __future__ import annotations

import asyncio
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.directory.base import DEFAULT_AUDIENCE, Trust
from daemon.errors import ConfigError, IdentityNotAllowedError
from daemon.models import CacheKey, Identity
from daemon.tokens import FileKeySource, UrlKeySource

ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}", re.ASCII)


@dataclass(frozen=True)
class Rule:
    subject: str
    role_arn: str
    # A pattern's regex, built once: matches() runs on every request the exact map misses.
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = None
        if self.is_pattern:
            regex = re.compile(".*".join(re.escape(part) for part in self.subject.split("*")), re.DOTALL)
        object.__setattr__(self, "_regex", regex)

    @property
    def is_pattern(self) -> bool:
        return "*" in self.subject

    def matches(self, subject: str) -> bool:
        if self._regex is None:
            return subject == self.subject
        return self._regex.fullmatch(subject) is not None


class StaticDirectory:
    def __init__(self, rules: list[Rule], *, source: str) -> None:
        self._exact = {rule.subject: rule.role_arn for rule in rules if not rule.is_pattern}
        self._patterns = [rule for rule in rules if rule.is_pattern]
        self._source = source

    @property
    def ready(self) -> bool:
        return True

    @property
    def not_ready_reason(self) -> str | None:
        return None

    def in_use(self, key: CacheKey) -> bool:
        return True  # the file knows no pods: requests alone keep an entry alive (idle eviction)

    async def run(self) -> None:
        await asyncio.Event().wait()  # a file does not change under us; nothing to watch

    def role_now(self, identity: Identity) -> str | None:
        role = self._exact.get(identity.subject)
        if role is not None:
            return role
        for rule in self._patterns:
            if rule.matches(identity.subject):
                return rule.role_arn
        return None

    async def role_for(self, identity: Identity) -> str:
        role = self.role_now(identity)
        if role is not None:
            return role
        raise IdentityNotAllowedError(
            f"no role is mapped to subject {identity.subject!r} in {self._source}", code="no_role"
        )


TOP_LEVEL_KEYS = ("issuer", "audience", "jwks_file", "jwks_url", "identities")
IDENTITY_KEYS = ("subject", "role_arn")
_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _malformed_subject(subject: str) -> str | None:
    """Why `subject` cannot be a token's `sub` (or a pattern of them), or None."""
    if subject != subject.strip() or any(not ch.isprintable() or ch.isspace() for ch in subject):
        return "holds spaces or control characters, which no token's `sub` has"
    rest = subject.removeprefix(_SERVICE_ACCOUNT_PREFIX)
    if rest != subject and "*" not in rest:  # a pattern may span the parts: system:serviceaccount:*
        parts = rest.split(":")
        if len(parts) != 2 or not all(parts):
            return "is not system:serviceaccount:<namespace>:<name>"
    return None


def load_static_config(path: Path) -> tuple[Trust, StaticDirectory]:
    """Read and validate the file; every problem is reported, each on a line naming its field."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError([f"static config {path}: cannot be read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError([f"static config {path}: not valid YAML{where}: {problem}"]) from None
    problems: list[str] = []

    def problem(where: str, what: str) -> None:
        problems.append(f"static config {path}: {where}: {what}")

    if not isinstance(document, dict):
        raise ConfigError([f"static config {path}: must be a mapping with issuer, jwks_file or jwks_url, identities"])
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            problem(str(key), f"unknown key{_did_you_mean(str(key), TOP_LEVEL_KEYS)}")
    issuer = document.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        problem("issuer", "required, the `iss` your tokens carry")
    elif not re.fullmatch(r"https://[^/\s?#]+(/[^\s?#]*)?", issuer):
        problem("issuer", f"{issuer!r} is not an https:// URL (an OIDC issuer is one, exactly as in the tokens' `iss`)")
    audience = document.get("audience", DEFAULT_AUDIENCE)
    if not isinstance(audience, str) or not audience:
        problem("audience", "must be a non-empty string")

    jwks_file, jwks_url = document.get("jwks_file"), document.get("jwks_url")
    key_source: Any = None
    if (jwks_file is None) == (jwks_url is None):
        problem("jwks_file/jwks_url", "exactly one is required")
    elif jwks_file is not None:
        key_path = (path.parent / str(jwks_file)).resolve()
        if not key_path.is_file():
            problem("jwks_file", f"{key_path} is not a readable file")
        key_source = FileKeySource(key_path)
    else:
        if not re.match(r"https?://", str(jwks_url)):
            problem("jwks_url", f"{jwks_url!r} is not an http(s) URL")
        key_source = UrlKeySource(str(jwks_url))

    rules: list[Rule] = []
    first_seen: dict[str, int] = {}
    identities = document.get("identities")
    if not isinstance(identities, list) or not identities:
        problem("identities", "required, a list of {subject, role_arn}")
        identities = []
    for index, item in enumerate(identities):
        where = f"identities[{index}]"
        if not isinstance(item, dict):
            problem(where, "must be a mapping with subject and role_arn")
            continue
        for key in item:
            if key not in IDENTITY_KEYS:
                problem(f"{where}.{key}", f"unknown key{_did_you_mean(str(key), IDENTITY_KEYS)}")
        subject, role_arn = item.get("subject"), item.get("role_arn")
        if not isinstance(subject, str) or not subject:
            problem(f"{where}.subject", "required")
        elif (reason := _malformed_subject(subject)) is not None:
            problem(f"{where}.subject", f"{subject!r} {reason}")
            subject = None
        if not isinstance(role_arn, str) or not ROLE_ARN.fullmatch(role_arn):
            problem(f"{where}.role_arn", f"{role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
        if isinstance(subject, str) and subject in first_seen:
            problem(f"{where}.subject", f"{subject!r} is already mapped at identities[{first_seen[subject]}]")
        elif isinstance(subject, str) and isinstance(role_arn, str):
            first_seen[subject] = index
            rules.append(Rule(subject, role_arn))

    if problems:
        raise ConfigError(problems)
    trust = Trust(issuer=issuer, audience=audience, key_source=key_source)
    return trust, StaticDirectory(rules, source=f"static config {path}")
