"""Warm handoff from one generation of the daemon to the next on the same node.

A DaemonSet update starts the new generation (B) while the old one (A) still serves
(`maxSurge: 1`). Both are started with the same `--listen` and `--handoff-socket`.
A listens on the handoff socket; B connects to it before binding anything, and gets:

1. A's listening sockets themselves, passed as file descriptors (SCM_RIGHTS, as
   Envoy's hot restart does). Both generations then accept from one socket and one
   accept queue: nothing is refused while B starts and nothing queued is lost when A
   stops. Chosen over SO_REUSEPORT, which would admit into the group any process of
   the same uid (a host-network pod running as 65532 would receive pods' tokens) and
   resets a closing listener's accept queue unless net.ipv4.tcp_migrate_req is set,
   which an unprivileged pod cannot do;
2. A's cache: every entry's credentials, its freshest pod token, its refresh schedule,
   and the refusals A remembers. Nothing expired is sent; nothing is written to disk.

B serves, then says "done": A starts no refresh from then on (B refreshes on the
schedule it received), stops answering metrics and probes (so Prometheus sees one
process), and keeps answering credential requests until SIGTERM, when it drains.
B then listens on the handoff socket for its own successor.

Wire format, version `WIRE_VERSION`: frames of a 4-byte big-endian length and a JSON
object; the sockets ride on the first frame A sends. The cache state has its own
`STATE_VERSION`: a successor that does not know A's state version still takes the
sockets (their passing never changes) and starts cold. Both ends check that the peer
runs under their own uid (SO_PEERCRED); the socket's directory is the daemon's alone.

Degraded cases end in a cold start within `config.HANDOFF_SECONDS`: no predecessor, a stale
socket, garbage, a predecessor that never answers, an incompatible version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import metrics
from daemon.cache import EntryState, RefusalState
from daemon import config
from daemon.config import Address
from daemon.errors import DaemonError, StsDeniedError, StsError, StsTimeoutError, StsUnavailableError
from daemon.logs import describe
from daemon.models import CacheKey, Credentials, Identity, VerifiedToken

log = logging.getLogger(__name__)

WIRE_VERSION = 1
STATE_VERSION = 1
MAX_FRAME_BYTES = 256 * 1024 * 1024  # 20,000 identities are a few tens of MB
MAX_SOCKETS = 16
_LENGTH = struct.Struct(">I")


class HandoffError(Exception):
    """The peer broke the protocol; the message says how."""


# --- frames ---


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    frame = _LENGTH.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [frame], fds)
        frame = frame[sent:]
    sock.sendall(frame)


def _receive(sock: socket.socket, *, with_fds: bool = False) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    try:
        if with_fds:
            data, fds, _, _ = socket.recv_fds(sock, 64 * 1024, MAX_SOCKETS)
            if not data:
                raise HandoffError("the peer closed the connection")
        else:
            data = b""
        data = _read_exactly(sock, _LENGTH.size, data)
        (length,) = _LENGTH.unpack(data[: _LENGTH.size])
        if length > MAX_FRAME_BYTES:
            raise HandoffError(f"a frame of {length} bytes announced: not the handoff protocol")
        body = _read_exactly(sock, _LENGTH.size + length, data)[_LENGTH.size:]
        try:
            message = json.loads(body)
        except ValueError:
            raise HandoffError("a frame that is not JSON: not the handoff protocol") from None
        if not isinstance(message, dict):
            raise HandoffError("a frame that is not a JSON object")
        return message, fds
    except BaseException:
        for fd in fds:  # descriptors that came with a broken frame are nobody's: close them
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _read_exactly(sock: socket.socket, size: int, have: bytes) -> bytes:
    chunks = [have]
    got = len(have)
    while got < size:
        chunk = sock.recv(min(size - got, 1024 * 1024))
        if not chunk:
            raise HandoffError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_peer(sock: socket.socket) -> None:
    """The peer must run under our own uid: nothing else may take our sockets or cache."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        raise HandoffError(f"the peer (pid {pid}) runs as uid {uid}, not {os.getuid()}: refused")


# --- the cache's state on the wire ---


