"""Refusals remembered for a while, so that a refused caller asking again is answered
from memory instead of by the upstream that refused it.

One shape for the daemon's three memories: the cache's STS refusals, the directory's
pods found absent from the node, and TokenReview's rejected tokens. Each is bounded
(the oldest refusal goes first when full) and times come from the caller's clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=BaseException)


class Refusals(Generic[K, E]):
    """At most `max_items` refusals by key, each in force until its own time."""

    def __init__(self, max_items: int) -> None:
        self._max_items = max_items
        self._items: OrderedDict[K, tuple[float, E]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, key: K, error: E, until: float) -> E:
        self._items[key] = (until, error)
        self._items.move_to_end(key)
        while len(self._items) > self._max_items:
            self._items.popitem(last=False)
        return error

    def get(self, key: K, now: float) -> E | None:
        """The refusal in force for `key`, if any; a lapsed one is forgotten here."""
        item = self._items.get(key)
        if item is None:
            return None
        if now >= item[0]:
            del self._items[key]
            return None
        return item[1]

    def forget(self, key: K) -> None:
        self._items.pop(key, None)

    def forget_where(self, matches: Callable[[K], bool]) -> None:
        for key in [key for key in self._items if matches(key)]:
            del self._items[key]

    def in_force(self, now: float) -> Iterator[tuple[K, float, E]]:
        """(key, until, refusal) of every refusal still in force at `now`."""
        for key, (until, error) in self._items.items():
            if until > now:
                yield key, until, error
