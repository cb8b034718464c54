"""The scenario catalogue under tests/doctor_scenarios: loading a scenario, minting its
token, and the checks its expected.yaml asks for. Shared by the offline and live tests."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml

from daemon.embedded import Issuer

ROOT = Path(__file__).parent / "doctor_scenarios"


FILE_FLAGS = {
    "trust-policy.json": "--trust-policy",
    "oidc-providers.json": "--oidc-providers",
    "service-account.yaml": "--service-account",
    "pod.yaml": "--pod",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    spec: dict[str, Any]
    expected: dict[str, Any]

    def file(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    def json(self, name: str) -> Any:
        path = self.file(name)
        return json.loads(path.read_text()) if path else None

    def yaml(self, name: str) -> Any:
        path = self.file(name)
        return yaml.safe_load(path.read_text()) if path else None

    @property
    def issuer(self) -> str:
        """The cluster's issuer: --cluster-issuer, else the token's iss."""
        args = self.spec.get("args") or []
        if "--cluster-issuer" in args:
            return str(args[args.index("--cluster-issuer") + 1])
        return str(self.spec["token"]["claims"]["iss"])

    def arg(self, flag: str) -> str | None:
        args = self.spec.get("args") or []
        return str(args[args.index(flag) + 1]) if flag in args else None


def scenarios() -> list[Scenario]:
    found = []
    for path in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        found.append(Scenario(
            name=path.name, path=path,
            spec=yaml.safe_load((path / "scenario.yaml").read_text()),
            expected=yaml.safe_load((path / "expected.yaml").read_text()),
        ))
    return found


def mint(spec: dict[str, Any], keys: dict[str, Issuer], now: float | None = None) -> str:
    """The scenario's token, signed now: what a file of that description would hold."""
    if "raw" in spec:
        return str(spec["raw"])
    issued = time.time() if now is None else now
    exp = issued + float(spec["expires_in"])
    claims = {**spec["claims"], "iat": int(min(issued, exp - 3600)), "nbf": int(min(issued, exp - 3600)),
              "exp": int(exp)}
    key = keys[spec["signed_by"]]
    token = jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})
    return token + ("\n" if spec.get("newline") else "")


def offline_argv(scenario: Scenario, keys: dict[str, Issuer], directory: Path) -> list[str]:
    argv = [str(arg) for arg in scenario.spec.get("args") or []]
    if "token" in scenario.spec:
        token_file = directory / "token"
        token_file.write_text(mint(scenario.spec["token"], keys))
        argv += ["--token", str(token_file)]
    if scenario.spec.get("jwks"):
        jwks_file = directory / "jwks.json"
        jwks_file.write_text(json.dumps(keys[scenario.spec["jwks"]].jwks()))
        argv += ["--jwks", str(jwks_file)]
    for name, flag in FILE_FLAGS.items():
        if (path := scenario.file(name)) is not None:
            argv += [flag, str(path)]
    return argv


def failures(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {check["id"]: check for check in checks if check["status"] == "fail"}


def assert_expected(checks: list[dict[str, Any]], *, fails: dict[str, list[str]], warns: dict[str, list[str]],
                    broken_link: str | None, where: str) -> None:
    """The failures are exactly `fails`, each with its words; `warns` warn; the first failure's
    link is `broken_link`."""
    failed = failures(checks)
    assert set(failed) == set(fails), f"{where}: failing checks {sorted(failed)}, expected {sorted(fails)}:\n" + "\n".join(
        f"  {c['id']}: {c['message']}" for c in failed.values())
    for check_id, words in fails.items():
        text = f"{failed[check_id]['message']} {failed[check_id]['fix']}".lower()
        for word in words:
            assert str(word).lower() in text, f"{where}: {check_id} lacks {word!r}: {text}"
    by_id = {check["id"]: check for check in checks}
    for check_id, words in warns.items():
        assert by_id[check_id]["status"] == "warn", f"{where}: {check_id} is {by_id[check_id]}"
        text = f"{by_id[check_id]['message']} {by_id[check_id]['fix']}".lower()
        for word in words:
            assert str(word).lower() in text, f"{where}: {check_id} lacks {word!r}: {text}"
    first = next((check for check in checks if check["status"] == "fail"), None)
    assert (first["link"] if first else None) == broken_link, f"{where}: first failure {first}"
