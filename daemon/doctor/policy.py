"""IAM policy evaluation, as IAM does it, for one request: pure, no AWS call.

Doctor uses it to say which statement and which condition of a role's trust policy
admits or rejects a web identity. The rules, as IAM's documentation states them
("IAM JSON policy elements: Condition operators", "Conditions with multiple context
keys or values", "Multivalued context keys"):

- A statement applies when its principal, its action and every condition match.
  An explicit Deny that applies wins over any Allow; nothing applying is an implicit
  deny.
- Several operators in a `Condition` block AND together; several keys under one
  operator AND; several values for one key OR, except for a negated operator
  (`StringNotEquals`, `StringNotLike`, `ArnNotLike`, ...), whose values NOR.
- A key absent from the request makes a condition false, except for a negated
  operator (true), `...IfExists` (true) and `Null`.
- `ForAnyValue:` is true when some value of the request matches (false when the key
  is absent or empty); `ForAllValues:` when every value of the request matches (true
  when the key is absent or empty). With a negated operator, "matches" means
  "matches none of the policy's values". `IfExists` changes nothing under either.
- Key names are case-insensitive; `StringEquals` compares exactly (a `*` is a star),
  `StringLike` takes `*` (any run) and `?` (one character); actions compare without
  case and take the same wildcards.

Doctor does not know every key of a real request (the caller's IP address, say).
Such keys are "unknown", and a condition on one evaluates to UNKNOWN: the decision
is then UNDETERMINED, never a guess.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

VARIABLES_VERSION = "2012-10-17"  # policy variables exist only from this version on


class PolicyError(ValueError):
    """The document is not an IAM policy IAM would accept."""


class Truth(enum.Enum):
    TRUE = "true"
    FALSE = "false"
    UNKNOWN = "unknown"  # depends on a key doctor cannot know

    @staticmethod
    def of(value: bool) -> Truth:
        return Truth.TRUE if value else Truth.FALSE


def all_of(truths: Iterable[Truth]) -> Truth:
    """Three-valued AND: any FALSE wins, then any UNKNOWN."""
    result = Truth.TRUE
    for truth in truths:
        if truth is Truth.FALSE:
            return Truth.FALSE
        if truth is Truth.UNKNOWN:
            result = Truth.UNKNOWN
    return result


class Unknown(enum.Enum):
    """A key present in the request whose value doctor cannot know."""

    VALUE = "unknown value"


UNKNOWN = Unknown.VALUE


class Effect(enum.Enum):
    ALLOW = "allow"
    EXPLICIT_DENY = "explicit deny"
    IMPLICIT_DENY = "implicit deny"  # no Allow statement applies
    UNDETERMINED = "undetermined"  # the answer depends on keys doctor cannot know


# --- the policy document ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Condition:
    """One (operator, key, values) triple of a Condition block."""

    operator: str  # as written, e.g. "ForAnyValue:StringLikeIfExists"
    key: str
    values: tuple[str, ...]
    qualifier: str | None = field(init=False)  # "ForAnyValue", "ForAllValues" or None
    base: str = field(init=False)  # e.g. "StringLike"
    if_exists: bool = field(init=False)

    def __post_init__(self) -> None:
        qualifier, _, rest = self.operator.rpartition(":")
        if qualifier and qualifier not in ("ForAnyValue", "ForAllValues"):
            raise PolicyError(f"condition operator {self.operator!r}: unknown set qualifier {qualifier!r}")
        if_exists = rest.endswith("IfExists") and rest != "IfExists"
        base = rest.removesuffix("IfExists") if if_exists else rest
        if base not in OPERATORS:
            raise PolicyError(f"condition operator {self.operator!r} is not an IAM condition operator")
        if base == "Null" and if_exists:
            raise PolicyError("condition operator 'NullIfExists' does not exist")
        object.__setattr__(self, "qualifier", qualifier or None)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "if_exists", if_exists)

    @property
    def negated(self) -> bool:
        return OPERATORS[self.base].negated


Principals = Mapping[str, tuple[str, ...]]  # {"Federated": (...), "AWS": (...)}; {"*": ("*",)} for "*"


@dataclass(frozen=True, kw_only=True)
class Statement:
    index: int  # 1-based, as a reader counts them
    sid: str | None
    effect: str  # "Allow" or "Deny"
    principal: Principals | None
    not_principal: Principals | None
    action: tuple[str, ...] | None
    not_action: tuple[str, ...] | None
    conditions: tuple[Condition, ...]

    @property
    def label(self) -> str:
        return f'statement {self.index} (Sid "{self.sid}")' if self.sid else f"statement {self.index}"

    def federated(self) -> tuple[str, ...]:
        return (self.principal or {}).get("Federated", ())


@dataclass(frozen=True, kw_only=True)
class Policy:
    version: str | None
    statements: tuple[Statement, ...]


def parse(document: Any) -> Policy:
    """A policy from its JSON value; PolicyError names what IAM would refuse."""
    if not isinstance(document, Mapping):
        raise PolicyError("a policy is a JSON object with a Statement")
    version = document.get("Version")
    if version is not None and version not in ("2012-10-17", "2008-10-17"):
        raise PolicyError(f"Version {version!r} is not 2012-10-17 or 2008-10-17")
    raw = document.get("Statement")
    if raw is None:
        raise PolicyError("the policy has no Statement")
    items = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(items, list) or not items:
        raise PolicyError("Statement must be an object or a non-empty list of objects")
    return Policy(version=version, statements=tuple(_statement(i, item) for i, item in enumerate(items, 1)))


def _statement(index: int, raw: Any) -> Statement:
    where = f"statement {index}"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} is not an object")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f"{where}: Effect must be Allow or Deny, not {effect!r}")
    if ("Principal" in raw) == ("NotPrincipal" in raw):
        raise PolicyError(f"{where}: a trust policy statement needs exactly one of Principal and NotPrincipal")
    if ("Action" in raw) == ("NotAction" in raw):
        raise PolicyError(f"{where}: needs exactly one of Action and NotAction")
    conditions: list[Condition] = []
    block = raw.get("Condition") or {}
    if not isinstance(block, Mapping):
        raise PolicyError(f"{where}: Condition must be an object")
    for operator, pairs in block.items():
        if not isinstance(pairs, Mapping):
            raise PolicyError(f"{where}: {operator} must map condition keys to values")
        for key, values in pairs.items():
            conditions.append(Condition(operator=operator, key=key, values=_strings(values, f"{where}: {key}")))
    sid = raw.get("Sid")
    return Statement(
        index=index,
        sid=str(sid) if sid is not None else None,
        effect=effect,
        principal=_principals(raw["Principal"], where) if "Principal" in raw else None,
        not_principal=_principals(raw["NotPrincipal"], where) if "NotPrincipal" in raw else None,
        action=_strings(raw["Action"], f"{where}: Action") if "Action" in raw else None,
        not_action=_strings(raw["NotAction"], f"{where}: NotAction") if "NotAction" in raw else None,
        conditions=tuple(conditions),
    )


def _principals(raw: Any, where: str) -> Principals:
    if raw == "*":
        return {"*": ("*",)}
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: Principal must be \"*\" or an object such as {{\"Federated\": ARN}}")
    return {kind: _strings(value, f"{where}: Principal {kind}") for kind, value in raw.items()}


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")  # JSON true is the string "true" to IAM
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise PolicyError(f"{where}: {item!r} is not a string")
    if not out:
        raise PolicyError(f"{where}: empty list")
    return tuple(out)


# --- the request ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Context:
    """The request's condition keys: known values, keys present with an unknown value, and
    everything else absent. Keys are matched without case, as IAM does."""

    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    absent_prefixes: tuple[str, ...] = ()  # e.g. ("aws:requesttag/",): known to be absent
    unknown_prefixes: tuple[str, ...] = ()  # e.g. ("aws:",): present, value unknown

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", {k.lower(): tuple(v) for k, v in self.values.items()})
        object.__setattr__(self, "absent_prefixes", tuple(p.lower() for p in self.absent_prefixes))
        object.__setattr__(self, "unknown_prefixes", tuple(p.lower() for p in self.unknown_prefixes))

    def lookup(self, key: str) -> tuple[str, ...] | None | Unknown:
        """The key's values, None when absent, UNKNOWN when present with an unknown value."""
        lowered = key.lower()
        if lowered in self.values:
            return self.values[lowered]
        if any(lowered.startswith(prefix) for prefix in self.absent_prefixes):
            return None
        if any(lowered.startswith(prefix) for prefix in self.unknown_prefixes):
            return UNKNOWN
        return None

    def with_value(self, key: str, *values: str) -> Context:
        return Context(values={**self.values, key.lower(): values}, absent_prefixes=self.absent_prefixes,
                       unknown_prefixes=self.unknown_prefixes)


