"""Exponential backoff, capped: the one formula behind every retry of the daemon.

The exponent is clamped before it is used: a retry loop that runs for days (an
upstream down over a weekend, a role STS keeps failing) counts past 1,024 failures,
where `2 ** failures` no longer converts to a float and would raise.
"""

from __future__ import annotations

import random

MAX_DOUBLINGS = 64  # far past any cap: base * 2**64 exceeds every maximum in use


def capped(base_seconds: float, max_seconds: float, doublings: int) -> float:
    """`base_seconds` doubled `doublings` times, at most `max_seconds`."""
    return min(max_seconds, base_seconds * 2 ** min(max(doublings, 0), MAX_DOUBLINGS))


def full_jitter(rng: random.Random, base_seconds: float, max_seconds: float, doublings: int) -> float:
    """A delay drawn uniformly below the capped backoff ("full jitter"): retries of many
    clients that failed together spread out instead of arriving together again."""
    return rng.uniform(0, capped(base_seconds, max_seconds, doublings))
