"""bench/burst.py's physical floor: the least time to credentials STS's admission rate allows."""

from __future__ import annotations

import pytest

from bench.burst import physical_floor


def pods(*starts_by_identity: tuple[int, float]) -> list[dict[str, float]]:
    return [{"identity": identity, "started": start} for identity, start in starts_by_identity]


def test_fifty_identities_at_ten_per_second_after_a_bucket_of_ten_take_four_seconds() -> None:
    # The scale-out: every identity's first pod at once.
    results = pods(*((n, 0.0) for n in range(50)))

    floor = physical_floor(results, rate=10.0, bucket=10.0, latency=0.05)

    assert floor[:10] == pytest.approx([0.05] * 10)  # the bucket
    assert floor[10] == pytest.approx(0.1 + 0.05)
    assert floor[-1] == pytest.approx(4.0 + 0.05)  # (50 - 10) / 10 s


def test_a_pod_that_starts_after_its_identitys_call_returned_waits_for_nothing() -> None:
    results = pods((0, 0.0), (0, 0.01), (0, 5.0), (1, 5.0))

    assert physical_floor(results, rate=1.0, bucket=1.0, latency=0.1) == pytest.approx([0.1, 0.09, 0.0, 0.1])


def test_identities_are_called_in_the_order_their_first_pods_start_and_the_bucket_refills_only_to_its_size() -> None:
    # Identity 1 starts first; after a quiet 100 s the bucket holds 2 tokens, not 100.
    results = pods((0, 0.5), (1, 0.0), (2, 100.0), (3, 100.0), (4, 100.0))

    floor = physical_floor(results, rate=1.0, bucket=2.0, latency=0.0)

    assert floor == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])