@dataclass(frozen=True, kw_only=True)
class Request:
    principal_type: str  # "Federated" for a web identity
    principal: str  # the OIDC provider's ARN
    action: str  # "sts:AssumeRoleWithWebIdentity"
    context: Context


# --- matching -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Operator:
    match: Callable[[str, str], bool | None]  # (request value, policy value); None: the policy value is malformed
    negated: bool = False
    variables: bool = False  # policy variables are expanded in its values


def glob(pattern: str, *, ignore_case: bool = False, literal: str = "") -> re.Pattern[str]:
    """IAM's wildcard pattern: `*` any run, `?` one character; characters at positions
    marked in `literal` ("1") are taken as themselves (a star from `${*}`)."""
    out: list[str] = []
    for i, char in enumerate(pattern):
        is_literal = i < len(literal) and literal[i] == "1"
        if char == "*" and not is_literal:
            out.append(".*")
        elif char == "?" and not is_literal:
            out.append(".")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _string_like(value: str, pattern: str) -> bool:
    return glob(pattern).fullmatch(value) is not None


def _arn_like(value: str, pattern: str) -> bool:
    # Each of the six colon-separated parts is matched on its own.
    parts, wanted = value.split(":", 5), pattern.split(":", 5)
    return len(parts) == len(wanted) == 6 and all(glob(w).fullmatch(p) for p, w in zip(parts, wanted))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _compared(read: Callable[[str], float | None],
              compare: Callable[[float, float], bool]) -> Callable[[str, str], bool | None]:
    """An operator on values read as numbers (or dates): undetermined when one does not read."""
    def match(value: str, wanted: str) -> bool | None:
        a, b = read(value), read(wanted)
        return None if a is None or b is None else compare(a, b)

    return match


