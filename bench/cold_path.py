"""Cold path benchmark: daemon CPU per first request, when many pods with new tokens arrive at once.

    python bench/cold_path.py [--requests 1000] [--identities 20] [--rounds 3] [--baseline main]

What it measures, in one run:

1. `--requests` first requests (each with a token the daemon has never seen) over
   `--identities` identities, all sent at once to a daemon with a cold cache, each on
   a connection of its own (as many new pods do). The daemon runs as deployed
   (`python -m daemon serve`, static config, its defaults, moto as STS), in a process
   of its own; its CPU time (user + system, from /proc/<pid>/stat) over the burst,
   divided by the requests, is the CPU per first request. It includes everything a
   first request costs: the connection, the token's verification, the cache entry,
   the audit line, and a share of the identities' STS exchanges.
2. The same burst against the daemon of `--baseline` (a git ref, default `main`;
   exported with `git archive` into a temporary directory and run from there), in
   alternating order (ABBA) with fresh daemons and the very same tokens, so that both
   see the same machine. `--baseline none` skips it.
3. In this process, on the same tokens: what verifying a token costs with PyJWT's
   plain API (`get_unverified_header`, then `decode` with the key), next to this
   checkout's `TokenVerifier` (uncached: every token new).

Every answer is checked: a caller answered anything but 200 is counted, and so is a
caller turned away although its identity's STS exchange had already succeeded (the
daemon's log says when each exchange finished; the client notes when each answer came).

Speed is printed, never asserted: the exit status is 0 when the benchmark ran. The
machine is shared: each run reports the CPU other processes used meanwhile (noise),
and the comparison is the ratio of two builds measured side by side. Figures are
written to bench/results/cold_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from daemon.demo import metric_total, scrape  # noqa: E402
from daemon.stats import nearest_rank  # noqa: E402
from daemon.embedded import (  # noqa: E402
    DEMO_ACCOUNT, IRSA_AUDIENCE, Background, Issuer, MotoSts, cpu_seconds, free_port, machine_busy_seconds,
)

RESULTS_PATH = HERE / "results" / "cold_path.json"
REGION = "us-east-1"
TARGET_CPU_US = 300.0  # daemon CPU per first request, at most
SETTLE_SECONDS = 0.5  # after the last answer: the last log lines and exchanges finish
CLIENT_TIMEOUT_SECONDS = 60.0


def py_spy() -> str:
    """py-spy's command: on the PATH, or beside this interpreter (a venv not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or str(beside)


# --- the client: one raw HTTP/1.1 request per connection ---


@dataclass(frozen=True)
class Answer:
    identity: int
    status: int
    sent: float  # epoch seconds
    answered: float
    code: str  # the error code of a non-200 answer


async def ask(host: str, port: int, token: str, identity: int) -> Answer:
    sent = time.time()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /v1/credentials HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        response = await reader.read()  # to EOF: the daemon closes after its answer
        writer.close()
    except OSError as exc:
        return Answer(identity, 0, sent, time.time(), type(exc).__name__)
    answered = time.time()
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Answer(identity, 0, sent, answered, "no HTTP answer")
    code = ""
    if status != 200:
        with contextlib.suppress(ValueError, AttributeError):
            code = json.loads(body).get("code", "")
    return Answer(identity, status, sent, answered, code)


async def burst(host: str, port: int, tokens: list[tuple[int, str]]) -> list[Answer]:
    """Every request at once; bounded by the client timeout."""
    return await asyncio.wait_for(
        asyncio.gather(*(ask(host, port, token, identity) for identity, token in tokens)), CLIENT_TIMEOUT_SECONDS)


# --- one daemon, one burst ---


@dataclass(frozen=True)
class Run:
    build: str
    round: int
    requests: int
    cpu_us_per_request: float
    wall_seconds: float  # first request sent to last answer
    latency_p50_ms: float
    latency_p99_ms: float
    status_counts: dict[str, int]
    turned_away_after_success: int  # non-200 answers that came after their identity's exchange had succeeded
    sts_exchanges: float
    other_load_cores: float  # CPU used by processes other than the daemon and this one, during the burst


def exchanges_done(log_path: Path) -> dict[str, float]:
    """When each identity's first STS exchange finished (epoch seconds), from the daemon's log."""
    done: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message = record.get("message", "")
        if message.startswith("exchanged token for "):
            subject = message.removeprefix("exchanged token for ").split(" ", 1)[0]
            at = datetime.fromisoformat(record["time"]).timestamp()
            done.setdefault(subject, at)
    return done


