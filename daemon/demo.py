"""`irsa-cache demo`: the whole path on one machine, with no cluster and no AWS account.

It starts, all on loopback, an embedded OIDC issuer, an embedded STS (moto in
server mode) and `irsa-cache serve` in static mode, each STS and daemon in a process
of its own as on a node; then N simulated pods, each an
unmodified botocore credential chain configured only by
AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE,
fetch credentials and call sts:GetCallerIdentity with them. It ends with a table
of what that cost STS and which role each identity got.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.stats import nearest_rank

REGION = "us-east-1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=300, help="simulated pods to start (default: 300)")
    parser.add_argument("--identities", type=int, default=6, help="service accounts they spread over (default: 6)")
    parser.add_argument("--concurrency", type=int, default=32, help="pods starting at once (default: 32)")
    parser.add_argument(
        "--keep-running", action="store_true",
        help="leave the daemon up and print the variables to try the AWS CLI by hand",
    )


@dataclass(frozen=True)
class PodResult:
    subject: str
    expected_role: str
    seconds_to_credentials: float
    caller_arn: str | None
    error: str | None = None


def _pod_environment(credentials_url: str, token_file: Path) -> dict[str, str]:
    return {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": credentials_url,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }


@functools.cache
def _shared_model_loader() -> Any:
    # Each pod is its own botocore session; sharing the parsed service models (as one
    # process would parse them once) keeps the demo's CPU on the path being shown.
    import botocore.loaders

    return botocore.loaders.create_loader()


def run_pod(environ: Mapping[str, str], *, sts_url: str, subject: str, expected_role: str) -> PodResult:
    """One pod start: botocore's own container provider, reading only the two variables."""
    import botocore.session
    from botocore.credentials import ContainerProvider, CredentialResolver

    session = botocore.session.Session()
    session.register_component("data_loader", _shared_model_loader())
    session.register_component("credential_provider", CredentialResolver([ContainerProvider(environ=dict(environ))]))
    started = time.perf_counter()
    try:
        credentials = session.get_credentials()
        credentials.get_frozen_credentials()
        elapsed = time.perf_counter() - started
        client = session.create_client("sts", region_name=REGION, endpoint_url=sts_url)
        arn = client.get_caller_identity()["Arn"]
        return PodResult(subject, expected_role, elapsed, arn)
    except Exception as exc:  # a failed pod is a result to report, not a crash of the demo
        return PodResult(subject, expected_role, time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}")


def _role_name(arn: str | None) -> str:
    # arn:aws:sts::123456789012:assumed-role/<role>/<session>
    return arn.split("/")[1] if arn and "assumed-role/" in arn else "-"


def scrape(metrics_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The daemon's /metrics as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_total(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= sample_labels)


def _start_pods(args: argparse.Namespace, pods: list[tuple[dict[str, str], str]], roles: dict[str, str],
                sts_url: str, out: Any) -> tuple[list[PodResult], float]:
    done = 0
    lock = threading.Lock()

    def start_pod(environ: dict[str, str], subject: str) -> PodResult:
        nonlocal done
        result = run_pod(environ, sts_url=sts_url, subject=subject, expected_role=roles[subject])
        with lock:
            done += 1
        return result

    interactive = getattr(out, "isatty", lambda: False)()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="pod") as pool:
        futures = [pool.submit(start_pod, env, subject) for env, subject in pods]
        while wait(futures, timeout=0.5 if interactive else 2.0).not_done:
            progress = f"  pods started: {done}/{len(pods)} ({time.perf_counter() - started:.1f} s)"
            print(f"\r{progress}" if interactive else progress, end="" if interactive else "\n", file=out, flush=True)
        print(f"{chr(13) if interactive else ''}  pods started: {done}/{len(pods)}", file=out)
        return [future.result() for future in futures], time.perf_counter() - started


