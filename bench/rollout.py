"""An upgrade on one node, side by side: the warm handoff against a plain restart.

One command, one run. Real daemon processes on one loopback address serve N identities
warm; callers ask without pause (a new connection per request, as the SDKs' credential
fetches make them) while the node is upgraded twice, two ways:

- **handoff**: the new generation starts beside the old one with the same --listen and
  --handoff-socket, takes over its sockets and cache, then the old one gets SIGTERM
  (what the DaemonSet does with maxSurge: 1);
- **restart**: the old one gets SIGTERM and exits, then the new one starts (maxSurge: 0,
  what an agent without a handoff does).

For each: requests made during the upgrades, how many failed (refused connections,
errors), STS calls the upgrades cost, and the longest a caller waited.

    python bench/rollout.py [--identities 20] [--callers 16]

Figures also go to bench/results/rollout.json. Exit status 0 unless it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.embedded import Issuer, free_port  # noqa: E402
from tests.sts_double import StsDouble  # noqa: E402  (recording proxy: counts STS calls)

ROLE = "arn:aws:iam::123456789012:role/bench"


@dataclass
class Seen:
    requests: int = 0
    failures: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    slowest: float = 0.0


def start(argv: list[str], ready: Path, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[:4]} did not get ready: {log.read_text()[-1500:]}")
        time.sleep(0.02)
    return process


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


async def callers(url: str, tokens: list[str], n: int, stop_event: asyncio.Event, seen: Seen) -> None:
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def one(rng: random.Random) -> None:
            while not stop_event.is_set():
                started = time.perf_counter()
                try:
                    async with session.get(url, headers={"Authorization": rng.choice(tokens)}) as response:
                        await response.read()
                        ok = response.status == 200
                        kind = str(response.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    ok, kind = False, type(exc).__name__
                seen.requests += 1
                seen.slowest = max(seen.slowest, time.perf_counter() - started)
                if not ok:
                    seen.failures += 1
                    seen.kinds[kind] = seen.kinds.get(kind, 0) + 1
                await asyncio.sleep(0.002)

        await asyncio.gather(*(one(random.Random(i)) for i in range(n)))


async def run_mode(mode: str, identities: int, workers: int, sts: StsDouble) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix=f"irsa-cache-rollout-{mode}-"))
    issuer = Issuer()
    static = issuer.write_static_config(tmp, {"system:serviceaccount:bench:*": ROLE})
    (tmp / "run").mkdir(mode=0o700)
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    tokens = [issuer.mint(f"system:serviceaccount:bench:app-{n}") for n in range(identities)]
    url = f"http://{listen}/v1/credentials"

    def generation(name: str) -> tuple[list[str], Path]:
        status = tmp / f"status-{name}"
        status.mkdir()
        handoff = str(tmp / "run" / "handoff.sock") if mode == "handoff" else ""
        return ([sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics,
                 "--static-config", str(static), "--region", "us-east-1", "--sts-endpoint-url", sts.url,
                 "--handoff-socket", handoff, "--status-dir", str(status)], status / "ready")

    argv, ready = generation("a")
    current = await asyncio.to_thread(start, argv, ready, tmp / "a.log")
    async with aiohttp.ClientSession() as warm:
        for token in tokens:
            async with warm.get(url, headers={"Authorization": token}) as response:
                assert response.status == 200
    calls_before = len(sts.assume_calls)
    seen, stop_event = Seen(), asyncio.Event()
    running = asyncio.create_task(callers(url, tokens, workers, stop_event, seen))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    codes = []
    for name in ("b", "c"):
        argv, ready = generation(name)
        if mode == "handoff":
            successor = await asyncio.to_thread(start, argv, ready, tmp / f"{name}.log")
            codes.append(await asyncio.to_thread(stop, current))
        else:
            codes.append(await asyncio.to_thread(stop, current))
            successor = await asyncio.to_thread(start, argv, ready, tmp / f"{name}.log")
        current = successor
        await asyncio.sleep(1.0)
    elapsed = time.monotonic() - started
    stop_event.set()
    await running
    await asyncio.to_thread(stop, current)
    return {
        "requests": seen.requests, "failed": seen.failures, "failures_by_kind": seen.kinds,
        "sts_calls": len(sts.assume_calls) - calls_before, "slowest_seconds": seen.slowest,
        "upgrades_seconds": elapsed, "predecessor_exit_codes": codes,
    }


async def main(identities: int, workers: int) -> None:
    from daemon.embedded import MotoSts

    results = {}
    with MotoSts() as moto:
        for mode in ("handoff", "restart"):
            sts = await StsDouble(moto.url).start()
            try:
                results[mode] = await run_mode(mode, identities, workers, sts)
            finally:
                await sts.stop()
    print(f"\nTwo upgrades of one node, {identities} identities warm, {workers} callers asking throughout\n")
    print(f"  {'':<32} {'handoff':>12} {'restart':>12}")
    rows = [("requests during the upgrades", "requests", "{:>12,}"), ("failed", "failed", "{:>12,}"),
            ("STS calls the upgrades cost", "sts_calls", "{:>12}"), ("slowest answer (s)", "slowest_seconds", "{:>12.3f}"),
            ("old generation's exit codes", "predecessor_exit_codes", "{!s:>12}")]
    for label, key, form in rows:
        print(f"  {label:<32} " + " ".join(form.format(results[m][key]) for m in ("handoff", "restart")))
    kinds = results["restart"]["failures_by_kind"]
    if kinds:
        print(f"\n  restart's failures: {', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))}")
    out = ROOT / "bench" / "results" / "rollout.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--callers", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.identities, args.callers))