def encode_state(entries: list[EntryState], refusals: list[RefusalState]) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "entries": [_entry(entry) for entry in entries],
        "refusals": [{"key": _key(r.key), "fingerprint": r.fingerprint, "until": r.until, "error": _error(r.error)}
                     for r in refusals],
    }


def decode_state(state: dict[str, Any]) -> tuple[list[EntryState], list[RefusalState]]:
    """The entries and refusals of a state of STATE_VERSION; HandoffError if malformed."""
    try:
        entries = [_entry_from(item) for item in state["entries"]]
        refusals = [RefusalState(key=_key_from(item["key"]), fingerprint=item["fingerprint"], until=float(item["until"]),
                                 error=_error_from(item["error"])) for item in state["refusals"]]
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise HandoffError(f"a cache state that does not decode ({describe(exc)})") from None
    return entries, refusals


def _key(key: CacheKey) -> dict[str, str]:
    return {"role_arn": key.role_arn, "issuer": key.issuer, "subject": key.subject, "audience": key.audience}


def _key_from(item: dict[str, Any]) -> CacheKey:
    return CacheKey(role_arn=str(item["role_arn"]), issuer=str(item["issuer"]), subject=str(item["subject"]),
                    audience=str(item["audience"]))


def _entry(entry: EntryState) -> dict[str, Any]:
    credentials = entry.credentials
    token = entry.token
    return {
        "key": _key(entry.key),
        "credentials": None if credentials is None else {
            "access_key_id": credentials.access_key_id, "secret_access_key": credentials.secret_access_key,
            "session_token": credentials.session_token, "expiration": credentials.expires_at,
            "account_id": credentials.account_id, "assumed_role_arn": credentials.assumed_role_arn,
        },
        "token": None if token is None else {
            "raw": token.raw, "expires_at": token.expires_at, "fingerprint": token.fingerprint,
            "identity": {name: getattr(token.identity, name) for name in (
                "issuer", "subject", "audience", "namespace", "service_account", "pod_name", "pod_uid")},
        },
        "last_used": entry.last_used, "refresh_at": _number(entry.refresh_at), "retry_at": entry.retry_at,
        "failures": entry.failures,
    }


def _entry_from(item: dict[str, Any]) -> EntryState:
    credentials = item["credentials"]
    token = item["token"]
    return EntryState(
        key=_key_from(item["key"]),
        credentials=None if credentials is None else Credentials(
            access_key_id=str(credentials["access_key_id"]),
            secret_access_key=str(credentials["secret_access_key"]),
            session_token=str(credentials["session_token"]),
            expiration=datetime.fromtimestamp(float(credentials["expiration"]), timezone.utc),
            account_id=str(credentials["account_id"]),
            assumed_role_arn=str(credentials["assumed_role_arn"]),
        ),
        token=None if token is None else VerifiedToken(
            identity=Identity(**{k: (None if v is None else str(v)) for k, v in token["identity"].items()}),
            raw=str(token["raw"]), expires_at=float(token["expires_at"]), fingerprint=str(token["fingerprint"]),
        ),
        last_used=float(item["last_used"]),
        refresh_at=float(item["refresh_at"]) if item["refresh_at"] is not None else float("inf"),
        retry_at=float(item["retry_at"]),
        failures=int(item["failures"]),
    )


def _number(value: float) -> float | None:
    return None if value == float("inf") else value  # JSON has no infinity


_ERRORS: dict[str, type[StsError]] = {
    cls.__name__: cls for cls in (StsError, StsDeniedError, StsUnavailableError, StsTimeoutError)
}


def _error(error: DaemonError) -> dict[str, Any]:
    return {"class": type(error).__name__, "message": error.message, "code": error.code,
            "sts_code": getattr(error, "sts_code", None), "permanent": getattr(error, "permanent", False)}


def _error_from(item: dict[str, Any]) -> DaemonError:
    cls = _ERRORS.get(str(item["class"]), StsError)
    error = cls(str(item["message"]), sts_code=item.get("sts_code"), permanent=bool(item.get("permanent")))
    error.code = str(item["code"])
    return error


# --- the predecessor's side ---


