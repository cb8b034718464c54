"""The shortcut that answers cached credentials straight from a request head: it answers
exactly what the full way would, counts and audits the same, and leaves everything else
(errors, bodies, connection options, odd heads) to aiohttp, over real sockets.

Which way answered is visible in one place: aiohttp puts a Server header on every
answer it writes, the shortcut none. Each test that relies on it checks both sides."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import aiohttp
import pytest
from aiohttp import web

from daemon import listeners
from daemon.app import RunningDaemon
from daemon.config import CREDENTIALS_LIMITS, Address
from daemon.server import raw_error_response
from daemon.embedded import Issuer
from daemon.shortcut import OkHead, plain_get, request_line
from tests.conftest import SUBJECT_A, SUBJECT_B, StartDaemon, eventually, fetch, metric
from tests.sts_double import StsDouble
from tests.test_listeners import BOUND_SECONDS, answers, limits, plain, served_within

LINE = request_line("/v1/credentials")
MAX_FIELD = CREDENTIALS_LIMITS.max_field_bytes
AUDIT = "irsa_cache.audit"


def by_shortcut(head: bytes) -> bool:
    assert head.startswith(b"HTTP/1."), head[:40]
    return b"\r\nServer:" not in head


async def cached_and_connected(
    http: aiohttp.ClientSession, daemon: RunningDaemon, issuer: Issuer
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """A token whose credentials are cached, and a new connection to send it on."""
    token = issuer.mint(SUBJECT_A)
    await verified_and_cached(http, daemon, token)
    address = daemon.listen[0]
    reader, writer = await asyncio.open_connection(address.host, address.port)
    return token, reader, writer


async def verified_and_cached(http: aiohttp.ClientSession, daemon: RunningDaemon, token: str) -> dict[str, str]:
    """One request the full way: the token is verified and the credentials cached."""
    first = await fetch(http, daemon, token)
    assert first.status == 200, first.body
    assert "Server" in first.headers  # aiohttp answered: a new token is verified the full way
    return first.body


# --- the head reader ---


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(b"Host: h:1\r\nAuthorization: tok", id="minimal"),
        pytest.param(b"host:h:1\r\nauthorization:  tok \t", id="lower-case-no-space-trailing-whitespace"),
        pytest.param(b"Host: h:1\r\nUser-Agent: Boto3/1.43 md/Botocore#1.43\r\nAccept: */*\r\n"
                     b"Accept-Encoding: gzip, deflate\r\nConnection: Keep-Alive\r\nAuthorization: tok",
                     id="what-sdks-send"),
    ],
)
def test_a_plain_head_is_read(fields: bytes) -> None:
    assert read(LINE + fields + b"\r\n\r\n") == ("h:1", "tok")


def read(head: bytes) -> tuple[str, str] | None:
    return plain_get(head, LINE, max_headers=CREDENTIALS_LIMITS.max_headers, max_field_bytes=MAX_FIELD)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HEAD /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\n\r\n", id="HEAD"),
        pytest.param(b"GET /v1/credentials HTTP/1.0\r\nHost: h\r\nAuthorization: t\r\n\r\n", id="HTTP/1.0"),
        pytest.param(b"GET /v1/credentials?x=1 HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\n\r\n", id="query"),
        pytest.param(b"GET http://h/v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\n\r\n",
                     id="absolute-form"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\n\r\n", id="no-authorization"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nAuthorization: t\r\n\r\n", id="no-host"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nAuthorization: u\r\n\r\n",
                     id="two-authorizations"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nHost: evil\r\nAuthorization: t\r\n\r\n",
                     id="two-hosts"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nContent-Length: 5\r\n\r\n",
                     id="content-length"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n", id="transfer-encoding"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nConnection: close\r\n\r\n",
                     id="connection-close"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n", id="upgrade"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nExpect: 100-continue\r\n\r\n",
                     id="expect"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\n X-Folded: yes\r\n\r\n",
                     id="obs-fold"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\nHost: h\nAuthorization: t\n\r\n\r\n", id="bare-LF"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nBad Name: x\r\n\r\n",
                     id="space-in-a-name"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\xff\r\n\r\n", id="not-ascii"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\x00\r\n\r\n", id="nul"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\n\r\n", id="no-headers"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\nAuthorization: t\r\n\r\n", id="bare-LF-in-a-field"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\n", id="not-whole"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\n"
                     + b"".join(b"X-%d: y\r\n" % n for n in range(31)) + b"\r\n", id="more-headers-than-aiohttp-takes"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t" + b" " * MAX_FIELD + b"x\r\n\r\n",
                     id="a-field-longer-than-aiohttp-takes"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nUser-Agent: a\r\n"
                     b"user-agent: b\r\n\r\n", id="a-repeated-header"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nSec-WebSocket-Key1: 1\r\n\r\n",
                     id="websocket-draft-key"),
        pytest.param(b"GET /v1/credentials HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nTE: trailers\r\n\r\n",
                     id="TE (what bench/hot_path.py's full way sends)"),
    ],
)
def test_any_other_head_takes_the_full_way(head: bytes) -> None:
    assert read(head) is None


def test_the_date_header_follows_the_clock() -> None:
    now = [1_700_000_000.2]
    head = OkHead(lambda: now[0])
    first = head(10)
    assert first.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n")
    assert b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n" in first
    now[0] += 1
    assert b"Date: Tue, 14 Nov 2023 22:13:21 GMT\r\n" in head(10)


# --- what it answers, over sockets ---


async def test_a_repeat_request_gets_the_same_credentials_counted_and_audited_the_same(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, sts: StsDouble,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    token = issuer.mint(SUBJECT_A)
    first = await verified_and_cached(http, daemon, token)
    hits, repeats = metric("irsa_cache_requests_total", code="200", outcome="hit"), metric(
        "irsa_cache_repeat_answers_total")
    cached = metric("irsa_cache_token_verifications_total", result="cached")
    assert len([r for r in caplog.records if r.name == AUDIT]) == 1

    address = daemon.listen[0]
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(plain(daemon, token) * 2)
    (head, body), (head2, body2) = await answers(reader, 2)
    writer.close()

    assert by_shortcut(head) and by_shortcut(head2)
    assert re.search(rb"\r\nContent-Type: application/json\r\n", head)  # exactly: the Go SDK checks it
    assert json.loads(body) == first and body2 == body
    assert metric("irsa_cache_requests_total", code="200", outcome="hit") == hits + 2
    assert metric("irsa_cache_repeat_answers_total") == repeats + 2
    assert metric("irsa_cache_token_verifications_total", result="cached") == cached + 2
    assert len([r for r in caplog.records if r.name == AUDIT]) == 1  # repeats: no line
    assert len(sts.assume_calls) == 1


async def test_a_new_token_of_a_cached_identity_is_an_issuance_with_its_audit_line(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    await verified_and_cached(http, daemon, issuer.mint(SUBJECT_A))
    rotated = issuer.mint(SUBJECT_A)  # the kubelet rotated the pod's token
    await verified_and_cached(http, daemon, rotated)
    lines = [r for r in caplog.records if r.name == AUDIT]

    address = daemon.listen[0]
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(plain(daemon, rotated))
    (head, _), = await answers(reader, 1)
    writer.close()

    assert by_shortcut(head)
    assert len([r for r in caplog.records if r.name == AUDIT]) == len(lines) == 2


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        pytest.param(("Connection: close",), 200, id="connection-close"),
        pytest.param(("X-Forwarded-For: 10.0.0.1", "X-Forwarded-For: 10.0.0.2"), 200, id="repeated-other-header"),
        # What aiohttp's parser refuses, the shortcut must not answer 200:
        pytest.param(("User-Agent: a", "User-Agent: b"), 400, id="repeated-singleton-header"),
        pytest.param(tuple(f"X-{n}: y" for n in range(40)), 400, id="40-headers"),
        pytest.param(("X-Padding: " + "p" * (MAX_FIELD + 1),), 431, id="a-field-over-the-limit"),
    ],
)
async def test_heads_it_does_not_read_are_answered_the_full_way(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, extra: tuple[str, ...], status: int,
) -> None:
    token, reader, writer = await cached_and_connected(http, daemon, issuer)

    writer.write(plain(daemon, token, *extra))
    (head, body), = await answers(reader, 1)
    writer.close()

    assert int(head.split()[1]) == status, body
    assert not by_shortcut(head)


async def test_a_refusal_is_never_a_shortcut_answer(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession,
) -> None:
    token = issuer.mint(SUBJECT_A)
    await verified_and_cached(http, daemon, token)
    address = daemon.listen[0]
    wrong_host = plain(daemon, token).replace(f"Host: {address}".encode(), b"Host: evil.example")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")  # never verified: a bad signature

    for request, status in ((wrong_host, 400), (plain(daemon, forged), 401)):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(request)
        (head, body), = await answers(reader, 1)
        writer.close()
        assert not by_shortcut(head)
        assert int(head.split()[1]) == status, body
        assert json.loads(body)["code"]


async def test_a_body_is_never_read_as_a_request(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession,
) -> None:
    # A request whose body is itself a plain credentials request: the head reader splits
    # on blank lines, but the body belongs to the first request, and gets no answer.
    token, reader, writer = await cached_and_connected(http, daemon, issuer)
    inner = plain(daemon, token)
    outer = (f"POST /v1/credentials HTTP/1.1\r\nHost: {daemon.listen[0]}\r\nContent-Length: {len(inner)}\r\n\r\n"
             .encode() + inner)
    writer.write(outer)

    (head, body), = await answers(reader, 1)
    assert head.split()[1] == b"405"
    # Then a real request on the same connection: answered (the full way from now on), once.
    writer.write(plain(daemon, token))
    (head, body), = await answers(reader, 1)
    assert head.split()[1] == b"200" and not by_shortcut(head)
    with pytest.raises(TimeoutError):  # nothing more: the body was not answered
        await asyncio.wait_for(reader.read(1), 0.3)
    writer.close()


async def test_pipelined_behind_a_full_way_request_the_answers_keep_their_order(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession,
) -> None:
    token, reader, writer = await cached_and_connected(http, daemon, issuer)
    nope = f"GET /nope HTTP/1.1\r\nHost: {daemon.listen[0]}\r\n\r\n".encode()

    writer.write(nope + plain(daemon, token) + nope + plain(daemon, token) + plain(daemon, token))

    got = await answers(reader, 5)
    writer.close()
    assert [head.split()[1] for head, _ in got] == [b"404", b"200", b"404", b"200", b"200"]


async def test_pipelined_behind_a_held_request_the_answers_keep_their_order(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession, sts: StsDouble,
) -> None:
    # The first request waits for STS (a new identity); the cached one behind it must not
    # overtake it.
    cached = issuer.mint(SUBJECT_A)
    await verified_and_cached(http, daemon, cached)
    sts.delay_seconds = 0.5
    address = daemon.listen[0]
    reader, writer = await asyncio.open_connection(address.host, address.port)

    writer.write(plain(daemon, issuer.mint(SUBJECT_B)) + plain(daemon, cached))

    (first, first_body), (second, second_body) = await answers(reader, 2)
    writer.close()
    assert json.loads(first_body)["AccessKeyId"] != json.loads(second_body)["AccessKeyId"]
    assert json.loads(second_body) == (await fetch(http, daemon, cached)).body


async def test_an_idle_connection_after_a_shortcut_answer_is_closed(
    start_daemon: StartDaemon, issuer: Issuer, http: aiohttp.ClientSession,
) -> None:
    daemon = await start_daemon(adjust=limits(idle_seconds=0.5))
    token, reader, writer = await cached_and_connected(http, daemon, issuer)
    writer.write(plain(daemon, token))
    (head, _), = await answers(reader, 1)
    assert by_shortcut(head)
    started = time.monotonic()

    assert await asyncio.wait_for(reader.read(), BOUND_SECONDS) == b""  # closed by the server

    assert time.monotonic() - started < 3
    writer.close()


async def test_a_flood_of_cached_requests_never_read_stays_bounded(
    daemon: RunningDaemon, issuer: Issuer, http: aiohttp.ClientSession,
) -> None:
    # The shortcut answers at once; once the client stops reading, answers back up, the
    # shortcut stands aside, and the connection is held (reading paused) or, with more than
    # two heads waiting, cut, like any other.
    token, reader, writer = await cached_and_connected(http, daemon, issuer)
    one = plain(daemon, token)
    for _ in range(20):  # about 20 MB offered, never read
        try:
            writer.write(one * 1_000)
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            break  # the server stopped reading: held
        except (ConnectionResetError, BrokenPipeError):
            break  # cut
    else:
        pytest.fail("the server kept reading requests whose answers were never read")

    await served_within(http, daemon, issuer, 1.0)
    writer.transport.abort()
    await eventually(lambda: metric("irsa_cache_connections", listener="credentials") <= 1,  # the client's pool
                     seconds=BOUND_SECONDS)


async def test_a_connection_in_use_is_kept_past_the_idle_bound(
    start_daemon: StartDaemon, issuer: Issuer, http: aiohttp.ClientSession,
) -> None:
    # Each shortcut answer starts the idle clock again, as an answer of aiohttp's does.
    daemon = await start_daemon(adjust=limits(idle_seconds=0.5))
    token, reader, writer = await cached_and_connected(http, daemon, issuer)

    for _ in range(6):  # 1.8 s in all, never 0.5 s idle
        writer.write(plain(daemon, token))
        (head, _), = await answers(reader, 1)
        assert by_shortcut(head) and head.split()[1] == b"200"
        await asyncio.sleep(0.3)
    writer.close()


async def test_a_shortcut_that_fails_leaves_the_request_to_aiohttp(caplog: pytest.LogCaptureFixture) -> None:
    # A bug in the shortcut must cost the caller nothing but the full way.
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="the full way")

    def broken(head: bytes) -> bytes | None:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/v1/credentials", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    (listener,) = await listeners.serve(name="credentials", runner=runner, sockets=[listeners.bind(
        Address("127.0.0.1", 0))], limits=CREDENTIALS_LIMITS, render=raw_error_response,
        shortcut=lambda limits: broken)
    try:
        reader, writer = await asyncio.open_connection(listener.address.host, listener.address.port)
        writer.write(b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\nAuthorization: t\r\n\r\n" * 2)
        got = await answers(reader, 2)
        writer.close()
        assert [body for _, body in got] == [b"the full way"] * 2
        assert "the shortcut failed" in caplog.text
    finally:
        listener.stop_accepting()
        listener.sock.close()
        await runner.cleanup()
