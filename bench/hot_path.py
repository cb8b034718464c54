"""Hot path benchmark: the daemon's cached credentials path next to a bare aiohttp handler.

What it measures, in one run:

1. Throughput (req/s) and p50/p99 latency, with wrk at 32 connections, of
   GET /v1/credentials in the steady state of a node: the token was verified before
   and its identity's credentials are cached, so every request is a cache hit. The
   very same requests go to a bare aiohttp app, in a process of its own, that
   answers the very same JSON body: the floor any aiohttp server reaches here.
   The CPU time each server process spends per request is reported too. A third
   column, "full way", sends the daemon the same request with one more header
   (`TE: trailers`), which its shortcut for cached answers leaves to aiohttp: what a
   cached answer costs through aiohttp's request machinery and the daemon's handler.
2. The daemon's resident memory (VmRSS) at idle and after caching credentials for
   10,000 distinct identities, and the cost per entry; then, in that same daemon, the
   hot path once more (one wrk run, unpaired): a node's cache is rarely one entry.

Why side by side: absolute req/s on a small, shared 2-core machine move with every
neighbour and with wrk itself, which shares the cores. The ratio of two servers
measured in alternation, in one run, on the same cores with the same load generator
moves much less. Runs alternate in ABC CBA order (bare, daemon, full way, then full
way, daemon, bare, ...), so that no server always runs first, and every figure is the
median over rounds; a ratio is the median of the per-round ratios.
Each run also reports the CPU that processes other than the server and wrk used
meanwhile, from /proc/stat: the noise, in cores, next to the figure it disturbed.

The daemon runs as deployed (`python -m daemon serve`, static config, moto as STS,
on the event loop `serve` uses; the bare server is built on that same loop) with
its audit log on, to a file: one JSON line per issuance (the warm-up's), and the
repeats wrk sends counted, as in production. All traffic stays on 127.0.0.1.

    python bench/hot_path.py [--duration 10] [--rounds 5]

Targets are printed as PASS/MISS; the exit status is 0 either way (speed is
measured, not asserted) and non-zero only when the benchmark itself cannot run.
Figures are also written to bench/results/hot_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from daemon import __version__
from daemon.__main__ import new_event_loop
from daemon.demo import metric_total, scrape
from daemon.embedded import (
    DEMO_ACCOUNT, Background, Issuer, MotoSts, cpu_seconds, free_port, machine_busy_seconds, vm_rss_kib,
)
from daemon.server import CREDENTIALS_PATH

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "hot_path.json"
WRK_INSTALL = "apt-get install -y wrk"
ROLE_ARN = f"arn:aws:iam::{DEMO_ACCOUNT}:role/bench"
SUBJECT_GLOB = "system:serviceaccount:*"
WARMUP_SECONDS = 2
FILL_ATTEMPTS = 5
# The node's STS budget (default 10 exchanges/s) protects real STS; moto on loopback
# needs no protection, and 10,000 identities would take 17 minutes to fill at 10/s.
# The budget is not on the hot path: hits never touch it.
STS_BUDGET_FLAGS = ["--sts-rate", "1000", "--sts-burst", "1000"]


TARGET_THROUGHPUT_RATIO = 0.8  # daemon req/s over bare req/s, at least
FULL_WAY_HEADER = {"TE": "trailers"}  # a header the daemon's shortcut leaves to aiohttp
SERVERS = ("bare", "daemon", "full way")
TARGET_P99_MS = 5.0  # daemon p99 at 32 connections, below
TARGET_RSS_MB = 80.0  # daemon RSS with 10,000 identities, below


# --- the bare server: run by this same script, in a process of its own ---


def serve_bare(port: int, body_path: Path) -> None:
    """The least an aiohttp server can do: answer the daemon's very bytes on the same path."""
    body = body_path.read_bytes()

    async def credentials(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get(CREDENTIALS_PATH, credentials)
    # The loop `irsa-cache serve` runs on: the comparison is of the servers, not of the loops.
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=new_event_loop())


# --- processes and what the kernel says about them ---