@dataclass
class Predecessor:
    """Listens on the handoff socket and hands everything over to the first successor
    that completes the exchange. Runs its blocking socket work in a thread of its own;
    the cache is read on the event loop."""

    path: Path
    sockets: list[tuple[str, socket.socket]]  # (role, listening socket)
    snapshot: Callable[[], tuple[list[EntryState], list[RefusalState]]]
    on_handed_over: Callable[[], None]  # called on the event loop once the successor serves
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _server: socket.socket | None = None
    _closed: threading.Event = field(default_factory=threading.Event)
    _inode: int | None = None  # of the path we bound: a successor's later socket there is not ours

    def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # ours now: the generation before us handed it over, or died
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        server.listen(4)
        self._server = server
        threading.Thread(target=self._accept, name="handoff server", daemon=True).start()
        log.info("handoff: a successor can take over from %s", self.path)

    def close(self) -> None:
        """Stop listening; remove the socket's path unless a successor has taken it over."""
        self._closed.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    def _accept(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                connection, _ = self._server.accept()
            except OSError:
                return  # closed
            with connection:
                connection.settimeout(config.HANDOFF_SECONDS)
                started = time.monotonic()
                try:
                    if self._hand_over(connection):
                        metrics.HANDOFF_DURATION.labels(role="predecessor").observe(time.monotonic() - started)
                        self._inode = None  # the path is the successor's from now on
                        self.close()
                        return
                except Exception as exc:  # noqa: BLE001 - whatever a successor sends, we keep serving
                    metrics.handoff_outcome("predecessor", "failed").inc()
                    log.warning("handoff: a successor's attempt failed: %s; still serving", describe(exc))

    def _hand_over(self, connection: socket.socket) -> bool:
        _check_peer(connection)
        hello, _ = _receive(connection)
        if hello.get("wire") != WIRE_VERSION:
            _send(connection, {"error": f"wire version {hello.get('wire')!r} unknown; this one speaks {WIRE_VERSION}"})
            raise HandoffError(f"a successor speaking wire version {hello.get('wire')!r}")
        described = [{"role": role, "address": list(sock.getsockname()[:2])} for role, sock in self.sockets]
        _send(connection, {"sockets": described}, [sock.fileno() for _, sock in self.sockets])
        wanted = hello.get("state_versions") or []
        if STATE_VERSION in wanted:
            entries, refusals = asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop).result(config.HANDOFF_SECONDS)
            _send(connection, {"state": encode_state(entries, refusals)})
        else:
            entries = []
            _send(connection, {"state": None, "reason": f"state version {STATE_VERSION} is not one the successor "
                               f"reads ({wanted})"})
        connection.settimeout(config.CONFIRM_SECONDS)
        done, _ = _receive(connection)
        if done.get("done") is not True:
            raise HandoffError("the successor did not confirm")
        metrics.HANDOFF_ENTRIES.labels(direction="sent").inc(len(entries))
        metrics.handoff_outcome("predecessor", "handed_over").inc()
        log.info("handoff: pid %s took over %d entries and the listening sockets; no more refreshes here",
                 done.get("pid"), len(entries))
        self.loop.call_soon_threadsafe(self.on_handed_over)
        return True

    async def _snapshot(self) -> tuple[list[EntryState], list[RefusalState]]:
        return self.snapshot()


# --- the successor's side ---


@dataclass
class Inheritance:
    """What a successor received: listening sockets by role, and the cache's state."""

    sockets: list[tuple[str, Address, socket.socket]]
    entries: list[EntryState]
    refusals: list[RefusalState]
    connection: socket.socket
    started: float

    def confirm(self) -> None:
        """Tell the predecessor that we serve now; it retires."""
        try:
            _send(self.connection, {"done": True, "pid": os.getpid()})
        except OSError as exc:
            log.warning("handoff: could not confirm to the predecessor: %s", describe(exc))
        finally:
            self.connection.close()
        metrics.HANDOFF_DURATION.labels(role="successor").observe(time.monotonic() - self.started)


