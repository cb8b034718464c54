"""Listening sockets and what a connection on them may cost.

Any pod on the node can open connections to the credentials address, and anything
that reaches the node can open them to the metrics address. So on both, whatever a
client sends:

- a request head (request line and headers) must be complete within
  `head_seconds` of the connection or of its first byte, and hold at most
  `max_head_bytes`: a client that trickles bytes, or sends none, or sends megabytes
  of headers, is answered 408 or 431 and closed;
- an idle keep-alive connection is closed after `idle_seconds`;
- at most `max_connections` are open at once. A new connection beyond that closes
  the oldest one not answering a request (a slow or idle client, which is how an
  attacker holds a connection), so that a legitimate client, which sends its
  request at once, is served; only when every connection is answering a request
  (held for STS) is the new one answered 503 with Retry-After and closed.

So memory and file descriptors stay bounded: `max_connections` x (`max_head_bytes`
+ a connection's own state). Refusals are counted, and logged at a bounded rate.

A listener may be given the app's shortcut (`shortcut.py`): a whole request head is
offered to it first, while aiohttp is idle on the connection (no request of its own
under way or queued, nothing of its answer unsent), and what it answers is written
at once; a head it declines goes to aiohttp. A connection that has sent a request
with a body, or asked for an upgrade, never takes the shortcut again: the head
reader splits on blank lines and knows nothing of bodies.

Built on aiohttp's request handler (a subclass: the hook that renders the parser's
own errors, `handle_error`, is not public; the aiohttp version is pinned and a test
covers it). Sockets are created here, not by aiohttp, so that bind errors become one
clear line and a successor can be handed the very same sockets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from daemon import metrics
from daemon.config import Address, ConnectionLimits
from daemon.logs import RateLimited
from daemon.shortcut import Shortcut, ShortcutFor

log = logging.getLogger(__name__)
refusals = RateLimited(log)

_HEAD_END = b"\r\n\r\n"
_BODY_OR_UPGRADE = re.compile(rb"\n(?:content-length|transfer-encoding|upgrade)[ \t]*:", re.IGNORECASE)
BACKLOG = 1024


def _handler_options(limits: ConnectionLimits) -> dict[str, Any]:
    return {
        "keepalive_timeout": limits.idle_seconds,
        "max_headers": limits.max_headers,
        "max_field_size": limits.max_field_bytes,
        "max_line_size": limits.max_line_bytes,
    }


class BindError(Exception):
    """A listen address cannot be bound; the message says what to do."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def bind(address: Address) -> socket.socket:
    """A listening TCP socket on `address`, or BindError saying why not in one line."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise BindError(f"{address}: {address.host!r} is not an address of this node ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_advice(address, exc), exc.errno) from None
    return sock


def _bind_advice(address: Address, exc: OSError) -> str:
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{address}: {address.host} is not an address of this node; run `irsa-cache init-network` to "
                f"add it (the DaemonSet's init container does), or use --listen 127.0.0.1:PORT")
    if exc.errno == errno.EADDRINUSE:
        return (f"{address}: port {address.port} is already in use on {address.host} (another credentials agent, "
                "such as the EKS Pod Identity Agent, or a second irsa-cache?)")
    if exc.errno == errno.EACCES:
        return (f"{address}: permission denied: port {address.port} needs CAP_NET_BIND_SERVICE "
                "(the image's interpreter carries it) or a port above 1023")
    return f"{address}: cannot listen: {exc.strerror or exc}"


class ConnectionTable:
    """The open connections of one listener, oldest first."""

    def __init__(self, *, name: str, limits: ConnectionLimits) -> None:
        self.name = name
        self.limits = limits
        self._open: OrderedDict[BoundedHandler, None] = OrderedDict()
        self._gauge = metrics.CONNECTIONS.labels(listener=name)

    def __len__(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> int:
        return sum(1 for connection in self._open if connection.busy)

    def admit(self, connection: BoundedHandler) -> bool:
        """Room for `connection`: at once, or by closing the oldest connection not
        answering a request. False if every connection is answering one."""
        if len(self._open) >= self.limits.max_connections:
            idle = next((c for c in self._open if not c.busy), None)
            if idle is None:
                return False
            idle.close_refused("evicted", "the oldest connection not in a request made room for a new one")
        self._open[connection] = None
        self._gauge.set(len(self._open))
        return True

    def release(self, connection: BoundedHandler) -> None:
        if self._open.pop(connection, 0) is None:
            self._gauge.set(len(self._open))

    def close_after_answers(self) -> None:
        """Draining: idle connections close now, the others once their request under way
        is answered, so that keep-alive clients reconnect (to the next generation, which
        shares the listening socket) instead of asking a daemon on its way out."""
        for connection in list(self._open):
            if connection.busy:
                connection.close()  # aiohttp: no keep-alive after the answer under way
            else:
                connection.force_close()  # close() would only cancel its wait, leaving the socket open


Render = Callable[[int, str, str], bytes]
"""(status, code, message) -> a whole HTTP/1.1 response that closes the connection."""


class BoundedHandler(RequestHandler):
    """aiohttp's request handler with the bounds of the module docstring."""

    __slots__ = ("_table", "_render", "_shortcut", "_admitted", "_pending", "_head_timer", "_answering", "_held")

    def __init__(self, manager: web.Server, *, table: ConnectionTable, render: Render, shortcut: Shortcut | None,
                 loop: asyncio.AbstractEventLoop, **options: Any) -> None:
        super().__init__(manager, loop=loop, **options)
        self._table = table
        self._render = render
        self._shortcut = shortcut  # None once a head went to aiohttp with a body or an upgrade
        self._admitted = False
        self._pending = bytearray()  # a request head not yet whole, or one pipelined behind another
        self._head_timer: asyncio.TimerHandle | None = None  # runs while a head is awaited
        self._answering = False  # aiohttp made a request of the last head and has not answered it yet
        self._held = False  # reading paused: a pipelined head waits for the answer before it

    @property
    def busy(self) -> bool:
        """Answering a request (not to be evicted to make room)."""
        return self._answering

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._table.admit(self):
            metrics.connections_refused(self._table.name, "full").inc()
            refusals.log(logging.WARNING, "%s listener: %d connections, all answering requests: refusing one",
                         self._table.name, len(self._table))
            transport.write(self._render(503, "too_many_connections",  # type: ignore[attr-defined]
                                         "irsa-cache is answering as many connections as it allows; retry shortly"))
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm_head_timer()  # also bounds a connection that never sends a byte

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._disarm_head_timer()
        self._table.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Hand aiohttp one whole request head at a time: a partial head waits here, in one
        buffer of at most `max_head_bytes`, and never reaches the parser (which would keep
        more per header); a head pipelined behind one not yet answered waits here too, with
        reading paused, so that a connection costs one request's memory however many it
        sends at once."""
        if not self._admitted or self.transport is None:
            return
        if not self._pending and not self._answering and data.endswith(_HEAD_END) \
                and data.find(_HEAD_END) == len(data) - len(_HEAD_END):
            # The usual case: one whole request head in one read (no timer to arm).
            if len(data) > self._table.limits.max_head_bytes:
                self._too_large()
                return
            self._hand_over(data)
            return
        self._pending.extend(data)
        self._next_head()

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """aiohttp's last step of every request it made, whoever answered it (a handler, the
        router's own 404, an error): once the answer is written, the next head may go."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered()

    def _answered(self) -> None:
        """The request handed over last has its answer: the next pipelined head, if one
        waits, goes to aiohttp (or the shortcut)."""
        self._answering = False
        if self.transport is None or self.transport.is_closing():
            return
        if self._held:
            self._held = False
            self.transport.resume_reading()
        if self._pending:
            self._next_head()

    def _next_head(self) -> None:
        """Hand over the whole heads waiting in the buffer, one at a time, until one is
        being answered (the rest are held) or only part of a head is left."""
        limit = self._table.limits.max_head_bytes
        pending = self._pending
        while pending and self.transport is not None and not self.transport.is_closing():
            end = pending.find(_HEAD_END)
            length = end + len(_HEAD_END) if end >= 0 else len(pending)
            if length > limit or len(pending) > 2 * limit:
                self._too_large()
                return
            if self._answering:
                # Pipelined behind a request still being answered: hold it, and read no more.
                if not self._held:
                    self._held = True
                    self.transport.pause_reading()
                return
            if end < 0:
                if self._head_timer is None:
                    self._arm_head_timer()  # the first bytes of a new head
                return  # the rest of this head is still to come
            head = bytes(pending[:length])
            del pending[:length]
            self._hand_over(head)

    def _hand_over(self, head: bytes) -> None:
        """Answer one head by the shortcut, or give it to aiohttp. Busy only if aiohttp made a
        request of it: blank lines before a request line, or the end of a chunked body, make
        none and no handler will answer, so the connection stays one that is waiting for a
        head: evictable, and on the clock it was already on (more blank lines do not buy time)."""
        if self._shortcut is not None:
            if self._aiohttp_idle():
                try:
                    answer = self._shortcut(head)
                except Exception:  # a bug: the full way answers (and words it) instead
                    refusals.log(logging.ERROR, "%s listener: the shortcut failed; answering the full way",
                                 self._table.name, exc_info=True)
                    answer = None
                if answer is not None:
                    self._answered_at_once(answer)
                    return
            if _BODY_OR_UPGRADE.search(head):
                self._shortcut = None
        requests_before = self._request_count
        super().data_received(head)
        if self._request_count != requests_before:
            self._disarm_head_timer()
            self._answering = True
        elif self._head_timer is None and self.transport is not None and not self.transport.is_closing():
            self._arm_head_timer()

    def _aiohttp_idle(self) -> bool:
        """aiohttp waits for a request on this connection: none of its own is under way or
        queued, nothing of an answer is left to send, and it means to keep the connection."""
        waiter = self._waiter
        return (waiter is not None and not waiter.done() and not self._messages and self._keepalive
                and not self._close and not self._force_close and self._keepalive_timeout > 0
                and self.transport is not None and not self.transport.get_write_buffer_size())

    def _answered_at_once(self, answer: bytes) -> None:
        """The shortcut's answer: written now, and the connection idle again, on aiohttp's
        keep-alive clock as after an answer of its own."""
        assert self.transport is not None
        self._disarm_head_timer()
        self._request_count += 1
        self.transport.write(answer)
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _too_large(self) -> None:
        limit = self._table.limits.max_head_bytes
        self._pending.clear()
        self.close_refused("head_too_large", f"request head over {limit} bytes", status=431,
                           code="header_too_large", message=f"the request's headers exceed {limit} bytes")

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self._loop.call_later(self._table.limits.head_seconds, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._answering or not self._pending and self._request_count:
            return  # answering, or between requests: the keep-alive timeout is aiohttp's
        limit = self._table.limits.head_seconds
        self.close_refused("head_timeout", f"no whole request head within {limit:g} s", status=408,
                           code="request_timeout", message=f"the request's headers did not arrive within {limit:g} s")

    def close_refused(self, reason: str, why: str, *, status: int | None = None, code: str = "",
                      message: str = "") -> None:
        """Close this connection for `reason` (counted, logged at a bounded rate), with a
        JSON answer first if `status` is given."""
        metrics.connections_refused(self._table.name, reason).inc()
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        refusals.log(logging.INFO, "%s listener: closed a connection from %s: %s", self._table.name,
                     peer[0] if peer else "?", why)
        self._disarm_head_timer()
        self._pending = bytearray()
        self._table.release(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if status is not None:
                transport.write(self._render(status, code, message))  # type: ignore[attr-defined]
            transport.close()
        self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse: the JSON error body every SDK
        parses, naming the kind of error only (its text may quote the request)."""
        kind = type(exc).__name__ if exc is not None else "error"
        refusals.log(logging.INFO, "%s listener: unparsable request (%s)", self._table.name, kind)
        if isinstance(exc, LineTooLong):
            metrics.connections_refused(self._table.name, "head_too_large").inc()
            limits = self._table.limits
            status, code = 431, "header_too_large"
            text = (f"a header is over {limits.max_field_bytes} bytes or the request line over "
                    f"{limits.max_line_bytes} (a token is at most 20000 characters)")
        elif status < 500:
            metrics.connections_refused(self._table.name, "unparsable").inc()
            code, text = "bad_request", f"the request could not be parsed as HTTP/1.1 ({kind})"
        else:
            code, text = "internal_error", "internal error; see the daemon's log"
        response = web.Response(status=status, body=_json_error_body(code, text), content_type="application/json")
        response.force_close()
        return response


def _json_error_body(code: str, message: str) -> bytes:
    from daemon.server import error_json  # the one place that shapes error bodies

    return error_json(code, message)


@dataclass
class Listener:
    """One listening address: its socket, the asyncio server accepting on it, its connections."""

    address: Address  # as bound: a port given as 0 is resolved
    sock: socket.socket
    table: ConnectionTable
    server: asyncio.Server | None = None

    def stop_accepting(self) -> None:
        """No new connections from here on; connections already accepted carry on."""
        if self.server is not None:
            self.server.close()


async def serve(*, name: str, runner: web.AppRunner, sockets: list[socket.socket], limits: ConnectionLimits,
                render: Render, shortcut: ShortcutFor | None = None) -> list[Listener]:
    """Accept connections on `sockets` for the app behind `runner` (already set up);
    heads are offered to the app's shortcut first, if given, made for these limits: the
    ones aiohttp's parser gets."""
    loop = asyncio.get_running_loop()
    assert runner.server is not None, "runner.setup() first"
    manager = runner.server
    table = ConnectionTable(name=name, limits=limits)
    options = _handler_options(limits)
    answer_at_once = shortcut(limits) if shortcut is not None else None

    def connection() -> BoundedHandler:
        return BoundedHandler(manager, table=table, render=render, shortcut=answer_at_once, loop=loop, access_log=None,
                              **options)

    listeners = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        listener = Listener(address=Address(str(host), int(port)), sock=sock, table=table)
        listener.server = await loop.create_server(connection, sock=sock, backlog=BACKLOG)
        listeners.append(listener)
    return listeners
