"""The scenario catalogue, offline: each directory's files through `irsa-cache doctor`, and
its expected.yaml checked against the JSON report (see doctor_scenarios/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.doctor import cli
from daemon.embedded import Issuer
from tests.doctor_scenario import Scenario, assert_expected, offline_argv, scenarios

SCENARIOS = scenarios()


@pytest.fixture(scope="module")
def keys() -> dict[str, Issuer]:
    return {"cluster": Issuer(), "other": Issuer()}


def test_the_catalogue_covers_the_ways_irsa_breaks() -> None:
    assert len(SCENARIOS) >= 20
    links = {s.expected.get("broken_link") for s in SCENARIOS}
    assert {"token", "provider", "trust-policy", "service-account", "pod"} <= links
    assert any(s.expected["exit"] == 0 and not s.expected["fails"] for s in SCENARIOS)


async def run(argv: list[str]) -> tuple[int, str, str]:
    return await cli.run(cli.parser().parse_args(argv), environ={})


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_offline(scenario: Scenario, keys: dict[str, Issuer], tmp_path: Path) -> None:
    status, out, error = await run([*offline_argv(scenario, keys, tmp_path), "--json"])
    assert error == ""
    report = json.loads(out)
    expected = scenario.expected
    assert status == expected["exit"], out
    assert report["ok"] is (expected["exit"] == 0)
    assert_expected(report["checks"], fails=expected["fails"], warns=expected.get("warns") or {},
                    broken_link=expected.get("broken_link"), where=scenario.name)
    sts = next(check for check in report["checks"] if check["id"] == "sts.assume-role")
    assert sts["status"] == "skip", "offline, STS's verdict is never a failure"


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.expected["exit"] == 0], ids=lambda s: s.name)
async def test_a_working_configuration_checks_every_link(scenario: Scenario, keys: dict[str, Issuer],
                                                         tmp_path: Path) -> None:
    status, out, _ = await run([*offline_argv(scenario, keys, tmp_path), "--json"])
    checks = json.loads(out)["checks"]
    not_checked = {check["id"] for check in checks if check["status"] == "skip"}
    # Given every input, only STS (live only) and the role's maximum session (get-role) stay unchecked.
    assert not_checked == {"sts.assume-role", "trust-policy.max-session"}
