"""SIGTERM: readiness flips first, no new connections, every request under way (those
held for an STS exchange included) finishes or gets a clean answer, then exit 0."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from daemon.embedded import Background, Issuer, free_port
from tests.conftest import SUBJECT_A, StartDaemon, eventually, fetch
from tests.sts_double import StsDouble
from tests.test_listeners import answers, plain

BOUND_SECONDS = 30.0


async def until_connections(http: aiohttp.ClientSession, metrics_listen: str, count: int) -> None:
    """Until the daemon's gauge shows `count` credentials connections open (bounded)."""
    pattern = re.compile(r'^irsa_cache_connections\{listener="credentials"\} (\S+)$', re.MULTILINE)
    async with asyncio.timeout(BOUND_SECONDS):
        while True:
            async with http.get(f"http://{metrics_listen}/metrics") as response:
                found = pattern.search(await response.text())
            if found is not None and float(found.group(1)) >= count:
                return
            await asyncio.sleep(0.05)


async def test_sigterm_answers_every_request_in_flight_then_exits_0(
    issuer: Issuer, sts: StsDouble, tmp_path: Path
) -> None:
    subjects = [f"system:serviceaccount:batch:job-{n}" for n in range(16)]
    static = issuer.write_static_config(tmp_path, {"system:serviceaccount:batch:*": "arn:aws:iam::123456789012:role/b"})
    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    daemon = Background(
        [sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
         "--static-config", str(static), "--region", "us-east-1", "--sts-endpoint-url", sts.url],
        ready_url=f"http://{metrics_listen}/readyz", log_path=tmp_path / "daemon.log",
    )
    sts.delay_seconds = 2.0  # every request is held for its exchange when SIGTERM comes
    await asyncio.to_thread(daemon.__enter__)
    try:
        assert daemon.process is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_SECONDS)) as http:

            async def get(subject: str) -> int:
                async with http.get(f"http://{listen}/v1/credentials",
                                    headers={"Authorization": issuer.mint(subject)}) as response:
                    await response.read()
                    return response.status

            in_flight = [asyncio.create_task(get(subject)) for subject in subjects]
            await until_connections(http, metrics_listen, len(subjects))  # every request is at the daemon
            await asyncio.sleep(0.2)
            daemon.process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            await asyncio.sleep(0.2)

            async with http.get(f"http://{metrics_listen}/readyz") as response:  # readiness flipped first
                assert response.status == 503
                assert "draining" in await response.text()
            with pytest.raises(aiohttp.ClientConnectionError):  # no new connections
                await get(SUBJECT_A)
            statuses = await asyncio.gather(*in_flight)

        assert statuses == [200] * 16
        code = await asyncio.to_thread(daemon.process.wait, 25)
        assert code == 0
        assert time.monotonic() - stopped_at < 20 + 2  # within the drain deadline
    finally:
        await asyncio.to_thread(daemon.__exit__)
    log = (tmp_path / "daemon.log").read_text()
    assert "stopping on signal" in log and "drained" in log


async def test_callers_held_past_the_drain_deadline_get_a_clean_503(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await start_daemon()
    sts.delay_seconds = 10.0  # the exchanges outlast the drain
    held = [asyncio.create_task(fetch(http, daemon, issuer.mint(f"system:serviceaccount:batch:job-{n}")))
            for n in range(8)]
    await asyncio.sleep(0.5)
    started = time.monotonic()

    await asyncio.wait_for(daemon.drain(2.0), BOUND_SECONDS)
    answers = await asyncio.wait_for(asyncio.gather(*held), BOUND_SECONDS)

    assert time.monotonic() - started < 2.5
    for answer in answers:
        assert answer.status == 503 and answer.content_type == "application/json"
        assert answer.body["code"] == "overloaded"
        assert "shutting down" in answer.body["message"]
        assert answer.headers["Retry-After"] == "1"


async def test_a_caller_with_still_valid_credentials_gets_them_at_the_drain_deadline(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    from tests.conftest import FakeClock

    clock = FakeClock(time.time())
    daemon = await start_daemon("--refresh-wait", "20", "--request-hold", "20", clock=clock)
    token = issuer.mint(SUBJECT_A)
    first = await fetch(http, daemon, token)
    clock.advance(3600 - 900)  # under the floor: this caller would wait for the refresh
    sts.delay_seconds = 10.0
    held = asyncio.create_task(fetch(http, daemon, token))
    await asyncio.sleep(0.5)

    await daemon.drain(1.5)
    answer = await asyncio.wait_for(held, BOUND_SECONDS)

    assert answer.status == 200 and answer.body["AccessKeyId"] == first.body["AccessKeyId"]


async def test_draining_closes_keep_alive_connections_after_their_answer(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble
) -> None:
    """A keep-alive client must not keep asking a daemon on its way out: the idle
    connection closes at once, the busy one right after its answer."""
    daemon = await start_daemon()
    host, port = daemon.listen[0].host, daemon.listen[0].port

    idle_reader, idle_writer = await asyncio.open_connection(host, port)
    idle_writer.write(plain(daemon, issuer.mint(SUBJECT_A)))
    (head, _), = await answers(idle_reader, 1)  # the whole answer; the connection stays open
    assert head.startswith(b"HTTP/1.1 200")
    sts.delay_seconds = 1.0
    busy_reader, busy_writer = await asyncio.open_connection(host, port)
    busy_writer.write(plain(daemon, issuer.mint("system:serviceaccount:batch:slow")))
    await eventually(lambda: len(sts.assume_calls) == 2)  # the busy one is held for STS

    draining = asyncio.create_task(daemon.drain(10.0))
    assert await asyncio.wait_for(idle_reader.read(), 2.0) == b""  # closed by the daemon, not by us
    answer = await asyncio.wait_for(busy_reader.read(), BOUND_SECONDS)  # whole answer, then the close
    await asyncio.wait_for(draining, BOUND_SECONDS)

    assert answer.startswith(b"HTTP/1.1 200") and b'"AccessKeyId"' in answer
    for writer in (idle_writer, busy_writer):
        writer.close()
