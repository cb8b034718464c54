"""Room in a bounded memory (a dict in insertion order: oldest first).

The verification caches and the audit trail each keep at most so many items. Making
room drops what has lapsed, and when nothing has (or not enough), the oldest quarter
at once, so that a full memory is not trimmed again on every insertion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def make_room(items: dict[K, V], max_items: int, lapsed: Callable[[V], bool] = lambda value: False) -> None:
    """Room for one more item in `items`, which holds at most `max_items`."""
    if len(items) < max_items:
        return
    for key in [key for key, value in items.items() if lapsed(value)]:
        del items[key]
    if len(items) >= max_items:
        for key in list(items)[: max_items // 4 or 1]:
            del items[key]
