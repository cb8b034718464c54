"""Zero-gap upgrades: a generation hands its listening sockets and its cache to the next.

Real processes on one loopback address: A serves 20 identities warm, a loop of
concurrent callers runs throughout, B starts on the same address and handoff socket,
A gets SIGTERM once B is ready; then B to C. No request fails, STS sees nothing, and C
answers with the credentials A got. Then every degraded case of the handoff ends in a
cold start within its bound, and never in a failure to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest

from daemon import config, handoff
from daemon.embedded import Background, Issuer, free_port
from tests.conftest import FakeClock, StartDaemon, eventually, fetch, metric
from tests.sts_double import StsDouble

SUBJECTS = [f"system:serviceaccount:batch:job-{n}" for n in range(20)]
ROLE = "arn:aws:iam::123456789012:role/batch"
BOUND_SECONDS = 60.0


@dataclass
class Node:
    """What every generation on one node shares: addresses, the handoff socket, the config."""

    tmp: Path
    static: Path
    sts_url: str
    listen: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    metrics_listen: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")

    @property
    def handoff_socket(self) -> Path:
        return self.tmp / "run" / "handoff.sock"

    def generation(self, name: str, *extra: str) -> Background:
        status = self.tmp / f"status-{name}"
        status.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "daemon", "serve", "--listen", self.listen, "--metrics-listen",
                self.metrics_listen, "--static-config", str(self.static), "--region", "us-east-1",
                "--sts-endpoint-url", self.sts_url, "--handoff-socket", str(self.handoff_socket),
                "--status-dir", str(status), *extra]
        # Ready is the generation's own status file: the shared metrics socket may answer for another.
        return Generation(argv, ready_file=status / "ready", log_path=self.tmp / f"{name}.log")


class Generation(Background):
    def __init__(self, argv: list[str], *, ready_file: Path, log_path: Path) -> None:
        super().__init__(argv, ready_url="", log_path=log_path)
        self.ready_file = ready_file

    def __enter__(self) -> Generation:
        self._log = open(self.log_path, "wb")  # type: ignore[arg-type]  # noqa: SIM115
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; the exit status and how long the drain took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, time.monotonic() - started

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def node(tmp_path: Path, issuer: Issuer, sts: StsDouble) -> Node:
    (tmp_path / "run").mkdir(mode=0o700)
    static = issuer.write_static_config(tmp_path, {"system:serviceaccount:batch:*": ROLE})
    return Node(tmp=tmp_path, static=static, sts_url=sts.url)


@dataclass
class Traffic:
    """What callers that never stop asking (as a busy node's pods do) saw."""

    requests: int = 0
    failures: list[str] = field(default_factory=list)
    keys: Counter[tuple[str, str]] = field(default_factory=Counter)  # (subject, AccessKeyId)


async def ask_until(url: str, tokens: dict[str, str], stop: asyncio.Event, seen: Traffic, workers: int = 16) -> None:
    # A new connection for every request, as the SDKs' credential fetches make them.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def one(rng: random.Random) -> None:
            while not stop.is_set():  # bounded: the test sets it
                subject = rng.choice(SUBJECTS)
                try:
                    async with session.get(url, headers={"Authorization": tokens[subject]}) as response:
                        body = await response.json(content_type=None)
                        seen.requests += 1
                        if response.status == 200:
                            seen.keys[(subject, body["AccessKeyId"])] += 1
                        else:
                            seen.failures.append(f"{response.status} {body}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    seen.requests += 1
                    seen.failures.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.002)

        await asyncio.gather(*(one(random.Random(n)) for n in range(workers)))


async def test_two_rollouts_lose_no_request_and_cost_sts_nothing(
    node: Node, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    tokens = {subject: issuer.mint(subject) for subject in SUBJECTS}
    url = f"http://{node.listen}/v1/credentials"
    generations = [await asyncio.to_thread(node.generation("a").__enter__)]
    stop = asyncio.Event()
    seen = Traffic()
    try:
        first = {}
        for subject in SUBJECTS:  # warm: every identity exchanged once, by A
            async with http.get(url, headers={"Authorization": tokens[subject]}) as response:
                first[subject] = (await response.json())["AccessKeyId"]
        calls_warm = len(sts.assume_calls)
        running = asyncio.create_task(ask_until(url, tokens, stop, seen))
        await asyncio.sleep(1.0)
        exits = []
        for name in ("b", "c"):  # each takes over its predecessor's sockets and cache, then it stops
            generations.append(await asyncio.to_thread(node.generation(name).__enter__))
            await asyncio.sleep(0.5)
            exits.append(await asyncio.to_thread(generations[-2].stop))
            await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(running, BOUND_SECONDS)
        from_c = {}
        for subject in SUBJECTS:  # only C is left
            async with http.get(url, headers={"Authorization": tokens[subject]}) as response:
                from_c[subject] = (await response.json())["AccessKeyId"]
    finally:
        stop.set()
        for generation in generations:
            await asyncio.to_thread(generation.__exit__)

    assert seen.requests > 500, seen.requests  # the callers really were asking throughout
    assert seen.failures == [], seen.failures[:5]
    assert [code for code, _ in exits] == [0, 0]  # predecessors exit 0, within the drain
    assert all(drain < config.DRAIN_SECONDS + 2 for _, drain in exits)
    assert len(sts.assume_calls) == calls_warm  # neither rollout cost STS a call
    assert from_c == first  # C answers with A's credentials: handed over twice, never exchanged again
    assert {key for _, key in seen.keys} == set(first.values())
    a, b, c = generations
    assert any("took over 20 entries" in str(line.get("message")) for line in a.lines())
    assert any("took over 20 entries" in str(line.get("message")) for line in b.lines())
    assert any("20 cached identities taken over" in str(line.get("message")) for line in c.lines())


# --- in process: what exactly crosses, and the degraded cases ---


def handoff_args(path: Path) -> tuple[str, ...]:
    return ("--handoff-socket", str(path))


async def test_the_successor_keeps_the_refresh_schedule_tokens_and_refusals(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "run" / "handoff.sock"
    path.parent.mkdir()
    clock = FakeClock(time.time())
    a = await start_daemon(*handoff_args(path), clock=clock)
    tokens = {subject: issuer.mint(subject) for subject in SUBJECTS[:5]}
    for token in tokens.values():
        assert (await fetch(http, a, token)).status == 200
    sts.fail_with("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", status=403)
    denied = issuer.mint("system:serviceaccount:team-a:app")
    assert (await fetch(http, a, denied)).status == 403
    calls = len(sts.assume_calls)

    b = await start_daemon(*handoff_args(path), clock=clock, adjust=same_addresses(a))

    await eventually(lambda: a.cache._retired)  # once A has B's "done", moments after B is up
    assert not b.cache._retired  # the successor refreshes now, the predecessor does not
    for key, entry in a.cache._entries.items():
        received = b.cache._entries[key]
        assert received.refresh_at == entry.refresh_at and received.last_used == entry.last_used
        assert received.credentials == entry.credentials
        assert received.token is not None and received.token.raw == entry.token.raw  # type: ignore[union-attr]
    refused = await fetch(http, b, denied)  # remembered across the handoff: STS is not asked
    assert refused.status == 403 and "AccessDenied" in refused.body["message"]
    assert len(sts.assume_calls) == calls
    # The refresh happens where the schedule said, in B; A, retired, starts none.
    sts.heal()
    clock.advance(3600 * 0.6)
    a.cache.maintain()
    b.cache.maintain()
    for _ in range(100):  # bounded: until B's five refreshes are answered
        if sum(1 for entry in b.cache._entries.values() if entry.exchange is None) == 5 and len(
                sts.assume_calls) - calls >= 5:
            break
        await asyncio.sleep(0.1)
    refreshes = [call for call in sts.assume_calls[calls:] if call.action == "AssumeRoleWithWebIdentity"]
    assert len(refreshes) == 5
    assert metric("irsa_cache_handoff_entries_total", direction="received") >= 5


def same_addresses(predecessor: object) -> Callable[[config.Settings], config.Settings]:
    import dataclasses

    def adjust(settings: config.Settings) -> config.Settings:
        server = dataclasses.replace(settings.server, listen=tuple(predecessor.listen),  # type: ignore[attr-defined]
                                     metrics_listen=predecessor.metrics_listen)  # type: ignore[attr-defined]
        return dataclasses.replace(settings, server=server)

    return adjust


class FakePredecessor:
    """A unix socket at the handoff path that misbehaves as told."""

    def __init__(self, path: Path, behaviour: str) -> None:
        self.path = path
        self.behaviour = behaviour
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.connections: list[socket.socket] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.server.setblocking(False)
        connection, _ = await loop.sock_accept(self.server)
        self.connections.append(connection)
        if self.behaviour == "garbage":
            await loop.sock_sendall(connection, b"\xff" * 100 + b"HTTP/1.1 200 OK\r\n\r\n")
        elif self.behaviour == "huge-frame":
            await loop.sock_sendall(connection, struct.pack(">I", 2**31) + b"{")
        elif self.behaviour == "version":
            await loop.sock_recv(connection, 65536)
            body = json.dumps({"error": "wire version 1 unknown; this one speaks 2"}).encode()
            await loop.sock_sendall(connection, struct.pack(">I", len(body)) + body)
        elif self.behaviour == "silent":
            await asyncio.Event().wait()  # accepts, never answers

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.server.close()


@pytest.mark.parametrize("behaviour", ["garbage", "huge-frame", "version", "silent"])
async def test_a_broken_predecessor_means_a_cold_start_within_the_bound(
    start_daemon: StartDaemon, issuer: Issuer, http: aiohttp.ClientSession, tmp_path: Path, behaviour: str
) -> None:
    path = tmp_path / "run" / "handoff.sock"
    path.parent.mkdir()
    fake = FakePredecessor(path, behaviour)
    serving = asyncio.create_task(fake.run())
    started = time.monotonic()
    failed = metric("irsa_cache_handoffs_total", role="successor", outcome="failed")
    try:
        daemon = await asyncio.wait_for(start_daemon(*handoff_args(path)), BOUND_SECONDS)
        elapsed = time.monotonic() - started
    finally:
        serving.cancel()
        fake.close()

    assert elapsed < config.HANDOFF_SECONDS + 3
    assert (await fetch(http, daemon, issuer.mint(SUBJECTS[0]))).status == 200
    assert metric("irsa_cache_handoffs_total", role="successor", outcome="failed") == failed + 1
    # And it listens for its own successor at the same path.
    assert path.exists() and os.stat(path).st_mode & 0o777 == 0o600


async def test_no_predecessor_or_a_stale_socket_is_a_cold_start_at_once(
    start_daemon: StartDaemon, issuer: Issuer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "run" / "handoff.sock"
    path.parent.mkdir()
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))
    left.close()  # a socket file whose process is gone
    started = time.monotonic()

    daemon = await start_daemon(*handoff_args(path))

    assert time.monotonic() - started < 3
    assert (await fetch(http, daemon, issuer.mint(SUBJECTS[0]))).status == 200


async def test_a_predecessor_under_another_uid_is_refused(
    start_daemon: StartDaemon, issuer: Issuer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run the impostor under another uid")
    shared = Path(tempfile.mkdtemp(prefix="irsa-cache-impostor-", dir="/tmp"))  # pytest's tmp is root's alone
    os.chmod(shared, 0o777)
    path = shared / "handoff.sock"
    # An impostor, uid 65534, that would hand over a socket of its own to whoever asks.
    python = "/usr/bin/python3"  # the project's venv may be unreadable to uid 65534
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is needed to run the impostor")
    impostor = subprocess.Popen([python, "-c", IMPOSTOR, str(path)], preexec_fn=lambda: os.setuid(65534), cwd="/")
    try:
        for _ in range(200):  # bounded: until it listens
            if path.exists():
                break
            await asyncio.sleep(0.05)
        assert path.exists(), "the impostor did not start"
        failed = metric("irsa_cache_handoffs_total", role="successor", outcome="failed")
        daemon = await start_daemon(*handoff_args(path))
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(shared, ignore_errors=True)
    assert metric("irsa_cache_handoffs_total", role="successor", outcome="failed") == failed + 1
    assert daemon.listen[0].port != 0 and all(l.sock.getsockname()[1] == daemon.listen[0].port
                                              for l in daemon.credentials)
    assert (await fetch(http, daemon, issuer.mint(SUBJECTS[0]))).status == 200


IMPOSTOR = """
import json, socket, struct, sys
server = socket.socket(socket.AF_UNIX); server.bind(sys.argv[1]); server.listen(1)
connection, _ = server.accept()
connection.recv(65536)
bait = socket.socket(); bait.bind(("127.0.0.1", 0)); bait.listen(1)
body = json.dumps({"sockets": [{"role": "credentials", "address": list(bait.getsockname())}]}).encode()
socket.send_fds(connection, [struct.pack(">I", len(body)) + body], [bait.fileno()])
connection.recv(65536)
"""


async def test_the_first_upgrade_from_a_release_without_handoff_cannot_surge(
    node: Node, issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    """0.1.0 holds the port without sharing it: a surge successor exits 2 saying so; the
    one-time path (the old pod first, maxSurge 0) starts cold, and every later upgrade surges."""
    url = f"http://{node.listen}/v1/credentials"
    old = Generation([*node.generation("old").argv, "--handoff-socket", ""], ready_file=node.tmp / "status-old" / "ready",
                     log_path=node.tmp / "old.log")
    await asyncio.to_thread(old.__enter__)
    try:
        surge = await asyncio.to_thread(subprocess.run, node.generation("b").argv, capture_output=True, text=True,
                                        timeout=BOUND_SECONDS)
        assert surge.returncode == 2
        assert f"port {node.listen.rpartition(':')[2]} is already in use" in surge.stderr
        assert "Traceback" not in surge.stderr
        code, _ = await asyncio.to_thread(old.stop)  # the one-time path: the old one goes first
        assert code == 0
    finally:
        await asyncio.to_thread(old.__exit__)
    b = await asyncio.to_thread(node.generation("b").__enter__)
    try:
        async with http.get(url, headers={"Authorization": issuer.mint(SUBJECTS[0])}) as response:
            assert response.status == 200
        c = await asyncio.to_thread(node.generation("c").__enter__)  # and from now on, upgrades surge
        await asyncio.to_thread(c.__exit__)
        assert any("cached identities taken over" in str(line.get("message")) for line in c.lines())
    finally:
        await asyncio.to_thread(b.__exit__)


async def test_a_successor_that_syncs_before_confirming_still_retires_the_predecessor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The successor says "done" only once it serves, which may follow a directory sync
    far longer than the handoff's own bound: the predecessor must wait for it, or both
    generations would go on refreshing and answering metrics."""
    monkeypatch.setattr(config, "HANDOFF_SECONDS", 0.3)  # the exchange's bound, not the confirmation's
    path = tmp_path / "handoff.sock"
    listening = socket.create_server(("127.0.0.1", 0))
    retired = asyncio.Event()
    predecessor = handoff.Predecessor(path=path, sockets=[("credentials", listening)], snapshot=lambda: ([], []),
                                      on_handed_over=retired.set)
    predecessor.start()
    try:
        inheritance = await asyncio.to_thread(handoff.inherit, path)
        assert inheritance is not None
        await asyncio.sleep(1.0)  # syncing, more than three times the exchange's bound
        await asyncio.to_thread(inheritance.confirm)
        await asyncio.wait_for(retired.wait(), 5)
        for _, _, inherited in inheritance.sockets:
            inherited.close()
    finally:
        predecessor.close()
        listening.close()


def _descriptors_of(sock: socket.socket) -> int:
    """How many of our descriptors refer to the socket `sock` refers to (dups included)."""
    target = os.readlink(f"/proc/self/fd/{sock.fileno()}")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass  # the listing's own descriptor, gone by now
    return count


def inherit_from_bad_predecessor(tmp_path: Path, baits: list[socket.socket],
                                 offer: Callable[[socket.socket, list[int]], None]) -> list[int]:
    """`handoff.inherit` from a predecessor that answers the hello with `offer(connection,
    the baits' descriptors)`; must start cold. Returns how many descriptors of ours refer to
    each bait afterwards: 1, the bait itself, unless the successor kept a copy."""
    path = tmp_path / "handoff.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def predecessor() -> None:
        connection, _ = server.accept()
        with connection, contextlib.suppress(ConnectionError):  # the successor may hang up first
            handoff._receive(connection)  # the hello
            offer(connection, [bait.fileno() for bait in baits])

    thread = threading.Thread(target=predecessor)
    thread.start()
    try:
        with mock.patch.object(config, "HANDOFF_SECONDS", 2):
            assert handoff.inherit(path) is None
        gc.collect()  # a socket object left behind closes its descriptor now, warning
    finally:
        thread.join(5)
        server.close()
    copies = [_descriptors_of(bait) for bait in baits]
    for bait in baits:
        bait.close()
    return copies


@pytest.mark.parametrize("frame", [struct.pack(">I", 3) + b"[1]", struct.pack(">I", 100) + b'{"sockets":'],
                         ids=["json-not-an-object", "cut-short"])
def test_descriptors_that_come_with_a_broken_frame_are_closed(tmp_path: Path, frame: bytes) -> None:
    baits = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    copies = inherit_from_bad_predecessor(tmp_path, baits, lambda connection, fds: socket.send_fds(connection, [frame], fds))
    assert copies == [1, 1, 1]


def test_a_bad_socket_description_closes_each_descriptor_once(tmp_path: Path) -> None:
    """The first socket described well, the second not: nothing is taken, each descriptor
    received is closed once (a second close could hit a number reused meanwhile)."""
    baits = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    described = {"sockets": [{"role": "credentials", "address": ["127.0.0.1", 80]},
                             {"role": "metrics", "address": "oops"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copies = inherit_from_bad_predecessor(tmp_path, baits,
                                              lambda connection, fds: handoff._send(connection, described, fds))

    assert copies == [1, 1]
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "a socket left for its finalizer"


def a_state() -> dict[str, Any]:
    """What a predecessor sends for one entry with credentials and a token, as JSON would carry it."""
    from datetime import datetime, timezone

    from daemon.cache import EntryState
    from daemon.models import CacheKey, Credentials, Identity, VerifiedToken

    identity = Identity(issuer="https://issuer.test", subject="system:serviceaccount:ns:app", audience="sts.amazonaws.com")
    entry = EntryState(
        key=CacheKey.of("arn:aws:iam::123456789012:role/app", identity),
        credentials=Credentials(access_key_id="ASIA", secret_access_key="s", session_token="t",
                                expiration=datetime(2030, 1, 1, tzinfo=timezone.utc), account_id="123456789012",
                                assumed_role_arn="arn:aws:sts::123456789012:assumed-role/app/ns.app"),
        token=VerifiedToken(identity=identity, raw="a.b.c", expires_at=1.9e9, fingerprint="f"),
        last_used=1.0, refresh_at=2.0, retry_at=0.0, failures=0)
    return json.loads(json.dumps(handoff.encode_state([entry], [])))


@pytest.mark.parametrize("corrupt", [
    lambda state: state["entries"][0]["credentials"].update(expiration=1e300),
    lambda state: state["entries"][0]["token"].update(identity=["not", "a", "mapping"]),
    lambda state: state["entries"][0].update(failures=float("inf")),
], ids=["expiration-past-any-date", "identity-a-list", "failures-infinite"])
def test_a_state_that_does_not_decode_is_refused_not_raised(corrupt: Callable[[dict[str, Any]], None]) -> None:
    state = a_state()
    assert len(handoff.decode_state(state)[0]) == 1
    corrupt(state)

    with pytest.raises(handoff.HandoffError, match="does not decode"):
        handoff.decode_state(state)


@pytest.mark.parametrize("offered", ["bound elsewhere", "not listening"])
def test_a_socket_that_is_not_what_its_description_says_is_refused(tmp_path: Path, offered: str) -> None:
    """The successor serves on what it takes over: a socket bound to another address than
    described, or one not listening, would put it where nobody configured it."""
    if offered == "bound elsewhere":
        baits = [socket.create_server(("127.0.0.1", 0))]
        elsewhere = baits[0].getsockname()[1] + 1
        described = {"sockets": [{"role": "credentials", "address": ["127.0.0.1", elsewhere]}]}
    else:
        baits = [socket.socket(socket.AF_INET, socket.SOCK_STREAM)]
        baits[0].bind(("127.0.0.1", 0))
        described = {"sockets": [{"role": "credentials", "address": ["127.0.0.1", baits[0].getsockname()[1]]}]}

    copies = inherit_from_bad_predecessor(tmp_path, baits,
                                          lambda connection, fds: handoff._send(connection, described, fds))

    assert copies == [1]
