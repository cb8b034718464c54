"""The report: one line per check (✓ pass, ! warning, ✗ failure, - not checked) with
the fix under every ✗ and !, or the JSON document scripts read."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from daemon.doctor.facts import Facts
from daemon.doctor.model import Result, Status

LINK_WIDTH = 16
ID_WIDTH = 31


def ok(results: Sequence[Result]) -> bool:
    return not any(result.status is Status.FAIL for result in results)


def exit_status(results: Sequence[Result]) -> int:
    return 0 if ok(results) else 1


def as_json(results: Sequence[Result]) -> str:
    return json.dumps({"checks": [result.to_json() for result in results], "ok": ok(results)}, indent=2)


def _header(facts: Facts) -> str:
    parts = [
        f"role {facts.role_arn.value if facts.role_arn else '(unknown)'}",
        f"identity {facts.subject.value if facts.subject else '(unknown)'}",
        f"issuer {facts.issuer.value if facts.issuer else '(unknown)'}",
        f"audience {facts.audience}",
    ]
    return "irsa-cache doctor: " + ", ".join(parts)


def as_text(results: Sequence[Result], facts: Facts) -> str:
    lines = [_header(facts), ""]
    indent = " " * (2 + LINK_WIDTH + 1 + ID_WIDTH + 1)
    for result in results:
        lines.append(f"{result.status.mark} {result.link.value:<{LINK_WIDTH}} {result.id:<{ID_WIDTH}} {result.message}")
        if result.fix and result.status in (Status.FAIL, Status.WARN):
            lines.append(f"{indent}fix: {result.fix}")
    counts = Counter(result.status for result in results)
    summary = (f"{counts[Status.FAIL]} failed, {counts[Status.WARN]} warning(s), {counts[Status.PASS]} passed, "
               f"{counts[Status.SKIP]} not checked")
    first = next((result for result in results if result.status is Status.FAIL), None)
    verdict = (f"the first broken link is {first.link.value} ({first.id})" if first
               else "no broken link found" + (" (some links were not checked)" if counts[Status.SKIP] else ""))
    lines += ["", f"{summary}: {verdict}"]
    return "\n".join(lines)
