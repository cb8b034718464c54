"""`irsa-cache init-network` for real, in network namespaces these tests create.

Each test gets a namespace of its own (a unique name, deleted at teardown) and runs
the command in it with `ip netns exec`, as the init container runs it on a node;
nothing touches the machine's own network. Without permission to add a namespace
(not root, no CAP_NET_ADMIN/CAP_SYS_ADMIN) the tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import netsetup
from daemon.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_SECONDS = 60


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def network_namespace(role: str) -> Iterator[str]:
    """A new, empty network namespace, deleted on exit; skips the test where none can be made."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (apt-get install iproute2)")
    name = f"irsa-test-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here (needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN): "
                    f"{added.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def in_namespace(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRSA_CACHE_")}
    env.update(extra)
    return env


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace("node") as name:
        yield name


class Run:
    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.returncode = result.returncode
        self.stderr = result.stderr
        self.lines: list[dict[str, Any]] = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]

    def at(self, level: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["level"] == level]


def init_network(namespace: str, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> Run:
    result = subprocess.run(
        in_namespace(namespace, *prefix, sys.executable, "-m", "daemon", "init-network", *args),
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, cwd=REPO,
        env=env if env is not None else clean_environment(),
    )
    return Run(result)


def addresses(namespace: str) -> dict[str, set[str]]:
    """{interface: {"address/prefix", ...}} inside the namespace."""
    links = json.loads(ip("-n", namespace, "-j", "address", "show").stdout)
    return {link["ifname"]: {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])} for link in links}


def links(namespace: str) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(ip("-n", namespace, "-j", "link", "show").stdout)}


def dummy_supported(namespace: str) -> bool:
    probe = ip("-n", namespace, "link", "add", "irsa-probe0", "type", "dummy", check=False)
    if probe.returncode == 0:
        ip("-n", namespace, "link", "delete", "irsa-probe0")
    return probe.returncode == 0


def holder(namespace: str, address: str) -> list[str]:
    return [name for name, held in addresses(namespace).items() if address in held]


def test_adds_the_ipv4_address_on_the_dummy_link_or_else_lo(netns: str) -> None:
    expected = "irsa-cache0" if dummy_supported(netns) else "lo"

    run = init_network(netns)

    assert run.returncode == 0, run.stderr
    assert holder(netns, "169.254.170.23/32") == [expected]
    assert "UP" in links(netns)[expected]["flags"]
    assert not any("fd00:ec2::23" in held for held in addresses(netns).values())
    if expected == "lo":  # this kernel has no dummy link type
        assert any("no dummy link type" in line["message"] for line in run.at("warning")), run.stderr
    assert run.lines[-1]["message"] == f"node network ready: 169.254.170.23/32 on {expected}"


def test_interface_lo_puts_the_address_on_loopback(netns: str) -> None:
    run = init_network(netns, "--interface", "lo")

    assert run.returncode == 0, run.stderr
    assert holder(netns, "169.254.170.23/32") == ["lo"]
    assert "irsa-cache0" not in links(netns)
    assert not run.at("warning"), run.stderr


def test_a_second_run_changes_nothing_and_succeeds(netns: str) -> None:
    first = init_network(netns, "--ipv6")
    assert first.returncode == 0, first.stderr
    assert any(line.get("changed") for line in first.lines)
    before = (addresses(netns), {name: link["flags"] for name, link in links(netns).items()})

    second = init_network(netns, "--ipv6")

    assert second.returncode == 0, second.stderr
    assert (addresses(netns), {name: link["flags"] for name, link in links(netns).items()}) == before
    assert not [line for line in second.lines if line.get("changed")], second.stderr
    assert [line["message"] for line in second.lines if line.get("changed") is False] == [
        f"169.254.170.23/32 is already on {holder(netns, '169.254.170.23/32')[0]}",
        f"fd00:ec2::23/128 is already on {holder(netns, 'fd00:ec2::23/128')[0]}",
    ]


def test_ipv6_adds_the_ipv6_address_beside_the_ipv4_one(netns: str) -> None:
    run = init_network(netns, "--ipv6")

    assert run.returncode == 0, run.stderr
    (link,) = holder(netns, "169.254.170.23/32")
    assert holder(netns, "fd00:ec2::23/128") == [link]


