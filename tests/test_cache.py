"""The cache rules (refresh, serve floor, eviction, single flight), driven by a fake clock and a fake STS."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
from datetime import datetime, timezone

import pytest

from daemon.cache import CachePolicy, CredentialCache, Outcome, _Entry
from daemon.errors import OverloadedError, StsDeniedError, StsError, StsUnavailableError
from daemon.models import CacheKey, Credentials, Identity, Priority, Ticket, VerifiedToken
from tests.conftest import FakeClock, metric

SESSION_SECONDS = 3600.0
POLICY = CachePolicy(serve_floor_seconds=960, refresh_jitter=0.0, idle_evict_seconds=3600, max_entries=100)


class FakeSource:
    """Stands in for STS: records each exchange, can be held open or made to fail."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, VerifiedToken]] = []
        self.reasons: list[str] = []
        self.tickets: list[Ticket] = []
        self.error: StsError | OverloadedError | None = None
        self.gate: asyncio.Event | None = None

    async def assume_role(self, *, role_arn: str, token: VerifiedToken, reason: str, ticket: Ticket) -> Credentials:
        self.calls.append((role_arn, token))
        self.reasons.append(reason)
        self.tickets.append(ticket)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        n = len(self.calls)
        return Credentials(
            access_key_id=f"ASIA{n:016d}",
            secret_access_key=f"secret-{n}",
            session_token=f"session-{n}",
            expiration=datetime.fromtimestamp(self.clock() + SESSION_SECONDS, timezone.utc),
            account_id="123456789012",
            assumed_role_arn=f"arn:aws:sts::123456789012:assumed-role/r/s{n}",
        )

    def promote(self, ticket: Ticket) -> None:
        ticket.priority = Priority.CALLER


def make_token(clock: FakeClock, subject: str = "system:serviceaccount:ns:app", *, lifetime: float = 86_400, tag: str = "") -> VerifiedToken:
    identity = Identity(issuer="https://issuer.test", subject=subject, audience="sts.amazonaws.com")
    return VerifiedToken(identity=identity, raw=f"token-{subject}-{lifetime}-{tag}", expires_at=clock() + lifetime, fingerprint="f")


def key_for(token: VerifiedToken, role: str = "arn:aws:iam::123456789012:role/r") -> CacheKey:
    return CacheKey.of(role, token.identity)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def source(clock: FakeClock) -> FakeSource:
    return FakeSource(clock)


def new_cache(source: FakeSource, clock: FakeClock, policy: CachePolicy = POLICY, seed: int = 7) -> CredentialCache:
    return CredentialCache(source=source, clock=clock, policy=policy, rng=random.Random(seed))


