"""Real SDK clients against the daemon's default wait policy: boto3, the AWS CLI v1, the
JS SDK v3's container provider and a Go program on Debian's Go SDK v2, each a pod of its
own (a cold cache), all four at once, against an STS that answers after 1.2 to 8 s.

Each client runs in its own process through a relay that records every request it makes
(tests/client_tap.py); tests/sdk_clients says how each one waits, from its source. The
expectations are those of tests/test_wait_policy.py, now met by the real thing: served in
the first request whenever STS answers before the client's own timeout, never failing
while the client's patience covers STS's answer, one STS call per identity, and the
credentials the client ends with are the daemon's for its identity.

The clients come from .ci/run (the test extra, `npm ci`, Debian's Go packages). Outside
CI a missing one is skipped, saying what installs it; under CI=true that is a failure.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from daemon import app
from daemon.config import CREDENTIALS_LIMITS
from daemon.embedded import DEMO_ACCOUNT, Issuer
from daemon.server import CREDENTIALS_PATH
from daemon.shortcut import plain_get, request_line
from daemon.sts import session_name_for
from tests import sdk_clients
from tests.conftest import StartDaemon, fetch
from tests.sts_double import StsDouble
from tests.test_wait_policy import DEFAULT_HOLD, HOLD_SECONDS, LATE_SECONDS, expected_attempts

NAMES = ("boto3", "aws-cli", "js-v3", "go-v2-debian")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdk-clients")


@pytest.fixture(scope="module")
def present(build_dir: Path) -> list[sdk_clients.SdkClient]:
    """The clients that can run here (building the Go one)."""
    return [client for client in sdk_clients.clients(build_dir) if sdk_clients.missing(client, build_dir) is None]


@pytest.mark.parametrize("name", NAMES)
def test_the_client_is_installed(name: str, build_dir: Path) -> None:
    (client,) = [client for client in sdk_clients.clients(build_dir) if client.name == name]
    reason = sdk_clients.missing(client, build_dir)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def subject_of(name: str, sts_seconds: float) -> str:
    return f"system:serviceaccount:batch:{name}-{sts_seconds:g}s".replace(".", "-")


@dataclass
class Row:
    """Every client's trial against one daemon, at one STS latency."""

    daemon: app.RunningDaemon
    sts_seconds: float
    trials: dict[str, sdk_clients.Trial]
    tokens: dict[str, str]


async def run_row(
    daemon_args: tuple[str, ...], present: list[sdk_clients.SdkClient], start_daemon: StartDaemon,
    issuer: Issuer, sts: StsDouble, sts_seconds: float, workdir: Path, *, bound_seconds: float,
) -> Row:
    """Each client at once, cold, each with an identity of its own. Only the exchange is
    slow: the clients' own AWS call goes to moto (sts.upstream) directly."""
    moto_url = sts.upstream
    if not present:
        pytest.skip("no SDK client is installed here (see test_the_client_is_installed)")
    daemon = await start_daemon(*daemon_args)
    sts.delay_seconds = sts_seconds
    tokens = {client.name: issuer.mint(subject_of(client.name, sts_seconds)) for client in present}
    trials = await asyncio.gather(*(
        sdk_clients.trial(client, daemon_address=str(daemon.listen[0]), token=tokens[client.name],
                          workdir=workdir / client.name, aws_api_url=moto_url, bound_seconds=bound_seconds)
        for client in present))
    return Row(daemon, sts_seconds, {trial.client.name: trial for trial in trials}, tokens)


def problems_with(row: Row) -> list[str]:
    """Each client against what its patience and the policy promise it; empty when all is right."""
    problems = []
    for trial in row.trials.values():
        expected = expected_attempts(trial.client.patience, row.sts_seconds)
        served = len(trial.requests) if trial.ok else None
        if served not in expected:
            problems.append(f"expected to be served in request {sorted(expected, key=str)}; {trial.describe()}")
        if 503 in trial.statuses:
            problems.append(f"turned away with a 503 while STS was answering; {trial.describe()}")
        if trial.ok and row.sts_seconds + LATE_SECONDS < (trial.client.patience.attempt_seconds or HOLD_SECONDS):
            if trial.statuses != [200]:  # STS answered before the client's own timeout
                problems.append(f"not served in its first request; {trial.describe()}")
    return problems


async def check_credentials(row: Row, sts: StsDouble) -> None:
    """Each client that was served holds the daemon's credentials for its own identity,
    which cost STS one call; and asks in heads the shortcut reads, so that its repeats are
    answered the cheap way."""
    async with aiohttp.ClientSession() as http:
        for name, trial in row.trials.items():
            if not trial.ok:
                continue
            for request in trial.requests:
                assert plain_get(request.head, request_line(CREDENTIALS_PATH), max_headers=CREDENTIALS_LIMITS.max_headers,
                                 max_field_bytes=CREDENTIALS_LIMITS.max_field_bytes), (name, request.head[:200])
            assert trial.output, f"{name} said nothing: {trial.stderr[-300:]}"
            session = session_name_for(subject_of(name, row.sts_seconds))
            assert sum(1 for call in sts.assume_calls if call.session_name == session) == 1, name
            held = await fetch(http, row.daemon, row.tokens[name])  # a hit: what the daemon gave
            assert held.status == 200
            if "access_key_id" in trial.output:
                assert trial.output["access_key_id"] == held.body["AccessKeyId"], name
            if "arn" in trial.output or "Arn" in trial.output:  # its AWS call proves the role
                arn = trial.output.get("arn") or trial.output["Arn"]
                assert arn == f"arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/batch/{session}", name


@pytest.mark.parametrize("sts_seconds", [
    pytest.param(1.2, id="sts-1.2s"),
    pytest.param(2.0, id="sts-2s"),
    pytest.param(4.0, id="sts-4s", marks=pytest.mark.slow),
])
async def test_every_real_client_is_served_as_soon_as_its_patience_allows(
    present: list[sdk_clients.SdkClient], start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble,
    tmp_path: Path, sts_seconds: float,
) -> None:
    row = await run_row(DEFAULT_HOLD, present, start_daemon, issuer, sts, sts_seconds, tmp_path,
                        bound_seconds=sts_seconds + 15)

    problems = problems_with(row)
    assert not problems, "\n".join(problems)
    assert all(trial.ok for trial in row.trials.values())
    await check_credentials(row, sts)


@pytest.mark.slow
async def test_with_the_defaults_every_client_fares_as_its_patience_allows_when_sts_answers_in_8_s(
    present: list[sdk_clients.SdkClient], start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble,
    tmp_path: Path,
) -> None:
    # The default --sts-timeout (10 s) is above this latency: the clients that wait are
    # held until STS answers and served in their first request.
    row = await run_row(DEFAULT_HOLD, present, start_daemon, issuer, sts, 8.0, tmp_path, bound_seconds=8.0 + 5)

    problems = problems_with(row)
    assert not problems, "\n".join(problems)
    for name in ("js-v3", "go-v2-debian"):
        if name in row.trials:
            assert row.trials[name].statuses == [200], row.trials[name].describe()
    await check_credentials(row, sts)