def _date(text: str) -> float | None:
    number = _number(text)
    if number is not None:
        return number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _ip(value: str, network: str) -> bool | None:
    try:
        return ipaddress.ip_address(value) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return None


def _eq(a: float, b: float) -> bool:
    return a == b


OPERATORS: dict[str, _Operator] = {
    "StringEquals": _Operator(lambda v, p: v == p, variables=True),
    "StringNotEquals": _Operator(lambda v, p: v == p, negated=True, variables=True),
    "StringEqualsIgnoreCase": _Operator(lambda v, p: v.casefold() == p.casefold(), variables=True),
    "StringNotEqualsIgnoreCase": _Operator(lambda v, p: v.casefold() == p.casefold(), negated=True, variables=True),
    "StringLike": _Operator(_string_like, variables=True),
    "StringNotLike": _Operator(_string_like, negated=True, variables=True),
    "ArnEquals": _Operator(_arn_like, variables=True),
    "ArnLike": _Operator(_arn_like, variables=True),
    "ArnNotEquals": _Operator(_arn_like, negated=True, variables=True),
    "ArnNotLike": _Operator(_arn_like, negated=True, variables=True),
    "NumericEquals": _Operator(_compared(_number, _eq)),
    "NumericNotEquals": _Operator(_compared(_number, _eq), negated=True),
    "NumericLessThan": _Operator(_compared(_number, lambda a, b: a < b)),
    "NumericLessThanEquals": _Operator(_compared(_number, lambda a, b: a <= b)),
    "NumericGreaterThan": _Operator(_compared(_number, lambda a, b: a > b)),
    "NumericGreaterThanEquals": _Operator(_compared(_number, lambda a, b: a >= b)),
    "DateEquals": _Operator(_compared(_date, _eq)),
    "DateNotEquals": _Operator(_compared(_date, _eq), negated=True),
    "DateLessThan": _Operator(_compared(_date, lambda a, b: a < b)),
    "DateLessThanEquals": _Operator(_compared(_date, lambda a, b: a <= b)),
    "DateGreaterThan": _Operator(_compared(_date, lambda a, b: a > b)),
    "DateGreaterThanEquals": _Operator(_compared(_date, lambda a, b: a >= b)),
    "Bool": _Operator(lambda v, p: v.lower() == p.lower()),
    "BinaryEquals": _Operator(lambda v, p: v == p),
    "IpAddress": _Operator(_ip),
    "NotIpAddress": _Operator(_ip, negated=True),
    "Null": _Operator(lambda v, p: v == p),  # evaluated on presence, see evaluate_condition
}

