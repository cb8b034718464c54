"""The wire side of the cached answer: a plain credentials request, read straight from
its bytes, answered with whole response bytes.

Most requests a node sees are the same one: `GET /v1/credentials` with a token verified
before, for credentials already cached. aiohttp's machinery for a request (a task step,
the request and response objects, the router) costs more than everything the daemon
does to answer it, so a connection hands such a head to the credentials app's shortcut
first (see `server.create_app`), which answers it in the same call or declines.

Only the plainest heads are read here: the request line exactly as below, header lines
of token names and visible-ASCII values, no name twice, no more lines and none longer
than aiohttp's parser allows, nothing that announces a body or changes the connection
(Content-Length, Transfer-Encoding, Connection other than keep-alive, Expect, Upgrade,
TE, the WebSocket draft's key): a head aiohttp would refuse is never answered here.
Anything else, and every
refusal, takes the full way through aiohttp and `server.credentials`, which is the
one place that words errors; the shortcut only ever answers 200.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email.utils import formatdate

from daemon.config import ConnectionLimits

Shortcut = Callable[[bytes], bytes | None]
"""A whole request head -> the whole response, or None: take the full way."""
ShortcutFor = Callable[[ConnectionLimits], Shortcut]
"""The app's shortcut for a listener whose parser has these limits."""

_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?[ \t]*")
_FULL_WAY = frozenset({b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade", b"te",
                       b"sec-websocket-key1"})


def request_line(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\n".encode()


def plain_get(head: bytes, line: bytes, *, max_headers: int, max_field_bytes: int) -> tuple[str, str] | None:
    """(Host, Authorization) of a plain request whose request line is `line`, or None.
    `head` is whole: it ends with the blank line."""
    if not head.startswith(line) or not head.endswith(b"\r\n\r\n"):
        return None
    fields = head[len(line):-4].split(b"\r\n")
    if len(fields) > max_headers:
        return None
    seen: dict[bytes, bytes] = {}
    for field in fields:
        match = _HEADER.fullmatch(field)
        if match is None or len(field) > max_field_bytes:
            return None
        name = match[1].lower()
        if name in seen:
            return None  # aiohttp refuses some repeated headers; none of ours repeats
        value = seen[name] = match[2] or b""
        if name in _FULL_WAY and not (name == b"connection" and value.lower() == b"keep-alive"):
            return None
    host, authorization = seen.get(b"host"), seen.get(b"authorization")
    if host is None or authorization is None:
        return None
    return host.decode("ascii"), authorization.decode("ascii")


class OkHead:
    """`200 OK` response heads for JSON bodies, the Date header redone once a second."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._date = b""

    def __call__(self, body_length: int) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._date = formatdate(second, usegmt=True).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n\r\n" % (
            body_length, self._date)
