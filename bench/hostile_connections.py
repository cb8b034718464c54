"""What hostile connections cost the daemon, and whether a real client still gets through.

One command, one run, side by side: the daemon (as deployed: `python -m daemon
serve`, static config, its own process) first at idle, then under each attack, with
the resident memory (VmRSS) of its process and the time a legitimate client takes to
get credentials measured during the attack next to the same client's time at idle.

Attacks, each with N connections (default: the --max-connections cap, 1024):

- `silent`: connect, send nothing;
- `trickle`: send a request head one byte per 0.2 s, never finishing;
- `fat-head`: send 31 KB of header fields (several near the field limit), never finishing;
- `long-field`: one Authorization header of 24,000 bytes, never finishing;
- `over-cap`: twice the cap of connections each sending a partial head.

    python bench/hostile_connections.py [--connections 1024] [--hold 3]

Prints a table and writes bench/results/hostile_connections.json. The exit status is
0 unless the benchmark itself cannot run (speed and memory are measured, not asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import config  # noqa: E402
from daemon.embedded import Background, Issuer, MotoSts, free_port, vm_rss_kib  # noqa: E402

SUBJECT = "system:serviceaccount:bench:app"
ROLE = "arn:aws:iam::123456789012:role/bench"


Attack = Callable[[str, int, int, list[asyncio.StreamWriter]], Awaitable[None]]


async def _open(host: str, port: int, first: bytes, writers: list[asyncio.StreamWriter]) -> None:
    _, writer = await asyncio.open_connection(host, port)
    if first:
        writer.write(first)
    writers.append(writer)


async def silent(host: str, port: int, n: int, writers: list[asyncio.StreamWriter]) -> None:
    for _ in range(n):
        await _open(host, port, b"", writers)


async def trickle(host: str, port: int, n: int, writers: list[asyncio.StreamWriter]) -> None:
    for _ in range(n):
        await _open(host, port, b"G", writers)

    async def drip() -> None:
        for byte in b"ET /v1/credentials HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
            await asyncio.sleep(0.2)
            for writer in writers:
                if not writer.is_closing():
                    writer.write(bytes([byte]))

    asyncio.get_running_loop().create_task(drip())


async def fat_head(host: str, port: int, n: int, writers: list[asyncio.StreamWriter]) -> None:
    head = b"GET /v1/credentials HTTP/1.1\r\n" + (b"X-A: " + b"a" * 8000 + b"\r\n") * 3 + b"X-B: " + b"b" * 7000
    for _ in range(n):
        await _open(host, port, head, writers)


async def long_field(host: str, port: int, n: int, writers: list[asyncio.StreamWriter]) -> None:
    for _ in range(n):
        await _open(host, port, b"GET /v1/credentials HTTP/1.1\r\nAuthorization: " + b"a" * 24_000, writers)


async def over_cap(host: str, port: int, n: int, writers: list[asyncio.StreamWriter]) -> None:
    for _ in range(2 * n):
        await _open(host, port, b"GET /v1/credentials HTTP/1.1\r\nX-Slow: " + b"x" * 1000, writers)


ATTACKS: dict[str, Attack] = {
    "silent": silent, "trickle": trickle, "fat-head": fat_head, "long-field": long_field, "over-cap": over_cap,
}


async def client_seconds(session: aiohttp.ClientSession, url: str, token: str, times: int = 5) -> float:
    """Median time for a legitimate client to get credentials (a cache hit)."""
    elapsed = []
    for _ in range(times):
        started = time.perf_counter()
        async with session.get(url, headers={"Authorization": token}) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"the legitimate client got {response.status}")
        elapsed.append(time.perf_counter() - started)
    return statistics.median(elapsed)


async def run(connections: int, hold: float) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * connections + 256:
        raise SystemExit(f"the file descriptor limit ({hard}) is too low for {connections} connections")
    workdir = Path(tempfile.mkdtemp(prefix="irsa-cache-hostile-"))
    issuer = Issuer()
    static = issuer.write_static_config(workdir, {SUBJECT: ROLE})
    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    host, port = listen.split(":")
    url = f"http://{listen}/v1/credentials"
    token = issuer.mint(SUBJECT)
    results: dict[str, object] = {"connections": connections, "limits": config.CREDENTIALS_LIMITS.__dict__}
    rows = []
    with MotoSts() as sts:
        daemon = Background(
            [sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
             "--static-config", str(static), "--region", "us-east-1", "--sts-endpoint-url", sts.url,
             "--max-connections", str(connections)],
            ready_url=f"http://{metrics_listen}/readyz", log_path=workdir / "daemon.log",
        )
        with daemon:
            assert daemon.process is not None
            pid = daemon.process.pid
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                await client_seconds(session, url, token)  # the identity's credentials are cached now
                await asyncio.sleep(0.5)
                idle_rss, idle_client = vm_rss_kib(pid) / 1024, await client_seconds(session, url, token)
                results["idle"] = {"rss_mb": idle_rss, "client_ms": idle_client * 1000}
                for name, attack in ATTACKS.items():
                    writers: list[asyncio.StreamWriter] = []
                    await attack(host, int(port), connections, writers)
                    await asyncio.sleep(hold)
                    peak = vm_rss_kib(pid) / 1024
                    during = await client_seconds(session, url, token)
                    for writer in writers:
                        writer.close()
                    await asyncio.sleep(config.CREDENTIALS_LIMITS.head_seconds + 1)  # every attacker gone
                    after = vm_rss_kib(pid) / 1024
                    per_connection_kb = max(0.0, peak - idle_rss) * 1024 / connections
                    rows.append((name, peak, per_connection_kb, during * 1000, after))
                    results[name] = {"rss_mb": peak, "per_connection_kb": per_connection_kb,
                                     "client_ms": during * 1000, "rss_after_mb": after}
    print(f"\nirsa-cache under {connections} hostile connections (cap --max-connections {connections}, "
          f"head {config.CREDENTIALS_LIMITS.max_head_bytes} bytes / {config.CREDENTIALS_LIMITS.head_seconds:g} s)\n")
    print(f"  {'attack':<11} {'RSS MB':>7} {'KB/conn':>8} {'client ms':>10} {'RSS after':>10}")
    print(f"  {'(idle)':<11} {idle_rss:>7.1f} {'':>8} {idle_client * 1000:>10.1f} {'':>10}")
    for name, peak, per, client, after in rows:
        print(f"  {name:<11} {peak:>7.1f} {per:>8.1f} {client:>10.1f} {after:>10.1f}")
    worst = max(per for _, _, per, _, _ in rows)
    print(f"\n  worst case: {worst:.1f} KB per connection: {connections} connections cost at most "
          f"{worst * connections / 1024:.0f} MB above idle")
    results["worst_per_connection_kb"] = worst
    out = ROOT / "bench" / "results" / "hostile_connections.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=config.CREDENTIALS_LIMITS.max_connections)
    parser.add_argument("--hold", type=float, default=2.0, help="seconds each attack is held before measuring")
    args = parser.parse_args()
    asyncio.run(run(args.connections, args.hold))


if __name__ == "__main__":
    main()