def run_once(build: str, round_number: int, argv_prefix: list[str], env: dict[str, str], workdir: Path,
             static_config: Path, sts_url: str, tokens: list[tuple[int, str]], subjects: list[str],
             profile: Path | None) -> Run:
    listen_port, metrics_port = free_port(), free_port()
    log_path = workdir / f"daemon-{build}-{round_number}.log"
    argv = [*argv_prefix, "serve", "--listen", f"127.0.0.1:{listen_port}", "--metrics-listen",
            f"127.0.0.1:{metrics_port}", "--static-config", str(static_config), "--region", REGION,
            "--sts-endpoint-url", sts_url]
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with Background(argv, ready_url=f"http://127.0.0.1:{metrics_port}/readyz", log_path=log_path, env=env) as daemon:
        assert daemon.process is not None
        pid = daemon.process.pid
        time.sleep(1.0)  # start-up settles: its CPU is not the burst's
        spy = None
        if profile is not None:
            spy = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--rate", "1000", "--format", "raw",
                                    "--output", str(profile / f"cold-{build}-{round_number}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        before_cpu, before_busy, before_self = cpu_seconds(pid), machine_busy_seconds(), time.process_time()
        started = time.time()
        answers = asyncio.run(burst("127.0.0.1", listen_port, tokens))
        last = max(answer.answered for answer in answers)
        time.sleep(max(0.0, last + SETTLE_SECONDS - time.time()))
        elapsed = time.time() - started
        used = cpu_seconds(pid) - before_cpu
        others = machine_busy_seconds() - before_busy - used - (time.process_time() - before_self)
        samples = scrape(metrics_url)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its profile and exits
            spy.wait(timeout=30)
    done = exchanges_done(log_path)
    statuses: dict[str, int] = {}
    turned_away = 0
    for answer in answers:
        key = str(answer.status) + (f" {answer.code}" if answer.code else "")
        statuses[key] = statuses.get(key, 0) + 1
        succeeded_at = done.get(subjects[answer.identity])
        if answer.status != 200 and succeeded_at is not None and succeeded_at < answer.answered:
            turned_away += 1
    latencies = [answer.answered - answer.sent for answer in answers]
    return Run(
        build=build, round=round_number, requests=len(answers),
        cpu_us_per_request=used / len(answers) * 1e6,
        wall_seconds=last - min(answer.sent for answer in answers),
        latency_p50_ms=nearest_rank(latencies, 0.5) * 1000,  # type: ignore[operator]
        latency_p99_ms=nearest_rank(latencies, 0.99) * 1000,  # type: ignore[operator]
        status_counts=statuses, turned_away_after_success=turned_away,
        sts_exchanges=metric_total(samples, "irsa_cache_sts_calls_total", result="success"),
        other_load_cores=max(others, 0.0) / elapsed,
    )


# --- verification alone, in this process ---


def verification_in_process(issuer: Issuer, tokens: list[str]) -> dict[str, float]:
    """CPU per token: PyJWT's plain API, and this checkout's TokenVerifier (every token new to it)."""
    import jwt

    from daemon.tokens import TokenVerifier

    key = jwt.PyJWK(issuer.jwks()["keys"][0])
    options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
               "verify_iss": False}
    started = time.process_time()
    for token in tokens:
        jwt.get_unverified_header(token)
        jwt.decode(token, key=key.key, algorithms=["RS256"], options=options)
    pyjwt = (time.process_time() - started) / len(tokens)

    class Keys:
        description = "the benchmark's issuer"

        async def fetch(self) -> dict[str, Any]:
            return issuer.jwks()

    async def ours() -> float:
        verifier = TokenVerifier(issuer=issuer.url, audience=IRSA_AUDIENCE, key_source=Keys(), clock=time.time,
                                 leeway_seconds=60, refetch_min_interval_seconds=60, max_verified=len(tokens) + 1)
        await verifier.load_keys()
        started = time.process_time()
        for token in tokens:
            await verifier.verify(token)
        return (time.process_time() - started) / len(tokens)

    return {"pyjwt_us_per_token": pyjwt * 1e6, "token_verifier_us_per_token": asyncio.run(ours()) * 1e6}


# --- the builds ---