def children_cpu_seconds() -> float:
    """CPU time of the child processes waited for so far: here, the wrk runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pid_of(background: Background) -> int:
    assert background.process is not None  # set once the context is entered
    return background.process.pid


def loop_name() -> str:
    loop = new_event_loop()
    loop.close()
    return type(loop).__module__.split(".")[0]


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": wrk_version.split(" [")[0],
        "irsa_cache": __version__,
        "loop": loop_name(),
    }


# --- part 1: throughput and latency with wrk ---


@dataclass(frozen=True)
class WrkRun:
    server: str
    round: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int  # connect, read, write errors and timeouts (wrk's is 2 s)
    cpu_us_per_request: float  # the server process's CPU time over the requests answered
    other_load_cores: float  # CPU used by neither the server nor wrk, over the run: the noise


_WRK_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_latency_ms(output: str, percentile: int) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {percentile}% line in wrk's output:\n{output}")
    return float(match.group(1)) * _WRK_UNITS_MS[match.group(2)]


def _wrk_int(output: str, pattern: str) -> int:
    match = re.search(pattern, output, re.MULTILINE)
    return int(match.group(1)) if match else 0


def run_wrk(url: str, headers: dict[str, str], *, duration: int, connections: int, threads: int) -> str:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return result.stdout


def measure_run(
    server: str, round_number: int, pid: int, url: str, headers: dict[str, str], args: argparse.Namespace
) -> WrkRun:
    """One timed wrk run against the server process `pid`, with the CPU it and everything else used."""
    server_before, wrk_before, busy_before = cpu_seconds(pid), children_cpu_seconds(), machine_busy_seconds()
    started = time.perf_counter()
    output = run_wrk(url, headers, duration=args.duration, connections=args.connections, threads=args.threads)
    elapsed = time.perf_counter() - started
    server_used = cpu_seconds(pid) - server_before
    other_used = machine_busy_seconds() - busy_before - server_used - (children_cpu_seconds() - wrk_before)
    requests = _wrk_int(output, r"^\s*(\d+) requests in ")
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if not requests or rate is None:
        raise RuntimeError(f"wrk completed no requests against {url}:\n{output}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkRun(
        server=server,
        round=round_number,
        requests_per_second=float(rate.group(1)),
        p50_ms=_wrk_latency_ms(output, 50),
        p99_ms=_wrk_latency_ms(output, 99),
        requests=requests,
        non_2xx=_wrk_int(output, r"^\s*Non-2xx or 3xx responses: (\d+)"),
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
        cpu_us_per_request=server_used / requests * 1e6,
        other_load_cores=max(other_used, 0.0) / elapsed,
    )


def hit_counts(metrics_url: str) -> tuple[float, float]:
    """(cache hits, credential requests) the daemon has counted so far."""
    samples = scrape(metrics_url)
    return (
        metric_total(samples, "irsa_cache_requests_total", outcome="hit"),
        metric_total(samples, "irsa_cache_requests_total"),
    )


def fetch(url: str, headers: dict[str, str]) -> tuple[str, bytes]:
    """(Content-Type, body) of a GET that must answer 200."""
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers["Content-Type"], response.read()


@dataclass(frozen=True)
class Throughput:
    runs: list[WrkRun]
    daemon_hit_ratio: float  # over every request of the timed daemon runs


def measure_throughput(
    args: argparse.Namespace, workdir: Path, issuer: Issuer, static_config: Path, sts_url: str
) -> Throughput:
    token = issuer.mint("system:serviceaccount:bench:hot", pod_name="hot-0")
    with contextlib.ExitStack() as stack:
        daemon, listen, metrics_url = start_daemon(stack, workdir, "throughput", static_config, sts_url)
        daemon_url = f"http://{listen}{CREDENTIALS_PATH}"
        daemon_headers = {"Authorization": token, "Host": listen}
        fetch(daemon_url, daemon_headers)  # miss: verifies the token, one STS exchange
        answer = fetch(daemon_url, daemon_headers)  # the cached answer, as every later request gets it
        hits, requests = hit_counts(metrics_url)
        if (hits, requests) != (1, 2):
            raise RuntimeError(f"warming the daemon: expected 1 hit in 2 requests, counted {hits:g} in {requests:g}")

        body_path = workdir / "body.json"
        body_path.write_bytes(answer[1])
        bare_port = free_port()
        bare_listen = f"127.0.0.1:{bare_port}"
        bare_url = f"http://{bare_listen}{CREDENTIALS_PATH}"
        bare = stack.enter_context(Background(
            [sys.executable, __file__, "--bare-server", str(bare_port), "--bare-body", str(body_path)],
            ready_url=bare_url, log_path=workdir / "bare.log",
        ))
        bare_headers = {"Authorization": token, "Host": bare_listen}
        if fetch(bare_url, bare_headers) != answer:
            raise RuntimeError("the bare server's Content-Type or body differs from the daemon's")

        targets = {
            "bare": (pid_of(bare), bare_url, bare_headers),
            "daemon": (pid_of(daemon), daemon_url, daemon_headers),
            "full way": (pid_of(daemon), daemon_url, {**daemon_headers, **FULL_WAY_HEADER}),
        }
        for _, url, headers in targets.values():  # untimed: connections, lazy imports, allocator
            run_wrk(url, headers, duration=WARMUP_SECONDS, connections=args.connections, threads=args.threads)

        hits_before, requests_before = hit_counts(metrics_url)
        runs: list[WrkRun] = []
        for round_number in range(1, args.rounds + 1):
            order = SERVERS if round_number % 2 else SERVERS[::-1]
            for server in order:
                pid, url, headers = targets[server]
                run = measure_run(server, round_number, pid, url, headers, args)
                print(f"  round {round_number}  {server:<8} {run.requests_per_second:>8,.0f} req/s  "
                      f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                      f"CPU {run.cpu_us_per_request:4.0f} us/req  other load {run.other_load_cores:.2f} cores  "
                      f"socket errors {run.socket_errors}", flush=True)
                if run.non_2xx:
                    raise RuntimeError(f"{run.non_2xx} of {run.requests} answers from {server} were not 2xx")
                runs.append(run)
        hits_after, requests_after = hit_counts(metrics_url)
    served = requests_after - requests_before
    return Throughput(runs=runs, daemon_hit_ratio=(hits_after - hits_before) / served if served else 0.0)


# --- part 2: many identities: memory, and the hot path once they are cached ---


@dataclass(frozen=True)
class ManyIdentities:
    identities: int
    warm_identities: int  # cached first, so that one-time costs of the first exchanges stay out of the slope
    rss_idle_kib: int  # started, no request served yet
    rss_warm_kib: int
    rss_filled_kib: int
    cache_entries: float
    sts_exchanges: float
    fill_seconds: float
    fill_retries: int  # 503s retried while filling
    hot_path: WrkRun  # one identity's hits again, now among all the others

    @property
    def per_entry_bytes(self) -> float:
        """What one more cached identity costs: the slope from the warm point to the full cache."""
        return (self.rss_filled_kib - self.rss_warm_kib) * 1024 / (self.identities - self.warm_identities)


async def fill_cache(url: str, host: str, tokens: list[str], concurrency: int) -> tuple[list[str], int]:
    """Fetch credentials once per token, `concurrency` at a time; returns the failures and the retries.

    A 503 (the exchange waits for the node's STS budget) is retried after its
    Retry-After, as the SDKs do, at most FILL_ATTEMPTS times per token.
    """
    failures: list[str] = []
    retries = 0
    pending = iter(tokens)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal retries
        for token in pending:  # shared: each token goes to exactly one worker
            for _ in range(FILL_ATTEMPTS):
                async with session.get(url, headers={"Authorization": token, "Host": host}) as response:
                    status, body = response.status, await response.text()
                    retry_after = response.headers.get("Retry-After", "1")
                if status != 503:
                    break
                retries += 1
                await asyncio.sleep(float(retry_after))
            if status != 200:
                failures.append(f"{status}: {body}")

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failures, retries


def measure_many_identities(
    args: argparse.Namespace, workdir: Path, issuer: Issuer, static_config: Path, sts_url: str
) -> ManyIdentities:
    warm = args.identities // 100
    started = time.perf_counter()
    tokens = [
        issuer.mint(f"system:serviceaccount:ns-{n:05d}:app", pod_name=f"app-{n:05d}")
        for n in range(args.identities)
    ]
    print(f"  minted {len(tokens):,} tokens, distinct subjects, in {time.perf_counter() - started:.1f} s", flush=True)
    with contextlib.ExitStack() as stack:
        daemon, listen, metrics_url = start_daemon(stack, workdir, "many", static_config, sts_url)
        url = f"http://{listen}{CREDENTIALS_PATH}"
        time.sleep(1.0)  # let start-up settle: the figure is the idle daemon, not its start
        rss: list[int] = [vm_rss_kib(pid_of(daemon))]
        started = time.perf_counter()
        retries = 0
        for batch in (tokens[:warm], tokens[warm:]):
            failures, batch_retries = asyncio.run(fill_cache(url, listen, batch, args.fill_concurrency))
            if failures:
                raise RuntimeError(f"{len(failures)} of {len(batch)} identities got no credentials: {failures[0]}")
            retries += batch_retries
            rss.append(vm_rss_kib(pid_of(daemon)))
        fill_seconds = time.perf_counter() - started
        samples = scrape(metrics_url)

        headers = {"Authorization": tokens[0], "Host": listen}
        run_wrk(url, headers, duration=WARMUP_SECONDS, connections=args.connections, threads=args.threads)
        hot_path = measure_run("daemon", 0, pid_of(daemon), url, headers, args)
        print(f"  hot path with {len(tokens):,} identities cached: {hot_path.requests_per_second:,.0f} req/s  "
              f"p50 {hot_path.p50_ms:.2f} ms  p99 {hot_path.p99_ms:.2f} ms  "
              f"other load {hot_path.other_load_cores:.2f} cores", flush=True)
        if hot_path.non_2xx:
            raise RuntimeError(f"{hot_path.non_2xx} of {hot_path.requests} answers were not 2xx")
    return ManyIdentities(
        identities=len(tokens),
        warm_identities=warm,
        rss_idle_kib=rss[0],
        rss_warm_kib=rss[1],
        rss_filled_kib=rss[2],
        cache_entries=metric_total(samples, "irsa_cache_cache_entries"),
        sts_exchanges=metric_total(samples, "irsa_cache_sts_calls_total", result="success"),
        fill_seconds=fill_seconds,
        fill_retries=retries,
        hot_path=hot_path,
    )


# --- the daemon, as deployed ---


def start_daemon(
    stack: contextlib.ExitStack, workdir: Path, name: str, static_config: Path, sts_url: str
) -> tuple[Background, str, str]:
    """`python -m daemon serve` on free loopback ports, stderr (audit log included) to a file.

    Returns the process, its credentials address and its metrics URL.
    """
    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    daemon = stack.enter_context(Background(
        [sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
         "--static-config", str(static_config), "--region", "us-east-1", "--sts-endpoint-url", sts_url,
         *STS_BUDGET_FLAGS],
        ready_url=f"http://{metrics_listen}/readyz", log_path=workdir / f"daemon-{name}.log",
    ))
    return daemon, listen, f"http://{metrics_listen}/metrics"


# --- the report ---


def _median(runs: list[WrkRun], server: str, attribute: str) -> float:
    return statistics.median(float(getattr(run, attribute)) for run in runs if run.server == server)


def summarize(throughput: Throughput, many: ManyIdentities) -> dict[str, Any]:
    runs = throughput.runs
    by_round: dict[int, dict[str, WrkRun]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.server] = run
    ratios = [pair["daemon"].requests_per_second / pair["bare"].requests_per_second for pair in by_round.values()]
    full_way_ratios = [pair["full way"].requests_per_second / pair["bare"].requests_per_second
                       for pair in by_round.values()]
    figures: dict[str, Any] = {
        f"{server.replace(' ', '_')}_{attribute}": _median(runs, server, attribute)
        for server in SERVERS
        for attribute in ("requests_per_second", "p50_ms", "p99_ms", "cpu_us_per_request")
    }
    figures.update(
        throughput_ratio=statistics.median(ratios),
        throughput_ratio_per_round=ratios,
        full_way_throughput_ratio=statistics.median(full_way_ratios),
        daemon_hit_ratio=throughput.daemon_hit_ratio,
        socket_errors=sum(run.socket_errors for run in runs),
        max_other_load_cores=max(run.other_load_cores for run in runs),
        identities=many.identities,
        rss_idle_mb=many.rss_idle_kib * 1024 / 1e6,
        warm_identities=many.warm_identities,
        rss_warm_mb=many.rss_warm_kib * 1024 / 1e6,
        rss_filled_mb=many.rss_filled_kib * 1024 / 1e6,
        rss_per_entry_bytes=many.per_entry_bytes,
        cache_entries=many.cache_entries,
        sts_exchanges=many.sts_exchanges,
        fill_seconds=many.fill_seconds,
        fill_retries=many.fill_retries,
        many_requests_per_second=many.hot_path.requests_per_second,
        many_p50_ms=many.hot_path.p50_ms,
        many_p99_ms=many.hot_path.p99_ms,
        many_other_load_cores=many.hot_path.other_load_cores,
    )
    return figures


def targets(figures: dict[str, Any]) -> dict[str, bool]:
    return {
        "throughput": figures["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO,
        "p99": figures["daemon_p99_ms"] < TARGET_P99_MS,
        "p99_many": figures["many_p99_ms"] < TARGET_P99_MS,
        "rss": figures["rss_filled_mb"] < TARGET_RSS_MB,
    }


def report_table(figures: dict[str, Any], met: dict[str, bool], args: argparse.Namespace) -> str:
    def verdict(name: str, detail: str = "") -> str:
        return ("PASS" if met[name] else "MISS") + (f" ({detail})" if detail else "")

    f = figures
    rows = [
        ("", "daemon", "full way", "bare", "target", "result"),
        ("throughput, req/s", f"{f['daemon_requests_per_second']:,.0f}", f"{f['full_way_requests_per_second']:,.0f}",
         f"{f['bare_requests_per_second']:,.0f}", f">= {TARGET_THROUGHPUT_RATIO:.1f}x bare",
         verdict("throughput", f"{f['throughput_ratio']:.2f}x; full way {f['full_way_throughput_ratio']:.2f}x")),
        ("latency p50, ms", f"{f['daemon_p50_ms']:.2f}", f"{f['full_way_p50_ms']:.2f}", f"{f['bare_p50_ms']:.2f}", "",
         ""),
        (f"latency p99, ms ({args.connections} conns)", f"{f['daemon_p99_ms']:.2f}", f"{f['full_way_p99_ms']:.2f}",
         f"{f['bare_p99_ms']:.2f}", f"< {TARGET_P99_MS:g} ms", verdict("p99")),
        ("server CPU per request, us", f"{f['daemon_cpu_us_per_request']:.0f}",
         f"{f['full_way_cpu_us_per_request']:.0f}", f"{f['bare_cpu_us_per_request']:.0f}", "", ""),
        (f"with {f['identities']:,} identities cached:", "", "", "", "", ""),
        ("  throughput, req/s", f"{f['many_requests_per_second']:,.0f}", "", "", "", ""),
        ("  latency p99, ms", f"{f['many_p99_ms']:.2f}", "", "", f"< {TARGET_P99_MS:g} ms", verdict("p99_many")),
        ("RSS idle, MB", f"{f['rss_idle_mb']:.1f}", "", "", "", ""),
        (f"RSS with {f['warm_identities']:,} identities, MB", f"{f['rss_warm_mb']:.1f}", "", "", "", ""),
        (f"RSS with {f['identities']:,} identities, MB", f"{f['rss_filled_mb']:.1f}", "", "",
         f"< {TARGET_RSS_MB:g} MB", verdict("rss")),
        ("RSS per further identity, KB", f"{f['rss_per_entry_bytes'] / 1000:.1f}", "", "", "", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    align = ["<", ">", ">", ">", "<", "<"]
    return "\n".join(
        "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths, strict=True)).rstrip() for row in rows
    )


def print_report(figures: dict[str, Any], met: dict[str, bool], host: dict[str, Any], args: argparse.Namespace) -> None:
    f = figures
    ratios = ", ".join(f"{ratio:.2f}" for ratio in f["throughput_ratio_per_round"])
    mean_latency_ms = args.connections / f["daemon_requests_per_second"] * 1000
    print(f"""
Hot path: irsa-cache {host['irsa_cache']} on {host['nproc']} CPUs ({host['cpu_model']}), Python {host['python']}, \
aiohttp {host['aiohttp']}, {host['wrk']}
  load: wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, GET {CREDENTIALS_PATH}, raw token in \
Authorization, listen address in Host; server and wrk share the cores, nothing pinned
  order: {args.rounds} rounds of bare, daemon and full way, in ABC CBA order; each figure is the median over rounds, the ratio the \
median of the per-round daemon/bare ratios ({ratios}); CPU used by other processes during the runs: up to \
{f['max_other_load_cores']:.2f} cores
  daemon: as deployed, static config (one glob rule), moto as STS, audit log ON (one JSON line per issuance, to a \
file); {f['daemon_hit_ratio']:.2%} of the timed requests were cache hits; wrk socket errors: {f['socket_errors']}
  full way: the daemon, the same request with the header {', '.join(f'{k}: {v}' for k, v in FULL_WAY_HEADER.items())}, which the shortcut for cached answers leaves to aiohttp (median ratio to bare {f['full_way_throughput_ratio']:.2f}x)
  loop: both servers on {host['loop']}
  latency: wrk keeps {args.connections} requests in flight, so mean latency ~ {args.connections} / throughput \
({args.connections} / {f['daemon_requests_per_second']:,.0f} req/s = {mean_latency_ms:.1f} ms \
for the daemon): p99 < {TARGET_P99_MS:g} ms needs well over {args.connections / TARGET_P99_MS * 1000:,.0f} req/s
  memory: {f['identities']:,} distinct subjects, each fetched once, {args.fill_concurrency} at a time, in \
{f['fill_seconds']:.0f} s ({f['fill_retries']} retries after 503): {f['cache_entries']:,.0f} cache entries, \
{f['sts_exchanges']:,.0f} STS exchanges; \
RSS is VmRSS, MB 10^6 bytes; the per-identity cost is the slope after the first {f['warm_identities']:,}; \
then one unpaired wrk run in that daemon (other load {f['many_other_load_cores']:.2f} cores)
""")
    print(report_table(figures, met, args))
    print(f"\nFigures written to {RESULTS_PATH}")


# --- command line ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each timed wrk run (default: 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one run of each server (default: 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default: 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: 2)")
    parser.add_argument("--identities", type=int, default=10_000,
                        help="identities cached for the memory figures (default: 10000)")
    parser.add_argument("--fill-concurrency", type=int, default=64,
                        help="requests in flight while filling the cache (default: 64)")
    # Internal: how this script starts the bare server in a process of its own.
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare-body", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.duration, args.rounds, args.connections, args.threads, args.fill_concurrency) < 1:
        parser.error("every count and duration must be at least 1")
    if args.identities < 200:
        parser.error("--identities must be at least 200: the first 1% warm the daemon, the rest give the slope")
    return args


def main() -> int:
    args = parse_args()
    if args.bare_server is not None:
        serve_bare(args.bare_server, args.bare_body)
        return 0
    if shutil.which("wrk") is None:
        print(f"hot_path: the load generator wrk is not installed; install it with:\n  {WRK_INSTALL}",
              file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="irsa-cache-bench-"))
    issuer = Issuer()
    static_config = issuer.write_static_config(workdir, {SUBJECT_GLOB: ROLE_ARN})
    try:
        sts = MotoSts(log_path=workdir / "moto.log")
        with sts:
            print(f"1/2 throughput: daemon and bare aiohttp, {args.rounds} rounds of {args.duration} s each "
                  f"(logs in {workdir})", flush=True)
            throughput = measure_throughput(args, workdir, issuer, static_config, sts.url)
            print(f"2/2 {args.identities:,} identities: memory, then the hot path again", flush=True)
            many = measure_many_identities(args, workdir, issuer, static_config, sts.url)
    except (RuntimeError, TimeoutError, OSError, aiohttp.ClientError) as exc:
        print(f"hot_path: the benchmark could not run: {exc}\n  logs kept in {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir)  # the audit log of the wrk runs is large; kept only on failure

    figures = summarize(throughput, many)
    met = targets(figures)
    host = machine()
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({
        "machine": host,
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("bare_")},
        "figures": figures,
        "targets": {
            "throughput_ratio_at_least": TARGET_THROUGHPUT_RATIO,
            "p99_ms_below": TARGET_P99_MS,
            "rss_mb_below": TARGET_RSS_MB,
            "met": met,
        },
        "runs": [asdict(run) for run in throughput.runs],
        "run_with_many_identities": asdict(many.hot_path),
    }, indent=2) + "\n")
    print_report(figures, met, host, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
