"""`irsa-cache serve` settings: defaults, the environment, validation, and the CLI's error output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from daemon import __version__, config
from daemon.config import Address, Settings
from daemon.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT = 60


@pytest.fixture
def static_file(tmp_path: Path) -> Path:
    # parse_serve_args only checks that the file exists; its content is the directory's business.
    path = tmp_path / "static.yaml"
    path.write_text("issuer: https://issuer.test\n")
    return path


KUBERNETES_ONLY = {"--kubeconfig", "--node-name", "--annotation-prefix", "--issuer", "--audience", "--token-review"}


def base_args(static_file: Path, *, omit: Sequence[str] = ()) -> list[str]:
    """The least a valid command line needs, minus the flags a test wants to set itself; in
    Kubernetes mode when a flag omitted is one only that mode reads."""
    args: list[str] = []
    if KUBERNETES_ONLY & set(omit):
        args += ["--directory", "kubernetes"]
        if "--node-name" not in omit:
            args += ["--node-name", "node-a"]
    elif "--static-config" not in omit:
        args += ["--static-config", str(static_file)]
    if "--region" not in omit:
        args += ["--region", "eu-west-1"]
    return args


def parse(static_file: Path, *argv: str, environ: Mapping[str, str] | None = None, omit: Sequence[str] = ()) -> Settings:
    return config.parse_serve_args([*base_args(static_file, omit=omit), *argv], environ={} if environ is None else environ)


def problems_of(static_file: Path, *argv: str, environ: Mapping[str, str] | None = None, omit: Sequence[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(static_file, *argv, environ=environ, omit=omit)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- defaults ---


def test_defaults(static_file: Path) -> None:
    settings = parse(static_file)

    assert settings.server.listen == (Address("169.254.170.23", 80),)
    assert settings.server.metrics_listen == Address("0.0.0.0", 9464)
    assert settings.directory.kind == "static"
    assert settings.directory.static_config == static_file
    assert settings.sts.region == "eu-west-1"
    assert settings.sts.endpoint_url == "https://sts.eu-west-1.amazonaws.com"
    assert settings.sts.session_duration_seconds == 3600
    assert isinstance(settings.sts.session_duration_seconds, int)
    assert settings.sts.timeout_seconds == 10
    assert settings.cache.serve_floor_seconds == 960
    assert settings.cache.refresh_jitter == 0.1
    assert settings.cache.idle_evict_seconds == 3600
    assert settings.cache.max_entries == 20000
    assert settings.cache.stale_cutoff_seconds == config.STALE_CUTOFF_SECONDS == 60
    assert settings.log_level == "info"


@pytest.mark.parametrize(
    ("argv", "environ", "region", "endpoint"),
    [
        pytest.param(["--region", "eu-west-1"], {}, "eu-west-1", "https://sts.eu-west-1.amazonaws.com", id="flag"),
        pytest.param([], {"AWS_REGION": "eu-west-1"}, "eu-west-1", "https://sts.eu-west-1.amazonaws.com", id="AWS_REGION"),
        pytest.param([], {"AWS_DEFAULT_REGION": "us-east-2"}, "us-east-2", "https://sts.us-east-2.amazonaws.com", id="AWS_DEFAULT_REGION"),
        pytest.param([], {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}, "eu-west-1",
                     "https://sts.eu-west-1.amazonaws.com", id="AWS_REGION-before-AWS_DEFAULT_REGION"),
        pytest.param(["--region", "ap-south-1"], {"AWS_REGION": "eu-west-1"}, "ap-south-1",
                     "https://sts.ap-south-1.amazonaws.com", id="flag-wins-over-AWS_REGION"),
        pytest.param([], {"IRSA_CACHE_REGION": "ap-south-1", "AWS_REGION": "eu-west-1"}, "ap-south-1",
                     "https://sts.ap-south-1.amazonaws.com", id="IRSA_CACHE_REGION-wins-over-AWS_REGION"),
        pytest.param(["--region", "cn-north-1"], {}, "cn-north-1", "https://sts.cn-north-1.amazonaws.com.cn", id="china"),
        pytest.param([], {"AWS_REGION": "cn-northwest-1"}, "cn-northwest-1",
                     "https://sts.cn-northwest-1.amazonaws.com.cn", id="china-from-env"),
        pytest.param(["--region", "us-gov-west-1"], {}, "us-gov-west-1", "https://sts.us-gov-west-1.amazonaws.com", id="govcloud"),
        pytest.param(["--region", "eu-west-1", "--sts-endpoint-url", "http://127.0.0.1:5000/"], {}, "eu-west-1",
                     "http://127.0.0.1:5000", id="explicit-endpoint-wins"),
    ],
)
def test_region_and_regional_endpoint(
    static_file: Path, argv: list[str], environ: dict[str, str], region: str, endpoint: str
) -> None:
    settings = parse(static_file, *argv, environ=environ, omit=["--region"])

    assert settings.sts.region == region
    assert settings.sts.endpoint_url == endpoint


# --- every flag from the environment; the command line wins ---

Getter = Callable[[Settings], Any]

# (flag, env value, command-line value, getter, expected from env, expected from the command line)
ENV_TABLE = [
    pytest.param("--listen", "127.0.0.1:8080", "127.0.0.1:9090", lambda s: s.server.listen,
                 (Address("127.0.0.1", 8080),), (Address("127.0.0.1", 9090),), id="listen"),
    pytest.param("--metrics-listen", "127.0.0.1:9000", "127.0.0.1:9001", lambda s: s.server.metrics_listen,
                 Address("127.0.0.1", 9000), Address("127.0.0.1", 9001), id="metrics-listen"),
    pytest.param("--static-config", "{tmp}/env.yaml", "{tmp}/cli.yaml", lambda s: s.directory.static_config.name,
                 "env.yaml", "cli.yaml", id="static-config"),
    pytest.param("--region", "us-west-2", "ca-central-1", lambda s: (s.sts.region, s.sts.endpoint_url),
                 ("us-west-2", "https://sts.us-west-2.amazonaws.com"),
                 ("ca-central-1", "https://sts.ca-central-1.amazonaws.com"), id="region"),
    pytest.param("--sts-endpoint-url", "http://127.0.0.1:1", "http://127.0.0.1:2", lambda s: s.sts.endpoint_url,
                 "http://127.0.0.1:1", "http://127.0.0.1:2", id="sts-endpoint-url"),
    pytest.param("--session-duration", "2h", "7200s", lambda s: s.sts.session_duration_seconds, 7200, 7200,
                 id="session-duration-units"),
    pytest.param("--session-duration", "3000", "43200", lambda s: s.sts.session_duration_seconds, 3000, 43200,
                 id="session-duration"),
    pytest.param("--sts-timeout", "2", "3s", lambda s: s.sts.timeout_seconds, 2, 3, id="sts-timeout"),
    pytest.param("--serve-floor", "10m", "90s", lambda s: s.cache.serve_floor_seconds, 600, 90, id="serve-floor"),
    pytest.param("--refresh-jitter", "0.2", "0", lambda s: s.cache.refresh_jitter, 0.2, 0.0, id="refresh-jitter"),
    pytest.param("--idle-evict", "2h", "30m", lambda s: s.cache.idle_evict_seconds, 7200, 1800, id="idle-evict"),
    pytest.param("--max-entries", "10", "20", lambda s: s.cache.max_entries, 10, 20, id="max-entries"),
    pytest.param("--log-level", "debug", "error", lambda s: s.log_level, "debug", "error", id="log-level"),
    pytest.param("--request-hold", "2", "0.5", lambda s: s.cache.request_hold_seconds, 2, 0.5, id="request-hold"),
    pytest.param("--refresh-wait", "0.1", "0.3", lambda s: s.cache.refresh_wait_seconds, 0.1, 0.3, id="refresh-wait"),
    pytest.param("--max-connections", "100", "2000", lambda s: s.server.credentials_limits.max_connections,
                 100, 2000, id="max-connections"),
    pytest.param("--handoff-socket", "/run/a.sock", "/run/b.sock", lambda s: str(s.server.handoff_socket),
                 "/run/a.sock", "/run/b.sock", id="handoff-socket"),
    pytest.param("--status-dir", "{tmp}", "/tmp", lambda s: s.server.status_dir is not None, True, True,
                 id="status-dir"),
    pytest.param("--sts-rate", "2.5", "40", lambda s: s.sts.rate_per_second, 2.5, 40, id="sts-rate"),
    pytest.param("--sts-burst", "5", "50", lambda s: s.sts.burst, 5, 50, id="sts-burst"),
    pytest.param("--sts-concurrency", "2", "16", lambda s: s.sts.concurrency, 2, 16, id="sts-concurrency"),
    pytest.param("--sts-queue", "10", "1000", lambda s: s.sts.max_queued, 10, 1000, id="sts-queue"),
    pytest.param("--kubeconfig", "{tmp}/env.yaml", "{tmp}/cli.yaml", lambda s: s.directory.kubeconfig.name,
                 "env.yaml", "cli.yaml", id="kubeconfig"),
    pytest.param("--node-name", "node-env", "node-cli", lambda s: s.directory.node_name, "node-env", "node-cli",
                 id="node-name"),
    pytest.param("--annotation-prefix", "irsa.example.com", "x.example.com", lambda s: s.directory.annotation_prefix,
                 "irsa.example.com", "x.example.com", id="annotation-prefix"),
    pytest.param("--issuer", "https://a.test", "https://b.test", lambda s: s.directory.issuer,
                 "https://a.test", "https://b.test", id="issuer"),
    pytest.param("--audience", "aud-env", "aud-cli", lambda s: s.directory.audience, "aud-env", "aud-cli", id="audience"),
]


def _option(flag: str) -> config.Option:
    return next(option for option in config.SERVE_OPTIONS if option.flag == flag)


def test_the_env_table_covers_every_flag() -> None:
    # --directory has one usable value, so it is covered by its own test below.
    covered = {param.values[0] for param in ENV_TABLE} | {"--directory", "--token-review"}
    covered |= {"--sts-cluster-rate", "--sts-cluster-burst"}  # need the kubernetes directory: tested below
    assert covered == {option.flag for option in config.SERVE_OPTIONS}


def test_env_names_are_the_flag_in_upper_snake() -> None:
    for option in config.SERVE_OPTIONS:
        assert option.env == "IRSA_CACHE_" + option.flag.removeprefix("--").replace("-", "_").upper()


@pytest.mark.parametrize(("flag", "env_value", "cli_value", "get", "from_env", "from_cli"), ENV_TABLE)
def test_every_flag_reads_its_environment_variable(
    tmp_path: Path, static_file: Path, flag: str, env_value: str, cli_value: str, get: Getter, from_env: Any, from_cli: Any
) -> None:
    (tmp_path / "env.yaml").write_text("{}\n")
    environ = {_option(flag).env: env_value.format(tmp=tmp_path)}

    settings = parse(static_file, environ=environ, omit=[flag])

    assert get(settings) == from_env


@pytest.mark.parametrize(("flag", "env_value", "cli_value", "get", "from_env", "from_cli"), ENV_TABLE)
def test_the_command_line_wins_over_the_environment(
    tmp_path: Path, static_file: Path, flag: str, env_value: str, cli_value: str, get: Getter, from_env: Any, from_cli: Any
) -> None:
    (tmp_path / "env.yaml").write_text("{}\n")
    (tmp_path / "cli.yaml").write_text("{}\n")
    environ = {_option(flag).env: env_value.format(tmp=tmp_path)}

    settings = parse(static_file, flag, cli_value.format(tmp=tmp_path), environ=environ, omit=[flag])

    assert get(settings) == from_cli


def test_directory_is_read_from_the_environment_and_the_command_line_wins(static_file: Path) -> None:
    settings = parse(static_file, environ={"IRSA_CACHE_DIRECTORY": "kubernetes", "NODE_NAME": "node-a"},
                     omit=["--static-config"])
    assert settings.directory.kind == "kubernetes" and settings.directory.node_name == "node-a"

    settings = parse(static_file, "--directory", "static", environ={"IRSA_CACHE_DIRECTORY": "kubernetes"})
    assert settings.directory.kind == "static"


# --- the STS budget shared by every node ---

IN_CLUSTER = {"IRSA_CACHE_DIRECTORY": "kubernetes", "NODE_NAME": "node-a",
              "DAEMONSET_NAME": "irsa-cache", "POD_NAMESPACE": "kube-system"}
K8S = ["--static-config"]  # Kubernetes mode: no static config


def test_the_cluster_budget_names_its_daemonset_and_bursts_a_second_by_default(static_file: Path) -> None:
    assert parse(static_file, environ=IN_CLUSTER, omit=K8S).sts.cluster is None  # the per-node budget by default

    settings = parse(static_file, "--sts-cluster-rate", "600", environ=IN_CLUSTER, omit=K8S)
    assert settings.sts.cluster == config.ClusterBudgetSettings(
        rate_per_second=600, burst=600, daemonset_namespace="kube-system", daemonset_name="irsa-cache")
    assert parse(static_file, "--sts-cluster-rate", "2.5", environ=IN_CLUSTER, omit=K8S).sts.cluster.burst == 3


@pytest.mark.parametrize(("flag", "env_value", "cli_value", "get", "from_env", "from_cli"), [
    pytest.param("--sts-cluster-rate", "50", "600", lambda s: s.sts.cluster.rate_per_second, 50, 600, id="rate"),
    pytest.param("--sts-cluster-burst", "100", "20", lambda s: s.sts.cluster.burst, 100, 20, id="burst"),
])
def test_the_cluster_budget_flags_read_their_environment_variables(
    static_file: Path, flag: str, env_value: str, cli_value: str, get: Getter, from_env: Any, from_cli: Any
) -> None:
    environ = {**IN_CLUSTER, "IRSA_CACHE_STS_CLUSTER_RATE": "10", _option(flag).env: env_value}
    assert get(parse(static_file, environ=environ, omit=K8S)) == from_env
    assert get(parse(static_file, flag, cli_value, environ=environ, omit=K8S)) == from_cli


@pytest.mark.parametrize(("argv", "environ", "problem"), [
    pytest.param(["--sts-cluster-rate", "600"], {}, "--sts-cluster-rate: needs --directory kubernetes",
                 id="static-directory"),
    pytest.param(["--sts-cluster-rate", "600"], {**IN_CLUSTER, "DAEMONSET_NAME": ""},
                 "--sts-cluster-rate: set DAEMONSET_NAME and POD_NAMESPACE", id="no-daemonset-name"),
    pytest.param(["--sts-cluster-rate", "600"], {k: v for k, v in IN_CLUSTER.items() if k != "POD_NAMESPACE"},
                 "--sts-cluster-rate: set DAEMONSET_NAME and POD_NAMESPACE", id="no-namespace"),
    pytest.param(["--sts-cluster-burst", "10"], IN_CLUSTER, "--sts-cluster-burst: only with --sts-cluster-rate",
                 id="burst-alone"),
    pytest.param(["--sts-cluster-rate", "0"], IN_CLUSTER, "--sts-cluster-rate: '0' must be above 0", id="zero-rate"),
])
def test_the_cluster_budget_says_what_it_lacks(
    static_file: Path, argv: list[str], environ: dict[str, str], problem: str
) -> None:
    problems = problems_of(static_file, *argv, environ=environ,
                           omit=K8S if environ.get("IRSA_CACHE_DIRECTORY") == "kubernetes" else ())
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_token_review_is_a_switch(static_file: Path) -> None:
    kubernetes = ["--directory", "kubernetes", "--node-name", "n"]
    assert parse(static_file, *kubernetes, omit=["--static-config"]).directory.token_review is False
    assert parse(static_file, *kubernetes, "--token-review", omit=["--static-config"]).directory.token_review is True
    assert parse(static_file, *kubernetes, environ={"IRSA_CACHE_TOKEN_REVIEW": "true"},
                 omit=["--static-config"]).directory.token_review is True
    assert problems_of(static_file, *kubernetes, environ={"IRSA_CACHE_TOKEN_REVIEW": "maybe"},
                       omit=["--static-config"]) == ["IRSA_CACHE_TOKEN_REVIEW: 'maybe' is not true or false"]


@pytest.mark.parametrize(
    ("argv", "environ", "name"),
    [
        pytest.param(["--issuer", "https://x.test"], {}, "--issuer", id="issuer"),
        pytest.param(["--audience", "vault"], {}, "--audience", id="audience"),
        pytest.param(["--token-review"], {}, "--token-review", id="token-review"),
        pytest.param([], {"IRSA_CACHE_NODE_NAME": "n"}, "IRSA_CACHE_NODE_NAME", id="node-name-env"),
    ],
)
def test_an_option_the_static_directory_would_ignore_is_refused(
    static_file: Path, argv: list[str], environ: dict[str, str], name: str
) -> None:
    assert problems_of(static_file, *argv, environ=environ) == [
        f"{name}: only used with --directory kubernetes (the static config file has its own issuer: and audience:)"
    ]


def test_node_name_from_the_downward_api_is_no_option_and_never_refused(static_file: Path) -> None:
    assert parse(static_file, environ={"NODE_NAME": "node-a"}).directory.kind == "static"


# --- addresses and durations ---


def test_listen_is_repeatable_and_takes_ipv6(static_file: Path) -> None:
    settings = parse(static_file, "--listen", "169.254.170.23:80", "--listen", "[fd00:ec2::23]:80")

    assert settings.server.listen == (Address("169.254.170.23", 80), Address("fd00:ec2::23", 80))
    assert [str(address) for address in settings.server.listen] == ["169.254.170.23:80", "[fd00:ec2::23]:80"]


def test_listen_from_the_environment_is_comma_separated(static_file: Path) -> None:
    environ = {"IRSA_CACHE_LISTEN": "169.254.170.23:80, [fd00:ec2::23]:80,"}

    settings = parse(static_file, environ=environ)

    assert settings.server.listen == (Address("169.254.170.23", 80), Address("fd00:ec2::23", 80))


def test_listen_on_the_command_line_replaces_the_environment_list(static_file: Path) -> None:
    environ = {"IRSA_CACHE_LISTEN": "169.254.170.23:80,[fd00:ec2::23]:80"}

    settings = parse(static_file, "--listen", "127.0.0.1:8080", environ=environ)

    assert settings.server.listen == (Address("127.0.0.1", 8080),)


@pytest.mark.parametrize(
    ("text", "address", "loopback"),
    [
        pytest.param("169.254.170.23:80", Address("169.254.170.23", 80), False, id="ipv4"),
        pytest.param("[fd00:ec2::23]:80", Address("fd00:ec2::23", 80), False, id="ipv6"),
        pytest.param("[::1]:8080", Address("::1", 8080), True, id="ipv6-loopback"),
        pytest.param("127.0.0.1:0", Address("127.0.0.1", 0), True, id="ephemeral-port"),
        pytest.param("localhost:65535", Address("localhost", 65535), True, id="hostname-max-port"),
        # status.hostIP through $(HOST_IP):9464 on an IPv6 node: no brackets, the last colon is the port's.
        pytest.param("2600:1f14:abc::7:9464", Address("2600:1f14:abc::7", 9464), False, id="ipv6-unbracketed"),
    ],
)
def test_parse_address(text: str, address: Address, loopback: bool) -> None:
    assert config.parse_address(text) == address
    assert config.parse_address(text).is_loopback is loopback


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("90", 90, id="bare-seconds"),
        pytest.param("90s", 90, id="seconds"),
        pytest.param("16m", 960, id="minutes"),
        pytest.param("1h", 3600, id="hours"),
        pytest.param("1.5h", 5400, id="fractional"),
        pytest.param("0.3", 0.3, id="sub-second"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds)


def test_durations_with_units_reach_the_settings(static_file: Path) -> None:
    settings = parse(
        static_file, "--session-duration", "1h", "--serve-floor", "16m", "--sts-timeout", "90s", "--idle-evict", "2h"
    )

    assert settings.sts.session_duration_seconds == 3600
    assert settings.cache.serve_floor_seconds == 960
    assert settings.sts.timeout_seconds == 90
    assert settings.cache.idle_evict_seconds == 7200


# --- validation: one line per problem, naming where the value came from ---


BAD_VALUES = [
    pytest.param(["--listen", "foo"], {}, (), "--listen", "foo", id="listen-not-host-port"),
    pytest.param(["--listen", "127.0.0.1:65536"], {}, (), "--listen", "65536", id="listen-port-too-high"),
    pytest.param(["--listen", "127.0.0.1:80", "--listen", "bar"], {}, (), "--listen", "bar", id="second-listen-bad"),
    pytest.param(["--metrics-listen", "[fd00:ec2::23::1]:80"], {}, (), "--metrics-listen", "fd00", id="bad-ipv6"),
    pytest.param(["--metrics-listen", "0.0.0.0:99999"], {}, (), "--metrics-listen", "99999", id="metrics-port-too-high"),
    pytest.param(["--session-duration", "1y"], {}, (), "--session-duration", "1y", id="bad-duration-unit"),
    pytest.param(["--serve-floor", "soon"], {}, (), "--serve-floor", "soon", id="bad-duration"),
    pytest.param(["--sts-timeout", "-1"], {}, (), "--sts-timeout", "-1", id="negative-duration"),
    pytest.param(["--sts-timeout", "0"], {}, (), "--sts-timeout", "0", id="zero-timeout"),
    pytest.param(["--idle-evict", "0s"], {}, (), "--idle-evict", "0", id="zero-idle-evict"),
    pytest.param(["--refresh-jitter", "0.5"], {}, (), "--refresh-jitter", "0.5", id="jitter-0.5"),
    pytest.param(["--refresh-jitter", "0.9"], {}, (), "--refresh-jitter", "0.9", id="jitter-0.9"),
    pytest.param(["--refresh-jitter=-0.1"], {}, (), "--refresh-jitter", "-0.1", id="jitter-negative"),
    pytest.param(["--refresh-jitter", "lots"], {}, (), "--refresh-jitter", "lots", id="jitter-not-a-number"),
    pytest.param(
        ["--session-duration", "100"], {}, (), "--session-duration", "100",
        id="session-too-short",
    ),
    pytest.param(["--session-duration", "50000"], {}, (), "--session-duration", "50000", id="session-too-long"),
    pytest.param(["--serve-floor", "1440"], {}, (), "--serve-floor", "1440", id="floor-at-latest-refresh"),
    pytest.param(["--session-duration", "900", "--serve-floor", "16m"], {}, (), "--serve-floor", "960",
                 id="floor-above-short-session"),
    pytest.param(["--refresh-jitter", "0.3", "--serve-floor", "720"], {}, (), "--serve-floor", "720",
                 id="floor-vs-jitter"),
    pytest.param(["--serve-floor", "60"], {}, (), "--serve-floor", "60", id="floor-at-stale-cutoff"),
    pytest.param(["--max-entries", "0"], {}, (), "--max-entries", "0", id="max-entries-zero"),
    pytest.param(["--max-entries", "1.5"], {}, (), "--max-entries", "1.5", id="max-entries-fraction"),
    pytest.param(["--sts-endpoint-url", "ftp://sts.test"], {}, (), "--sts-endpoint-url", "ftp", id="endpoint-not-http"),
    pytest.param(["--log-level", "loud"], {}, (), "--log-level", "loud", id="log-level"),
    pytest.param(["--directory", "ldap"], {}, (), "--directory", "ldap", id="directory-unknown"),
    pytest.param(["--directory", "kubernetes"], {}, ("--static-config",), "--node-name", "NODE_NAME",
                 id="kubernetes-needs-node-name"),
    pytest.param(["--directory", "kubernetes", "--node-name", "n", "--kubeconfig", "/nonexistent/kubeconfig"], {},
                 ("--static-config",), "--kubeconfig", "/nonexistent/kubeconfig", id="kubeconfig-missing"),
    pytest.param([], {}, ("--region",), "--region", "AWS_REGION", id="missing-region"),
    pytest.param(["--region", "x"], {}, ("--region",), "--region", "'x'", id="bad-region"),
    pytest.param(["--region", "EU-WEST-1"], {}, ("--region",), "--region", "EU-WEST-1", id="region-upper-case"),
    pytest.param(["--region", "eu-west"], {}, ("--region",), "--region", "eu-west", id="region-no-number"),
    pytest.param([], {}, ("--static-config",), "--static-config", "required", id="missing-static-config"),
    pytest.param(["--static-config", "/nonexistent/irsa-cache.yaml"], {}, ("--static-config",), "--static-config",
                 "/nonexistent/irsa-cache.yaml", id="static-config-missing-file"),
    pytest.param(["--static-config", "/"], {}, ("--static-config",), "--static-config", "/", id="static-config-a-folder"),
    # From the environment: the line names the variable the operator set.
    pytest.param([], {"IRSA_CACHE_LISTEN": "foo"}, (), "IRSA_CACHE_LISTEN", "foo", id="env-listen"),
    pytest.param([], {"IRSA_CACHE_LISTEN": "127.0.0.1:80,127.0.0.1:70000"}, (), "IRSA_CACHE_LISTEN", "70000",
                 id="env-listen-second-item"),
    pytest.param([], {"IRSA_CACHE_METRICS_LISTEN": "nowhere"}, (), "IRSA_CACHE_METRICS_LISTEN", "nowhere",
                 id="env-metrics-listen"),
    pytest.param([], {"IRSA_CACHE_SESSION_DURATION": "an hour"}, (), "IRSA_CACHE_SESSION_DURATION", "an hour",
                 id="env-bad-duration"),
    pytest.param([], {"IRSA_CACHE_REFRESH_JITTER": "0.7"}, (), "IRSA_CACHE_REFRESH_JITTER", "0.7", id="env-jitter"),
    pytest.param([], {"IRSA_CACHE_MAX_ENTRIES": "many"}, (), "IRSA_CACHE_MAX_ENTRIES", "many", id="env-max-entries"),
    pytest.param([], {"IRSA_CACHE_DIRECTORY": "ldap"}, (), "IRSA_CACHE_DIRECTORY", "ldap", id="env-directory"),
    pytest.param([], {"IRSA_CACHE_SESSION_DURATION": "50000"}, (), "IRSA_CACHE_SESSION_DURATION", "50000", id="env-session-out-of-range"),
    pytest.param([], {"IRSA_CACHE_SERVE_FLOOR": "1h"}, (), "IRSA_CACHE_SERVE_FLOOR", "3600", id="env-serve-floor-too-high"),
    pytest.param([], {"IRSA_CACHE_STATIC_CONFIG": "/nonexistent/irsa-cache.yaml"}, ("--static-config",),
                 "IRSA_CACHE_STATIC_CONFIG", "/nonexistent", id="env-static-config-missing"),
    pytest.param([], {"AWS_REGION": "x"}, ("--region",), "AWS_REGION", "'x'", id="env-aws-region-bad"),
]


@pytest.mark.parametrize(("argv", "environ", "omit", "name", "mentions"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_its_source(
    static_file: Path, argv: list[str], environ: dict[str, str], omit: tuple[str, ...], name: str, mentions: str
) -> None:
    problems = problems_of(static_file, *argv, environ=environ, omit=omit)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: "), problems
    assert mentions in problems[0]
    assert "\n" not in problems[0]


def test_several_bad_values_give_several_lines(static_file: Path) -> None:
    problems = problems_of(
        static_file,
        "--listen", "foo", "--metrics-listen", "127.0.0.1:70000", "--session-duration", "1y",
        "--refresh-jitter", "0.5", "--region", "x", "--max-entries", "0",
        environ={"IRSA_CACHE_LOG_LEVEL": "loud"},
        omit=["--region", "--static-config"],
    )

    names = [problem.split(": ", 1)[0] for problem in problems]
    assert sorted(names) == sorted([
        "--listen", "--metrics-listen", "--session-duration", "--refresh-jitter", "--region", "--max-entries",
        "IRSA_CACHE_LOG_LEVEL", "--static-config",
    ])
    assert all("\n" not in problem for problem in problems)


def test_a_value_that_failed_to_parse_feeds_no_cross_field_rule(static_file: Path) -> None:
    # A bad jitter must not also produce a serve-floor complaint computed from nothing.
    problems = problems_of(static_file, "--refresh-jitter", "0.5", "--serve-floor", "1h")

    assert [problem.split(":", 1)[0] for problem in problems] == ["--refresh-jitter"]


# --- the command ---


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IRSA_CACHE_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )


def test_cli_reports_every_problem_on_its_own_line_and_exits_2() -> None:
    result = _run("serve", "--listen", "foo", "--region", "x")

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines, "no error output"
    assert all(line.startswith("irsa-cache: error: ") for line in lines), lines
    assert len(lines) == 3, lines
    assert any(line.startswith("irsa-cache: error: --listen: ") and "'foo'" in line for line in lines)
    assert any(line.startswith("irsa-cache: error: --region: ") and "'x'" in line for line in lines)
    assert any(line.startswith("irsa-cache: error: --static-config: ") for line in lines)
    assert result.stdout == ""


def test_cli_version() -> None:
    result = _run("--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"irsa-cache {__version__}"
