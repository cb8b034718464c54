"""The first failures a newcomer meets, as the command line shows them: one line on
stderr naming what to do, exit status 2, no traceback. And what is not theirs to fix
(an upstream down at start) is no reason to exit at all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.embedded import Issuer, free_port

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "IRSA_CACHE_"))}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=REPO, env=environment)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("irsa-cache: error: "), lines
    return lines[0]


@pytest.fixture
def static(tmp_path: Path, issuer: Issuer) -> Path:
    return issuer.write_static_config(tmp_path, {"system:serviceaccount:a:b": "arn:aws:iam::123456789012:role/x"})


def serve(static: Path, *args: str) -> list[str]:
    return ["serve", "--static-config", str(static), "--region", "us-east-1", "--sts-endpoint-url",
            "http://127.0.0.1:1", "--handoff-socket", "", "--metrics-listen", f"127.0.0.1:{free_port()}", *args]


def test_a_listen_address_not_on_the_node_says_to_run_init_network(static: Path) -> None:
    line = one_line_error(run(*serve(static, "--listen", "169.254.170.99:8080")))

    assert "169.254.170.99 is not an address of this node" in line
    assert "irsa-cache init-network" in line and "--listen 127.0.0.1:PORT" in line


def test_a_port_in_use_names_the_port(static: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        line = one_line_error(run(*serve(static, "--listen", f"127.0.0.1:{port}")))

    assert f"port {port} is already in use on 127.0.0.1" in line


def test_kubernetes_mode_outside_a_cluster_says_what_to_pass() -> None:
    line = one_line_error(run("serve", "--directory", "kubernetes", "--node-name", "n", "--region", "us-east-1",
                              "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                              "--handoff-socket", ""))

    assert "in-cluster configuration" in line and "--kubeconfig" in line


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{{{ not yaml", id="not-yaml"),
        pytest.param("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n", id="no-context"),
        pytest.param("just a string\n", id="a-string"),
    ],
)
def test_a_broken_kubeconfig_is_one_line(tmp_path: Path, content: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(content)

    line = one_line_error(run("serve", "--directory", "kubernetes", "--node-name", "n", "--region", "us-east-1",
                              "--kubeconfig", str(kubeconfig), "--listen", f"127.0.0.1:{free_port()}",
                              "--metrics-listen", f"127.0.0.1:{free_port()}", "--handoff-socket", ""))

    assert f"--kubeconfig {kubeconfig}" in line


@pytest.mark.parametrize(
    ("jwks", "reason"),
    [
        pytest.param("not json", "is not JSON", id="not-json"),
        pytest.param('{"keys": "none"}', "not a JSON Web Key Set", id="not-a-key-set"),
        pytest.param('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}',
                     "no usable signing key (skipping key k1: not an asymmetric signing key)", id="only-hmac"),
    ],
)
def test_a_malformed_key_set_file_says_why(static: Path, jwks: str, reason: str) -> None:
    (static.parent / "jwks.json").write_text(jwks)

    line = one_line_error(run(*serve(static, "--listen", f"127.0.0.1:{free_port()}")))

    assert "jwks_file" in line and reason in line


def test_an_unknown_key_in_the_static_config_suggests_the_known_one(static: Path) -> None:
    static.write_text(static.read_text().replace("audience:", "audiance:"))

    line = one_line_error(run(*serve(static, "--listen", f"127.0.0.1:{free_port()}")))

    assert "audiance: unknown key (did you mean 'audience'?)" in line


def test_a_key_set_url_down_at_start_is_waited_for_not_an_exit(tmp_path: Path, issuer: Issuer) -> None:
    closed = free_port()
    static = tmp_path / "static.yaml"
    static.write_text(f"issuer: {issuer.url}\njwks_url: http://127.0.0.1:{closed}/keys\nidentities:\n"
                      "  - subject: system:serviceaccount:a:b\n    role_arn: arn:aws:iam::123456789012:role/x\n")
    metrics = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--static-config", str(static), "--region",
                                "us-east-1", "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", metrics,
                                "--handoff-socket", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, text=True)
    try:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:  # bounded: until /readyz answers
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                urllib.request.urlopen(f"http://{metrics}/readyz", timeout=1)
            except urllib.error.HTTPError as error:
                text = error.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert "signing keys not loaded" in text and f"127.0.0.1:{closed}" in text, text
    finally:
        process.terminate()
        code = process.wait(30)
        if process.stderr is not None:
            process.stderr.close()
    assert code == 0  # a clean stop, not a crash


def test_demo_without_its_extra_is_one_line() -> None:
    # As an install without the [demo] extra: moto and boto3 are not to be found.
    result = subprocess.run([sys.executable, "-c", HIDE, "demo"], capture_output=True, text=True, timeout=TIMEOUT,
                            cwd=REPO)

    line = one_line_error(result)
    assert "pip install 'irsa-cache[demo]'" in line


HIDE = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in ("moto", "boto3") else real(name, *a)
from daemon.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_stops_every_child_and_removes_its_files_on_sigterm() -> None:
    with subprocess.Popen([sys.executable, "-m", "daemon", "demo", "--pods", "4", "--identities", "2",
                           "--keep-running"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO) as process:
        try:
            assert process.stdout is not None
            workdir, printed = "", []
            for line in process.stdout:  # bounded: the demo prints a few dozen lines, then waits
                printed.append(line)
                if "files in " in line:
                    workdir = line.rsplit("files in ", 1)[1].strip()
                if "Try it by hand" in line:
                    break
            assert workdir and Path(workdir).exists(), printed
            children = children_of(process.pid)
            assert len(children) >= 2, children  # moto and the daemon

            process.send_signal(signal.SIGTERM)
            code = process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 143
    assert not Path(workdir).exists()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or zombie(pid), f"child {pid} still runs"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