_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_ESCAPES = {"*": "*", "?": "?", "$": "$"}


def expand(value: str, context: Context) -> tuple[str, str] | None | Unknown:
    """Policy variables in `value`: (text, literal mask), None if a variable is absent
    without a default (the value then matches nothing), UNKNOWN if one is unknown."""
    text: list[str] = []
    mask: list[str] = []
    position = 0
    for found in _VARIABLE.finditer(value):
        literal = value[position:found.start()]
        text.append(literal)
        mask.append("0" * len(literal))
        position = found.end()
        name, _, default = found.group(1).partition(",")
        name = name.strip()
        if name in _ESCAPES:
            text.append(_ESCAPES[name])
            mask.append("1")
            continue
        resolved = context.lookup(name)
        if resolved is UNKNOWN:
            return UNKNOWN
        if not resolved:
            stripped = default.strip()
            if not stripped:
                return None
            replacement = stripped.strip("'")
        else:
            replacement = resolved[0]
        text.append(replacement)
        mask.append("1" * len(replacement))
    text.append(value[position:])
    mask.append("0" * (len(value) - position))
    return "".join(text), "".join(mask)


# --- evaluation -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConditionOutcome:
    condition: Condition
    truth: Truth
    found: tuple[str, ...] | None  # the request's values; None when the key is absent
    matched: tuple[str, ...]  # the policy values some request value matched
    why: str


def evaluate_condition(condition: Condition, context: Context, *, version: str | None = VARIABLES_VERSION) -> ConditionOutcome:
    """One condition against the request context, with the reason in words."""
    found = context.lookup(condition.key)
    key = condition.key

    def outcome(truth: Truth, why: str, values: tuple[str, ...] | None = None,
                matched: tuple[str, ...] = ()) -> ConditionOutcome:
        return ConditionOutcome(condition=condition, truth=truth, found=values, matched=matched, why=why)

    if found is UNKNOWN:
        if condition.base == "Null":  # present, whatever its value: Null can answer
            return outcome(Truth.of(condition.values[0].lower() == "false"), f"{key} is present in the request")
        return outcome(Truth.UNKNOWN, f"doctor cannot know the value of {key} in the real request")
    if condition.base == "Null":
        absent = found is None or len(found) == 0
        wants_absent = condition.values[0].lower() == "true"
        return outcome(Truth.of(absent == wants_absent),
                       f"{key} is {'absent from' if absent else 'present in'} the request", found)
    operator = OPERATORS[condition.base]
    values: tuple[str, ...] = found or ()

    if not values:
        if condition.qualifier == "ForAllValues":
            return outcome(Truth.TRUE, f"{key} is absent, and ForAllValues is true for no values", found)
        if condition.qualifier == "ForAnyValue":
            return outcome(Truth.FALSE, f"{key} is absent, and ForAnyValue needs at least one value", found)
        if condition.if_exists:
            return outcome(Truth.TRUE, f"{key} is absent, and ...IfExists is then true", found)
        if operator.negated:
            return outcome(Truth.TRUE, f"{key} is absent, and a negated operator is then true", found)
        return outcome(Truth.FALSE, f"{key} is absent from the request", found)

    patterns: list[tuple[str, str, str]] = []  # (as written, expanded text, literal mask)
    for wanted in condition.values:
        if operator.variables and version == VARIABLES_VERSION and "${" in wanted:
            expanded = expand(wanted, context)
            if expanded is UNKNOWN:
                return outcome(Truth.UNKNOWN, f"{wanted!r} names a variable doctor cannot know", values)
            if expanded is None:
                continue  # an absent variable without a default matches nothing
            patterns.append((wanted, expanded[0], expanded[1]))
        else:
            patterns.append((wanted, wanted, ""))

    def hits(value: str) -> list[str]:
        out = []
        for written, text, mask in patterns:
            if condition.base in ("StringLike", "StringNotLike") and mask:
                ok: bool | None = glob(text, literal=mask).fullmatch(value) is not None
            else:
                ok = operator.match(value, text)
            if ok:
                out.append(written)
        return out

    per_value = {value: hits(value) for value in values}
    matched = tuple(dict.fromkeys(p for found_hits in per_value.values() for p in found_hits))
    # For a negated operator a value "matches" when it hits none of the policy's values (NOR).
    ok = {value: (not found_hits) if operator.negated else bool(found_hits) for value, found_hits in per_value.items()}
    shown = values[0] if len(values) == 1 else list(values)
    if condition.qualifier == "ForAllValues":
        truth = all(ok.values())
    elif condition.qualifier == "ForAnyValue":
        truth = any(ok.values())
    elif operator.negated:
        truth = all(ok.values())
    else:
        truth = any(ok.values())
    if truth:
        why = f"{key} is {json.dumps(shown)}, which {condition.base} admits"
    elif operator.negated:
        why = f"{key} is {json.dumps(shown)}, which {condition.base} excludes (it matches {json.dumps(list(matched))})"
    else:
        why = f"{key} is {json.dumps(shown)}, which matches none of {json.dumps(list(condition.values))}"
    return outcome(Truth.of(truth), why, values, matched)


