"""Every setting of the daemon, its default and its unit, in one place.

Each flag of `irsa-cache serve` can also come from the environment as
`IRSA_CACHE_<FLAG_IN_UPPER_SNAKE>` (a flag on the command line wins). Values are
validated when the settings are built, cross-field rules included, and every
problem is reported on a line of its own. Only this module reads argv and the
environment; components take keyword-only arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

ENV_PREFIX = "IRSA_CACHE_"


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """What one listener allows (see listeners.py); every number is per listener."""

    max_connections: int
    head_seconds: float  # to send a whole request head
    idle_seconds: float  # keep-alive, between requests
    max_head_bytes: int  # request line and headers together
    max_headers: int
    max_field_bytes: int  # one header line
    max_line_bytes: int  # the request line


@dataclass(frozen=True, kw_only=True)
class ApiTimeouts:
    """Deadlines of the calls to the Kubernetes API server, in seconds."""

    list_seconds: float = 60.0  # a whole list, body included (all ServiceAccounts of a large cluster)
    request_seconds: float = 10.0  # a read, a TokenReview, the discovery document and key set
    connect_seconds: float = 10.0  # establishing a connection, for any call
    watch_seconds: int = 300  # the server ends each watch after this; we resume at once
    # A real API server sends a bookmark about every minute: a watch quiet for longer is
    # presumed dead (a black-holed connection, a hung server) and replaced by a list.
    watch_silence_seconds: float = 90.0
    backoff_max_seconds: float = 30.0  # between relists while the server fails

# Policy that operators do not tune: the SDK contract and STS's limits.
STALE_CUTOFF_SECONDS = 60.0  # stop serving stale credentials this close to expiry
TOKEN_LEEWAY_SECONDS = 60.0  # clock skew allowed on exp/nbf
MAX_TOKEN_CHARS = 20_000  # STS rejects longer WebIdentityTokens
STS_MIN_SESSION_SECONDS = 900
STS_MAX_SESSION_SECONDS = 43_200
JWKS_REFETCH_MIN_INTERVAL_SECONDS = 30.0  # unknown `kid`s cannot hammer the key source
VERIFIED_TOKENS_MAX = 50_000  # verification results kept, by token digest
MAINTENANCE_INTERVAL_SECONDS = 1.0  # how often the cache looks for due refreshes
STS_MIN_RATE_PER_SECOND = 0.5  # throttling never cuts the budget below this
STS_MAX_ATTEMPTS = 5  # per exchange, for passing failures
STS_EXCHANGE_DEADLINE_SECONDS = 30.0  # an exchange gives up after this, retries included
REFUSAL_SECONDS = 30.0  # a permanent STS refusal is answered from memory this long
INVALID_TOKEN_REFUSAL_SECONDS = 5.0  # InvalidIdentityToken: may be STS failing to fetch the keys
ABSENT_POD_SECONDS = 30.0  # a pod found absent from this node is remembered this long
DIRECTORY_SYNC_WAIT_SECONDS = 10.0  # at start, serving waits this long at most for the directory to sync
# Upgrades: a successor waits at most HANDOFF_SECONDS for its predecessor's sockets and
# cache, then starts cold; the predecessor waits CONFIRM_SECONDS for "done" (sent once the
# successor serves: after its directory's sync, plus its setup); an address a predecessor
# that does not hand over still holds is retried for BIND_WAIT_SECONDS.
HANDOFF_SECONDS = 5.0
CONFIRM_SECONDS = DIRECTORY_SYNC_WAIT_SECONDS + 2 * HANDOFF_SECONDS
BIND_WAIT_SECONDS = 30.0
STATUS_INTERVAL_SECONDS = 1.0  # how often the --status-dir files follow readiness
TOKEN_REVIEWS_AT_ONCE = 16  # TokenReviews under way at most; more are told to retry (503)
DRAIN_SECONDS = 20.0  # SIGTERM: in-flight requests finish within this (the pod's grace is 30 s)
FD_RESERVE = 128  # file descriptors kept for everything but client connections

# What one connection may cost. A projected token is one to a few KB; the head limit
# keeps a token just over STS's 20,000 characters reachable, for its clear refusal.
CREDENTIALS_LIMITS = ConnectionLimits(
    max_connections=1024,  # the default of --max-connections
    head_seconds=5.0,
    idle_seconds=5.0,
    max_head_bytes=32 * 1024,
    max_headers=32,
    max_field_bytes=24 * 1024,
    max_line_bytes=8 * 1024,
)
# Kubelet probes and Prometheus scrapes: small requests, few at a time.
METRICS_LIMITS = ConnectionLimits(
    max_connections=64,
    head_seconds=5.0,
    idle_seconds=5.0,
    max_head_bytes=8 * 1024,
    max_headers=32,
    max_field_bytes=4 * 1024,
    max_line_bytes=4 * 1024,
)
KUBERNETES_TIMEOUTS = ApiTimeouts()
DAEMONSET_READ_INTERVAL_SECONDS = 30.0  # --sts-cluster-rate: how often the node count is read


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    listen: tuple[Address, ...]
    metrics_listen: Address
    credentials_limits: ConnectionLimits = CREDENTIALS_LIMITS
    metrics_limits: ConnectionLimits = METRICS_LIMITS
    drain_seconds: float = DRAIN_SECONDS
    handoff_socket: Path | None = None
    status_dir: Path | None = None


@dataclass(frozen=True, kw_only=True)
class DirectorySettings:
    kind: str  # "static" or "kubernetes"
    static_config: Path | None
    kubeconfig: Path | None = None
    node_name: str | None = None
    annotation_prefix: str = "eks.amazonaws.com"
    issuer: str | None = None
    audience: str = "sts.amazonaws.com"
    token_review: bool = False
    pod_wait_seconds: float = 0.5  # a pod too new for the informer: wait this, then read it once
    absent_pod_seconds: float = ABSENT_POD_SECONDS
    timeouts: ApiTimeouts = KUBERNETES_TIMEOUTS


@dataclass(frozen=True, kw_only=True)
class StsSettings:
    region: str
    endpoint_url: str
    session_duration_seconds: int
    timeout_seconds: float  # per attempt
    rate_per_second: float
    burst: int
    concurrency: int
    max_queued: int
    # The budget shared by every node (--sts-cluster-rate): None keeps the per-node one.
    cluster: ClusterBudgetSettings | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterBudgetSettings:
    rate_per_second: float  # for the whole cluster
    burst: int
    daemonset_namespace: str  # the node count is this DaemonSet's status.desiredNumberScheduled
    daemonset_name: str


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    serve_floor_seconds: float
    refresh_jitter: float  # fraction of the lifetime, +/-
    idle_evict_seconds: float
    max_entries: int
    request_hold_seconds: float
    refresh_wait_seconds: float
    stale_cutoff_seconds: float = STALE_CUTOFF_SECONDS
    refusal_seconds: float = REFUSAL_SECONDS
    invalid_token_refusal_seconds: float = INVALID_TOKEN_REFUSAL_SECONDS


@dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerSettings
    directory: DirectorySettings
    sts: StsSettings
    cache: CacheSettings
    log_level: str = "info"


# --- value parsers: each raises ValueError with a message fit for the user ---


def parse_address(text: str) -> Address:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not match:
        # An IPv6 address without brackets, as the downward API's status.hostIP gives it
        # (`$(HOST_IP):9464`): the last colon is the port's.
        host, _, port = text.strip().rpartition(":")
        try:
            if port.isdigit() and ipaddress.ip_address(host).version == 6:
                return parse_address(f"[{host}]:{port}")
        except ValueError:
            pass
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [addr]:port)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    if match.group(1):
        ipaddress.IPv6Address(host)  # raises ValueError naming the address
    return Address(host, port)


def parse_addresses(text: str) -> tuple[Address, ...]:
    return tuple(parse_address(part) for part in text.split(",") if part.strip())


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (seconds, or with s/m/h: 90s, 16m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise ValueError(f"{text!r} must be a positive whole number")
    return int(text)


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{text!r} must be above 0")
    return value


def parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 <= value < 0.5:
        raise ValueError(f"{text!r} must be at least 0 and below 0.5")
    return value


def parse_bool(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def parse_url(text: str) -> str:
    if not re.match(r"https?://[^/\s]+", text):
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text.rstrip("/")


@dataclass(frozen=True)
class Option:
    """One flag of `serve`: its parser, its default (as the user would type it), its help."""

    flag: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    repeatable: bool = False
    metavar: str | None = None
    flag_only: bool = False  # a switch: present means "true"

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


SERVE_OPTIONS: tuple[Option, ...] = (
    Option("--listen", parse_address, "169.254.170.23:80", "credentials endpoint address; repeatable", repeatable=True, metavar="HOST:PORT"),
    Option("--metrics-listen", parse_address, "0.0.0.0:9464", "metrics, /healthz and /readyz", metavar="HOST:PORT"),
    Option("--handoff-socket", Path, "/run/irsa-cache/handoff.sock", "where a successor takes over this daemon's sockets and cache (an upgrade); '' for none; off when its directory is missing", metavar="PATH"),
    Option("--status-dir", Path, None, "keep the files `started` and `ready` here, for exec probes (the DaemonSet's)", metavar="DIR"),
    Option("--directory", parse_choice("static", "kubernetes"), "static", "where roles and signing keys come from"),
    Option("--static-config", Path, None, "YAML file of issuer, key set and subject-to-role rules (--directory static)", metavar="FILE"),
    Option("--kubeconfig", Path, None, "kubeconfig for --directory kubernetes (default: in-cluster service account)", metavar="FILE"),
    Option("--node-name", str, None, "this node, to watch only its pods (default: NODE_NAME, set from spec.nodeName)"),
    Option("--annotation-prefix", str, "eks.amazonaws.com", "ServiceAccount annotation prefix; the role is <prefix>/role-arn", metavar="PREFIX"),
    Option("--issuer", str, None, "service-account token issuer (default: from the API server's discovery document)", metavar="URL"),
    Option("--audience", str, "sts.amazonaws.com", "audience the pods' projected tokens must carry (--directory kubernetes)"),
    Option("--token-review", parse_bool, "false", "verify tokens with the API server's TokenReview instead of its key set", flag_only=True),
    Option("--region", str, None, "AWS region of the STS endpoint (default: AWS_REGION, then AWS_DEFAULT_REGION)"),
    Option("--sts-endpoint-url", parse_url, None, "STS endpoint (default: https://sts.<region>.amazonaws.com)", metavar="URL"),
    Option("--session-duration", parse_duration, "3600", "DurationSeconds asked of STS (900..43200 s)", metavar="SECONDS"),
    Option("--sts-timeout", parse_duration, "10", "how long one STS attempt may wait for STS's answer (connecting: at most 3 s)", metavar="SECONDS"),
    Option("--serve-floor", parse_duration, "960", "never serve credentials with less left while a refresh is possible", metavar="SECONDS"),
    Option("--refresh-jitter", parse_fraction, "0.1", "refresh at half the lifetime +/- this fraction of it", metavar="FRACTION"),
    Option("--request-hold", parse_duration, "30", "a caller with nothing cached waits at most this for its STS exchange (which runs on), then gets 503 + Retry-After", metavar="SECONDS"),
    Option("--refresh-wait", parse_duration, "0.2", "a caller whose credentials are under the serve floor but valid waits at most this for the refresh, then gets them", metavar="SECONDS"),
    Option("--sts-rate", parse_positive_float, "10", "STS calls per second from this node, retries included", metavar="PER_SECOND"),
    Option("--sts-burst", parse_positive_int, "20", "STS calls allowed at once above the rate", metavar="N"),
    Option("--sts-concurrency", parse_positive_int, "8", "STS calls in flight at once", metavar="N"),
    Option("--sts-queue", parse_positive_int, "500", "exchanges that may wait for the budget; past it, 503 at once", metavar="N"),
    Option("--sts-cluster-rate", parse_positive_float, None, "STS calls per second for the whole cluster, shared by every node: each has its share (this / nodes, from the DaemonSet's status) and borrows unused quota while STS does not throttle; replaces --sts-rate", metavar="PER_SECOND"),
    Option("--sts-cluster-burst", parse_positive_int, None, "STS calls at once for the whole cluster (default: one second of --sts-cluster-rate)", metavar="N"),
    Option("--idle-evict", parse_duration, "3600", "drop entries not requested for this long", metavar="SECONDS"),
    Option("--max-entries", parse_positive_int, "20000", "bound on cached identities; the least recently used goes first", metavar="N"),
    Option("--max-connections", parse_positive_int, str(CREDENTIALS_LIMITS.max_connections), "connections open at once on the credentials addresses; past it the oldest idle one is closed", metavar="N"),
    Option("--log-level", parse_choice("debug", "info", "warning", "error"), "info", "log level"),
)


def serve_default(flag: str) -> Any:
    """The parsed default of one `serve` flag (None if it has none)."""
    option = next(option for option in SERVE_OPTIONS if option.flag == flag)
    return None if option.default is None else option.parse(option.default)


def cluster_burst_default(rate_per_second: float) -> int:
    """--sts-cluster-burst when not given: one second of the cluster's rate."""
    return max(1, math.ceil(rate_per_second))


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SERVE_OPTIONS)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Each option as a flag whose help names its default and its environment variable."""
    for option in options:
        default = f" (default: {option.default})" if option.default is not None else ""
        help_text = f"{option.help}{default}; env {option.env}"
        if option.flag_only:
            parser.add_argument(option.flag, dest=option.dest, action="store_const", const="true", default=None,
                                help=help_text)
            continue
        parser.add_argument(
            option.flag,
            dest=option.dest,
            action="append" if option.repeatable else "store",
            default=None,
            metavar=option.metavar,
            help=help_text,
        )


@dataclass
class _Read:
    values: dict[str, Any]  # by dest; None when absent or unparsable
    sources: dict[str, str]  # where each value came from (flag or variable), to name it in a problem
    given: set[str]  # set on the command line or in the environment, not defaulted
    problems: list[str]


def _read(options: Sequence[Option], args: argparse.Namespace, environ: Mapping[str, str]) -> _Read:
    """Flags, then `IRSA_CACHE_*` variables, then defaults; parsed, one problem per bad value."""
    read = _Read(values={}, sources={}, given=set(), problems=[])
    for option in options:
        raw: str | Sequence[str] | None = getattr(args, option.dest, None)
        source = option.flag
        if raw is None and option.env in environ:
            raw, source = environ[option.env], option.env
            if option.repeatable:
                raw = [part for part in raw.split(",") if part.strip()]
        if raw is not None:
            read.given.add(option.dest)
        read.sources[option.dest] = source
        if raw is None:
            raw = option.default
            if option.repeatable and raw is not None:
                raw = [raw]
        read.values[option.dest] = None
        if raw is None:
            continue
        try:
            if option.repeatable:
                read.values[option.dest] = tuple(option.parse(item) for item in raw)
            else:
                read.values[option.dest] = option.parse(raw)  # type: ignore[arg-type]
        except ValueError as exc:
            read.problems.append(f"{source}: {exc}")
    return read


def read_options(
    options: Sequence[Option], args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Flags, then `IRSA_CACHE_*` variables, then defaults; parsed. Raises ConfigError
    with one line per bad value, each naming where the value came from."""
    read = _read(options, args, os.environ if environ is None else environ)
    if read.problems:
        raise ConfigError(read.problems)
    return read.values


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Build validated Settings from parsed flags, then the environment, then defaults."""
    environ = os.environ if environ is None else environ
    read = _read(SERVE_OPTIONS, args, environ)
    values, sources, given, problems = read.values, read.sources, read.given, read.problems
    for dest in given & set(_MODE_ONLY):
        mode = _MODE_ONLY[dest]
        if values["directory"] is not None and values["directory"] != mode:
            problems.append(f"{sources[dest]}: only used with --directory {mode}" + (
                " (the static config file has its own issuer: and audience:)" if mode == "kubernetes" else ""))
    return _build(values, sources, environ, problems)


# Options that one directory reads and the other would silently ignore.
_MODE_ONLY = {
    "static_config": "static",
    "kubeconfig": "kubernetes", "node_name": "kubernetes", "annotation_prefix": "kubernetes",
    "issuer": "kubernetes", "audience": "kubernetes", "token_review": "kubernetes",
}


def _build(v: dict[str, Any], src: dict[str, str], environ: Mapping[str, str], problems: list[str]) -> Settings:
    """Cross-field rules; values that failed to parse are None and skip the rules they feed."""

    for address in v["listen"] or ():
        if address.host in ("0.0.0.0", "::"):
            problems.append(
                f"{src['listen']}: {address} would offer credentials to the whole network; name the link-local "
                "or loopback address pods use"
            )

    region, region_source = v["region"], src["region"]
    for fallback in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if not region and environ.get(fallback):
            region, region_source = environ[fallback], fallback
    if not region:
        problems.append("--region: required (or set AWS_REGION)")
        region = ""
    elif not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
        problems.append(f"{region_source}: {region!r} is not an AWS region name like eu-west-1")
    endpoint = v["sts_endpoint_url"] or _regional_sts_endpoint(region)

    problems += cache_and_sts_rules(v, src)

    if v["status_dir"] is not None and not v["status_dir"].is_dir():
        problems.append(f"{src['status_dir']}: {v['status_dir']} is not a directory")

    if v["directory"] == "static":
        path: Path | None = v["static_config"]
        if path is None:
            problems.append("--static-config: required with --directory static")
        elif not path.is_file():
            problems.append(f"{src['static_config']}: {path} is not a readable file")
    node_name = v["node_name"] or environ.get("NODE_NAME")
    if v["directory"] == "kubernetes":
        if not node_name:
            problems.append("--node-name: required with --directory kubernetes (or set NODE_NAME from spec.nodeName)")
        if v["kubeconfig"] is not None and not v["kubeconfig"].is_file():
            problems.append(f"{src['kubeconfig']}: {v['kubeconfig']} is not a readable file")

    cluster = _cluster_budget(v, src, environ, problems)

    if problems:
        raise ConfigError(problems)
    return Settings(
        server=ServerSettings(
            listen=v["listen"],
            metrics_listen=v["metrics_listen"],
            credentials_limits=dataclasses.replace(CREDENTIALS_LIMITS, max_connections=v["max_connections"]),
            handoff_socket=v["handoff_socket"] if v["handoff_socket"] and str(v["handoff_socket"]) != "." else None,
            status_dir=v["status_dir"],
        ),
        directory=DirectorySettings(
            kind=v["directory"],
            static_config=v["static_config"],
            kubeconfig=v["kubeconfig"],
            node_name=node_name,
            annotation_prefix=v["annotation_prefix"],
            issuer=v["issuer"],
            audience=v["audience"],
            token_review=bool(v["token_review"]),
        ),
        sts=StsSettings(
            region=region,
            endpoint_url=endpoint,
            session_duration_seconds=int(v["session_duration"]),
            timeout_seconds=v["sts_timeout"],
            rate_per_second=v["sts_rate"],
            burst=v["sts_burst"],
            concurrency=v["sts_concurrency"],
            max_queued=v["sts_queue"],
            cluster=cluster,
        ),
        cache=CacheSettings(
            serve_floor_seconds=v["serve_floor"],
            refresh_jitter=v["refresh_jitter"],
            idle_evict_seconds=v["idle_evict"],
            max_entries=v["max_entries"],
            request_hold_seconds=v["request_hold"],
            refresh_wait_seconds=v["refresh_wait"],
        ),
        log_level=v["log_level"],
    )


def cache_and_sts_rules(v: Mapping[str, Any], src: Mapping[str, str]) -> list[str]:
    """The rules between the cache's and STS's settings, by option dest (a value that is
    absent or failed to parse is None and skips the rules it feeds); `src` names each
    setting as the user gave it. `serve` and `simulate` both apply them."""
    problems: list[str] = []
    session, floor, jitter = v.get("session_duration"), v.get("serve_floor"), v.get("refresh_jitter")
    if session is not None and not STS_MIN_SESSION_SECONDS <= session <= STS_MAX_SESSION_SECONDS:
        problems.append(
            f"{src['session_duration']}: {session:g} s is outside STS's "
            f"{STS_MIN_SESSION_SECONDS}..{STS_MAX_SESSION_SECONDS} s"
        )
        session = None  # the floor cannot be judged against a session STS would refuse
    if None not in (session, floor, jitter):
        earliest_refresh_left = session * (0.5 - jitter)
        if floor >= earliest_refresh_left:
            problems.append(
                f"{src['serve_floor']}: {floor:g} s must be below the time left at the latest refresh "
                f"({earliest_refresh_left:g} s = session {session:g} s x (0.5 - jitter {jitter:g})), "
                "or every request would wait for STS"
            )
        if floor <= STALE_CUTOFF_SECONDS:
            problems.append(f"{src['serve_floor']}: {floor:g} s must be above the stale cutoff of {STALE_CUTOFF_SECONDS:g} s")
    for dest in ("sts_timeout", "request_hold", "idle_evict"):
        if v.get(dest) is not None and v[dest] <= 0:
            problems.append(f"{src[dest]}: must be above 0")
    hold, wait = v.get("request_hold"), v.get("refresh_wait")
    if hold is not None and wait is not None and wait > hold:
        problems.append(f"{src['refresh_wait']}: {wait:g} s must not exceed the request hold ({hold:g} s)")
    if v.get("sts_cluster_rate") is None and v.get("sts_cluster_burst") is not None:
        problems.append(f"{src['sts_cluster_burst']}: only with --sts-cluster-rate")
    return problems


def _cluster_budget(v: dict[str, Any], src: dict[str, str], environ: Mapping[str, str],
                    problems: list[str]) -> ClusterBudgetSettings | None:
    """--sts-cluster-rate: the node count comes from the daemon's own DaemonSet, named by the
    manifest in DAEMONSET_NAME and POD_NAMESPACE, read through the Kubernetes API."""
    rate = v["sts_cluster_rate"]
    if rate is None:
        return None
    name, namespace = environ.get("DAEMONSET_NAME"), environ.get("POD_NAMESPACE")
    if v["directory"] != "kubernetes":
        problems.append(f"{src['sts_cluster_rate']}: needs --directory kubernetes (the node count is the "
                        "DaemonSet's, read from the API server)")
    elif not name or not namespace:
        problems.append(f"{src['sts_cluster_rate']}: set DAEMONSET_NAME and POD_NAMESPACE to this daemon's own "
                        "DaemonSet (deploy/base/daemonset.yaml does), whose node count divides the rate")
    burst = v["sts_cluster_burst"] if v["sts_cluster_burst"] is not None else cluster_burst_default(rate)
    return ClusterBudgetSettings(rate_per_second=rate, burst=burst, daemonset_namespace=namespace or "",
                                 daemonset_name=name or "")


def _regional_sts_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://sts.{region}.{suffix}"


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Parse `serve` flags alone: what tests and the manifest check use."""
    parser = argparse.ArgumentParser(prog="irsa-cache serve")
    add_serve_options(parser)
    return settings_from(parser.parse_args(list(argv)), environ)


__all__ = [
    "Address",
    "CacheSettings",
    "ClusterBudgetSettings",
    "DirectorySettings",
    "ServerSettings",
    "Settings",
    "StsSettings",
    "add_serve_options",
    "parse_serve_args",
    "settings_from",
]
