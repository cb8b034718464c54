"""Memory benchmark: where the daemon's bytes go, at idle and per cached identity.

    python bench/memory.py [--identities 2000]

Three measurements, each of a daemon with its own process:

1. tracemalloc, static mode: the daemon runs in a child process that starts
   tracemalloc before it imports anything of the daemon, builds its settings as
   `irsa-cache serve` does and runs `app.running()` on the loop `serve` uses. At
   idle (started, keys loaded, the STS client built, nothing served) it reports the
   bytes Python holds, by package; then `--identities` distinct identities fetch
   credentials once each (a client in another process, so that its allocations are
   not counted), and it reports the bytes each further identity holds, by the line
   that allocated them (the verification cache, the cache entry, the token kept for
   refreshing, the credentials STS sent, the audit trail). The slope is taken after
   the first 10% of identities, so that one-time costs stay out.
2. RSS, static mode: `python -m daemon serve` as deployed, no tracemalloc: VmRSS at
   idle and the slope per identity over the same fill (RSS includes the allocator's
   own overhead and the shared libraries; tracemalloc sees only Python's objects).
3. RSS, Kubernetes mode: `python -m daemon serve --directory kubernetes` against the
   Kubernetes API double (tests/k8s_double.py, its own process). Idle is measured with
   an empty cluster; then the double creates one ServiceAccount and one running Pod on
   this node per identity (what the informers keep, per identity), and the identities
   fetch as in static mode.

STS is moto on loopback, with the daemon's STS budget raised (moto needs no
protection; 2000 exchanges at the default 10/s would take minutes). Everything is
printed, nothing asserted; figures go to bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import linecache
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_PATH = HERE / "results" / "memory.json"
WARM_FRACTION = 0.1
STS_BUDGET_FLAGS = ["--sts-rate", "1000", "--sts-burst", "1000"]
NODE = "bench-node"
ROLE = "arn:aws:iam::123456789012:role/bench"
SETTLE_SECONDS = 1.0
INFORMER_SYNC_SECONDS = 5.0  # the pod and ServiceAccount informers take in the cluster's objects

# A client in a process of its own: each token fetched once; a 503 retried after a second.
CLIENT = r"""
import asyncio, sys, aiohttp
url, host, path, lo, hi = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tokens = open(path).read().split("\n")[lo:hi]
async def main():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        async def one(token):
            for _ in range(10):
                async with session.get(url, headers={"Authorization": token, "Host": host}) as answer:
                    body = await answer.read()
                    if answer.status == 200:
                        return
                if answer.status != 503:
                    raise SystemExit(f"answered {answer.status}: {body[:300]!r}")
                await asyncio.sleep(1)
            raise SystemExit("still 503 after 10 tries")
        await asyncio.gather(*(one(token) for token in tokens))