def export_baseline(ref: str, into: Path) -> str:
    """`git archive` the daemon package of `ref` into `into`; returns the commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "daemon"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return commit


def build_env(source_root: Path) -> dict[str, str]:
    # -P plus PYTHONPATH: the daemon package imported is the one under `source_root`.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(source_root)
    return env


def summarize(runs: list[Run], verification: dict[str, float]) -> dict[str, Any]:
    builds = sorted({run.build for run in runs}, key=lambda b: b != "this")
    figures: dict[str, Any] = {"verification_in_process": verification}
    for build in builds:
        mine = [run for run in runs if run.build == build]
        figures[build] = {
            "cpu_us_per_request": statistics.median(run.cpu_us_per_request for run in mine),
            "wall_seconds": statistics.median(run.wall_seconds for run in mine),
            "latency_p99_ms": statistics.median(run.latency_p99_ms for run in mine),
            "non_200": sum(run.requests - run.status_counts.get("200", 0) for run in mine),
            "turned_away_after_success": sum(run.turned_away_after_success for run in mine),
        }
    if "baseline" in figures:
        by_round = {run.round: {} for run in runs}
        for run in runs:
            by_round[run.round][run.build] = run
        figures["cpu_ratio_this_over_baseline"] = statistics.median(
            pair["this"].cpu_us_per_request / pair["baseline"].cpu_us_per_request for pair in by_round.values())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="first requests sent at once (default: 1000)")
    parser.add_argument("--identities", type=int, default=20, help="identities they spread over (default: 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each build (default: 3)")
    parser.add_argument("--baseline", default="main",
                        help="git ref whose daemon runs side by side (default: main; 'none' to skip)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also record each run with py-spy (raw stacks into DIR; perturbs the figures a little)")
    args = parser.parse_args()
    if min(args.requests, args.identities, args.rounds) < 1:
        parser.error("--requests, --identities and --rounds must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="irsa-cache-cold-"))
    issuer = Issuer()
    subjects = [f"system:serviceaccount:team-{n}:app" for n in range(args.identities)]
    roles = [f"arn:aws:iam::{DEMO_ACCOUNT}:role/team-{n}-app" for n in range(args.identities)]
    static_config = issuer.write_static_config(workdir, dict(zip(subjects, roles, strict=True)))
    tokens = [(n % args.identities, issuer.mint(subjects[n % args.identities], pod_name=f"app-{n:05d}"))
              for n in range(args.requests)]
    builds = {"this": ([sys.executable, "-P", "-m", "daemon"], build_env(REPO))}
    baseline_commit = None
    if args.baseline != "none":
        baseline_root = workdir / "baseline"
        baseline_root.mkdir()
        try:
            baseline_commit = export_baseline(args.baseline, baseline_root)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"cold_path: cannot export {args.baseline!r} with git ({exc}); use --baseline none", file=sys.stderr)
            return 2
        builds["baseline"] = ([sys.executable, "-P", "-m", "daemon"], build_env(baseline_root))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    here = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "daemon"],
                                capture_output=True, text=True).stdout.strip())
    print(f"cold path: {args.requests:,} first requests at once over {args.identities} identities, a fresh daemon "
          f"per run; this checkout at {here}{' (modified)' if dirty else ''}"
          + (f", baseline {args.baseline} at {baseline_commit}" if baseline_commit else "")
          + f"; load average {os.getloadavg()[0]:.2f}; logs in {workdir}", flush=True)

    runs: list[Run] = []
    try:
        with MotoSts(log_path=workdir / "moto.log") as sts:
            for round_number in range(1, args.rounds + 1):
                order = list(builds) if round_number % 2 else list(reversed(builds))
                for build in order:
                    argv_prefix, env = builds[build]
                    run = run_once(build, round_number, argv_prefix, env, workdir, static_config, sts.url, tokens,
                                   subjects, args.profile)
                    runs.append(run)
                    print(f"  round {round_number}  {build:<8} {run.cpu_us_per_request:6.0f} us CPU per request  "
                          f"all answered in {run.wall_seconds:5.2f} s (p50 {run.latency_p50_ms:6.0f} ms, p99 "
                          f"{run.latency_p99_ms:6.0f} ms)  answers {run.status_counts}  turned away after their "
                          f"exchange succeeded: {run.turned_away_after_success}  STS exchanges "
                          f"{run.sts_exchanges:g}  other load {run.other_load_cores:.2f} cores", flush=True)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"cold_path: the benchmark could not run: {exc}\n  logs kept in {workdir}", file=sys.stderr)
        return 1
    verification = verification_in_process(issuer, [token for _, token in tokens])
    figures = summarize(runs, verification)

    print(f"\nverification alone, in this process, {args.requests:,} new tokens (RS256, 2048-bit key): PyJWT's "
          f"get_unverified_header + decode {verification['pyjwt_us_per_token']:.0f} us per token; this checkout's "
          f"TokenVerifier {verification['token_verifier_us_per_token']:.0f} us per token (claims and cache included)")
    for build in builds:
        f = figures[build]
        print(f"{build:<8}  daemon CPU per first request (median of {args.rounds}): {f['cpu_us_per_request']:.0f} us "
              f"(target <= {TARGET_CPU_US:g}: {'PASS' if f['cpu_us_per_request'] <= TARGET_CPU_US else 'MISS'}); "
              f"all answered in {f['wall_seconds']:.2f} s; non-200 answers {f['non_200']}, of which after their "
              f"exchange had succeeded {f['turned_away_after_success']}")
    if "cpu_ratio_this_over_baseline" in figures:
        print(f"this / baseline CPU per first request (median of per-round ratios): "
              f"{figures['cpu_ratio_this_over_baseline']:.2f}")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({
        "command": "python bench/cold_path.py " + " ".join(sys.argv[1:]),
        "this": here, "this_modified": dirty, "baseline": args.baseline, "baseline_commit": baseline_commit,
        "figures": figures, "runs": [asdict(run) for run in runs],
    }, indent=2) + "\n")
    print(f"figures written to {RESULTS_PATH}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
