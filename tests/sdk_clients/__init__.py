"""Four real AWS SDK clients as pods, each in a process of its own, configured only by the
environment: boto3, the AWS CLI v1, the JS SDK v3's container provider, and a Go program
built against the Go SDK v2 as Debian packages it.

Each client's patience with the credentials endpoint, read from its source:

- botocore (boto3, and the CLI's own copy): `ContainerMetadataFetcher`, 2 s per attempt,
  3 attempts, 1 s sleep after each failure, every non-200 retried, `Retry-After` ignored;
- JS v3 `fromHttp` (what the default chain calls for these variables): a 1 s request
  timeout that node-http-handler 4.x only warns about (the request goes on waiting), 3
  retries 1 s apart, every failure retried;
- Go v2 of Debian (aws 1.17, credentials 1.12): no timeout on the endpoint client, and an
  error answer becomes an `EndpointError` without its HTTP status, which the standard
  retryer does not retry: one 5xx is final. This build reads only
  AWS_CONTAINER_AUTHORIZATION_TOKEN (the token itself), not the _FILE variant.

`trial()` runs one client, cold, through a `ClientTap` in front of the daemon, and says
what it got: ok or not, every request it made (status, time), time to credentials.
Used by tests/test_sdk_clients.py and bench/sdk_matrix.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.embedded import write_token
from tests.client_tap import ClientTap, Request

HERE = Path(__file__).resolve().parent
JS_DIR = HERE / "js"
GO_SOURCE = HERE / "go" / "main.go"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put their source
GO_SDK = GOPATH / "src/github.com/aws/aws-sdk-go-v2"


@dataclass(frozen=True, kw_only=True)
class Patience:
    """How a client waits for the credentials endpoint, from its source."""

    attempt_seconds: float | None  # it gives up on one request after this; None: it waits
    attempts: int
    sleep_seconds: float  # between attempts
    retries_errors: bool  # a 5xx answer is tried again

    def served_in(self, ready_at: float, *, hold: float) -> int | None:
        """The attempt (1, 2, ...) that gets credentials the daemon has `ready_at` seconds
        after the client's first request, or None: the client has given up by then.

        An attempt is served if it is open then or starts later; a client without a
        timeout is held at most `hold`, then gets a 503 that it may retry."""
        start = 0.0
        for attempt in range(1, self.attempts + 1):
            window = hold if self.attempt_seconds is None else min(self.attempt_seconds, hold)
            if ready_at < start + window:
                return attempt
            if self.attempt_seconds is None and not self.retries_errors:
                return None  # the 503 at the end of the hold is final for it
            start += window + self.sleep_seconds
        return None

    def __str__(self) -> str:
        each = "no timeout" if self.attempt_seconds is None else f"{self.attempt_seconds:g} s each"
        retry = "" if self.attempts == 1 else f", {self.sleep_seconds:g} s apart"
        final = "" if self.retries_errors else ", a 5xx is final"
        return f"{self.attempts} attempt{'s' if self.attempts > 1 else ''} ({each}){retry}{final}"


BOTOCORE = Patience(attempt_seconds=2.0, attempts=3, sleep_seconds=1.0, retries_errors=True)
JS_FROM_HTTP = Patience(attempt_seconds=None, attempts=4, sleep_seconds=1.0, retries_errors=True)
GO_DEBIAN = Patience(attempt_seconds=None, attempts=1, sleep_seconds=0.0, retries_errors=False)


# When the daemon has the credentials, after STS's delay: moto's own answer and the daemon's
# work come on top; EARLY_SECONDS allows for a client whose later attempts drift late.
LATE_SECONDS = 0.15
EARLY_SECONDS = 0.05


def expected_attempts(patience: Patience, sts_seconds: float, *, hold: float, sts_timeout: float) -> set[int | None]:
    """The attempt that may be served (None: the client gives up first) when STS answers
    after `sts_seconds`, for the earliest and the latest the daemon can have the answer.
    An STS slower than the daemon's own per-attempt timeout is never heard."""
    if sts_seconds >= sts_timeout:
        return {None}
    return {patience.served_in(sts_seconds - EARLY_SECONDS, hold=hold),
            patience.served_in(sts_seconds + LATE_SECONDS, hold=hold)}


