"""`irsa-cache doctor` as users run it: exit statuses, the one-line error for an unreadable
input, the text report, the list of checks, and the command line the daemon can print."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.doctor import checks, cli, command_for
from daemon.embedded import Issuer
from tests.doctor_scenario import offline_argv, scenarios

README = Path(__file__).parent.parent / "README.md"
BY_NAME = {s.name: s for s in scenarios()}


def doctor(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", "doctor", *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})


async def run(*argv: str) -> tuple[int, str, str]:
    return await cli.run(cli.parser().parse_args(list(argv)), environ={})


@pytest.mark.parametrize(("setup", "flag", "words"), [
    pytest.param(None, "--trust-policy", "no such file", id="missing"),
    pytest.param("{not json", "--trust-policy", "not JSON", id="unparsable-json"),
    pytest.param("{not json", "--oidc-providers", "not JSON", id="unparsable-providers"),
    pytest.param("{not json", "--jwks", "not JSON", id="unparsable-jwks"),
    pytest.param("kind: Pod\nspec: [", "--pod", "not YAML or JSON", id="unparsable-yaml"),
    pytest.param("kind: ConfigMap\n", "--service-account", "kind is ConfigMap, not ServiceAccount", id="wrong-kind"),
])
async def test_an_unreadable_input_is_exit_2_and_one_line(tmp_path: Path, setup: str | None, flag: str,
                                                          words: str) -> None:
    path = tmp_path / "input"
    if setup is not None:
        path.write_text(setup)
    status, out, error = await run(flag, str(path))
    assert (status, out) == (2, "")
    assert "\n" not in error
    assert error.startswith(f"irsa-cache doctor: error: {flag} {path}:") and words in error


def test_the_command_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    done = doctor("--trust-policy", str(tmp_path / "missing.json"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"irsa-cache doctor: error: --trust-policy {tmp_path / 'missing.json'}: no such file\n"


def test_a_token_that_is_not_a_jwt_is_a_failed_check_not_an_input_error(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("hello")
    done = doctor("--token", str(token))
    assert done.returncode == 1, done.stderr
    assert "✗ token" in done.stdout and "token.jwt" in done.stdout


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b"", b"a.b.c"], ids=["binary", "empty", "three-dots"])
async def test_a_token_file_of_anything_else_fails_token_jwt(tmp_path: Path, content: bytes) -> None:
    token = tmp_path / "token"
    token.write_bytes(content)
    status, out, _ = await run("--token", str(token), "--json")
    report = json.loads(out)
    assert status == 1
    assert [c["id"] for c in report["checks"] if c["status"] == "fail"] == ["token.jwt"]


async def test_a_token_the_daemon_would_refuse_to_read_fails_token_jwt(tmp_path: Path) -> None:
    """doctor reads a token as the daemon does: a padded signature (which PyJWT accepts
    and the daemon does not) is not a JWT, not a signature from the wrong issuer."""
    key = Issuer()
    token, jwks = tmp_path / "token", tmp_path / "jwks.json"
    token.write_text(key.mint("system:serviceaccount:team-a:app") + "==")
    jwks.write_text(json.dumps(key.jwks()))
    status, out, _ = await run("--token", str(token), "--jwks", str(jwks), "--json")
    failed = {c["id"]: c for c in json.loads(out)["checks"] if c["status"] == "fail"}
    assert status == 1 and list(failed) == ["token.jwt"]


def test_a_key_the_daemon_skips_is_reported_once_not_also_logged(tmp_path: Path) -> None:
    key = Issuer()
    token, jwks = tmp_path / "token", tmp_path / "jwks.json"
    token.write_text(key.mint("system:serviceaccount:team-a:app"))
    hmac = {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}
    jwks.write_text(json.dumps({"keys": [*key.jwks()["keys"], hmac]}))
    done = doctor("--token", str(token), "--jwks", str(jwks))
    assert "hmac" in done.stdout
    assert done.stderr == ""


async def test_a_token_longer_than_sts_takes(tmp_path: Path) -> None:
    key = Issuer()
    token = tmp_path / "token"
    token.write_text(key.mint("system:serviceaccount:team-a:app", padding="x" * 20_000))
    status, out, _ = await run("--token", str(token), "--json")
    failed = {c["id"]: c for c in json.loads(out)["checks"] if c["status"] == "fail"}
    assert list(failed) == ["token.jwt"] and "at most 20000" in failed["token.jwt"]["message"]


async def test_live_targets_need_live() -> None:
    assert await run("--pod-name", "team-a/app") == (
        2, "", "irsa-cache doctor: error: --pod-name and --service-account-name need --live")


async def test_the_text_report(tmp_path: Path) -> None:
    keys = {"cluster": Issuer(), "other": Issuer()}
    scenario = BY_NAME["trust-explicit-deny"]
    status, text, _ = await cli.run(cli.parser().parse_args(offline_argv(scenario, keys, tmp_path)), environ={})
    assert status == 1
    lines = text.splitlines()
    assert lines[0].startswith("irsa-cache doctor: role arn:aws:iam::123456789012:role/team-a-app, identity "
                               "system:serviceaccount:team-a:app")
    failing = [i for i, line in enumerate(lines) if line.startswith("✗ ")]
    assert len(failing) == 1
    assert re.match(r"✗ trust-policy +trust-policy\.conditions +statement 2 \(Sid \"NoTeamA\"\) denies", lines[failing[0]])
    assert lines[failing[0] + 1].strip().startswith("fix: narrow or remove statement 2")
    assert any(line.startswith("✓ token ") for line in lines)
    assert any(line.startswith("- sts ") for line in lines)
    assert lines[-1].startswith("1 failed, 0 warning(s), ") and lines[-1].endswith(
        "the first broken link is trust-policy (trust-policy.conditions)")

    warned = BY_NAME["trust-no-audience-condition"]
    status, text, _ = await cli.run(cli.parser().parse_args(offline_argv(warned, keys, tmp_path)), environ={})
    assert status == 0
    assert any(line.startswith("! trust-policy ") for line in text.splitlines())


async def test_nothing_given_is_exit_0_with_every_link_unchecked() -> None:
    status, out, _ = await run("--json")
    assert status == 0
    report = json.loads(out)
    assert report["ok"] is True
    assert {check["status"] for check in report["checks"]} == {"skip"}
    assert [check["id"] for check in report["checks"]] == [c.id for c in checks.CHECKS if not c.live_only]
    assert set(report["checks"][0]) == {"id", "link", "status", "message", "fix"}


async def test_list_checks_names_every_check() -> None:
    status, out, _ = await run("--list-checks")
    assert status == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == [check.id for check in checks.CHECKS]
    assert {line.split()[1] for line in out.splitlines()} == {
        "token", "provider", "trust-policy", "service-account", "pod", "sts"}


@pytest.mark.parametrize(("kwargs", "expected"), [
    pytest.param({"namespace": "team-a", "service_account": "app", "pod": "app-1",
                  "role_arn": "arn:aws:iam::123456789012:role/team-a-app"},
                 "irsa-cache doctor --live --pod-name team-a/app-1 --role-arn arn:aws:iam::123456789012:role/team-a-app",
                 id="pod"),
    pytest.param({"namespace": "team-a", "service_account": "app"},
                 "irsa-cache doctor --live --service-account-name team-a/app", id="service-account"),
    pytest.param({"namespace": "team-a", "service_account": "app", "audience": "api://irsa"},
                 "irsa-cache doctor --live --service-account-name team-a/app --audience api://irsa", id="audience"),
    pytest.param({"namespace": None, "role_arn": "arn:aws:iam::123456789012:role/x"},
                 "irsa-cache doctor --live --role-arn arn:aws:iam::123456789012:role/x", id="role-only"),
])
def test_command_for_reproduces_a_failure(kwargs: dict[str, str], expected: str) -> None:
    line = command_for(**kwargs)
    assert line == expected
    argv = shlex.split(line)
    assert argv[:2] == ["irsa-cache", "doctor"]
    parsed = cli.parser().parse_args(argv[2:])
    assert parsed.live
    if kwargs.get("pod"):
        assert parsed.pod_name == f"{kwargs['namespace']}/{kwargs['pod']}"
    assert parsed.role_arn == kwargs.get("role_arn")


def test_command_for_quotes_what_a_shell_would_split() -> None:
    line = command_for(namespace="team a", service_account="app;rm")
    assert shlex.split(line)[-1] == "team a/app;rm"


def test_the_readme_lists_every_check() -> None:
    text = README.read_text()
    section = text[text.index("#### `irsa-cache doctor`"):text.index("#### Error by error")]
    for check in checks.CHECKS:
        assert f"`{check.id}`" in section, check.id
    for permission in ("iam:GetRole", "iam:ListOpenIDConnectProviders", "iam:GetOpenIDConnectProvider",
                       "serviceaccounts/token"):
        assert permission in section