def test_ipv6_disabled_warns_and_still_succeeds(netns: str) -> None:
    # net.ipv6.conf.{all,default}.disable_ipv6=1, written as sysctl(8) would (procps may be absent).
    subprocess.run(in_namespace(netns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
                                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"), check=True, timeout=30)

    run = init_network(netns, "--ipv6")

    assert run.returncode == 0, run.stderr
    assert holder(netns, "169.254.170.23/32"), "the IPv4 address is still added"
    assert not any("fd00:ec2::23/128" in held for held in addresses(netns).values())
    (warning,) = [line for line in run.at("warning") if "fd00:ec2::23" in line["message"]]
    assert "IPv6 is disabled" in warning["message"]
    assert warning["address"] == "fd00:ec2::23/128"


def test_the_address_on_another_interface_fails_with_one_line_naming_it(netns: str) -> None:
    ip("-n", netns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    ip("-n", netns, "address", "add", "169.254.170.23/32", "dev", "other0")
    before = addresses(netns)

    run = init_network(netns, "--ipv6")

    assert run.returncode == 1, run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr
    (error,) = run.lines
    assert error["level"] == "error"
    assert "169.254.170.23" in error["message"] and "other0" in error["message"]
    assert (error["address"], error["interface"]) == ("169.254.170.23", "other0")
    assert addresses(netns) == before, "nothing changes when the command refuses"


def test_an_existing_interface_that_is_not_a_dummy_link_is_refused(netns: str) -> None:
    ip("-n", netns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")

    run = init_network(netns, env=clean_environment(IRSA_CACHE_INTERFACE="other0"))

    assert run.returncode == 1, run.stderr
    (error,) = run.lines
    assert "other0" in error["message"] and "veth" in error["message"]
    assert not holder(netns, "169.254.170.23/32")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux's setpriv is not installed")
def test_without_net_admin_the_error_says_so(netns: str) -> None:
    run = init_network(netns, prefix=("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"))

    assert run.returncode == 1, run.stderr
    (error,) = run.lines
    assert "Operation not permitted" in error["message"] and "NET_ADMIN" in error["message"]


def test_environment_variables_stand_for_the_flags(netns: str) -> None:
    run = init_network(netns, env=clean_environment(IRSA_CACHE_INTERFACE="lo", IRSA_CACHE_IPV6="true"))

    assert run.returncode == 0, run.stderr
    assert {"169.254.170.23/32", "fd00:ec2::23/128"} <= addresses(netns)["lo"]


def test_bad_settings_exit_2_naming_each_one(netns: str) -> None:
    run = init_network(netns, "--interface", "a/b", env=clean_environment(IRSA_CACHE_IPV6="maybe"))

    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "irsa-cache: error: --interface: 'a/b' is not an interface name (1 to 15 characters, no '/', ':' or spaces)",
        "irsa-cache: error: IRSA_CACHE_IPV6: 'maybe' is not true or false",
    ]
    assert not holder(netns, "169.254.170.23/32")


def settings(argv: list[str], environ: dict[str, str]) -> netsetup.NetworkSettings:
    import argparse

    parser = argparse.ArgumentParser()
    netsetup.add_arguments(parser)
    return netsetup.settings_from(parser.parse_args(argv), environ)


def test_settings_defaults_flags_and_environment() -> None:
    assert settings([], {}) == netsetup.NetworkSettings(
        interface="irsa-cache0", addresses=(netsetup.IPV4_ADDRESS,), log_level="info", handoff_dir=None,
        handoff_uid=65532,
    )
    from_env = settings([], {"IRSA_CACHE_IPV6": "yes", "IRSA_CACHE_INTERFACE": "lo", "IRSA_CACHE_LOG_LEVEL": "debug"})
    assert from_env.addresses == (netsetup.IPV4_ADDRESS, netsetup.IPV6_ADDRESS)
    assert (from_env.interface, from_env.log_level) == ("lo", "debug")
    assert settings(["--interface", "node-link0"], {"IRSA_CACHE_INTERFACE": "lo"}).interface == "node-link0"
    with pytest.raises(ConfigError) as raised:
        settings(["--interface", "sixteen-chars-xx"], {})
    assert raised.value.problems == [
        "--interface: 'sixteen-chars-xx' is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
    ]


def test_the_handoff_directory_is_made_the_daemons_alone(netns: str, tmp_path: Path) -> None:
    directory = tmp_path / "run" / "irsa-cache"

    run = init_network(netns, "--handoff-dir", str(directory), "--handoff-uid", "65532")

    assert run.returncode == 0, run.stderr
    info = directory.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65532, 65532, 0o700)
    again = init_network(netns, "--handoff-dir", str(directory))  # idempotent, like the addresses
    assert again.returncode == 0, again.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux's setpriv is not installed")
def test_without_chown_the_handoff_directory_error_says_so(netns: str, tmp_path: Path) -> None:
    run = init_network(netns, "--handoff-dir", str(tmp_path / "h"),
                       prefix=("setpriv", "--inh-caps=-chown", "--bounding-set=-chown"))

    assert run.returncode == 1, run.stderr
    (error,) = [line for line in run.lines if line["level"] == "error"]
    assert "CAP_CHOWN" in error["message"]