def _run(args: argparse.Namespace, out: Any) -> int:
    if args.pods < 1 or args.identities < 1:
        print("irsa-cache demo: --pods and --identities must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="irsa-cache-demo-") as workdir_name:
        return _run_in(args, out, Path(workdir_name))


def _run_in(args: argparse.Namespace, out: Any, workdir: Path) -> int:
    from daemon.embedded import DEMO_ACCOUNT, Background, Issuer, MotoSts, free_port, write_token

    issuer = Issuer()
    subjects = [f"system:serviceaccount:team-{i}:app" for i in range(args.identities)]
    roles = {subject: f"arn:aws:iam::{DEMO_ACCOUNT}:role/team-{i}-app" for i, subject in enumerate(subjects)}
    static_config = issuer.write_static_config(workdir, roles)
    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    credentials_url = f"http://{listen}/v1/credentials"
    metrics_url = f"http://{metrics_listen}/metrics"

    with MotoSts(log_path=workdir / "moto.log") as sts:
        print(f"embedded issuer {issuer.url}; embedded STS (moto) at {sts.url}; files in {workdir}", file=out)
        daemon = Background(
            [sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
             "--static-config", str(static_config), "--region", REGION, "--sts-endpoint-url", sts.url],
            ready_url=f"http://{metrics_listen}/readyz", log_path=workdir / "daemon.log",
        )
        with daemon:
            print(f"irsa-cache serving {credentials_url}; metrics {metrics_url}; log {daemon.log_path}", file=out)
            pods = []
            for n in range(args.pods):
                subject = subjects[n % len(subjects)]
                namespace, name = subject.split(":")[2:]
                pod = f"{name}-{uuid.uuid4().hex[:5]}"
                token_file = write_token(workdir / f"{namespace}.{pod}.token", issuer.mint(subject, pod_name=pod))
                pods.append((_pod_environment(credentials_url, token_file), subject))

            before = scrape(metrics_url)
            results, wall = _start_pods(args, pods, roles, sts.url, out)
            after = scrape(metrics_url)

            def delta(name: str, **labels: str) -> float:
                return metric_total(after, name, **labels) - metric_total(before, name, **labels)

            _print_table(out, args, results, exchanges=delta("irsa_cache_sts_calls_total", result="success"),
                         hits=delta("irsa_cache_requests_total", outcome="hit"),
                         requests=delta("irsa_cache_requests_total"), wall=wall)
            failed = [r for r in results if r.error or _role_name(r.caller_arn) != r.expected_role.split("/")[-1]]
            if args.keep_running:
                _print_try_it(out, credentials_url, workdir, issuer, subjects[0], sts.url)
                with contextlib.suppress(KeyboardInterrupt):
                    daemon.process.wait()  # type: ignore[union-attr]
            return 1 if failed else 0


def _print_table(out: Any, args: argparse.Namespace, results: list[PodResult], *, exchanges: float,
                 hits: float, requests: float, wall: float) -> None:
    times = [r.seconds_to_credentials * 1000 for r in results if not r.error]
    failed = sum(1 for r in results if r.error)
    print(file=out)
    rows = [
        ("pods", f"{len(results)} ({failed} failed)"),
        ("identities", str(args.identities)),
        ("STS exchanges", f"{exchanges:.0f}"),
        ("credential requests", f"{requests:.0f}"),
        ("cache hit ratio", f"{hits / requests:.1%}" if requests else "-"),
        ("time to credentials p50", f"{nearest_rank(times, 0.5):.1f} ms" if times else "-"),
        ("time to credentials p99", f"{nearest_rank(times, 0.99):.1f} ms" if times else "-"),
        ("wall time", f"{wall:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}", file=out)

    print(file=out)
    by_subject: dict[str, list[PodResult]] = defaultdict(list)
    for result in results:
        by_subject[result.subject].append(result)
    print(f"  {'service account':<34} {'pods':>5}  {'expected role':<16} {'caller identity (assumed role)':<32} ok", file=out)
    for subject, group in sorted(by_subject.items()):
        expected = group[0].expected_role.split("/")[-1]
        seen = Counter(_role_name(r.caller_arn) for r in group)
        ok = set(seen) == {expected}
        seen_text = ", ".join(f"{role} x{count}" for role, count in sorted(seen.items()))
        print(f"  {subject.removeprefix('system:serviceaccount:'):<34} {len(group):>5}  {expected:<16} {seen_text:<32} {'yes' if ok else 'NO'}", file=out)
    errors = Counter(r.error for r in results if r.error)
    for error, count in errors.most_common(3):
        print(f"  failed x{count}: {error}", file=out)


def _print_try_it(out: Any, url: str, workdir: Path, issuer: Any, subject: str, sts_url: str) -> None:
    from daemon.embedded import write_token

    token_file = write_token(workdir / "you.token", issuer.mint(subject, pod_name="you"))
    print(
        "\nThe daemon stays up (Ctrl-C to stop). Try it by hand in another shell:\n\n"
        f"  export AWS_CONTAINER_CREDENTIALS_FULL_URI={url}\n"
        f"  export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={token_file}\n"
        f"  export AWS_ENDPOINT_URL_STS={sts_url}   # the embedded STS: these credentials are moto's\n"
        f"  export AWS_DEFAULT_REGION={REGION}\n"
        "  aws sts get-caller-identity\n",
        file=out, flush=True,
    )


class _Stopped(Exception):
    """SIGTERM or SIGHUP: leave through the context managers, which stop every child."""


def main(args: argparse.Namespace) -> int:
    missing = [name for name in ("moto", "boto3") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"irsa-cache: error: demo needs {' and '.join(missing)}, which come with its extra: "
              "pip install 'irsa-cache[demo]'", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        return _run(args, sys.stdout)
    except (_Stopped, KeyboardInterrupt) as exc:
        print(f"irsa-cache demo: stopped ({exc or 'interrupted'}); its processes are stopped and its files removed",
              file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
