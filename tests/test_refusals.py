"""The bounded memory of refusals shared by the cache, the directory and TokenReview."""

from __future__ import annotations

from daemon.errors import StsDeniedError
from daemon.refusals import Refusals
from tests.conftest import FakeClock


def test_lapsed_refusals_are_forgotten_as_new_ones_come_not_kept_at_their_peak() -> None:
    clock = FakeClock()
    refusals: Refusals[str, StsDeniedError] = Refusals(max_items=1000, clock=clock)
    for n in range(500):
        refusals.remember(f"pod-{n}", StsDeniedError("AccessDenied"), until=clock() + 30)
    clock.advance(31)

    refusals.remember("late", StsDeniedError("AccessDenied"), until=clock() + 30)

    assert len(refusals) == 1


def test_the_oldest_goes_first_when_full() -> None:
    clock = FakeClock()
    refusals: Refusals[int, StsDeniedError] = Refusals(max_items=3, clock=clock)
    for n in range(5):
        refusals.remember(n, StsDeniedError(f"refusal {n}"), until=clock() + 30)

    assert [n for n in range(5) if refusals.get(n) is not None] == [2, 3, 4]


def test_each_caller_gets_a_copy_to_raise_and_the_memory_keeps_no_traceback() -> None:
    clock = FakeClock()
    refusals: Refusals[str, StsDeniedError] = Refusals(max_items=10, clock=clock)
    try:
        raise refusals.remember("key", StsDeniedError("AccessDenied: no", sts_code="AccessDenied"), until=clock() + 5)
    except StsDeniedError as raised:
        original = raised

    first, second = refusals.get("key"), refusals.get("key")
    assert first is not None and second is not None and first is not second and first is not original
    assert (first.message, first.sts_code, first.__traceback__) == ("AccessDenied: no", "AccessDenied", None)
    (_, kept), = refusals._items.values()  # what is kept, not only what is handed out
    assert kept is not original and kept.__traceback__ is None
    clock.advance(5)
    assert refusals.get("key") is None