@dataclass(frozen=True, kw_only=True)
class Pod:
    """What one pod's container is given: the endpoint, its token, the AWS API to call."""

    credentials_url: str
    token: str
    token_file: Path
    aws_api_url: str  # where its one AWS call goes (moto itself: only the exchange is slowed)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_CONTAINER_CREDENTIALS_FULL_URI=self.credentials_url,
            AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(self.token_file),
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
        )
        return env


@dataclass(frozen=True, kw_only=True)
class SdkClient:
    name: str  # short, for test ids and the table's header
    label: str  # with its version
    patience: Patience
    command: Callable[[Pod], tuple[list[str], dict[str, str]]]


class Missing(Exception):
    """A client cannot run here; the message says what installs it."""


BOTO3_SCRIPT = """
import json, sys, time
import boto3
started = time.monotonic()
session = boto3.Session(region_name="us-east-1")
try:
    key = session.get_credentials().get_frozen_credentials().access_key
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}))
    sys.exit(1)
seconds = time.monotonic() - started
arn = session.client("sts", endpoint_url=sys.argv[1]).get_caller_identity()["Arn"]
print(json.dumps({"access_key_id": key, "arn": arn, "seconds": seconds}))
"""


def _boto3_command(pod: Pod) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-c", BOTO3_SCRIPT, pod.aws_api_url], pod.environment()


def aws_cli() -> str:
    """The AWS CLI of this environment (the test extra installs it)."""
    candidate = Path(sys.executable).parent / "aws"
    if not candidate.exists():
        raise Missing("the AWS CLI is not installed (pip install -e '.[test]' installs awscli)")
    return str(candidate)


def _cli_command(pod: Pod) -> tuple[list[str], dict[str, str]]:
    argv = [aws_cli(), "sts", "get-caller-identity", "--endpoint-url", pod.aws_api_url, "--output", "json"]
    return argv, pod.environment()


def js_client() -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise Missing("node is not installed")
    if not (JS_DIR / "node_modules" / "@aws-sdk" / "credential-provider-http").is_dir():
        raise Missing(f"the JS SDK is not installed (npm ci --prefix {JS_DIR.relative_to(HERE.parent.parent)})")
    return [node, str(JS_DIR / "pod.mjs")]


def _js_command(pod: Pod) -> tuple[list[str], dict[str, str]]:
    return js_client(), pod.environment()


_go_binary: dict[Path, Path] = {}


def go_client(build_dir: Path) -> Path:
    """The Go client, built once per `build_dir` from tests/sdk_clients/go/main.go."""
    if build_dir in _go_binary:
        return _go_binary[build_dir]
    go = shutil.which("go")
    if go is None or not GO_SDK.is_dir():
        raise Missing("Go and Debian's Go SDK v2 are not installed "
                      "(apt-get install golang-go golang-github-aws-aws-sdk-go-v2-dev)")
    binary = build_dir / "pod-go"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOFLAGS": ""}
    result = subprocess.run([go, "build", "-o", str(binary), str(GO_SOURCE)], env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"go build of {GO_SOURCE} failed:\n{result.stderr}")
    _go_binary[build_dir] = binary
    return binary


def go_command(build_dir: Path) -> Callable[[Pod], tuple[list[str], dict[str, str]]]:
    def command(pod: Pod) -> tuple[list[str], dict[str, str]]:
        env = pod.environment()
        # This SDK reads only the token itself; the _FILE variable is left for the others.
        del env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = pod.token
        return [str(go_client(build_dir)), pod.aws_api_url], env

    return command


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _js_version() -> str:
    try:
        lock = json.loads((JS_DIR / "package-lock.json").read_text())
        return lock["packages"]["node_modules/@aws-sdk/credential-provider-http"]["version"]
    except (OSError, KeyError, ValueError):
        return "?"


