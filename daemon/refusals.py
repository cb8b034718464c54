"""Refusals remembered for a while, so that a refused caller asking again is answered
from memory instead of by the upstream that refused it.

One shape for the daemon's three memories: the cache's STS refusals, the directory's
pods found absent from the node, and TokenReview's rejected tokens. Each is bounded
(the oldest refusal goes first when full, and lapsed ones at the front go as new ones
come) and times come from the owner's clock.

What is kept is a copy of the error without its traceback, and each caller gets a copy
of its own to raise: a raised exception holds the frames it passed through, and those
frames hold a request, its token and an entry, which must not outlive the request.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=BaseException)


class Refusals(Generic[K, E]):
    """At most `max_items` refusals by key, each in force until its own time."""

    def __init__(self, max_items: int, clock: Callable[[], float]) -> None:
        self._max_items = max_items
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, E]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, key: K, error: E, until: float) -> E:
        """Keep `error` for `key` until `until`; returns `error` itself, for the caller to raise."""
        kept = copy.copy(error)  # args and attributes; no traceback, cause or context
        self._items[key] = (until, kept)
        self._items.move_to_end(key)
        now = self._clock()
        while self._items and (len(self._items) > self._max_items or next(iter(self._items.values()))[0] <= now):
            self._items.popitem(last=False)
        return error

    def get(self, key: K) -> E | None:
        """A copy of the refusal in force for `key`, if any; a lapsed one is forgotten here."""
        item = self._items.get(key)
        if item is None:
            return None
        if self._clock() >= item[0]:
            del self._items[key]
            return None
        return copy.copy(item[1])

    def forget(self, key: K) -> None:
        self._items.pop(key, None)

    def forget_where(self, matches: Callable[[K], bool]) -> None:
        for key in [key for key in self._items if matches(key)]:
            del self._items[key]

    def in_force(self) -> Iterator[tuple[K, float, E]]:
        """(key, until, refusal) of every refusal still in force."""
        now = self._clock()
        for key, (until, error) in self._items.items():
            if until > now:
                yield key, until, copy.copy(error)
