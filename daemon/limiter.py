"""The node's STS budget: how fast, how many at once, and who goes first.

STS's quota is per account and region, shared by every node; a scale-out must not
spend it in one burst. Every attempt at STS, retries included, takes a token from
one bucket (`rate` per second, `burst` at most) and one of `concurrency` slots.
Exchanges a caller waits for go before background refreshes. On throttling the
rate is cut and recovers along botocore's own CUBIC curve (the calculator its
`adaptive` retry mode uses); retries back off with full jitter within a deadline.

What botocore does and what is ours: botocore makes single attempts (transport,
time-outs, error parsing) and `sts.py` decides which errors are permanent. Its
retry modes retry inside one call, unseen by a shared budget, and its adaptive
limiter is per client with no priorities, no concurrency bound and no metrics;
so the retry loop, the shared bucket, the priorities and the metrics live here.

With `--sts-cluster-rate` the rate and the bucket are the node's part of a budget
shared by every node (`cluster_budget.ClusterShare`): its share, borrowing above it
while exchanges wait, cutting the borrowing on throttling; CUBIC is then not used.

Time is the event loop's (`loop.time()`), so tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from botocore.retries.throttling import CubicCalculator

from daemon import metrics
from daemon.backoff import full_jitter
from daemon.cluster_budget import ClusterShare
from daemon.errors import OverloadedError, StsDeniedError, StsError
from daemon.models import Credentials, CredentialSource, Priority, Ticket, VerifiedToken

log = logging.getLogger(__name__)

_EPSILON = 1e-9  # refills are float sums: 0.9999999999 tokens is a whole one
_MIN_WAKEUP_SECONDS = 0.001


@dataclass(frozen=True, kw_only=True)
class BudgetPolicy:
    rate_per_second: float = 10.0
    burst: int = 20
    concurrency: int = 8
    max_queued: int = 500  # exchanges waiting for budget; past it, callers get 503 at once
    min_rate_per_second: float = 0.5  # throttling never cuts below this
    cut_interval_seconds: float = 1.0  # throttles within this of a cut are the same wave


class BudgetExhaustedError(OverloadedError):
    code = "sts_budget_exhausted"


class StsBudget:
    """Token bucket, concurrency slots and a two-class priority queue."""

    def __init__(self, policy: BudgetPolicy, share: ClusterShare | None = None) -> None:
        self._policy = policy
        self._share = share
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self.rate = policy.rate_per_second
        self._tokens = float(policy.burst)
        self._refilled_at = now
        self._in_flight = 0
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()
        self._wakeup: asyncio.TimerHandle | None = None
        self._cubic = CubicCalculator(starting_max_rate=policy.rate_per_second, start_time=now)
        self._last_cut = -math.inf
        self._throttled_since_success = False
        # Resolved once: this runs on every grant and release.
        self._waiting_series = (metrics.STS_WAITING.labels(priority="caller"),
                                metrics.STS_WAITING.labels(priority="refresh"))
        self._idle_since: float | None = now  # nothing waiting or in flight since then
        self._shared = False  # the share has been active (its node count known)
        if share is not None:
            share.on_change = self._share_changed
            if share.active:
                self.rate, self._tokens, self._shared = share.rate, share.initial_tokens(), True
        metrics.STS_BUDGET_RATE.set(self.rate)

    @property
    def _active_share(self) -> ClusterShare | None:
        """The share, when the cluster's budget is in force: it sets the rate and the bucket."""
        return self._share if self._share is not None and self._share.active else None

    @property
    def _burst(self) -> float:
        share = self._active_share
        return share.capacity if share is not None else float(self._policy.burst)

    def _follow_share(self) -> None:
        """The rate is the share's now (its gauge too)."""
        assert self._share is not None
        if self._share.rate != self.rate:
            self.rate = self._share.rate
            metrics.STS_BUDGET_RATE.set(self.rate)

    def _share_changed(self) -> None:
        """The node count changed (or became known): the rate and bucket follow at once."""
        assert self._share is not None
        now = self._loop.time()
        self._refill(now)
        self._follow_share()
        # From the per-node budget to the share: start from the node's part of the burst.
        self._tokens = min(self._tokens, self._burst) if self._shared else self._share.initial_tokens()
        self._shared = True
        self._dispatch()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        """Wait for a token and a concurrency slot, in priority order; hold the slot inside."""
        await self.acquire(ticket)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a token and a concurrency slot, in priority order; `release()` the slot after."""
        await self._acquire(ticket)

    def release(self) -> None:
        self._in_flight -= 1
        self._dispatch()
        if not self._waiting and self._in_flight == 0:
            self._idle_since = self._loop.time()

    def promote(self, ticket: Ticket) -> None:
        """A caller now waits for this exchange: it goes before refreshes from now on."""
        if ticket.priority is not Priority.CALLER:
            ticket.priority = Priority.CALLER
            self._publish_queue()
            self._dispatch()

    def throttled(self) -> None:
        """STS said slow down: cut the rate (CUBIC's multiplicative decrease) and spend the bucket."""
        now = self._loop.time()
        self._refill(now)
        self._throttled_since_success = True
        if (share := self._active_share) is not None:
            # Borrowing cut (never below the share) and held for a while. The bucket is kept (down
            # to its new size): the node's own share is still its own. (Emptying it, as the per-node
            # budget does, would leave quota unused: the shares add up to the account's rate.)
            share.throttled(now)
            self._follow_share()
            self._tokens = min(self._tokens, self._burst)
            return
        self._tokens = min(self._tokens, 0.0)
        if now - self._last_cut < self._policy.cut_interval_seconds:
            return  # the same wave of calls, answered together: one cut, not one per answer
        self._last_cut = now
        self.rate = max(self._policy.min_rate_per_second, self._cubic.error_received(self.rate, now))
        metrics.STS_BUDGET_RATE.set(self.rate)
        log.warning("STS throttled: budget cut to %.2f calls/s", self.rate)

    def succeeded(self) -> None:
        """Recover along the CUBIC curve towards the configured rate (shared: maybe borrow more)."""
        if (share := self._active_share) is not None:
            now = self._loop.time()
            self._refill(now)
            share.succeeded(now, backlog=bool(self._waiting))
            self._follow_share()
            return
        if not self._throttled_since_success and self.rate >= self._policy.rate_per_second:
            return
        now = self._loop.time()
        self._refill(now)
        recovered = self._cubic.success_received(now)
        self.rate = min(self._policy.rate_per_second, max(self._policy.min_rate_per_second, recovered))
        self._throttled_since_success = False
        metrics.STS_BUDGET_RATE.set(self.rate)

    async def _acquire(self, ticket: Ticket) -> None:
        if len(self._waiting) >= self._policy.max_queued:
            raise BudgetExhaustedError(
                f"{len(self._waiting)} STS exchanges are already queued on this node; retry shortly"
            )
        if self._idle_since is not None:
            if (share := self._active_share) is not None:
                now = self._loop.time()
                self._refill(now)
                share.resume(now - self._idle_since)
                self._follow_share()
            self._idle_since = None
        ticket.seq = next(self._seq)
        ticket.granted = self._loop.create_future()
        self._waiting.append(ticket)
        self._publish_queue()
        started = self._loop.time()
        self._dispatch()
        try:
            await ticket.granted
        except asyncio.CancelledError:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._publish_queue()
            elif ticket.granted.done() and not ticket.granted.cancelled():
                self._in_flight -= 1  # granted, then cancelled before use: give the slot back
                self._dispatch()
            raise
        finally:
            metrics.STS_BUDGET_WAIT.labels(priority=ticket.priority.name.lower()).observe(self._loop.time() - started)

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now

    def _dispatch(self) -> None:
        """Grant waiters, best priority then oldest first, while tokens and slots last."""
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        now = self._loop.time()
        self._refill(now)
        share = self._active_share
        if share is not None and self._waiting:
            share.grow(now, backlog=True)  # exchanges wait: borrow more if the share allows
            self._follow_share()
        while self._waiting and self._in_flight < self._policy.concurrency and self._tokens >= 1.0 - _EPSILON:
            ticket = min(self._waiting, key=lambda t: (t.priority, t.seq))
            self._waiting.remove(ticket)
            assert ticket.granted is not None
            if ticket.granted.done():
                continue  # cancelled, its task not yet resumed to remove it: skip, spend nothing
            self._tokens -= 1.0
            self._in_flight += 1
            ticket.granted.set_result(None)
        self._publish_queue()
        if self._waiting and self._in_flight < self._policy.concurrency:
            # Out of tokens: come back when the next one is due. (Out of slots: a release calls us.)
            due_in = max((1.0 - self._tokens) / self.rate, _MIN_WAKEUP_SECONDS)
            if share is not None:
                due_in = min(due_in, share.policy.raise_interval_seconds)  # the rate may grow meanwhile
            self._wakeup = self._loop.call_at(now + due_in, self._dispatch)

    def _publish_queue(self) -> None:
        callers = sum(1 for t in self._waiting if t.priority is Priority.CALLER)
        caller_series, refresh_series = self._waiting_series
        caller_series.set(callers)
        refresh_series.set(len(self._waiting) - callers)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 5
    max_attempts_invalid_token: int = 2  # InvalidIdentityToken may mean STS could not fetch the keys
    backoff_base_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    deadline_seconds: float = 30.0  # an exchange gives up after this, retries included


class BudgetedSource:
    """STS through the budget: each attempt waits for a slot; passing failures are retried."""

    def __init__(self, *, source: CredentialSource, budget: StsBudget, retry: RetryPolicy,
                 rng: random.Random | None = None) -> None:
        self._source = source
        self._budget = budget
        self._retry = retry
        self._rng = rng or random.Random()

    @property
    def budget(self) -> StsBudget:
        return self._budget

    def promote(self, ticket: Ticket) -> None:
        self._budget.promote(ticket)

    async def assume_role(self, *, role_arn: str, token: VerifiedToken, reason: str, ticket: Ticket) -> Credentials:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._retry.deadline_seconds
        for attempt in itertools.count(1):
            try:
                async with asyncio.timeout_at(deadline):
                    await self._budget.acquire(ticket)
            except TimeoutError:
                raise BudgetExhaustedError(self._queued_too_long(ticket, loop.time() - started)) from None
            try:
                ticket.attempts = attempt
                attempt_started = loop.time()
                try:
                    credentials = await self._source.assume_role(role_arn=role_arn, token=token)
                except StsError as exc:
                    self._count(reason, exc, loop.time() - attempt_started)
                    ticket.last_error = exc.sts_code or exc.code
                    if exc.throttled:
                        self._budget.throttled()
                    if not self._should_retry(exc, attempt):
                        raise _with_history(exc, attempt, loop.time() - started) from None
                    error = exc
                else:
                    self._count(reason, None, loop.time() - attempt_started)
                    self._budget.succeeded()
                    return credentials
            finally:
                self._budget.release()
            # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter").
            delay = full_jitter(self._rng, self._retry.backoff_base_seconds, self._retry.backoff_max_seconds, attempt)
            if loop.time() + delay >= deadline:
                raise _with_history(error, attempt, loop.time() - started) from None
            metrics.STS_RETRIES.labels(reason=reason).inc()
            log.info("retrying STS for %s in %.2f s after %s (attempt %d)", token.identity.subject, delay, error.sts_code, attempt)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _queued_too_long(self, ticket: Ticket, waited: float) -> str:
        tried = f" after {ticket.attempts} attempt(s), the last answered {ticket.last_error}" if ticket.attempts else ""
        return (
            f"the STS exchange waited {waited:.0f} s for a turn in the node's STS budget{tried} "
            f"({self._budget.queued} exchanges queued, {self._budget.rate:.2f} calls/s now) and gave up; retry shortly"
        )

    def _should_retry(self, error: StsError, attempt: int) -> bool:
        if isinstance(error, StsDeniedError) and error.sts_code == "InvalidIdentityToken":
            return attempt < self._retry.max_attempts_invalid_token
        return not error.permanent and attempt < self._retry.max_attempts

    @staticmethod
    def _count(reason: str, error: StsError | None, elapsed: float) -> None:
        result = (
            "success" if error is None
            else "denied" if isinstance(error, StsDeniedError)
            else "throttled" if error.throttled
            else "error"
        )
        metrics.STS_CALLS.labels(reason=reason, result=result).inc()
        metrics.STS_CALL_DURATION.labels(result=result).observe(elapsed)


def _with_history(error: StsError, attempts: int, seconds: float) -> StsError:
    """The last error, its message saying how many attempts were made over how long: a
    pod's error then tells a single refusal from a failing STS."""
    if attempts > 1:
        error.message = f"{error.message} ({attempts} attempts over {seconds:.1f} s)"
        error.args = (error.message,)
    return error