async def settle() -> None:
    """Let tasks started by maintain() run to completion (the fake STS answers at once)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_exchange_for_many_concurrent_callers(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    source.gate = asyncio.Event()

    waiting = [asyncio.create_task(cache.get(key_for(token), token)) for _ in range(100)]
    await settle()
    source.gate.set()
    results = await asyncio.gather(*waiting)

    assert len(source.calls) == 1
    assert len({credentials.access_key_id for credentials, _ in results}) == 1
    outcomes = [outcome for _, outcome in results]
    assert outcomes.count(Outcome.MISS) == 1 and outcomes.count(Outcome.COALESCED) == 99
    assert (await cache.get(key_for(token), token))[1] is Outcome.HIT


async def test_a_caller_that_goes_away_does_not_cancel_the_exchange(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    source.gate = asyncio.Event()

    impatient = asyncio.create_task(cache.get(key_for(token), token))
    await settle()
    impatient.cancel()
    await asyncio.gather(impatient, return_exceptions=True)
    source.gate.set()
    await settle()

    credentials, outcome = await cache.get(key_for(token), token)
    assert outcome is Outcome.HIT
    assert len(source.calls) == 1


async def test_refresh_at_half_lifetime_with_the_freshest_token(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    old_token = make_token(clock, lifetime=7_200, tag="old")
    first, _ = await cache.get(key_for(old_token), old_token)
    newer_token = make_token(clock, lifetime=86_400, tag="new")
    await cache.get(key_for(newer_token), newer_token)

    clock.advance(SESSION_SECONDS / 2 - 1)
    cache.maintain()
    await settle()
    assert len(source.calls) == 1

    clock.advance(2)
    cache.maintain()
    await settle()
    assert len(source.calls) == 2
    assert source.calls[1][1] is newer_token
    refreshed, outcome = await cache.get(key_for(old_token), old_token)
    assert outcome is Outcome.HIT and refreshed.access_key_id != first.access_key_id
    assert source.reasons == ["cold", "refresh"]
    assert [ticket.priority for ticket in source.tickets] == [Priority.CALLER, Priority.REFRESH]


async def test_jitter_spreads_refreshes_of_entries_created_together(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock, CachePolicy(refresh_jitter=0.1, max_entries=1000))
    tokens = [make_token(clock, f"system:serviceaccount:ns:app-{n}") for n in range(200)]
    for token in tokens:
        await cache.get(key_for(token), token)

    refreshed_by: dict[float, int] = {}
    for elapsed in (1439, 1700, 1800, 1900, 2161):
        clock.now = 1_900_000_000.0 + elapsed
        cache.maintain()
        await settle()
        refreshed_by[elapsed] = len(source.calls) - 200

    assert refreshed_by[1439] == 0  # nothing before half life minus 10 %
    assert refreshed_by[2161] == 200  # everything by half life plus 10 %
    assert 20 < refreshed_by[1700] < refreshed_by[1800] < refreshed_by[1900] < 180  # spread, not a wave


async def test_below_the_serve_floor_a_caller_waits_for_fresh_credentials(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    first, _ = await cache.get(key_for(token), token)

    clock.advance(SESSION_SECONDS - 959)  # 959 s left: under the 960 s floor, no maintain() ran
    credentials, outcome = await cache.get(key_for(token), token)

    assert credentials.access_key_id != first.access_key_id
    assert credentials.remaining(clock()) > POLICY.serve_floor_seconds
    assert outcome is Outcome.MISS


async def test_stale_if_error_until_the_cutoff(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    first, _ = await cache.get(key_for(token), token)
    source.error = StsUnavailableError("STS is down", sts_code="InternalFailure")

    clock.advance(SESSION_SECONDS - 900)  # under the floor, STS failing
    served, outcome = await cache.get(key_for(token), token)
    assert (served.access_key_id, outcome) == (first.access_key_id, Outcome.STALE)
    calls_after_failure = len(source.calls)

    clock.advance(1)  # right after a failure, callers get stale credentials without a new STS call
    assert (await cache.get(key_for(token), token))[1] is Outcome.STALE
    assert len(source.calls) == calls_after_failure

    clock.advance(900 - 1 - 59)  # 59 s left: below the cutoff, stale is no longer served
    with pytest.raises(StsUnavailableError):
        await cache.get(key_for(token), token)

    source.error = None
    credentials, outcome = await cache.get(key_for(token), token)
    assert outcome is Outcome.MISS and credentials.remaining(clock()) > 3000


async def test_failed_background_refresh_is_retried_with_backoff_not_every_tick(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    await cache.get(key_for(token), token)
    source.error = StsUnavailableError("throttled", sts_code="Throttling", throttled=True)
    failures_before = metric("irsa_cache_refresh_failures_total")

    clock.advance(SESSION_SECONDS / 2)
    for _ in range(3):  # three ticks one second apart: one attempt, then backoff
        cache.maintain()
        await settle()
        clock.advance(1)
    assert len(source.calls) == 2
    assert metric("irsa_cache_refresh_failures_total") == failures_before + 1

    clock.advance(POLICY.retry_base_seconds)
    cache.maintain()
    await settle()
    assert len(source.calls) == 3


async def test_a_permanent_denial_evicts_and_old_credentials_are_not_served(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    await cache.get(key_for(token), token)
    source.error = StsDeniedError("trust policy no longer admits", sts_code="AccessDenied")
    denied_before = metric("irsa_cache_evictions_total", reason="denied")

    clock.advance(SESSION_SECONDS / 2)
    cache.maintain()
    await settle()

    assert key_for(token) not in cache
    assert metric("irsa_cache_evictions_total", reason="denied") == denied_before + 1
    with pytest.raises(StsDeniedError):
        await cache.get(key_for(token), token)


async def test_idle_entries_are_evicted_not_refreshed(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock, CachePolicy(idle_evict_seconds=600, serve_floor_seconds=960))
    token = make_token(clock)
    await cache.get(key_for(token), token)
    idle_before = metric("irsa_cache_evictions_total", reason="idle")

    clock.advance(601)
    cache.maintain()
    await settle()

    assert key_for(token) not in cache
    assert len(source.calls) == 1
    assert metric("irsa_cache_evictions_total", reason="idle") == idle_before + 1


async def test_an_entry_in_use_keeps_being_refreshed(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    for _ in range(4):  # four half-lives, one request in each
        await cache.get(key_for(token), token)
        clock.advance(SESSION_SECONDS / 2 + 1)
        cache.maintain()
        await settle()
    assert len(source.calls) == 5
    assert (await cache.get(key_for(token), token))[1] is Outcome.HIT


async def test_an_expired_token_is_dropped_and_never_used_to_refresh(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock, lifetime=600)
    await cache.get(key_for(token), token)

    clock.advance(SESSION_SECONDS / 2)  # due, but the only token expired at 600 s
    cache.maintain()
    await settle()
    assert len(source.calls) == 1

    clock.advance(SESSION_SECONDS / 2)  # credentials expired too: nothing left to serve
    cache.maintain()
    assert key_for(token) not in cache


async def test_the_least_recently_used_entry_goes_when_full(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock, CachePolicy(max_entries=3))
    tokens = [make_token(clock, f"system:serviceaccount:ns:app-{n}") for n in range(4)]
    for token in tokens[:3]:
        await cache.get(key_for(token), token)
    await cache.get(key_for(tokens[0]), tokens[0])  # app-0 is now the most recent

    await cache.get(key_for(tokens[3]), tokens[3])

    assert len(cache) == 3
    assert key_for(tokens[1]) not in cache
    assert key_for(tokens[0]) in cache


async def test_gauges_follow_the_entries(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    for n in range(3):
        token = make_token(clock, f"system:serviceaccount:ns:gauge-{n}")
        await cache.get(key_for(token), token)
    clock.advance(100)
    cache.maintain()

    assert metric("irsa_cache_cache_entries") == 3
    assert metric("irsa_cache_cache_nearest_expiry_seconds") == pytest.approx(SESSION_SECONDS - 100)


@pytest.mark.looptime
async def test_a_caller_waits_at_most_the_request_hold_then_gets_503(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    source.gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(OverloadedError) as refused:
        await cache.get(key_for(token), token)

    assert loop.time() - started == pytest.approx(POLICY.request_hold_seconds)
    assert refused.value.status == 503 and refused.value.retry_after_seconds == 1
    assert "queued behind the node's STS budget" in refused.value.message
    # The exchange ran on without the caller; its result serves the retry.
    source.gate.set()
    await settle()
    assert (await cache.get(key_for(token), token))[1] is Outcome.HIT
    assert len(source.calls) == 1


@pytest.mark.looptime
async def test_past_the_hold_a_caller_under_the_floor_gets_the_old_credentials(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    first, _ = await cache.get(key_for(token), token)
    clock.advance(SESSION_SECONDS - 900)
    source.gate = asyncio.Event()

    served, outcome = await cache.get(key_for(token), token)

    assert (served.access_key_id, outcome) == (first.access_key_id, Outcome.STALE)
    source.gate.set()


async def test_a_caller_joining_a_background_refresh_promotes_it(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    await cache.get(key_for(token), token)
    source.gate = asyncio.Event()
    clock.advance(SESSION_SECONDS / 2 + 1)
    cache.maintain()
    await settle()
    assert source.tickets[-1].priority is Priority.REFRESH

    clock.advance(SESSION_SECONDS / 2 - 900)  # now under the floor: this caller must wait for it
    waiting = asyncio.create_task(cache.get(key_for(token), token))
    await settle()

    assert source.tickets[-1].priority is Priority.CALLER
    assert len(source.calls) == 2
    source.gate.set()
    assert (await waiting)[1] is Outcome.COALESCED


async def test_a_full_budget_queue_is_a_passing_failure(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    source.error = OverloadedError("queue full", retry_after_seconds=1)

    with pytest.raises(OverloadedError):
        await cache.get(key_for(token), token)

    assert key_for(token) in cache  # not evicted: the next request tries again


async def test_drop_evicts_matching_entries_at_once(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    kept = make_token(clock, "system:serviceaccount:ns:kept")
    dropped = make_token(clock, "system:serviceaccount:ns:dropped")
    for token in (kept, dropped):
        await cache.get(key_for(token), token)
    before = metric("irsa_cache_evictions_total", reason="directory")

    assert cache.drop(lambda key: key.subject.endswith(":dropped"), "directory") == 1

    assert key_for(dropped) not in cache and key_for(kept) in cache
    assert metric("irsa_cache_evictions_total", reason="directory") == before + 1
    _, outcome = await cache.get(key_for(dropped), dropped)
    assert outcome is Outcome.MISS and len(source.calls) == 3


async def test_identities_no_longer_in_use_are_not_refreshed(clock: FakeClock, source: FakeSource) -> None:
    live: set[str] = {"system:serviceaccount:ns:a", "system:serviceaccount:ns:b"}
    cache = CredentialCache(source=source, clock=clock, policy=POLICY, rng=random.Random(1),
                            in_use=lambda key: key.subject in live)
    tokens = [make_token(clock, subject) for subject in sorted(live)]
    for token in tokens:
        await cache.get(key_for(token), token)
    live.discard("system:serviceaccount:ns:b")  # its last pod on this node went away

    clock.advance(SESSION_SECONDS / 2 + 1)
    cache.maintain()
    await settle()

    refreshed = [token.identity.subject for _, token in source.calls[2:]]
    assert refreshed == ["system:serviceaccount:ns:a"]


async def test_a_pass_looks_only_at_entries_whose_time_has_come(
    clock: FakeClock, source: FakeSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = new_cache(source, clock, CachePolicy(serve_floor_seconds=960, refresh_jitter=0.0, max_entries=2000))
    early = [make_token(clock, f"system:serviceaccount:ns:early-{n}") for n in range(10)]
    for token in early:
        await cache.get(key_for(token), token)
    clock.advance(600)
    late = [make_token(clock, f"system:serviceaccount:ns:late-{n}") for n in range(1000)]
    for token in late:
        await cache.get(key_for(token), token)
    # Reads internals: every entry a pass looks at starts with its token.
    looked_at: list[str] = []
    usable_token = _Entry.usable_token

    def counting(entry: _Entry, now: float) -> VerifiedToken | None:
        looked_at.append(entry.key.subject)
        return usable_token(entry, now)

    monkeypatch.setattr(_Entry, "usable_token", counting)

    clock.advance(SESSION_SECONDS / 2 - 600 + 1)  # the early ten are due; the late thousand in 599 s
    cache.maintain()
    await settle()

    assert sorted(looked_at) == sorted(token.identity.subject for token in early)
    assert len(source.calls) == 1010 + 10


async def test_a_refresh_that_waited_for_a_token_starts_once_one_comes(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    short = make_token(clock, lifetime=600, tag="short")
    await cache.get(key_for(short), short)
    clock.advance(SESSION_SECONDS / 2 + 1)  # due, but the only token expired
    cache.maintain()
    await settle()
    assert len(source.calls) == 1

    clock.advance(10)
    fresh = make_token(clock, tag="fresh")
    assert (await cache.get(key_for(fresh), fresh))[1] is Outcome.HIT  # still above the floor
    cache.maintain()
    await settle()

    assert len(source.calls) == 2 and source.calls[1][1] is fresh
    assert source.reasons == ["cold", "refresh"]


async def test_the_nearest_expiry_follows_refreshes_and_evictions(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    first = make_token(clock, "system:serviceaccount:ns:first")
    await cache.get(key_for(first), first)
    clock.advance(600)
    second = make_token(clock, "system:serviceaccount:ns:second")
    await cache.get(key_for(second), second)
    cache.maintain()
    assert metric("irsa_cache_cache_nearest_expiry_seconds") == SESSION_SECONDS - 600

    clock.advance(SESSION_SECONDS / 2 - 600 + 1)  # the first is refreshed: the second is now the soonest
    cache.maintain()
    await settle()
    cache.maintain()
    assert metric("irsa_cache_cache_nearest_expiry_seconds") == SESSION_SECONDS / 2 + 600 - 1

    cache.drop(lambda key: key.subject.endswith(":second"), "directory")
    cache.maintain()
    assert metric("irsa_cache_cache_nearest_expiry_seconds") == SESSION_SECONDS  # refreshed just now

    cache.drop(lambda key: True, "directory")
    cache.maintain()
    assert metric("irsa_cache_cache_nearest_expiry_seconds") == 0


async def test_schedules_of_evicted_entries_do_not_pile_up(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock, CachePolicy(max_entries=10))
    for n in range(5000):  # each evicts the least recently used: 4,990 evictions
        token = make_token(clock, f"system:serviceaccount:ns:churn-{n}")
        await cache.get(key_for(token), token)
        if n % 100 == 0:
            clock.advance(1)
            cache.maintain()
    cache.maintain()

    assert len(cache) == 10
    # Reads internals: the two heaps are rebuilt once stale items outnumber the entries.
    assert len(cache._checks) <= 2 * 10 + 1024 and len(cache._expiries) <= 2 * 10 + 1024


async def test_release_waiters_answers_every_held_caller_at_once_and_holds_nobody_after(
    clock: FakeClock, source: FakeSource
) -> None:
    cache = new_cache(source, clock)
    tokens = [make_token(clock, f"system:serviceaccount:ns:app-{n}") for n in range(10)]
    source.gate = asyncio.Event()
    held = [asyncio.create_task(cache.get(key_for(token), token)) for token in tokens for _ in range(100)]
    await settle()

    cache.release_waiters()
    results = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), timeout=5)

    assert all(isinstance(result, OverloadedError) for result in results)
    assert "shutting down" in results[0].message
    late = make_token(clock, "system:serviceaccount:ns:late")
    with pytest.raises(OverloadedError):
        await asyncio.wait_for(cache.get(key_for(late), late), timeout=5)  # not held for its exchange
    # The exchanges were not cancelled: their results land in the cache.
    source.gate.set()
    await settle()
    assert [(await cache.get(key_for(token), token))[1] for token in tokens] == [Outcome.HIT] * len(tokens)


async def test_callers_held_for_one_exchange_leave_alone_or_together(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    source.gate = asyncio.Event()
    held = [asyncio.create_task(cache.get(key_for(token), token)) for _ in range(50)]
    await settle()

    for task in held[:10]:  # callers that go away leave the others held
        task.cancel()
    await asyncio.gather(*held[:10], return_exceptions=True)
    await settle()
    assert not any(task.done() for task in held[10:])

    source.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*held[10:]), timeout=5)
    assert {credentials.access_key_id for credentials, _ in results} == {"ASIA0000000000000001"}
    assert len(source.calls) == 1


async def test_an_identity_with_a_live_pod_is_never_idle_evicted(clock: FakeClock, source: FakeSource) -> None:
    # Sessions of 2 h, idle eviction after 1 h: a pod's SDK asks about every 105 min, so
    # without its live pod counted as a use, each of its refreshes would be a cold exchange.
    live = {"system:serviceaccount:ns:app"}
    cache = CredentialCache(source=source, clock=clock, policy=POLICY, rng=random.Random(3),
                            in_use=lambda key: key.subject in live, in_use_means_live_pod=True)
    token = make_token(clock)
    await cache.get(key_for(token), token)

    for _ in range(6):  # three hours of half-hour passes, no request at all
        clock.advance(1800)
        cache.maintain()
        await settle()
    assert key_for(token) in cache
    assert (await cache.get(key_for(token), token))[1] is Outcome.HIT

    live.clear()  # its last pod went away: it ages out as idle
    clock.advance(POLICY.idle_evict_seconds + 1)
    cache.maintain()
    assert key_for(token) not in cache


def tagged(token: VerifiedToken, tag: str) -> VerifiedToken:
    """The same identity's token with a fingerprint of its own (another pod's)."""
    return dataclasses.replace(token, fingerprint=tag, raw=f"{token.raw}-{tag}")


async def test_an_exchange_uses_the_freshest_token_of_the_identity_not_the_callers(
    clock: FakeClock, source: FakeSource
) -> None:
    cache = new_cache(source, clock)
    fresh = tagged(make_token(clock, lifetime=86_400), "pod-a")
    await cache.get(key_for(fresh), fresh)
    clock.advance(SESSION_SECONDS - 900)  # under the serve floor: the next caller's request refreshes
    lagging = tagged(make_token(clock, lifetime=30), "pod-b")  # a pod whose kubelet is late rotating

    await cache.get(key_for(lagging), lagging)

    assert [token.fingerprint for _, token in source.calls] == ["pod-a", "pod-a"]


async def test_a_refused_token_costs_the_identity_neither_its_credentials_nor_its_refreshes(
    clock: FakeClock, source: FakeSource
) -> None:
    """ExpiredTokenException concerns the token exchanged, not the identity: the other
    pods of the identity keep the credentials cached for them, and the refused token is
    not used again."""
    cache = new_cache(source, clock)
    only = tagged(make_token(clock, lifetime=SESSION_SECONDS), "pod-a")
    first, _ = await cache.get(key_for(only), only)
    clock.advance(SESSION_SECONDS - 900)
    source.error = StsDeniedError("ExpiredTokenException: Token expired", sts_code="ExpiredTokenException")

    with pytest.raises(StsDeniedError):
        await cache.get(key_for(only), only)

    assert key_for(only) in cache
    source.error = None
    rotated = tagged(make_token(clock, lifetime=86_400), "pod-a-rotated")
    served, outcome = await cache.get(key_for(rotated), rotated)
    assert outcome is Outcome.STALE and served == first  # STS refused moments ago: the old ones, no call
    calls = len(source.calls)
    clock.advance(POLICY.retry_max_seconds + 1)
    renewed, outcome = await cache.get(key_for(rotated), rotated)
    assert outcome is Outcome.MISS and renewed != first
    assert [token.fingerprint for _, token in source.calls[calls:]] == ["pod-a-rotated"]


async def test_a_remembered_refusal_holds_after_the_retry_backoff(clock: FakeClock, source: FakeSource) -> None:
    """The refusal is consulted whenever an exchange would start, not only while the
    entry backs off: a pod retrying after its backoff but within the refusal's memory
    costs STS nothing."""
    policy = dataclasses.replace(POLICY, retry_base_seconds=1.0, invalid_token_refusal_seconds=10.0)
    cache = new_cache(source, clock, policy)
    token = make_token(clock)
    source.error = StsDeniedError("InvalidIdentityToken: no keys", sts_code="InvalidIdentityToken",
                                  permanent=False)
    with pytest.raises(StsDeniedError):
        await cache.get(key_for(token), token)
    assert key_for(token) in cache  # InvalidIdentityToken may pass: the entry stays

    clock.advance(3)  # the entry's retry time has passed, the refusal's memory has not
    with pytest.raises(StsDeniedError):
        await cache.get(key_for(token), token)
    assert len(source.calls) == 1

    clock.advance(8)
    source.error = None
    assert (await cache.get(key_for(token), token))[1] is Outcome.MISS
    assert len(source.calls) == 2


async def test_a_stopping_cache_serves_what_it_has_and_starts_no_exchange(
    clock: FakeClock, source: FakeSource
) -> None:
    cache = new_cache(source, clock)
    cached = make_token(clock, "system:serviceaccount:ns:cached")
    await cache.get(key_for(cached), cached)
    cache.release_waiters()

    assert (await cache.get(key_for(cached), cached))[1] is Outcome.HIT
    newcomer = make_token(clock, "system:serviceaccount:ns:newcomer")
    with pytest.raises(OverloadedError, match="shutting down"):
        await cache.get(key_for(newcomer), newcomer)
    clock.advance(SESSION_SECONDS - 900)  # under the floor: served as they are, not refreshed
    assert (await cache.get(key_for(cached), cached))[1] is Outcome.STALE
    await settle()
    assert len(source.calls) == 1


async def test_a_stopping_cache_starts_no_refresh_either(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock)
    await cache.get(key_for(token), token)
    cache.release_waiters()

    clock.advance(SESSION_SECONDS / 2 + 1)  # past its refresh time
    cache.maintain()
    await settle()

    assert source.reasons == ["cold"]


async def test_a_remembered_passing_refusal_still_serves_valid_credentials(
    clock: FakeClock, source: FakeSource
) -> None:
    """Stale-if-error holds while a passing refusal is remembered: past the entry's
    retry time, the caller gets the credentials still valid, not the refusal."""
    policy = dataclasses.replace(POLICY, retry_base_seconds=1.0, invalid_token_refusal_seconds=10.0)
    cache = new_cache(source, clock, policy)
    token = make_token(clock)
    first, _ = await cache.get(key_for(token), token)
    clock.advance(SESSION_SECONDS - 900)  # under the serve floor, 900 s still valid
    source.error = StsDeniedError("InvalidIdentityToken: could not fetch keys", sts_code="InvalidIdentityToken",
                                  permanent=False)
    assert await cache.get(key_for(token), token) == (first, Outcome.STALE)

    remembered = metric("irsa_cache_refusals_remembered_total", kind="sts_refusal")
    clock.advance(3)  # past the entry's retry time, within the refusal's memory
    assert await cache.get(key_for(token), token) == (first, Outcome.STALE)
    assert len(source.calls) == 2
    assert metric("irsa_cache_refusals_remembered_total", kind="sts_refusal") == remembered  # served, not refused


async def test_a_token_refused_for_good_is_refused_every_time_not_served_stale(
    clock: FakeClock, source: FakeSource
) -> None:
    """ExpiredTokenException is final for that token: asking again with it gets the same
    403 from memory, not the identity's old credentials (other pods' tokens still get them)."""
    cache = new_cache(source, clock, dataclasses.replace(POLICY, retry_base_seconds=1.0))
    token = tagged(make_token(clock, lifetime=SESSION_SECONDS), "pod-a")
    await cache.get(key_for(token), token)
    clock.advance(SESSION_SECONDS - 900)  # under the serve floor: the next request exchanges
    source.error = StsDeniedError("ExpiredTokenException: Token expired", sts_code="ExpiredTokenException")

    outcomes = []
    for _ in range(3):
        try:
            outcomes.append((await cache.get(key_for(token), token))[1].value)
        except StsDeniedError as exc:
            outcomes.append(exc.status)
        clock.advance(5)  # past the entry's backoff (at most 1 s), within the refusal's 30 s

    assert outcomes == [403, 403, 403]
    assert len(source.calls) == 2


async def test_a_token_refused_for_good_never_refreshes_nor_refuses_the_identitys_other_pods(
    clock: FakeClock, source: FakeSource
) -> None:
    """A token STS refused for good is not taken back as the identity's refresh token when
    its pod asks again, even though it is the freshest: a sibling pod is then served (and
    the refresh made) with its own token."""
    cache = new_cache(source, clock, dataclasses.replace(POLICY, retry_base_seconds=1.0))
    refused = tagged(make_token(clock, lifetime=2 * SESSION_SECONDS), "pod-a")
    sibling = tagged(make_token(clock, lifetime=SESSION_SECONDS + 60), "pod-b")
    await cache.get(key_for(refused), refused)
    clock.advance(SESSION_SECONDS - 900)  # under the serve floor: the next request exchanges
    source.error = StsDeniedError("ExpiredTokenException: Token expired", sts_code="ExpiredTokenException")
    with pytest.raises(StsDeniedError):
        await cache.get(key_for(refused), refused)
    clock.advance(5)  # past the entry's backoff (at most 1 s), within the refusal's 30 s
    with pytest.raises(StsDeniedError):  # its pod asks again: refused from memory...
        await cache.get(key_for(refused), refused)
    source.error = None
    clock.advance(5)  # past the entry's backoff

    credentials, outcome = await cache.get(key_for(sibling), sibling)  # ...and not kept for the identity

    assert outcome is Outcome.MISS and credentials.remaining(clock()) > POLICY.serve_floor_seconds
    assert [token.fingerprint for _, token in source.calls] == ["pod-a", "pod-a", "pod-b"]
    clock.advance(SESSION_SECONDS)  # the next refresh, by maintenance
    cache.maintain()
    await settle()
    assert "pod-a" not in [token.fingerprint for _, token in source.calls[3:]]


def reachable(root: object, target: object, limit: int = 200_000) -> bool:
    """Whether `target` can be reached from `root` through references (the garbage collector's view)."""
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < limit:
        item = stack.pop()
        if item is target:
            return True
        if id(item) not in seen:
            seen.add(id(item))
            stack.extend(gc.get_referents(item))
    return False


async def test_a_remembered_refusal_keeps_no_callers_frames_or_token(clock: FakeClock, source: FakeSource) -> None:
    """Each caller raises a copy: the refusal kept holds no traceback, so no request's
    frames, and with them no token, outlive the request (nor its entry's eviction)."""
    cache = new_cache(source, clock)
    token = make_token(clock)
    source.error = StsDeniedError("AccessDenied: no", sts_code="AccessDenied")
    with pytest.raises(StsDeniedError) as first:
        await cache.get(key_for(token), token)
    with pytest.raises(StsDeniedError) as again:
        await cache.get(key_for(token), token)

    assert key_for(token) not in cache  # a permanent refusal evicted the entry
    assert again.value is not first.value and again.value.message == first.value.message
    assert reachable(again.value, token)  # raised through the caller's frames, which hold the token...
    kept = [error for _, error in cache._refusals._items.values()]  # ...which the memory does not keep
    assert kept and all(e.__traceback__ is None and e.__context__ is None and e.__cause__ is None for e in kept)
    assert len(source.calls) == 1


async def test_an_identity_sts_keeps_failing_for_days_is_still_retried(clock: FakeClock, source: FakeSource) -> None:
    cache = new_cache(source, clock)
    token = make_token(clock, lifetime=10 * 86_400)
    source.error = StsUnavailableError("InternalFailure: try again", sts_code="InternalFailure")
    for _ in range(1_100):  # past 1,024 failures, where an uncapped 2 ** failures raises
        with pytest.raises(StsUnavailableError):
            await cache.get(key_for(token), token)
        clock.advance(POLICY.retry_max_seconds)

    source.error = None
    assert (await cache.get(key_for(token), token))[1] is Outcome.MISS
