"""The STS budget shared by every node (--sts-cluster-rate): the share, borrowing above it and
falling back (pure, then in the real budget on virtual time), and the node count read from the
daemon's own DaemonSet through the API double with the real kubernetes-asyncio client."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon import app, config
from daemon.cluster_budget import ClusterShare, SharePolicy
from daemon.errors import StsUnavailableError
from daemon.limiter import BudgetedSource, BudgetPolicy, RetryPolicy, StsBudget
from daemon.models import Credentials, Identity, Priority, Ticket, VerifiedToken
from tests.conftest import eventually, metric
from tests.k8s_double import K8sApiDouble, daemon_set
from tests.sts_double import StsDouble

NAMESPACE, NAME = "irsa-cache", "irsa-cache"
DAEMONSET_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{NAME}"


def share_of(nodes: int, rate: float = 600, burst: int = 600, seed: int = 1) -> ClusterShare:
    share = ClusterShare(SharePolicy(rate_per_second=rate, burst=burst), rng=random.Random(seed))
    share.set_nodes(nodes)
    return share


# --- the share, on its own ---


def test_the_guaranteed_rate_is_the_cluster_rate_over_the_nodes_and_falls_as_nodes_join() -> None:
    share = ClusterShare(SharePolicy(rate_per_second=600, burst=600))
    assert not share.active  # until the DaemonSet is read: the per-node budget

    share.set_nodes(100)
    assert (share.share, share.rate, share.capacity) == (6.0, 6.0, pytest.approx(4.8))  # 80 % of 600 / 100
    share.set_nodes(1200)
    assert share.rate == 0.5  # the floor scales down: 1,200 nodes together ask 600/s, not 1,200 x 0.5
    assert share.capacity == 1.0  # but a node can always make one call


def test_borrowing_grows_while_exchanges_wait_and_stops_at_the_cluster_rate() -> None:
    share = share_of(100)  # 6/s each

    share.grow(0.0, backlog=False)
    share.grow(5.0, backlog=False)
    assert share.rate == 6  # nothing waiting: nothing to borrow for
    share.grow(10.0, backlog=True)
    assert share.rate == 6  # exchanges wait from now: the first step comes half a second later
    rates = []
    for step in range(1, 7):
        share.grow(10.0 + step * 0.5, backlog=True)
        share.grow(10.0 + step * 0.5 + 0.2, backlog=True)  # at most one step each half second
        rates.append(share.rate)

    assert rates == pytest.approx([7.5, 11.25, 22.5, 45, 90, 180])  # +25 %, +50 %, then doubling
    for step in range(7, 10):
        share.grow(10.0 + step * 0.5, backlog=True)
    assert share.rate == 600  # at most the cluster's rate


def borrowed(share: ClusterShare, steps: int, start: float = 0.0) -> float:
    """Let exchanges wait from `start` through `steps` raises; returns the time after."""
    share.grow(start, backlog=True)
    for step in range(1, steps + 1):
        share.grow(start + step * 0.5, backlog=True)
    return start + steps * 0.5


def test_throttling_cuts_borrowing_and_holds_it_longer_each_wave() -> None:
    share = share_of(100)
    now = borrowed(share, 4)
    assert share.rate == 45

    share.throttled(now)
    share.throttled(now + 0.5)  # the same wave: one cut and one hold, not two
    assert share.rate == pytest.approx(45 * 0.3)  # 30 % of what it borrowed
    share.throttled(now + 1.5)  # the next wave: never below the share
    assert share.rate == 6
    held = now + 1.5  # the first wave held 10-20 s; this second one holds 20-40 s
    share.grow(held + 19.9, backlog=True)
    assert share.rate == 6
    share.grow(held + 40.1, backlog=True)
    assert share.rate == 7.5  # borrowing again, from the first step

    share.throttled(held + 200.0)  # a minute and more without throttling: back to the first hold
    share.grow(held + 220.1, backlog=True)
    assert share.rate == 7.5


def test_idle_time_undoes_borrowing() -> None:
    share = share_of(100)
    borrowed(share, 4)
    assert share.rate == 45

    share.resume(idle_seconds=1.0)  # halves every half second of idleness
    assert share.rate == pytest.approx(45 / 4)
    share.resume(idle_seconds=30.0)
    assert share.rate == 6
    borrowed(share, 4, start=40.0)
    share.resume(idle_seconds=86_400.0)  # a day idle: back to the share, no arithmetic overflow
    assert share.rate == 6


def test_thousands_of_nodes_do_not_make_their_first_call_in_step() -> None:
    starts = [share_of(10_000, seed=seed).initial_tokens() for seed in range(1000)]  # 0.048 calls each
    assert all(0 <= tokens < 1 for tokens in starts)
    assert len(set(starts)) == 1000  # spread over the first 1 / share seconds, not all at once
    assert share_of(10, seed=1).initial_tokens() == pytest.approx(48)  # 80 % of 600 / 10


# --- the real budget with a share, on virtual time ---


def now() -> float:
    return asyncio.get_running_loop().time()


async def grants(budget: StsBudget, count: int) -> list[float]:
    granted: list[float] = []

    async def take() -> None:
        async with budget.slot(Ticket(Priority.CALLER)):
            granted.append(now())

    start = now()
    await asyncio.gather(*(take() for _ in range(count)))
    return [round(t - start, 3) for t in sorted(granted)]


@pytest.mark.looptime
async def test_the_budget_runs_at_the_share_and_follows_the_node_count() -> None:
    share = ClusterShare(SharePolicy(rate_per_second=20, burst=20), rng=random.Random(1))
    budget = StsBudget(BudgetPolicy(rate_per_second=10, burst=20, concurrency=100), share)
    assert budget.rate == 10  # the count is not known yet: the per-node budget

    share.set_nodes(4)
    assert (budget.rate, metric("irsa_cache_sts_budget_rate"), metric("irsa_cache_sts_cluster_nodes")) == (5, 5, 4)
    assert await grants(budget, 6) == [0, 0, 0, 0, 0.2, 0.4]  # its part of the burst (80 % of 20 / 4), then 5/s

    share.set_nodes(10)
    assert (budget.rate, metric("irsa_cache_sts_budget_share")) == (2, 2)
    assert await grants(budget, 1) == [0.5]  # 2/s, the bucket spent


class Sts:
    """Answers after 50 ms of virtual time; throttles while `throttling`."""

    def __init__(self) -> None:
        self.throttling = False
        self.calls = 0

    async def assume_role(self, *, role_arn: str, token: VerifiedToken) -> Credentials:
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.throttling:
            raise StsUnavailableError("Rate exceeded", sts_code="Throttling", throttled=True)
        return Credentials(access_key_id="ASIA", secret_access_key="s", session_token="t",
                           expiration=datetime(2030, 1, 1, tzinfo=timezone.utc), account_id="1",
                           assumed_role_arn="arn:aws:sts::1:assumed-role/r/s")


TOKEN = VerifiedToken(identity=Identity(issuer="https://i", subject="system:serviceaccount:a:b", audience="sts"),
                      raw="t", expires_at=2e9, fingerprint="f")


@pytest.mark.looptime
async def test_a_busy_node_borrows_what_idle_nodes_leave_and_falls_back_on_throttling() -> None:
    share = ClusterShare(SharePolicy(rate_per_second=20, burst=20), rng=random.Random(1))
    share.set_nodes(16)  # 1.25/s each: 40 exchanges would take half a minute at the share
    sts = Sts()
    source = BudgetedSource(source=sts, budget=StsBudget(BudgetPolicy(concurrency=8), share),
                            retry=RetryPolicy(), rng=random.Random(1))

    async def exchange() -> None:
        await source.assume_role(role_arn="r", token=TOKEN, reason="cold", ticket=Ticket(Priority.CALLER))

    start = now()
    await asyncio.gather(*(exchange() for _ in range(40)))
    took = now() - start

    assert took < 8  # nobody throttled it: it borrowed up towards the cluster's 20/s
    assert share.rate > 5
    sts.throttling = True
    with pytest.raises(StsUnavailableError):
        await exchange()
    assert source.budget.rate == 1.25  # throttled: back to its share


# --- the node count from the daemon's own DaemonSet ---


StartDaemon = Callable[..., AbstractAsyncContextManager[app.RunningDaemon]]


@pytest.fixture
def start(k8s: K8sApiDouble, sts: StsDouble, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> StartDaemon:
    monkeypatch.setattr(config, "DAEMONSET_READ_INTERVAL_SECONDS", 0.1)  # seconds, not half a minute
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")

    def running(*extra: str) -> AbstractAsyncContextManager[app.RunningDaemon]:
        settings = config.parse_serve_args(
            ["--directory", "kubernetes", "--kubeconfig", str(kubeconfig), "--node-name", "node-a",
             "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--region", "us-east-1",
             "--sts-endpoint-url", sts.url, "--sts-rate", "10", *extra],
            environ={"DAEMONSET_NAME": NAME, "POD_NAMESPACE": NAMESPACE},
        )
        return app.running(settings)

    return running


async def test_the_rate_follows_the_daemonsets_desired_number_scheduled(
    k8s: K8sApiDouble, start: StartDaemon
) -> None:
    k8s.create(daemon_set(NAMESPACE, NAME, desired=4))

    async with start("--sts-cluster-rate", "20"):
        await eventually(lambda: metric("irsa_cache_sts_cluster_nodes") == 4)
        assert metric("irsa_cache_sts_budget_rate") == metric("irsa_cache_sts_budget_share") == 5

        k8s.set_desired_nodes(NAMESPACE, NAME, 10)  # nodes joined
        await eventually(lambda: metric("irsa_cache_sts_budget_rate") == 2)
        k8s.set_desired_nodes(NAMESPACE, NAME, 2)  # and left
        await eventually(lambda: metric("irsa_cache_sts_budget_rate") == 10)

    # Least privilege: a GET of that one DaemonSet, nothing else of apps/v1.
    apps_calls = {(call.verb, call.path) for call in k8s.calls if call.path.startswith("/apis/apps")}
    assert apps_calls == {("get", DAEMONSET_PATH)}
    assert metric("irsa_cache_daemonset_reads_total", result="ok") >= 3


async def test_until_the_daemonset_can_be_read_the_per_node_budget_holds(
    k8s: K8sApiDouble, start: StartDaemon
) -> None:
    errors_before = metric("irsa_cache_daemonset_reads_total", result="error")
    async with start("--sts-cluster-rate", "20") as daemon:
        await eventually(lambda: metric("irsa_cache_daemonset_reads_total", result="error") > errors_before)
        assert metric("irsa_cache_sts_budget_rate") == 10  # --sts-rate, as without the flag
        assert not daemon.tasks[-1].done()  # a 404 does not stop the daemon

        k8s.create(daemon_set(NAMESPACE, NAME, desired=40))  # a retry finds it (within 2 s)
        await eventually(lambda: metric("irsa_cache_sts_budget_rate") == 0.5)
