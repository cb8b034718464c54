"""A transparent relay that records what an HTTP client asks of the daemon.

Real SDK clients do not say how many requests they made or when they gave up on one.
Put between such a client and the daemon's credentials address, this relay passes the
bytes through as they come and notes, per request: when its head arrived, the status of
its answer and when that was complete, or that none came before the client hung up.
The one change it makes is the `Host` header, rewritten to name the daemon's address (a
pod reaching the daemon directly sends that; the daemon refuses any other host).

A client that closes its connection gets the relay's connection to the daemon closed
too, so the daemon sees what the client did: a held caller that gives up is, for the
daemon, a caller that went away.

Only what the SDKs' container providers send is understood: GET requests without a
body, answered with a Content-Length. Loopback only; the relay stops with `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from dataclasses import dataclass

_HEAD_END = b"\r\n\r\n"
_HOST_LINE = re.compile(rb"\r\nhost:[^\r\n]*", re.IGNORECASE)
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_READ_BYTES = 64 * 1024


@dataclass
class Request:
    """One request a client made, in loop time."""

    started: float  # its head had arrived
    head: bytes = b""  # as relayed to the daemon (Host rewritten), blank line included
    status: int | None = None  # None: no answer before the connection closed (the client gave up)
    answered: float | None = None  # the whole answer had passed through

    @property
    def seconds(self) -> float | None:
        return None if self.answered is None else self.answered - self.started


class ClientTap:
    """Listens on a free loopback port and relays every connection to `upstream` (HOST:PORT)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._host_line = b"\r\nHost: " + upstream.encode()
        self.requests: list[Request] = []
        self.address = ""
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def credentials_url(self) -> str:
        return f"http://{self.address}/v1/credentials"

    async def start(self) -> ClientTap:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # stop(): the connection is closed, nothing is left to record
        finally:
            self._connections.discard(task)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        writers = [client_writer]
        pumps: set[asyncio.Task[None]] = set()
        try:
            daemon_reader, daemon_writer = await asyncio.open_connection(*self._upstream)
            writers.append(daemon_writer)
            waiting: deque[Request] = deque()  # asked, not yet answered, in order
            pumps = {
                asyncio.create_task(self._requests(client_reader, daemon_writer, waiting)),
                asyncio.create_task(self._answers(daemon_reader, client_writer, waiting)),
            }
            # Whichever side closes, close the other: the daemon must see a client leave.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass  # the daemon is not there: the client sees its connection closed
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in writers:  # before any await: a cancelled relay still closes both
                writer.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pumps, return_exceptions=True)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        waiting: deque[Request]) -> None:
        loop = asyncio.get_running_loop()
        pending = b""
        with contextlib.suppress(OSError):
            while data := await reader.read(_READ_BYTES):
                pending += data
                while _HEAD_END in pending:
                    head, _, pending = pending.partition(_HEAD_END)
                    relayed = _HOST_LINE.sub(lambda _: self._host_line, head, count=1) + _HEAD_END
                    request = Request(started=loop.time(), head=relayed)
                    self.requests.append(request)
                    waiting.append(request)
                    writer.write(relayed)
                await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       waiting: deque[Request]) -> None:
        loop = asyncio.get_running_loop()
        parsed = b""  # what has passed through but is not yet a whole answer
        with contextlib.suppress(OSError):
            while data := await reader.read(_READ_BYTES):
                writer.write(data)
                await writer.drain()
                parsed += data
                while _HEAD_END in parsed:
                    head, _, rest = parsed.partition(_HEAD_END)
                    length = _CONTENT_LENGTH.search(head)
                    body_bytes = int(length.group(1)) if length else 0
                    if len(rest) < body_bytes:
                        break  # the rest of the body is still on its way
                    parsed = rest[body_bytes:]
                    status = _STATUS_LINE.match(head)
                    if waiting:
                        request = waiting.popleft()
                        request.status = int(status.group(1)) if status else 0
                        request.answered = loop.time()
