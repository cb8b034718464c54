"""The credential cache: one STS exchange per identity, shared by every pod of it.

Entries are keyed by `CacheKey` (role, issuer, subject, audience). The rules:

- single-flight: however many callers arrive together, one exchange per key; it
  runs as its own task, so a caller that disconnects does not cancel it;
- the wait policy: a caller with nothing usable cached waits for its exchange as
  long as the exchange runs (it has its own deadline), at most `request_hold_seconds`;
  then 503 with Retry-After while the exchange runs on, its result serving the retry.
  A caller whose credentials are under the serve floor but still valid waits at most
  `refresh_wait_seconds` for the refresh, then gets the old ones. Holding costs a
  connection, not a thread; the server bounds connections. `release_waiters()` answers
  every held caller at once and starts no exchange from then on (shutdown);
- refresh ahead: at half the lifetime, jittered by +/- `refresh_jitter` of it, using
  the freshest valid token seen for the key; only entries still in use;
- serve floor: never answer with less than `serve_floor_seconds` left while a
  refresh is possible; if STS is failing, keep serving the old credentials until
  `stale_cutoff_seconds` before they expire (stale-if-error);
- remembered refusals: a permanent STS answer is kept for `refusal_seconds`
  (`invalid_token_refusal_seconds` for InvalidIdentityToken, which may be STS failing
  to fetch the issuer's keys; per token for a token-specific answer such as
  ExpiredTokenException, which keeps the identity's credentials and drops only that
  token), so that a refused identity costs STS a bounded number of calls whatever its
  pods do; they are consulted whenever an exchange would start, and `drop()` (a role
  changed) clears them at once. Exchanges use the freshest valid token any pod of the
  identity presented, not necessarily the caller's. Passing
  failures (throttling, 5xx) are not remembered for callers: the STS budget paces
  the retries, and a pod's retry joins a new exchange;
- credentials that arrive already (or nearly) expired by this node's clock are
  refused as clock skew, and counted, rather than served;
- eviction: idle entries, entries whose STS answer was permanent, and the least
  recently used when `max_entries` is reached.

No I/O and no sleeping here beyond the `run()` loop: time comes from the injected
clock, and `maintain()` does one pass, so tests drive the cache with a fake clock.

A pass touches only the entries that may need something, not all of them: each entry
sits in a heap at the earliest time its state can call for action (idle deadline,
token or credentials expiry, refresh or retry time). An entry is looked at when that
time comes, decides by the same rules as ever, and goes back in at its next time.
Requests do not touch the heap: a later `last_used` only makes the idle deadline, found
when it comes, move on. An entry that is due but cannot refresh (no caller on the node)
is looked at again on every pass, as before. The soonest expiry, for its gauge, comes
from a second heap.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon import metrics
from daemon.backoff import capped
from daemon.errors import DaemonError, OverloadedError, StsDeniedError, StsError, StsUnavailableError
from daemon.models import CacheKey, Clock, Credentials, ExchangeSource, Priority, Ticket, VerifiedToken
from daemon.refusals import Refusals

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    HIT = "hit"  # fresh credentials were in the cache
    MISS = "miss"  # this caller started the exchange and waited for it
    COALESCED = "coalesced"  # this caller joined an exchange already under way
    STALE = "stale"  # under the serve floor, but STS is failing: old credentials, still valid


@dataclass(frozen=True, kw_only=True)
class CachePolicy:
    serve_floor_seconds: float = 960.0
    refresh_jitter: float = 0.1
    idle_evict_seconds: float = 3600.0
    max_entries: int = 20_000
    stale_cutoff_seconds: float = 60.0
    request_hold_seconds: float = 30.0  # the longest a caller is held for its exchange
    refresh_wait_seconds: float = 0.2  # the longest a caller with valid credentials waits for a refresh
    retry_base_seconds: float = 5.0  # first retry after a failed exchange
    retry_max_seconds: float = 120.0
    refusal_seconds: float = 30.0  # a permanent STS refusal is answered from memory this long
    invalid_token_refusal_seconds: float = 5.0  # InvalidIdentityToken: may be STS failing to fetch keys
    max_refusals: int = 20_000


@dataclass(frozen=True, kw_only=True)
class EntryState:
    """What a successor needs of one entry to serve and refresh it as this cache would."""

    key: CacheKey
    credentials: Credentials | None
    token: VerifiedToken | None  # the freshest valid token: the refreshes' own
    last_used: float
    refresh_at: float
    retry_at: float
    failures: int


@dataclass(frozen=True, kw_only=True)
class RefusalState:
    key: CacheKey
    fingerprint: str | None  # a token-specific refusal's token; None: the identity's
    until: float
    error: DaemonError


# Refusals that concern the token presented, not the identity: another token may pass.
_TOKEN_REFUSALS = frozenset({"ExpiredTokenException"})
SHUTTING_DOWN = "irsa-cache is shutting down; retry in a second (the next daemon on this node answers)"


@dataclass(eq=False, slots=True)
class _Entry:
    key: CacheKey
    token: VerifiedToken | None
    last_used: float
    credentials: Credentials | None = None
    exchange: asyncio.Task[Credentials] | None = None
    ticket: Ticket | None = None  # the exchange's place in the STS budget
    refresh_at: float = math.inf
    retry_at: float = 0.0  # after a failure, no new attempt before this
    failures: int = 0
    evicted: bool = field(default=False)
    check_at: float = math.inf  # when maintain() looks at this entry next: its live item in the heap

    def usable_token(self, now: float) -> VerifiedToken | None:
        if self.token is not None and self.token.expires_at <= now:
            self.token = None  # an expired token is useless and is not kept
        return self.token


class CredentialCache:
    def __init__(
        self,
        *,
        source: ExchangeSource,
        clock: Clock,
        policy: CachePolicy,
        rng: random.Random | None = None,
        in_use: Callable[[CacheKey], bool] = lambda key: True,
        in_use_means_live_pod: bool = False,
    ) -> None:
        """`in_use` says whether an identity still has a caller on this node; entries it
        rejects are not refreshed and age out as idle. `in_use_means_live_pod`, where the
        directory knows the node's pods (so `in_use` says a live pod of the identity runs
        here), keeps such an identity from ageing out at all: its pods ask less often than
        --idle-evict when the session is longer."""
        self._source = source
        self._clock = clock
        self._policy = policy
        self._rng = rng or random.Random()
        self._in_use = in_use
        self._in_use_means_live_pod = in_use_means_live_pod
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()  # least recently used first
        # (time, sequence, entry); items left behind by a rescheduled or evicted entry are
        # skipped when they surface, and dropped in bulk when they outnumber the entries.
        self._checks: list[tuple[float, int, _Entry]] = []
        self._expiries: list[tuple[float, int, _Entry]] = []  # (credentials expire at, ...)
        self._sequence = itertools.count()
        # Permanent STS refusals by key, or by (key, token fingerprint); oldest first.
        self._refusals: Refusals[CacheKey | tuple[CacheKey, str], DaemonError] = Refusals(policy.max_refusals, clock)
        self._stopping = False  # set by release_waiters(): no caller is held, no exchange started
        self._retired = False  # a successor refreshes now: this cache starts no refresh
        self._waiters: set[asyncio.Future[None]] = set()  # one per caller held for an exchange

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def hit(self, key: CacheKey, token: VerifiedToken) -> Credentials | None:
        """Fresh credentials for `key` if they are cached (recording the use, as `get`
        does), without a coroutine: the hot path. None: call `get`."""
        entry = self._entries.get(key)
        if entry is None or entry.token is None:
            return None  # nothing, or a refresh waiting for a token: `get` schedules it
        cached = entry.credentials
        now = self._clock()
        if cached is None or not self._fresh(entry, cached, now):
            return None
        self._entries.move_to_end(key)
        self._offer(entry, token)
        entry.last_used = now
        return cached

    async def get(self, key: CacheKey, token: VerifiedToken) -> tuple[Credentials, Outcome]:
        """Credentials for `key`, exchanging `token` with STS only when nothing usable is cached."""
        cached = self.hit(key, token)
        if cached is not None:
            return cached, Outcome.HIT
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            refusal = self._refusal_for(key, token)
            if refusal is not None:
                raise self._answered_from_memory(refusal)
            entry = self._admit(key, token, now)
        else:
            self._entries.move_to_end(key)
            if entry.token is None:
                self._schedule(entry, now)  # a token again: a refresh that waited for one may start
            self._offer(entry, token)
        entry.last_used = now

        cached = entry.credentials
        if cached is not None and self._fresh(entry, cached, now):
            return cached, Outcome.HIT
        stale = cached if cached is not None and self._servable_stale(cached, now) else None
        exchange = entry.exchange
        joined = exchange is not None
        if exchange is None:
            if stale is not None and now < entry.retry_at:
                return stale, Outcome.STALE  # STS failed moments ago: do not call it again yet
            if self._stopping:
                if stale is not None:
                    return stale, Outcome.STALE
                raise OverloadedError(SHUTTING_DOWN, retry_after_seconds=1)
            # The freshest token of the identity's pods, not necessarily the caller's.
            exchange_token = entry.usable_token(now) or token
            refusal = self._refusal_for(key, exchange_token)
            if refusal is not None:
                if stale is not None and not _permanent(refusal):
                    return stale, Outcome.STALE  # a passing refusal: what is still valid is served
                raise self._answered_from_memory(refusal)
            exchange = self._start_exchange(entry, exchange_token, Priority.CALLER)
        ticket = entry.ticket
        if joined and ticket is not None:
            self._source.promote(ticket)  # a refresh nobody waited for now has a caller
        hold = self._policy.refresh_wait_seconds if stale is not None else self._policy.request_hold_seconds
        if not await self._wait(exchange, hold):
            # The exchange runs on without this caller; its result lands in the cache.
            if stale is not None and self._servable_stale(stale, self._clock()):
                return stale, Outcome.STALE
            raise OverloadedError(self._still_waiting(exchange, ticket, hold), retry_after_seconds=1)
        try:
            fresh = exchange.result()
        except (StsError, OverloadedError) as exc:
            if not _permanent(exc) and stale is not None and self._servable_stale(stale, self._clock()):
                return stale, Outcome.STALE
            raise exc.with_traceback(None) from None
        return fresh, Outcome.COALESCED if joined else Outcome.MISS

    async def _wait(self, exchange: asyncio.Task[Credentials], hold: float) -> bool:
        """Wait for `exchange` (never cancelling it) at most `hold` seconds, or until
        release_waiters(); True if it finished.

        Each caller waits on a future of its own, kept in a set that release_waiters()
        wakes. (One future shared by every held caller, as asyncio.wait on it would need,
        grows a callback list as long as the crowd, and each caller leaving scans it: a
        burst of a thousand callers paid a quadratic cost.)"""
        if exchange.done():
            return True
        if self._stopping:
            return False  # nobody is held any more
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        exchange.add_done_callback(wake)
        timer = loop.call_later(hold, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)
            exchange.remove_done_callback(wake)
        return exchange.done()

    def release_waiters(self) -> None:
        """Answer every caller held for an exchange now (503 + Retry-After, or its still
        valid credentials): the daemon is stopping. Exchanges are not cancelled here."""
        self._stopping = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _offer(self, entry: _Entry, token: VerifiedToken) -> None:
        """Keep the freshest token of the identity's pods: it can refresh furthest ahead.
        Never one STS refused for good (ExpiredTokenException): it refreshes nothing, and
        kept, it would have the identity's other pods refused in its name."""
        current = entry.token
        if (current is None or token.expires_at > current.expires_at) \
                and self._refusals.get((entry.key, token.fingerprint)) is None:
            entry.token = token

    def _fresh(self, entry: _Entry, credentials: Credentials, now: float) -> bool:
        remaining = credentials.remaining(now)
        if remaining > self._policy.serve_floor_seconds:
            return True
        # Credentials that arrived with less than the floor left (a short session, or
        # clocks apart) are served until their refresh: exchanging again on every
        # request would get nothing better.
        return now < entry.refresh_at and remaining > self._policy.stale_cutoff_seconds

    def _refusal_for(self, key: CacheKey, token: VerifiedToken) -> DaemonError | None:
        """A refusal remembered for the identity, or for this token of it."""
        return self._refusals.get(key) or self._refusals.get((key, token.fingerprint))

    @staticmethod
    def _answered_from_memory(refusal: DaemonError) -> DaemonError:
        metrics.REFUSALS_REMEMBERED.labels(kind="sts_refusal").inc()
        return refusal

    def _remember_refusal(self, entry: _Entry, token: VerifiedToken, error: StsError) -> None:
        token_specific = error.sts_code in _TOKEN_REFUSALS
        seconds = (self._policy.invalid_token_refusal_seconds if error.sts_code == "InvalidIdentityToken"
                   else self._policy.refusal_seconds)
        refusal_key: CacheKey | tuple[CacheKey, str] = (entry.key, token.fingerprint) if token_specific else entry.key
        self._refusals.remember(refusal_key, error, until=self._clock() + seconds)

    def maintain(self) -> None:
        """One pass: start due refreshes, evict what is idle or expired, update gauges.

        Only entries whose time has come are looked at (see the module docstring)."""
        now = self._clock()
        checks = self._checks
        due: list[_Entry] = []
        while checks and checks[0][0] <= now:
            at, _, entry = heapq.heappop(checks)
            if at == entry.check_at and not entry.evicted:  # else: a stale item
                entry.check_at = math.inf
                due.append(entry)
        for entry in due:
            token = entry.usable_token(now)
            cached = entry.credentials
            if now - entry.last_used > self._policy.idle_evict_seconds:
                if not (self._in_use_means_live_pod and self._in_use(entry.key)):
                    self._evict(entry, "idle")
                    continue
                # A live pod of this identity runs here: it will ask again (its SDK refreshes
                # about every session), so that counts as a use, whatever --idle-evict says.
                entry.last_used = now
            if entry.exchange is None and token is None and (cached is None or cached.remaining(now) <= 0):
                self._evict(entry, "expired")  # nothing to serve and nothing to refresh with
                continue
            if cached is not None:
                due_now = now >= max(entry.refresh_at, entry.retry_at) and not (self._retired or self._stopping)
                if due_now and entry.exchange is None and token is not None and self._in_use(entry.key):
                    self._start_exchange(entry, token, Priority.REFRESH)
            self._schedule(entry, self._next_check(entry))
        nearest = self._nearest_expiry()
        metrics.NEAREST_EXPIRY.set(0 if nearest == math.inf else max(nearest - now, 0))
        self._compact()

    def next_check_at(self) -> float:
        """When `maintain()` next has an entry to look at (wall time; math.inf: none).

        May be now or past, like the entries' own times (see `_next_check`). For a caller
        that runs `maintain()` when it is due rather than on a tick (the simulator)."""
        checks = self._checks
        while checks and (checks[0][2].evicted or checks[0][0] != checks[0][2].check_at):
            heapq.heappop(checks)  # stale: the entry was rescheduled or evicted
        return checks[0][0] if checks else math.inf

    def drop(self, matches: Callable[[CacheKey], bool], reason: str) -> int:
        """Evict every entry whose key matches, at once (say, a role annotation changed).
        An exchange under way finishes for its waiters but its result is not kept."""
        doomed = [entry for key, entry in self._entries.items() if matches(key)]
        for entry in doomed:
            self._evict(entry, reason)
        self._refusals.forget_where(lambda k: matches(k if isinstance(k, CacheKey) else k[0]))
        return len(doomed)

    # --- a warm handoff to a successor (handoff.py carries these over the wire) ---

    def snapshot(self) -> tuple[list[EntryState], list[RefusalState]]:
        """Every entry worth carrying over and every refusal still in force. Nothing
        expired: no expired credentials, token or refusal."""
        now = self._clock()
        entries = []
        for entry in self._entries.values():
            token = entry.usable_token(now)
            credentials = entry.credentials if entry.credentials is not None and entry.credentials.remaining(now) > 0 \
                else None
            if credentials is None and token is None:
                continue
            entries.append(EntryState(key=entry.key, credentials=credentials, token=token, last_used=entry.last_used,
                                      refresh_at=entry.refresh_at, retry_at=entry.retry_at, failures=entry.failures))
        refusals = [
            RefusalState(key=key if isinstance(key, CacheKey) else key[0],
                         fingerprint=None if isinstance(key, CacheKey) else key[1],
                         until=until, error=error)
            for key, until, error in self._refusals.in_force()
        ]
        return entries, refusals

    def restore(self, entries: list[EntryState], refusals: list[RefusalState]) -> int:
        """Take over a predecessor's entries (refresh times and all) and refusals; returns
        how many entries were taken. An entry already here is kept: it is at least as new."""
        now = self._clock()
        taken = 0
        for state in entries:
            if state.key in self._entries or len(self._entries) >= self._policy.max_entries:
                continue
            token = state.token if state.token is not None and state.token.expires_at > now else None
            credentials = state.credentials if state.credentials is not None and state.credentials.remaining(now) > 0 \
                else None
            if token is None and credentials is None:
                continue
            entry = _Entry(key=state.key, token=token, last_used=state.last_used, credentials=credentials,
                           refresh_at=state.refresh_at, retry_at=state.retry_at, failures=state.failures)
            self._entries[state.key] = entry
            if credentials is not None:
                heapq.heappush(self._expiries, (credentials.expires_at, next(self._sequence), entry))
            self._schedule(entry, self._next_check(entry))
            taken += 1
        for refusal in refusals:
            if refusal.until > now:
                key = refusal.key if refusal.fingerprint is None else (refusal.key, refusal.fingerprint)
                self._refusals.remember(key, refusal.error, until=refusal.until)
        metrics.CACHE_ENTRIES.set(len(self._entries))
        return taken

    def retire(self) -> None:
        """A successor has this cache's entries and refreshes them: start no refresh from
        now on (exchanges under way finish; callers are still answered)."""
        self._retired = True

    def _next_check(self, entry: _Entry) -> float:
        """The earliest time at which maintain() may have something to do with `entry`.

        May be now or past: an entry due but held back (no caller on the node) is
        looked at again on the next pass, as every entry used to be."""
        # Early by a millisecond, so that rounding in the sum can never make the
        # idle eviction later than `now - last_used > idle_evict_seconds` says.
        at = entry.last_used + self._policy.idle_evict_seconds - _EARLY_SECONDS
        token = entry.token
        if token is not None:
            at = min(at, token.expires_at)  # dropped then: an expired token is not kept
        cached = entry.credentials
        if cached is not None and entry.exchange is None:  # an exchange under way reschedules when it ends
            at = min(at, cached.expires_at)  # with no token left, evicted then
            if token is not None:  # without one, get() reschedules when a token comes
                at = min(at, max(entry.refresh_at, entry.retry_at))
        return at

    def _schedule(self, entry: _Entry, at: float) -> None:
        """Have maintain() look at `entry` at `at`, unless it will already look sooner."""
        if at < entry.check_at and not entry.evicted:
            entry.check_at = at
            heapq.heappush(self._checks, (at, next(self._sequence), entry))

    def _nearest_expiry(self) -> float:
        """When the soonest credentials of a cached entry expire (math.inf: none)."""
        expiries = self._expiries
        while expiries:
            at, _, entry = expiries[0]
            if not entry.evicted and entry.credentials is not None and entry.credentials.expires_at == at:
                return at
            heapq.heappop(expiries)  # evicted, or its credentials were replaced
        return math.inf

    def _compact(self) -> None:
        """Rebuild a heap from the live entries once stale items outnumber them."""
        limit = 2 * len(self._entries) + _COMPACT_SLACK
        if len(self._checks) > limit:
            self._checks = [
                (entry.check_at, next(self._sequence), entry)
                for entry in self._entries.values()
                if entry.check_at != math.inf
            ]
            heapq.heapify(self._checks)
        if len(self._expiries) > limit:
            self._expiries = [
                (entry.credentials.expires_at, next(self._sequence), entry)
                for entry in self._entries.values()
                if entry.credentials is not None
            ]
            heapq.heapify(self._expiries)

    async def run(self, *, interval_seconds: float) -> None:
        """Maintain the cache until cancelled; then cancel exchanges still under way."""
        try:
            while True:
                self.maintain()
                await asyncio.sleep(interval_seconds)
        finally:
            for entry in self._entries.values():
                if entry.exchange is not None:
                    entry.exchange.cancel()

    def _admit(self, key: CacheKey, token: VerifiedToken, now: float) -> _Entry:
        while len(self._entries) >= self._policy.max_entries:
            _, oldest = next(iter(self._entries.items()))
            self._evict(oldest, "capacity")
        entry = _Entry(key=key, token=token, last_used=now)
        self._entries[key] = entry
        self._schedule(entry, self._next_check(entry))
        metrics.CACHE_ENTRIES.set(len(self._entries))
        return entry

    def _evict(self, entry: _Entry, reason: str) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            metrics.EVICTIONS.labels(reason=reason).inc()
            metrics.CACHE_ENTRIES.set(len(self._entries))
            log.info("evicted %s (%s)", entry.key.subject, reason, extra={"role_arn": entry.key.role_arn, "reason": reason})
        entry.evicted = True
        entry.token = None  # the pod token goes with its entry

    def _servable_stale(self, credentials: Credentials, now: float) -> bool:
        return credentials.remaining(now) > self._policy.stale_cutoff_seconds

    def _still_waiting(self, exchange: asyncio.Task[Credentials], ticket: Ticket | None, hold: float) -> str:
        if self._stopping:
            return SHUTTING_DOWN
        if ticket is not None and ticket.queued:
            return (
                f"the STS exchange for this identity is still queued behind the node's STS budget after "
                f"{hold:g} s; it goes on without you, retry in a second"
            )
        attempts = ticket.attempts if ticket is not None else 0
        said = f"; STS's last answer: {ticket.last_error}" if ticket is not None and ticket.last_error else ""
        return (
            f"the STS exchange for this identity has not finished after {hold:g} s ({attempts} attempt"
            f"{'' if attempts == 1 else 's'} so far{said}); it goes on without you, retry in a second"
        )

    def _start_exchange(self, entry: _Entry, token: VerifiedToken, priority: Priority) -> asyncio.Task[Credentials]:
        reason = "cold" if entry.credentials is None else "refresh"
        entry.ticket = Ticket(priority)
        task = asyncio.create_task(
            self._exchange(entry, token, reason, entry.ticket), name=f"sts exchange for {entry.key.subject}"
        )
        task.add_done_callback(_consume_exception)
        entry.exchange = task
        return task

    async def _exchange(self, entry: _Entry, token: VerifiedToken, reason: str, ticket: Ticket) -> Credentials:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            credentials = await self._source.assume_role(
                role_arn=entry.key.role_arn, token=token, reason=reason, ticket=ticket
            )
            self._check_lifetime(credentials)
        except (StsError, OverloadedError) as exc:
            self._record_failure(entry, token, exc, reason)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unexpected library error: fail this exchange only
            # No traceback: an unexpected library error may quote what STS sent, secrets included.
            log.error("STS exchange for %s failed unexpectedly: %s", entry.key.subject, type(exc).__name__)
            error = StsUnavailableError(f"STS exchange failed unexpectedly: {type(exc).__name__}")
            self._record_failure(entry, token, error, reason)
            raise error from None
        else:
            now = self._clock()
            entry.credentials = credentials
            entry.failures = 0
            entry.retry_at = 0.0
            entry.refresh_at = self._refresh_time(credentials, now)
            if not entry.evicted:
                heapq.heappush(self._expiries, (credentials.expires_at, next(self._sequence), entry))
        finally:
            entry.exchange = None
            entry.ticket = None
            # Success, failure or cancellation: the entry's next time (refresh, retry, expiry).
            self._schedule(entry, self._next_check(entry))
        log.info(
            "exchanged token for %s (%s) in %.3f s",
            entry.key.subject, reason, loop.time() - started,
            extra={"role_arn": entry.key.role_arn, "reason": reason, "access_key_id": credentials.access_key_id,
                   "expiration": credentials.to_container_response()["Expiration"]},
        )
        return credentials

    def _check_lifetime(self, credentials: Credentials) -> None:
        """Credentials that expire before they could be used mean the node's clock and
        STS's disagree: refuse them (and retry later) rather than serve them."""
        now = self._clock()
        remaining = credentials.remaining(now)
        if remaining > self._policy.stale_cutoff_seconds:
            if remaining <= self._policy.serve_floor_seconds:
                metrics.CLOCK_SKEW.labels(severity="short").inc()
                log.warning("STS issued credentials with only %.0f s left by this node's clock; is the clock off?",
                            remaining)
            return
        metrics.CLOCK_SKEW.labels(severity="expired").inc()
        when = credentials.to_container_response()["Expiration"]
        raise StsUnavailableError(
            f"STS issued credentials that expire at {when}, {remaining:+.0f} s from now by this node's clock: "
            "this node's clock (or STS's) is off; check its time synchronisation (chrony, NTP)",
            sts_code="ClockSkew",
        )

    def _record_failure(self, entry: _Entry, token: VerifiedToken, exc: DaemonError, reason: str) -> None:
        if reason == "refresh":
            metrics.REFRESH_FAILURES.inc()
        entry.failures += 1
        backoff = capped(self._policy.retry_base_seconds, self._policy.retry_max_seconds, entry.failures - 1)
        entry.retry_at = self._clock() + self._rng.uniform(backoff / 2, backoff)
        log.warning("STS exchange for %s failed (%s): %s", entry.key.subject, reason, exc.message,
                    extra={"role_arn": entry.key.role_arn, "sts_code": getattr(exc, "sts_code", None),
                           "permanent": _permanent(exc)})
        if isinstance(exc, StsDeniedError) or _permanent(exc):
            self._remember_refusal(entry, token, exc)  # type: ignore[arg-type]
        if getattr(exc, "sts_code", None) in _TOKEN_REFUSALS:
            # The token is refused, not the identity: the credentials cached for the
            # identity's other pods stay, and this token refreshes nothing any more.
            if entry.token is token:
                entry.token = None
        elif _permanent(exc):
            self._evict(entry, "denied")

    def _refresh_time(self, credentials: Credentials, now: float) -> float:
        lifetime = max(credentials.remaining(now), 0.0)
        jitter = self._rng.uniform(-self._policy.refresh_jitter, self._policy.refresh_jitter)
        return now + lifetime * (0.5 + jitter)


_EARLY_SECONDS = 0.001
_COMPACT_SLACK = 1024


def _permanent(error: DaemonError) -> bool:
    return isinstance(error, StsError) and error.permanent


def _consume_exception(task: asyncio.Task[Credentials]) -> None:
    # Waiters get the error through shield(); a refresh nobody waits on must not
    # produce "Task exception was never retrieved".
    if not task.cancelled():
        task.exception()
