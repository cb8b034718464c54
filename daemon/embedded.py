"""Stand-ins for the outside world, for the demo and the tests: an OIDC issuer and STS.

`Issuer` holds a freshly generated signing key and mints projected-token-shaped
JWTs for it; it trusts nothing and is trusted only by a daemon configured with its
key set. `MotoSts` runs moto in server mode on loopback, in a process of its own (moto's
in-process mock does not reach aiobotocore, and a separate process keeps its CPU
out of the daemon's measurements). Imported only by `demo`, tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

DEMO_ACCOUNT = "123456789012"
IRSA_AUDIENCE = "sts.amazonaws.com"


@dataclass
class Issuer:
    """An OIDC issuer with one RSA signing key, minting Kubernetes-style service-account tokens."""

    url: str = "https://oidc.irsa-cache.test/id/DEMO"
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    private_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), repr=False
    )

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private_key.public_key()))
        public.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [public]}

    def mint(
        self,
        subject: str,
        *,
        audience: str | list[str] = IRSA_AUDIENCE,
        lifetime_seconds: float = 86_400,
        now: float | None = None,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        issuer: str | None = None,
        **extra_claims: Any,
    ) -> str:
        """A signed token for `subject` (`system:serviceaccount:<ns>:<sa>`), as the kubelet projects it."""
        issued = time.time() if now is None else now
        claims: dict[str, Any] = {
            "iss": issuer or self.url,
            "sub": subject,
            "aud": [audience] if isinstance(audience, str) else audience,
            "iat": int(issued),
            "nbf": int(issued),
            "exp": int(issued + lifetime_seconds),
            "jti": str(uuid.uuid4()),
        }
        parts = subject.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            kubernetes: dict[str, Any] = {
                "namespace": parts[2],
                "serviceaccount": {"name": parts[3], "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, subject))},
            }
            if pod_name:
                kubernetes["pod"] = {"name": pod_name, "uid": pod_uid or str(uuid.uuid4())}
            claims["kubernetes.io"] = kubernetes
        claims.update(extra_claims)
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": self.kid})

    def write_static_config(self, directory: Path, identities: dict[str, str]) -> Path:
        """Write jwks.json and a static config mapping subjects (or patterns) to role ARNs."""
        (directory / "jwks.json").write_text(json.dumps(self.jwks()))
        lines = [f"issuer: {self.url}", f"audience: {IRSA_AUDIENCE}", "jwks_file: jwks.json", "identities:"]
        for subject, role_arn in identities.items():
            lines += [f'  - subject: "{subject}"', f"    role_arn: {role_arn}"]
        path = directory / "static.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path


def write_token(path: Path, token: str) -> Path:
    # No trailing newline: botocore and the JS SDK reject a token that ends with one.
    path.write_text(token)
    return path


def vm_rss_kib(pid: int) -> int:
    """A process's resident memory (VmRSS), in KiB."""
    match = re.search(r"^VmRSS:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
    return int(match.group(1))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's unit of CPU time, per second


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    # The command name, field 2, may hold spaces: split after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all processes have used so far, plus time stolen by the hypervisor.
    Interrupt time is left out: it is mostly the loopback traffic of the run itself."""
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + steal) / _CLOCK_TICKS


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(url: str, *, timeout_seconds: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200; bounded, and fails early if `process` dies."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_seconds:g} s")


class Background:
    """A child process on loopback ports, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], *, ready_url: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None, timeout_seconds: float = 30.0) -> None:
        self.argv = argv
        self.ready_url = ready_url
        self.log_path = log_path
        self._env = env
        self._timeout = timeout_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def __enter__(self) -> Background:
        self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        output = self._log or subprocess.DEVNULL
        self.process = subprocess.Popen(self.argv, stdout=output, stderr=output, env=self._env)
        try:
            wait_until(self.ready_url, timeout_seconds=self._timeout, process=self.process)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class MotoSts(Background):
    """moto in server mode on a loopback port: STS's real wire protocol, validating nothing."""

    def __init__(self, *, log_path: Path | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            ready_url=f"{self.url}/moto-api/", log_path=log_path,
        )