def _go_versions() -> str:
    found = []
    for module in ("aws", "credentials"):
        try:
            text = (GO_SDK / module / "go_module_metadata.go").read_text()
            found.append(f"{module} {text.split('goModuleVersion = ')[1].split(chr(34))[1]}")
        except (OSError, IndexError):
            found.append(f"{module} ?")
    return ", ".join(found)


def clients(build_dir: Path) -> list[SdkClient]:
    """The four clients; `build_dir` holds the Go binary once built."""
    return [
        SdkClient(name="boto3", label=f"boto3 {_version('boto3')}", patience=BOTOCORE, command=_boto3_command),
        SdkClient(name="aws-cli", label=f"AWS CLI {_version('awscli')}", patience=BOTOCORE, command=_cli_command),
        SdkClient(name="js-v3", label=f"JS v3 (credential-provider-http {_js_version()})", patience=JS_FROM_HTTP,
                  command=_js_command),
        SdkClient(name="go-v2-debian", label=f"Go v2, Debian ({_go_versions()})", patience=GO_DEBIAN,
                  command=go_command(build_dir)),
    ]


def missing(client: SdkClient, build_dir: Path) -> str | None:
    """Why `client` cannot run here, or None."""
    pod = Pod(credentials_url="http://127.0.0.1:1/v1/credentials", token="x", token_file=build_dir / "none",
              aws_api_url="http://127.0.0.1:1")
    try:
        client.command(pod)
    except Missing as exc:
        return str(exc)
    return None


@dataclass
class Trial:
    """One client's cold fetch: what it got and every request it made on the way."""

    client: SdkClient
    ok: bool
    requests: list[Request]
    output: dict[str, Any] = field(default_factory=dict)  # the client's own JSON line
    stderr: str = ""
    bounded: bool = False  # still waiting when the trial's bound ran out: killed

    @property
    def statuses(self) -> list[int | None]:
        return [request.status for request in self.requests]

    @property
    def seconds_to_credentials(self) -> float | None:
        """From the client's first request to the end of its first 200."""
        for request in self.requests:
            if request.status == 200 and request.answered is not None:
                return request.answered - self.requests[0].started
        return None

    def describe(self) -> str:
        statuses = ", ".join("gave up" if status is None else str(status) for status in self.statuses)
        outcome = "ok" if self.ok else "failed"
        took = self.seconds_to_credentials
        timing = f", {took:.2f} s" if took is not None else ""
        said = "" if self.ok else f": {self.output.get('error') or self.stderr.strip()[-300:]}"
        return f"{self.client.name}: {outcome}, {len(self.requests)} request(s) [{statuses}]{timing}{said}"


async def trial(client: SdkClient, *, daemon_address: str, token: str, workdir: Path, aws_api_url: str,
                bound_seconds: float) -> Trial:
    """Run `client` once against the daemon at `daemon_address`, through a tap of its own;
    kill it if it has not finished after `bound_seconds`."""
    tap = await ClientTap(daemon_address).start()
    workdir.mkdir(parents=True, exist_ok=True)
    pod = Pod(credentials_url=tap.credentials_url, token=token, token_file=write_token(workdir / "token", token),
              aws_api_url=aws_api_url)
    argv, env = client.command(pod)
    bounded = False
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), bound_seconds)
        except TimeoutError:
            bounded = True
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            stdout, stderr = await process.communicate()
    finally:
        await tap.stop()
    output: dict[str, Any] = {}
    lines = stdout.decode(errors="replace").strip().splitlines()
    if lines:
        with contextlib.suppress(ValueError):
            parsed = json.loads(lines[-1] if client.name != "aws-cli" else "\n".join(lines))
            output = parsed if isinstance(parsed, dict) else {}
    ok = process.returncode == 0 and not bounded
    return Trial(client=client, ok=ok, requests=list(tap.requests), output=output,
                 stderr=stderr.decode(errors="replace"), bounded=bounded)
