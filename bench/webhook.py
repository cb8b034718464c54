"""Webhook benchmark: what one `irsa-cache webhook` replica costs, and how fast it answers.

It starts the webhook as deployed (`python -m daemon webhook`, its own process, TLS
with a certificate made here) against the Kubernetes API double of the tests, which
serves the pod's ServiceAccount; then it sends AdmissionReview requests for a
two-container pod over HTTPS, each answered with a JSONPatch, and reports:

- admissions per second and p50/p99 latency, ServiceAccount read included;
- CPU time of the webhook process per admission (from /proc/<pid>/stat);
- resident memory (VmRSS) idle and after the run.

The client and the API double share the machine with the webhook, so latency under
concurrency is the machine's as much as the webhook's; the sequential run (-c 1) is
the cleaner figure. All traffic stays on 127.0.0.1.

    python bench/webhook.py [-n 3000] [-c 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from daemon.embedded import cpu_seconds, free_port, vm_rss_kib  # noqa: E402
from daemon.stats import nearest_rank  # noqa: E402
from tests.certificates import authority, install, issue  # noqa: E402
from tests.k8s_double import K8sApiDouble  # noqa: E402
from tests.test_webhook import admission_review  # noqa: E402
from tests.webhook_cases import account, admitted, container, template  # noqa: E402


async def run(admissions: int, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        ca = authority()
        cert, key = install(issue(ca), directory / "tls")
        k8s = await K8sApiDouble().start()
        k8s.create(account())
        port, metrics_port = free_port(), free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "webhook", "--listen", f"127.0.0.1:{port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--tls-cert", str(cert), "--tls-key", str(key),
             "--kubeconfig", str(k8s.write_kubeconfig(directory / "kubeconfig")), "--log-level", "warning"],
            cwd=ROOT)
        try:
            connector = aiohttp.TCPConnector(ssl=ca.client_context(), limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(200):
                    try:
                        async with session.get(f"http://127.0.0.1:{metrics_port}/readyz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError("the webhook did not become ready")
                await asyncio.sleep(1)
                idle = vm_rss_kib(process.pid) / 1024
                pod = admitted(template(container("app"), container("sidecar")))
                latencies: list[float] = []
                gate = asyncio.Semaphore(concurrency)

                async def admit() -> None:
                    async with gate:
                        started = time.perf_counter()
                        async with session.post(f"https://127.0.0.1:{port}/mutate",
                                                json=admission_review(pod)) as response:
                            answer = await response.json()
                        latencies.append(time.perf_counter() - started)
                        if "patch" not in answer["response"]:
                            raise RuntimeError(f"no patch: {answer}")

                cpu_before = cpu_seconds(process.pid)
                started = time.perf_counter()
                await asyncio.gather(*(admit() for _ in range(admissions)))
                wall = time.perf_counter() - started
                cpu = cpu_seconds(process.pid) - cpu_before
                return {
                    "admissions": admissions, "concurrency": concurrency,
                    "per_second": round(admissions / wall),
                    "p50_ms": round(nearest_rank(latencies, 0.5) * 1000, 1),  # type: ignore[operator]
                    "p99_ms": round(nearest_rank(latencies, 0.99) * 1000, 1),  # type: ignore[operator]
                    "cpu_ms_per_admission": round(cpu * 1000 / admissions, 2),
                    "rss_idle_mb": round(idle, 1), "rss_after_mb": round(vm_rss_kib(process.pid) / 1024, 1),
                    "service_account_reads": k8s.count("get"),
                }
        finally:
            process.terminate()
            process.wait(timeout=30)
            await k8s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--admissions", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.admissions, args.concurrency))))


if __name__ == "__main__":
    main()