asyncio.run(main())
"""


def fill(url: str, host: str, tokens_path: Path, lo: int, hi: int) -> None:
    subprocess.run([sys.executable, "-c", CLIENT, url, host, str(tokens_path), str(lo), str(hi)], check=True,
                   timeout=600)


def package_of(filename: str) -> str:
    for pattern in (r"site-packages/([^/]+)", r"/(daemon)/", r"python3\.\d+/([^/]+)"):
        match = re.search(pattern, filename)
        if match:
            return match.group(1).removesuffix(".py")
    return "interpreter (imports, builtins)" if filename.startswith("<") else filename


# --- 1. the traced child: `python bench/memory.py --traced ...` ---


def traced_child(sts_url: str, static_config: Path, tokens_path: Path, identities: int, out: Path) -> None:
    import tracemalloc

    tracemalloc.start(16)
    sys.path.insert(0, str(REPO))
    from daemon import __main__ as cli
    from daemon import config

    args = cli.build_parser().parse_args(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--static-config",
         str(static_config), "--region", "us-east-1", "--sts-endpoint-url", sts_url, *STS_BUDGET_FLAGS])
    settings = config.settings_from(args)
    from daemon import app

    report: dict[str, Any] = {}

    async def run() -> None:
        import gc

        async with app.running(settings) as daemon:
            await asyncio.sleep(SETTLE_SECONDS)
            gc.collect()
            idle = tracemalloc.take_snapshot()
            by_package: collections.Counter[str] = collections.Counter()
            for stat in idle.statistics("filename"):
                by_package[package_of(stat.traceback[0].filename)] += stat.size
            report["idle_traced_bytes"] = sum(by_package.values())
            report["idle_by_package"] = by_package.most_common(15)

            url, host = daemon.credentials_url, str(daemon.listen[0])
            warm = max(1, int(identities * WARM_FRACTION))
            await asyncio.to_thread(fill, url, host, tokens_path, 0, warm)
            await asyncio.sleep(SETTLE_SECONDS)
            gc.collect()
            before = tracemalloc.take_snapshot()
            await asyncio.to_thread(fill, url, host, tokens_path, warm, identities)
            await asyncio.sleep(SETTLE_SECONDS)
            gc.collect()
            after = tracemalloc.take_snapshot()
            further = identities - warm
            sites: collections.Counter[str] = collections.Counter()
            for stat in after.compare_to(before, "traceback"):
                frames = list(stat.traceback)
                ours = [f for f in frames if "/daemon/" in f.filename]
                frame = ours[-1] if ours else frames[-1]
                code = linecache.getline(frame.filename, frame.lineno).strip()
                sites[f"{frame.filename.split('/daemon/')[-1]}:{frame.lineno}  {code[:70]}"] += stat.size_diff
            report["per_identity_traced_bytes"] = sum(sites.values()) / further
            report["per_identity_by_site"] = [(site, size / further) for site, size in sites.most_common(18)]
            report["cache_entries"] = len(daemon.cache)

    from daemon.__main__ import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run())
    out.write_text(json.dumps(report))


# --- 3. the Kubernetes API double's process: `python bench/memory.py --k8s-double ...` ---


def k8s_double_child(workdir: Path, identities: int) -> None:
    sys.path.insert(0, str(REPO))
    from daemon.embedded import Issuer
    from tests.k8s_double import K8sApiDouble, pod, service_account

    issuer = Issuer()

    async def run() -> None:
        double = await K8sApiDouble(issuer=issuer.url, jwks=issuer.jwks()).start()
        double.write_kubeconfig(workdir / "kubeconfig")
        (workdir / "k8s-ready").write_text("ready")
        # The daemon's idle figure is taken with an empty cluster; then the objects come.
        while not (workdir / "k8s-populate").exists():
            await asyncio.sleep(0.1)
        tokens = []
        for n in range(identities):
            namespace = f"ns-{n:05d}"
            double.create(service_account(namespace, "app", ROLE))
            bound = double.create(pod(namespace, f"app-{n:05d}", NODE, "app"))
            tokens.append(issuer.mint(f"system:serviceaccount:{namespace}:app", pod_name=bound["metadata"]["name"],
                                      pod_uid=bound["metadata"]["uid"]))
        (workdir / "k8s-tokens").write_text("\n".join(tokens))
        (workdir / "k8s-populated").write_text("populated")
        await asyncio.Event().wait()

    asyncio.run(run())


# --- 2 and 3: RSS of `python -m daemon serve` ---


def rss_fill(argv: list[str], workdir: Path, name: str, tokens_path: Path, identities: int,
             env: dict[str, str] | None = None, populate: Any = None) -> dict[str, float]:
    """RSS idle, then (`populate()`, for the Kubernetes mode: the cluster's objects, then a
    pause for the informers) and the slope per identity fetched after the first 10%."""
    from daemon.embedded import Background, free_port, vm_rss_kib

    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with Background([sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
                     *argv, *STS_BUDGET_FLAGS], ready_url=f"http://{metrics_listen}/readyz",
                    log_path=workdir / f"daemon-{name}.log", env=env, timeout_seconds=60) as daemon:
        assert daemon.process is not None
        pid = daemon.process.pid
        time.sleep(SETTLE_SECONDS)
        idle = vm_rss_kib(pid)
        populated = idle
        if populate is not None:
            populate()
            time.sleep(INFORMER_SYNC_SECONDS)
            populated = vm_rss_kib(pid)
        url = f"http://{listen}/v1/credentials"
        warm = max(1, int(identities * WARM_FRACTION))
        fill(url, listen, tokens_path, 0, warm)
        time.sleep(SETTLE_SECONDS)
        warmed = vm_rss_kib(pid)
        fill(url, listen, tokens_path, warm, identities)
        time.sleep(SETTLE_SECONDS)
        filled = vm_rss_kib(pid)
    return {"rss_idle_mb": idle * 1024 / 1e6, "rss_filled_mb": filled * 1024 / 1e6,
            "rss_informers_per_identity_bytes": (populated - idle) * 1024 / identities,
            "rss_per_identity_bytes": (filled - warmed) * 1024 / (identities - warm)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=2000, help="identities cached (default: 2000)")
    parser.add_argument("--no-kubernetes", action="store_true", help="skip the Kubernetes mode")
    parser.add_argument("--traced", nargs=4, help=argparse.SUPPRESS)  # sts_url config tokens out
    parser.add_argument("--k8s-double", type=Path, help=argparse.SUPPRESS)  # workdir
    args = parser.parse_args()
    if args.traced:
        sts_url, static_config, tokens_path, out = args.traced
        traced_child(sts_url, Path(static_config), Path(tokens_path), args.identities, Path(out))
        return 0
    if args.k8s_double:
        k8s_double_child(args.k8s_double, args.identities)
        return 0
    if args.identities < 20:
        parser.error("--identities must be at least 20")

    sys.path.insert(0, str(REPO))
    from daemon.embedded import Issuer, MotoSts

    workdir = Path(tempfile.mkdtemp(prefix="irsa-cache-memory-"))
    issuer = Issuer()
    static_config = issuer.write_static_config(workdir, {"system:serviceaccount:*": ROLE})
    tokens_path = workdir / "tokens"
    tokens_path.write_text("\n".join(issuer.mint(f"system:serviceaccount:ns-{n:05d}:app", pod_name=f"app-{n:05d}")
                                     for n in range(args.identities)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    figures: dict[str, Any] = {"identities": args.identities}
    print(f"memory: {args.identities:,} identities, one pod and token each; logs in {workdir}", flush=True)
    with MotoSts(log_path=workdir / "moto.log") as sts:
        print("1/3 tracemalloc, static mode ...", flush=True)
        out = workdir / "traced.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--identities", str(args.identities),
                        "--traced", sts.url, str(static_config), str(tokens_path), str(out)], check=True, env=env,
                       timeout=900)
        figures["traced"] = json.loads(out.read_text())
        print("2/3 RSS, static mode ...", flush=True)
        figures["static"] = rss_fill(["--static-config", str(static_config), "--region", "us-east-1",
                                      "--sts-endpoint-url", sts.url], workdir, "static", tokens_path,
                                     args.identities, env)
        if not args.no_kubernetes:
            print("3/3 RSS, Kubernetes mode ...", flush=True)
            with contextlib.ExitStack() as stack:
                double = stack.enter_context(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--identities", str(args.identities),
                     "--k8s-double", str(workdir)], env=env))
                stack.callback(double.kill)

                def wait_for(name: str) -> None:
                    deadline = time.monotonic() + 300
                    while not (workdir / name).exists():
                        if double.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"the Kubernetes API double did not say {name}")
                        time.sleep(0.2)

                def populate() -> None:
                    (workdir / "k8s-populate").write_text("go")
                    wait_for("k8s-populated")

                wait_for("k8s-ready")
                figures["kubernetes"] = rss_fill(
                    ["--directory", "kubernetes", "--kubeconfig", str(workdir / "kubeconfig"), "--node-name", NODE,
                     "--region", "us-east-1", "--sts-endpoint-url", sts.url], workdir, "kubernetes",
                    workdir / "k8s-tokens", args.identities, env, populate)

    traced = figures["traced"]
    print("\ntracemalloc, static mode (Python objects only):")
    print(f"  idle: {traced['idle_traced_bytes'] / 1e6:.1f} MB, by package:")
    for package, size in traced["idle_by_package"]:
        print(f"    {size / 1e6:6.2f} MB  {package}")
    print(f"  per further identity: {traced['per_identity_traced_bytes']:,.0f} bytes "
          f"({traced['cache_entries']:,} entries cached), by the line that allocated them:")
    for site, size in traced["per_identity_by_site"]:
        print(f"    {size:6.0f} B  {site}")
    for mode in ("static", "kubernetes"):
        if mode in figures:
            f = figures[mode]
            informers = (f"; the informers' Pod and ServiceAccount per identity "
                         f"{f['rss_informers_per_identity_bytes'] / 1000:.2f} KB" if mode == "kubernetes" else "")
            print(f"RSS, {mode} mode: idle {f['rss_idle_mb']:.1f} MB; with {args.identities:,} identities "
                  f"{f['rss_filled_mb']:.1f} MB; per further identity {f['rss_per_identity_bytes'] / 1000:.2f} KB"
                  f"{informers}")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({"command": "python bench/memory.py " + " ".join(sys.argv[1:]),
                                        "figures": figures}, indent=2) + "\n")
    print(f"figures written to {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
