"""The STS budget on virtual loop time, and the retries through it."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone

import aiohttp
import pytest

from daemon.errors import StsDeniedError, StsError, StsTimeoutError, StsUnavailableError
from daemon.limiter import BudgetedSource, BudgetExhaustedError, BudgetPolicy, RetryPolicy, StsBudget
from daemon.models import Credentials, Identity, Priority, Ticket, VerifiedToken
from tests.conftest import ROLE_A, SUBJECT_A, StartDaemon, fetch, metric
from tests.sts_double import StsDouble, sts_error

pytestmark = pytest.mark.looptime


def now() -> float:
    return asyncio.get_running_loop().time()


async def take(budget: StsBudget, ticket: Ticket, granted_at: list[float], hold_seconds: float = 0.0) -> None:
    async with budget.slot(ticket):
        granted_at.append(now())
        await asyncio.sleep(hold_seconds)


async def test_burst_then_rate() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=10, burst=20, concurrency=100))
    start = now()
    granted: list[float] = []

    await asyncio.gather(*(take(budget, Ticket(Priority.CALLER), granted) for _ in range(60)))

    offsets = sorted(t - start for t in granted)
    assert offsets[19] == pytest.approx(0, abs=1e-6)  # the burst goes at once
    assert offsets[20] == pytest.approx(0.1, abs=1e-3)  # then one every 1/rate
    assert offsets[59] == pytest.approx(4.0, abs=1e-3)


async def test_concurrency_bound() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=1000, burst=1000, concurrency=2))
    start = now()
    granted: list[float] = []

    await asyncio.gather(*(take(budget, Ticket(Priority.CALLER), granted, hold_seconds=1.0) for _ in range(5)))

    assert sorted(round(t - start, 3) for t in granted) == [0, 0, 1, 1, 2]


async def test_callers_go_before_refreshes_and_a_promoted_refresh_joins_them() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=1, burst=1, concurrency=10))
    order: list[str] = []

    async def run(name: str, ticket: Ticket) -> None:
        async with budget.slot(ticket):
            order.append(name)

    first = asyncio.create_task(run("first", Ticket(Priority.REFRESH)))  # takes the only token
    await asyncio.sleep(0)
    promoted = Ticket(Priority.REFRESH)
    tasks = [
        asyncio.create_task(run("refresh-1", Ticket(Priority.REFRESH))),
        asyncio.create_task(run("refresh-2", promoted)),
        asyncio.create_task(run("caller-1", Ticket(Priority.CALLER))),
    ]
    await asyncio.sleep(0)
    budget.promote(promoted)
    tasks.append(asyncio.create_task(run("caller-2", Ticket(Priority.CALLER))))
    await asyncio.gather(first, *tasks)

    assert order == ["first", "refresh-2", "caller-1", "caller-2", "refresh-1"]


async def test_throttling_cuts_the_rate_and_successes_bring_it_back() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=10, burst=20, concurrency=10, min_rate_per_second=0.5))
    budget.throttled()
    assert budget.rate == pytest.approx(7.0)  # CUBIC's beta = 0.7
    assert metric("irsa_cache_sts_budget_rate") == pytest.approx(7.0)
    for _ in range(7):  # a wave of concurrent calls all answered Throttling: one cut
        budget.throttled()
    assert budget.rate == pytest.approx(7.0)
    await asyncio.sleep(1)
    budget.throttled()  # still throttled a second later: cut again
    assert budget.rate == pytest.approx(4.9)

    rates = []
    for _ in range(6):
        await asyncio.sleep(1)
        budget.succeeded()
        rates.append(budget.rate)
    assert rates == sorted(rates)  # gradual, never a jump back and forth
    assert rates[0] < 10 and rates[-1] == pytest.approx(10)


async def test_throttling_never_cuts_below_the_floor() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=10, burst=20, concurrency=10, min_rate_per_second=0.5))
    for _ in range(30):
        budget.throttled()
        await asyncio.sleep(1)
    assert budget.rate == pytest.approx(0.5)


async def test_a_throttle_empties_the_bucket() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=10, burst=20, concurrency=10))
    budget.throttled()  # rate 7/s, no tokens left
    start = now()
    granted: list[float] = []

    await take(budget, Ticket(Priority.CALLER), granted)

    assert granted[0] - start == pytest.approx(1 / 7, abs=1e-3)


async def test_the_queue_is_bounded() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=1, burst=1, concurrency=10, max_queued=3))
    granted: list[float] = []
    waiting = [asyncio.create_task(take(budget, Ticket(Priority.CALLER), granted)) for _ in range(4)]
    await asyncio.sleep(0)  # one granted, three queued

    with pytest.raises(BudgetExhaustedError) as refused:
        await take(budget, Ticket(Priority.CALLER), granted)

    assert refused.value.status == 503
    await asyncio.gather(*waiting)
    assert len(granted) == 4


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=1, burst=1, concurrency=1))
    granted: list[float] = []
    holder = asyncio.create_task(take(budget, Ticket(Priority.CALLER), granted, hold_seconds=5))
    quitter = asyncio.create_task(take(budget, Ticket(Priority.CALLER), granted))
    await asyncio.sleep(0.5)
    quitter.cancel()
    await asyncio.gather(quitter, return_exceptions=True)
    assert budget.queued == 0

    await holder
    await asyncio.wait_for(take(budget, Ticket(Priority.CALLER), granted), timeout=2)
    assert len(granted) == 2


async def test_a_waiter_cancelled_just_before_its_turn_is_skipped() -> None:
    budget = StsBudget(BudgetPolicy(rate_per_second=1000, burst=1000, concurrency=1))
    holding = budget.slot(Ticket(Priority.CALLER))
    await holding.__aenter__()
    granted: list[float] = []
    quitter = asyncio.create_task(take(budget, Ticket(Priority.CALLER), granted))
    other = asyncio.create_task(take(budget, Ticket(Priority.REFRESH), granted))
    await asyncio.sleep(0)

    quitter.cancel()  # its future is cancelled now; its task runs only later
    await holding.__aexit__(None, None, None)  # the release dispatches at once

    await asyncio.wait_for(other, timeout=1)
    assert quitter.cancelled() and len(granted) == 1


# --- retries through the budget ---


class ScriptedSource:
    """Answers each attempt from a script of errors; then succeeds."""

    def __init__(self, *errors: StsError) -> None:
        self.errors = list(errors)
        self.attempts: list[float] = []

    async def assume_role(self, *, role_arn: str, token: VerifiedToken) -> Credentials:
        self.attempts.append(now())
        if self.errors:
            raise self.errors.pop(0)
        return Credentials(
            access_key_id="ASIAEXAMPLE", secret_access_key="s", session_token="t",
            expiration=datetime(2030, 1, 1, tzinfo=timezone.utc), account_id="123456789012",
            assumed_role_arn="arn:aws:sts::123456789012:assumed-role/r/s",
        )


TOKEN = VerifiedToken(
    identity=Identity(issuer="https://issuer.test", subject=SUBJECT_A, audience="sts.amazonaws.com"),
    raw="token", expires_at=2e9, fingerprint="f",
)


def throttle() -> StsUnavailableError:
    return StsUnavailableError("Rate exceeded", sts_code="Throttling", throttled=True)


def budgeted(source: ScriptedSource, **retry: float) -> BudgetedSource:
    budget = StsBudget(BudgetPolicy(rate_per_second=10, burst=20, concurrency=8))
    return BudgetedSource(source=source, budget=budget, retry=RetryPolicy(**retry), rng=random.Random(3))  # type: ignore[arg-type]


async def exchange(source: BudgetedSource) -> Credentials:
    return await source.assume_role(role_arn=ROLE_A, token=TOKEN, reason="cold", ticket=Ticket(Priority.CALLER))


async def test_throttling_is_retried_with_backoff_and_cuts_the_budget() -> None:
    scripted = ScriptedSource(throttle(), throttle())
    source = budgeted(scripted)
    throttled_before = metric("irsa_cache_sts_calls_total", reason="cold", result="throttled")
    retries_before = metric("irsa_cache_sts_retries_total", reason="cold")

    await exchange(source)

    assert len(scripted.attempts) == 3
    gaps = [b - a for a, b in zip(scripted.attempts, scripted.attempts[1:])]
    assert all(0 < gap <= 0.2 * 2**n + 0.2 for n, gap in enumerate(gaps, start=1))  # full jitter, capped
    assert metric("irsa_cache_sts_calls_total", reason="cold", result="throttled") == throttled_before + 2
    assert metric("irsa_cache_sts_retries_total", reason="cold") == retries_before + 2
    assert source.budget.rate < 10


@pytest.mark.parametrize(
    ("error", "attempts"),
    [
        pytest.param(StsDeniedError("no", sts_code="AccessDenied"), 1, id="AccessDenied-never"),
        pytest.param(StsDeniedError("no", sts_code="InvalidIdentityToken", permanent=False), 2, id="InvalidIdentityToken-once-more"),
        pytest.param(StsUnavailableError("bad request", sts_code="ValidationError", permanent=True), 1, id="ValidationError-never"),
        pytest.param(StsUnavailableError("down", sts_code="InternalFailure"), 5, id="5xx-up-to-max-attempts"),
        pytest.param(StsTimeoutError("slow"), 5, id="timeout-up-to-max-attempts"),
    ],
)
async def test_what_is_retried_and_how_often(error: StsError, attempts: int) -> None:
    scripted = ScriptedSource(*[error] * 10)
    with pytest.raises(type(error)):
        await exchange(budgeted(scripted, max_attempts=5))
    assert len(scripted.attempts) == attempts


async def test_retries_stop_at_the_deadline() -> None:
    scripted = ScriptedSource(*[throttle()] * 100)
    start = now()

    with pytest.raises(StsUnavailableError):
        await exchange(budgeted(scripted, max_attempts=100, deadline_seconds=10, backoff_max_seconds=5))

    assert now() - start <= 10
    assert 3 < len(scripted.attempts) < 100


# --- end to end: STS throttling hard, real HTTP ---


async def test_under_hard_throttling_every_caller_gets_credentials_or_a_clear_503(
    start_daemon: StartDaemon, issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    # STS admits 2 calls per second of loop time (virtual here) and throttles the rest.
    admitted: list[float] = []

    def rate_limited(call: object) -> object:
        recent = [t for t in admitted if now() - t < 1.0]
        admitted[:] = recent
        if len(recent) >= 2:
            return sts_error("Throttling", "Rate exceeded")
        admitted.append(now())
        return None

    sts.fault = rate_limited
    daemon = await start_daemon("--sts-rate", "50", "--sts-burst", "50", "--request-hold", "1.5")
    subjects = [f"system:serviceaccount:batch:job-{n}" for n in range(20)]
    tokens = [issuer.mint(subject) for subject in subjects for _ in range(5)]

    first = await asyncio.wait_for(asyncio.gather(*(fetch(http, daemon, token) for token in tokens)), timeout=60)

    assert {answer.status for answer in first} <= {200, 502, 503}
    for answer in first:
        if answer.status == 503:  # still waiting for the budget or STS when the hold ended
            assert answer.headers["Retry-After"] == "1"
            assert answer.body["code"] == "overloaded"
            assert "STS" in answer.body["message"]
        if answer.status == 502:  # the exchange ran out of attempts: STS's own answer, and how many
            assert answer.body["code"] == "sts_unavailable"
            assert "Throttling" in answer.body["message"] and "attempts over" in answer.body["message"]
    assert any(answer.status != 200 for answer in first)  # STS really pushed back
    assert metric("irsa_cache_sts_calls_total", reason="cold", result="throttled") > 0

    # Clients retry, as the SDKs do: everyone ends with credentials, one exchange per identity.
    for _ in range(30):
        await asyncio.sleep(1)
        again = await asyncio.gather(*(fetch(http, daemon, token) for token in tokens))
        if all(answer.status == 200 for answer in again):
            break
    assert all(answer.status == 200 for answer in again)
    succeeded = [call for call in sts.assume_calls if call.role_arn]
    assert len({call.session_name for call in succeeded}) == 20
