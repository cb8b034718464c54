"""`irsa-cache simulate` against figures computed by hand from the rules it models.

The rules: irsa-cache makes one STS call per node and identity, then refreshes at half
the lifetime (+/- 10 %); a pod's SDK fetches at start and 15 min (plus up to a minute)
before its credentials expire; a per-pod agent calls once per pod and refreshes at half
the lifetime; botocore's web-identity provider makes up to 5 attempts. Every run here
is small and takes milliseconds of wall time.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from daemon.__main__ import build_parser
from daemon.errors import ConfigError
from daemon.simulate import cli, inputs as inputs_module
from daemon.simulate.inputs import DaemonKnobs, Inputs, plan
from daemon.simulate.run import ModeResult, simulate
from daemon.simulate.vloop import DeadlockError, VirtualTimeLoop

SMALL = dict(nodes=4, identities=3, pods_per_identity=8)  # spread: 2 pods per node and identity


def run(mode: str, **overrides: object) -> ModeResult:
    inputs = Inputs(**{**SMALL, **overrides})  # type: ignore[arg-type]
    return simulate(inputs, plan(inputs), mode)


def main(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(build_parser().parse_args(["simulate", *argv]), out=out)
    return code, out.getvalue()


# --- figures by hand ---


def test_a_scale_out_costs_one_call_per_node_and_identity_through_irsa_cache() -> None:
    cached, direct, per_pod = run("irsa-cache"), run("direct"), run("per-pod")

    assert cached.sts_calls == 4 * 3  # exactly 12 cold exchanges for 24 pods
    assert direct.sts_calls == per_pod.sts_calls == 24  # one per pod
    for result in (cached, direct, per_pod):
        assert (result.throttled, result.failed_pods, result.unserved_pods, result.pods) == (0, 0, 0, 24)
        assert result.ttc_max_seconds == pytest.approx(0.05)  # STS's latency, never more
    assert cached.ttc_p50_seconds == 0  # the second pod of a node and identity is a cache hit


def test_steady_state_is_two_calls_per_node_and_identity_an_hour_with_one_hour_sessions() -> None:
    cached = run("irsa-cache", scenario="steady")  # 6 hours; counted after the first
    direct = run("direct", scenario="steady")
    per_pod = run("per-pod", scenario="steady")

    assert cached.calls_per_node_identity_hour == pytest.approx(2.0, abs=0.1)  # refreshed at half the hour
    # Direct: each pod calls at start and every 45-46 min (an hour's credentials, refreshed
    # 15 min early): 8 calls in 6 hours, 6 of them after the first hour; 2 pods per pair.
    assert direct.sts_calls == 24 * 8
    assert direct.calls_per_node_identity_hour == pytest.approx(2 * 6 / 5)
    assert per_pod.calls_per_node_identity_hour == pytest.approx(2 * 2.0, abs=0.2)  # 2 pods, each refreshed twice an hour
    assert cached.failed_pods == direct.failed_pods == per_pod.failed_pods == 0


def test_steady_state_follows_the_session_duration() -> None:
    # A day, so that where the count starts and ends within a refresh cycle hardly matters.
    # Pods ask every 1 h 45 min, more than the default --idle-evict of an hour: their live
    # pods keep the entries (as in Kubernetes mode), so each ask still finds one.
    two_hours = run("irsa-cache", scenario="steady", duration_seconds=86_400.0,
                    daemon=DaemonKnobs(session_duration_seconds=7200))
    assert two_hours.calls_per_node_identity_hour == pytest.approx(1.0, abs=0.06)  # no cold exchange on an ask


def test_maintenance_runs_when_entries_are_due_not_on_a_tick() -> None:
    result = run("irsa-cache", scenario="steady")
    # A one-second tick on 4 nodes for 6 hours would alone be 86,400 callbacks.
    assert result.events < 10_000


def test_a_node_replacement_costs_a_call_per_pod_direct_and_per_node_identity_through_irsa_cache() -> None:
    shape = dict(scenario="node-replacement", nodes=20, identities=5, pods_per_identity=40)
    # Four-hour sessions: no refresh falls inside the replacement (10 waves of a minute).
    cached = run("irsa-cache", **shape, daemon=DaemonKnobs(session_duration_seconds=14_400))
    direct = run("direct", **shape)

    assert cached.pods == direct.pods == 200  # every pod starts again on a new node
    assert cached.sts_calls == 20 * 5  # the new nodes' daemons start empty: one call per node and identity
    assert direct.sts_calls == 200


def test_a_rollout_without_the_handoff_makes_pods_wait_for_sts_at_their_next_refresh() -> None:
    shape = dict(nodes=20, identities=5, pods_per_identity=40, scenario="rollout")
    handed = run("irsa-cache", **shape, handoff=True)
    lost = run("irsa-cache", **shape, handoff=False)

    assert handed.ttc_max_seconds == 0  # every refresh answered from the handed-over cache
    assert lost.ttc_max_seconds == pytest.approx(0.05)  # a cold exchange, one per node and identity
    assert handed.failed_pods == lost.failed_pods == 0


def test_against_a_small_quota_direct_pods_are_throttled_and_irsa_cache_is_not() -> None:
    shape = dict(nodes=10, identities=4, pods_per_identity=100, ramp_seconds=0.0, account_rate_per_second=20,
                 account_burst=20)
    direct = run("direct", **shape)
    cached = run("irsa-cache", **shape, daemon=DaemonKnobs(cluster_rate_per_second=20, cluster_burst=20))

    assert direct.throttled > 400  # 400 pods at once against 20 calls/s
    assert direct.sts_calls == 400
    assert direct.peak_calls_per_second > 20
    assert cached.sts_calls == 40
    assert cached.throttled < 10  # the shared budget keeps to the quota: a probe above the share costs a node
    # about one throttled answer, not one per pod
    assert cached.peak_calls_per_second <= 20 + 20  # the rate and one burst


# --- scenarios and placements ---


def test_placements() -> None:
    spread = inputs_module.placement(Inputs(nodes=3, identities=2, pods_per_identity=4), rng=None)  # type: ignore[arg-type]
    assert spread == [0, 1, 2, 0, 1, 2, 0, 1]  # round-robin, continuing across identities
    packed = inputs_module.placement(Inputs(nodes=3, identities=2, pods_per_identity=100, placement="packed"),
                                     rng=None)  # type: ignore[arg-type]
    assert {node: packed.count(node) for node in set(packed)} == {0: 110, 1: 90}  # filled one after another
    assert set(packed[:100]) == set(packed[100:]) == {0, 1}  # each busy node runs every identity
    shape = Inputs(nodes=50, identities=2, pods_per_identity=100, placement="random")
    assert plan(shape) == plan(shape)  # seeded
    assert len({start.node for start in plan(shape).starts}) > 40


def test_the_default_ramp_keeps_pod_starts_to_what_a_control_plane_starts() -> None:
    assert Inputs(**SMALL).ramp == 60
    assert Inputs(nodes=10_000, identities=20, pods_per_identity=10_000).ramp == 200_000 / 100
    assert Inputs(**SMALL, scenario="cold-start").ramp == 0
    assert Inputs(**SMALL, ramp_seconds=5).ramp == 5


def test_pods_that_cannot_start_are_restarted_and_counted_as_failed() -> None:
    # One node, 30 identities at once, a quota of 1 call/s: most pods outlast their SDK's patience.
    result = run("irsa-cache", nodes=1, identities=30, pods_per_identity=1, ramp_seconds=0.0,
                 account_rate_per_second=1, account_burst=1)
    assert result.sts_calls == 30 and result.unserved_pods == 0
    assert result.failed_pods > 10
    assert result.ttc_max_seconds > 10  # served after a kubelet restart (10 s back-off)


# --- the virtual loop, and what the simulation leaves behind ---


def test_the_virtual_loop_jumps_to_the_next_timer_and_reports_a_deadlock() -> None:
    loop = VirtualTimeLoop()
    try:
        seen: list[float] = []
        loop.schedule(3600.0, lambda _: seen.append(loop.time()), None)
        loop.call_later(7200.0, loop.stop)
        loop.run_forever()
        assert seen == [3600.0] and loop.time() == 7200.0
        with pytest.raises(DeadlockError):
            loop.run_until_complete(loop.create_future())
    finally:
        loop.close()


def test_the_simulated_daemons_stay_off_the_process_registry() -> None:
    def sts_calls() -> float:
        return sum(REGISTRY.get_sample_value("irsa_cache_sts_calls_total", {"reason": reason, "result": result}) or 0
                   for reason in ("cold", "refresh") for result in ("success", "throttled", "denied", "error"))

    before = sts_calls()
    assert run("irsa-cache", scenario="steady").sts_calls > 100
    assert sts_calls() == before


# --- the command ---


def test_json_has_the_documented_shape() -> None:
    code, out = main("--nodes", "4", "--identities", "3", "--pods-per-identity", "8", "--scenario", "steady",
                     "--json")
    document = json.loads(out)

    assert code == 0
    assert set(document) == {"inputs", "modes"}
    assert list(document["modes"]) == ["direct", "per-pod", "irsa-cache"]
    required = {"sts_calls", "throttled", "failed_pods", "peak_calls_per_second", "ttc_p50_seconds",
                "ttc_p99_seconds", "ttc_max_seconds", "calls_per_node_identity_hour"}
    for figures in document["modes"].values():
        assert required <= set(figures)
    assert document["modes"]["irsa-cache"]["sts_calls"] < document["modes"]["direct"]["sts_calls"]
    assert document["inputs"]["nodes"] == 4 and document["inputs"]["daemon"]["session_duration_seconds"] == 3600
    _, scale_out = main("--nodes", "4", "--identities", "3", "--pods-per-identity", "8", "--json")
    assert "calls_per_node_identity_hour" not in json.loads(scale_out)["modes"]["direct"]  # steady only


def test_the_table_puts_the_modes_side_by_side() -> None:
    code, out = main("--nodes", "4", "--identities", "3", "--pods-per-identity", "8")
    lines = out.splitlines()

    assert code == 0
    header = next(line for line in lines if "irsa-cache" in line and "direct" in line)
    assert header.split() == ["direct", "per-pod", "irsa-cache"]
    calls = next(line for line in lines if line.startswith("STS calls"))
    assert calls.split()[-3:] == ["24", "24", "12"]


def test_the_daemons_own_flags_configure_the_simulated_daemons() -> None:
    _, out = main("--nodes", "4", "--identities", "3", "--pods-per-identity", "8", "--scenario", "steady",
                  "--duration", "24h", "--session-duration", "2h", "--idle-evict", "2h", "--modes", "irsa-cache",
                  "--json")
    assert json.loads(out)["modes"]["irsa-cache"]["calls_per_node_identity_hour"] == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize(("argv", "problem"), [
    pytest.param(["--nodes", "0"], "--nodes: '0' must be a positive whole number", id="nodes"),
    pytest.param(["--placement", "diagonal"], "--placement: 'diagonal' is not one of spread, packed, random",
                 id="placement"),
    pytest.param(["--scenario", "chaos"], "--scenario: 'chaos' is not one of", id="scenario"),
    pytest.param(["--ramp", "soon"], "--ramp: 'soon' is not a duration", id="ramp"),
    pytest.param(["--serve-floor", "40m"], "--serve-floor: 2400 s must be below the time left", id="floor"),
    pytest.param(["--modes", "direct,magic"], "--modes: 'magic' is not one of", id="modes"),
    # The rules `serve` applies between its own settings, the same here:
    pytest.param(["--refresh-wait", "60"], "--refresh-wait: 60 s must not exceed the request hold", id="wait"),
    pytest.param(["--request-hold", "0"], "--request-hold: must be above 0", id="hold"),
    pytest.param(["--idle-evict", "0"], "--idle-evict: must be above 0", id="idle"),
    pytest.param(["--sts-cluster-burst", "5"], "--sts-cluster-burst: only with --sts-cluster-rate", id="burst"),
    pytest.param(["--placement", "packed", "--pods-per-identity", "1000"], "--placement packed: 3000 pods do not fit",
                 id="packed-overflow"),
])
def test_bad_input_is_named_and_exits_2(argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--nodes": "4", "--identities": "3", "--pods-per-identity": "8"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    code, out = main(*[part for pair in base.items() for part in pair])

    assert code == 2 and out == ""
    assert any(line.startswith(f"irsa-cache simulate: error: {problem}") for line in capsys.readouterr().err.splitlines())


def test_plot_without_matplotlib_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else real(name, *args))
    code, _ = main("--nodes", "4", "--identities", "3", "--pods-per-identity", "8", "--plot", str(tmp_path / "x.png"))

    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "x.png").exists()


def test_plot_writes_a_chart(tmp_path: Path) -> None:
    chart = tmp_path / "simulate.png"
    code, out = main("--nodes", "4", "--identities", "3", "--pods-per-identity", "8", "--plot", str(chart))

    assert code == 0 and f"chart: {chart}" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    shape = dict(nodes=10, identities=4, pods_per_identity=50, account_rate_per_second=5, account_burst=5)
    first, again, other = run("direct", **shape), run("direct", **shape), run("direct", **shape, seed=2)
    assert (first.sts_calls, first.throttled, first.ttc_p99_seconds) == (again.sts_calls, again.throttled,
                                                                        again.ttc_p99_seconds)
    assert (first.throttled, first.ttc_p99_seconds) != (other.throttled, other.ttc_p99_seconds)
    assert math.isfinite(first.ttc_p99_seconds or math.nan)


def test_the_same_seed_gives_the_same_irsa_cache_run_jitter_and_all() -> None:
    """The simulated daemons' own randomness (refresh jitter, retry backoff, the shared
    budget's draws) comes from the seed too: a user running a command twice gets the same
    figures."""

    shape = dict(nodes=40, identities=10, pods_per_identity=200, placement="packed", scenario="cold-start",
                 account_rate_per_second=20, account_burst=20,
                 daemon=DaemonKnobs(cluster_rate_per_second=20, cluster_burst=20))
    first, again = run("irsa-cache", **shape), run("irsa-cache", **shape)

    assert first.throttled > 0  # retries and their jitter are part of this run
    assert (first.sts_calls, first.throttled, first.ttc_p50_seconds, first.ttc_p99_seconds, first.ttc_max_seconds) \
        == (again.sts_calls, again.throttled, again.ttc_p50_seconds, again.ttc_p99_seconds, again.ttc_max_seconds)


def test_the_simulated_daemons_defaults_are_the_daemons_own() -> None:
    from daemon import config
    from daemon.simulate.cli import DAEMON_FLAGS

    defaults = DaemonKnobs()
    for option in config.SERVE_OPTIONS:
        if option.flag in DAEMON_FLAGS and option.default is not None:
            assert getattr(defaults, DAEMON_FLAGS[option.flag]) == option.parse(option.default), option.flag


def test_serve_flags_become_the_knobs_serve_would_run_with() -> None:
    # bench/shared_budget.py runs real daemons with flags and simulated ones with these.
    static = cli.knobs_from_flags(["--sts-rate", "2.5", "--sts-burst", "2"])
    shared = cli.knobs_from_flags(["--sts-cluster-rate", "20", "--sts-cluster-burst", "20"])

    assert (static.sts_rate_per_second, static.sts_burst, static.cluster_rate_per_second) == (2.5, 2, None)
    assert (shared.cluster_rate_per_second, shared.cluster_burst) == (20.0, 20)
    assert shared.sts_rate_per_second == DaemonKnobs().sts_rate_per_second  # serve's default
    assert cli.knobs_from_flags([]) == DaemonKnobs()


def test_serve_flags_serve_would_refuse_are_refused_here_too() -> None:
    with pytest.raises(ConfigError) as refused:
        cli.knobs_from_flags(["--sts-cluster-burst", "20", "--sts-rate", "fast", "--listen", "127.0.0.1:1"])
    text = str(refused.value)
    assert "--sts-rate" in text and "--listen" in text and "--sts-cluster-burst" in text  # a burst without a rate