def _described_socket(item: object) -> tuple[str, Address]:
    """(role, address) of one socket the predecessor offers, or HandoffError."""
    if isinstance(item, dict):
        role, address = item.get("role"), item.get("address")
        if isinstance(role, str) and isinstance(address, list) and len(address) == 2 and isinstance(address[1], int):
            return role, Address(str(address[0]), address[1])
    raise HandoffError(f"a socket described as {item!r}"[:200] + ", not {role, address: [host, port]}")


def _check_listening(sock: socket.socket, described: Address) -> None:
    """A socket taken over must be what it was said to be: a listening TCP socket bound to
    the address described (else we might serve where nobody configured us to)."""
    tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
    if not (tcp and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        raise HandoffError(f"a socket described as {described} is not a listening TCP socket")
    host, port = sock.getsockname()[:2]
    bound = Address(str(host), int(port))
    if bound != described:
        raise HandoffError(f"a socket described as {described} listens on {bound}")


def inherit(path: Path) -> Inheritance | None:
    """Take over from a predecessor listening on `path`, or None (start cold) for any
    reason, said in the log. Blocking: run it in a thread."""
    started = time.monotonic()
    if not path.exists():
        metrics.handoff_outcome("successor", "no_predecessor").inc()
        log.info("handoff: no predecessor at %s; starting cold", path)
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(config.HANDOFF_SECONDS)
    received: list[int] = []  # descriptors not yet owned by a socket object
    sockets: list[tuple[str, Address, socket.socket]] = []
    try:
        try:
            connection.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            metrics.handoff_outcome("successor", "no_predecessor").inc()
            log.info("handoff: %s is left by a predecessor that is gone; starting cold", path)
            connection.close()
            return None
        _check_peer(connection)
        _send(connection, {"wire": WIRE_VERSION, "state_versions": [STATE_VERSION], "pid": os.getpid()})
        offer, received = _receive(connection, with_fds=True)
        if "error" in offer:
            raise HandoffError(f"the predecessor refused: {str(offer['error'])[:200]}")
        described = offer.get("sockets")
        if not isinstance(described, list) or len(described) != len(received):
            raise HandoffError(f"{len(received)} sockets for {described!r}")
        # Every description read before any descriptor is owned: on a bad one, each
        # descriptor is closed exactly once, by the handler below.
        roles = [_described_socket(item) for item in described]
        for role, address in roles:
            sockets.append((role, address, socket.socket(fileno=received[0])))
            received.pop(0)  # owned by its socket object now
            _check_listening(sockets[-1][2], address)
        entries: list[EntryState] = []
        refusals: list[RefusalState] = []
        try:
            state_frame, _ = _receive(connection)
            state = state_frame.get("state")
            if isinstance(state, dict) and state.get("version") == STATE_VERSION:
                entries, refusals = decode_state(state)
            else:
                version = state.get("version") if isinstance(state, dict) else state
                log.warning("handoff: the predecessor's cache cannot be read (%s); its sockets are ours, the cache "
                            "starts cold", state_frame.get("reason") or f"state version {version!r}")
        except (HandoffError, OSError, TimeoutError) as exc:
            # The sockets are ours already (binding would find the ports taken): keep them, start cold.
            log.warning("handoff: the predecessor's cache did not arrive (%s); its sockets are ours, the cache "
                        "starts cold", describe(exc))
        metrics.HANDOFF_ENTRIES.labels(direction="received").inc(len(entries))
        metrics.handoff_outcome("successor", "warm" if entries or refusals else "sockets_only").inc()
        log.info("handoff: received %d sockets, %d entries and %d refusals in %.3f s", len(sockets), len(entries),
                 len(refusals), time.monotonic() - started)
        return Inheritance(sockets=sockets, entries=entries, refusals=refusals, connection=connection,
                           started=started)
    except (HandoffError, OSError, TimeoutError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        for fd in received:
            with contextlib.suppress(OSError):
                os.close(fd)
        for _, _, sock in sockets:
            sock.close()
        connection.close()
        metrics.handoff_outcome("successor", "failed").inc()
        log.warning("handoff: taking over from %s failed (%s) after %.1f s; starting cold", path, describe(exc),
                    time.monotonic() - started)
        return None