def matches_action(patterns: Iterable[str], action: str) -> bool:
    return any(glob(pattern, ignore_case=True).fullmatch(action) for pattern in patterns)


def matches_principal(principals: Principals, principal_type: str, principal: str) -> bool:
    if "*" in principals:
        return True
    return any(value in ("*", principal) for value in principals.get(principal_type, ()))


@dataclass(frozen=True, kw_only=True)
class StatementOutcome:
    statement: Statement
    principal_matches: bool
    action_matches: bool
    conditions: tuple[ConditionOutcome, ...]
    truth: Truth  # does the statement apply to the request?

    @property
    def failing(self) -> tuple[ConditionOutcome, ...]:
        return tuple(c for c in self.conditions if c.truth is Truth.FALSE)

    @property
    def undetermined(self) -> tuple[ConditionOutcome, ...]:
        return tuple(c for c in self.conditions if c.truth is Truth.UNKNOWN)


def evaluate_statement(statement: Statement, request: Request, *, version: str | None = VARIABLES_VERSION) -> StatementOutcome:
    if statement.principal is not None:
        principal_ok = matches_principal(statement.principal, request.principal_type, request.principal)
    else:
        assert statement.not_principal is not None
        principal_ok = not matches_principal(statement.not_principal, request.principal_type, request.principal)
    if statement.action is not None:
        action_ok = matches_action(statement.action, request.action)
    else:
        assert statement.not_action is not None
        action_ok = not matches_action(statement.not_action, request.action)
    conditions = tuple(evaluate_condition(c, request.context, version=version) for c in statement.conditions)
    truth = all_of([Truth.of(principal_ok), Truth.of(action_ok), *(c.truth for c in conditions)])
    return StatementOutcome(statement=statement, principal_matches=principal_ok, action_matches=action_ok,
                            conditions=conditions, truth=truth)


@dataclass(frozen=True, kw_only=True)
class Decision:
    effect: Effect
    statements: tuple[StatementOutcome, ...]

    def applying(self, effect: str, truth: Truth = Truth.TRUE) -> tuple[StatementOutcome, ...]:
        return tuple(s for s in self.statements if s.statement.effect == effect and s.truth is truth)


def evaluate(policy: Policy, request: Request) -> Decision:
    """The policy's answer to the request: an explicit Deny wins, then an Allow, else implicit deny."""
    outcomes = tuple(evaluate_statement(s, request, version=policy.version) for s in policy.statements)
    decision = Decision(effect=Effect.IMPLICIT_DENY, statements=outcomes)
    deny, maybe_deny = decision.applying("Deny"), decision.applying("Deny", Truth.UNKNOWN)
    allow, maybe_allow = decision.applying("Allow"), decision.applying("Allow", Truth.UNKNOWN)
    if deny:
        effect = Effect.EXPLICIT_DENY
    elif allow and not maybe_deny:
        effect = Effect.ALLOW
    elif allow or maybe_allow:
        effect = Effect.UNDETERMINED
    else:
        effect = Effect.IMPLICIT_DENY
    return Decision(effect=effect, statements=outcomes)
