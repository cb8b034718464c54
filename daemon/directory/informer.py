"""List-then-watch of one Kubernetes resource, kept in memory, told of every change.

The loop is the one the API documents ("efficient detection of changes"): list,
then watch from the list's resourceVersion with bookmarks, resume each watch that
ends from the last resourceVersion seen, list again on 410 Gone. It never ends by
itself, whatever the API server or the network do, and never busy-loops: like
client-go's reflector, any failure (a refused connection, a proxy's HTML 503, a JSON
Status where an event belongs, a line that is not JSON, an object without a name) is
logged, counted, backed off with jitter, and followed by a fresh list. A relist diffs
against the store, so changes and deletions missed during an outage are still seen,
and until then the store keeps what the informer last saw.

Every call has a deadline. The watch stream is read line by line here, not through
kubernetes-asyncio's `Watch` (which hands back a non-JSON line as a string and raises
bare `Exception`s), with a silence detector: a real API server sends a bookmark about
every minute, so a watch quiet for longer than `watch_silence_seconds` is presumed
dead (a black-holed connection, a hung server) and is replaced by a relist.

Objects are kept as the API's raw JSON (dicts): the directory reads a handful of
fields and the models' validation would only cost time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from daemon import metrics
from daemon.backoff import full_jitter
from daemon.config import ApiTimeouts
from daemon.logs import describe

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)
OnChange = Callable[[Obj | None, Obj | None], None]  # (old, new); None = absent

BACKOFF_BASE_SECONDS = 0.5
# A watch the server ends sooner is a failure, backed off: resuming at once would spin
# against a server that closes every watch (client-go's reflector has the same rule
# for watches without events).
MIN_WATCH_SECONDS = 1.0
MAX_WATCH_LINE_BYTES = 4 * 1024 * 1024  # one event: a large object, never a stream


def total_timeout(timeouts: ApiTimeouts, seconds: float) -> aiohttp.ClientTimeout:
    """A call's deadline, body included."""
    return aiohttp.ClientTimeout(total=seconds, connect=timeouts.connect_seconds,
                                 sock_connect=timeouts.connect_seconds)


def watch_timeout(timeouts: ApiTimeouts) -> aiohttp.ClientTimeout:
    # No total: a watch lasts minutes. sock_read bounds the wait for each piece of it.
    return aiohttp.ClientTimeout(connect=timeouts.connect_seconds, sock_connect=timeouts.connect_seconds,
                                 sock_read=timeouts.watch_silence_seconds)


class ApiError(Exception):
    """The API server answered something other than what was asked for."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Expired(Exception):
    """The resourceVersion we hold is older than the server's history: list again."""


class _Silent(Exception):
    """The watch said nothing for longer than the silence deadline."""


async def raw_json(response: Any, what: str) -> Any:
    """The JSON body of a call made with `_preload_content=False`, which does not raise on
    errors. An error answer becomes ApiError naming the status and, for a Kubernetes
    Status, its reason; never the body of a proxy's page."""
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        raise ApiError(f"{what}: {_status_text(response.status, body, response.content_type)}", status=response.status)
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(f"{what}: the API server answered {response.status} with {response.content_type or 'a body'} "
                       "that is not JSON", status=response.status) from None


def _status_text(status: int, body: bytes, content_type: str | None) -> str:
    """What an error answer said, in one short line: a Status's reason and message, or
    just the status and content type of anything else (an HTML page from a proxy)."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("kind") == "Status":
        detail = f"{document.get('reason') or ''}: {document.get('message') or ''}".strip(": ")
        return f"API server answered {status} {detail[:200]}"
    return f"API server answered {status} ({content_type or 'no content type'})"


def key_of(obj: Any) -> Key | None:
    """(namespace, name) of an object, or None for something that is not an object."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        return None
    namespace = meta.get("namespace", "")
    return (namespace if isinstance(namespace, str) else "", name)


class Informer:
    """Keeps `store` equal to the server's view of one resource; calls `on_change` per change."""

    def __init__(
        self,
        *,
        name: str,
        list_call: Callable[..., Awaitable[Any]],
        on_change: OnChange,
        timeouts: ApiTimeouts,
        field_selector: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.store: dict[Key, Obj] = {}
        self.synced = asyncio.Event()  # set after the first successful list
        self.healthy = False  # false while the server cannot be reached
        self.last_error: str | None = None  # why it is not healthy, for /readyz
        # False while the API server cannot answer (unreachable, timing out, 5xx): an outage of
        # the control plane, not of this daemon (a 401/403 is ours to fix, and leaves it True).
        self.server_available = True
        self.unhealthy_since: float | None = None  # wall time
        self._list_call = list_call
        self._on_change = on_change
        self._timeouts = timeouts
        self._selector = {"field_selector": field_selector} if field_selector else {}
        self._rng = rng or random.Random()
        self._resource_version: str | None = None
        self._watch_started = 0.0  # monotonic

    @property
    def not_ready_reason(self) -> str | None:
        if self.healthy and self.synced.is_set():
            return None
        if self.last_error is None:
            return f"{self.name} informer: not listed yet"
        return f"{self.name} informer: {self.last_error}"

    async def run(self) -> None:
        """List and watch until cancelled. Nothing the API server sends ends this loop."""
        failures = 0
        while True:
            try:
                if self._resource_version is None:
                    await self._relist()
                await self._watch()
                failures = 0
            except _Expired:
                self._restart("expired")
                self._resource_version = None
                if time.monotonic() - self._watch_started >= MIN_WATCH_SECONDS:
                    continue  # history moved on while we watched: relist at once, the server is fine
                # Expired at once, every time, would spin (a proxy answering 410 to every
                # watch): back off as after any failure.
                failures += 1
                delay = full_jitter(self._rng, BACKOFF_BASE_SECONDS, self._timeouts.backoff_max_seconds, failures)
                log.warning("%s informer: the watch expired at once; listing again in %.1f s", self.name, delay)
                await asyncio.sleep(delay)
            except _Silent:
                self._restart("silent")
                self._failed(ApiError(f"no event or bookmark for {self._timeouts.watch_silence_seconds:g} s"))
                log.warning("%s informer: %s; listing again", self.name, self.last_error)
                self._resource_version = None  # a relist proves the server answers
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it was, back off and relist
                failures += 1
                self._failed(exc)
                # List again once back: it proves the server answers (a resumed watch
                # says nothing until its first event) and the diff catches what was missed.
                self._resource_version = None
                self._restart("error")
                delay = full_jitter(self._rng, BACKOFF_BASE_SECONDS, self._timeouts.backoff_max_seconds, failures)
                log.warning("%s informer: %s; retrying in %.1f s", self.name, self.last_error, delay)
                await asyncio.sleep(delay)

    def _failed(self, exc: Exception) -> None:
        if self.healthy or self.unhealthy_since is None:
            self.unhealthy_since = time.time()
        self.healthy = False
        status = exc.status if isinstance(exc, ApiError) else None
        self.server_available = status is not None and 400 <= status < 500
        self.last_error = f"{_describe(exc)} (since {_utc(self.unhealthy_since)})"

    async def _relist(self) -> None:
        response = await self._list_call(
            _preload_content=False, _request_timeout=total_timeout(self._timeouts, self._timeouts.list_seconds),
            **self._selector,
        )
        document = await raw_json(response, f"list {self.name}")
        items = document.get("items") if isinstance(document, dict) else None
        version = _resource_version(document)
        if not isinstance(items, list) or version is None:
            raise ApiError(f"list {self.name}: the API server answered JSON that is not a list")
        fresh: dict[Key, Obj] = {}
        for item in items:
            key = key_of(item)
            if key is None:
                self._skip("a listed object without a name")
                continue
            fresh[key] = item
        old_store, self.store = self.store, fresh
        for key, item in fresh.items():
            if old_store.get(key) != item:
                self._notify(old_store.get(key), item)
        for key, item in old_store.items():
            if key not in fresh:
                self._notify(item, None)
        self._resource_version = version
        self._recovered()
        self.synced.set()
        log.info("%s informer: listed %d at resourceVersion %s", self.name, len(fresh), version)

    async def _watch(self) -> None:
        started = self._watch_started = time.monotonic()
        response = await self._list_call(
            watch=True,
            resource_version=self._resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._timeouts.watch_seconds,
            _preload_content=False,
            _request_timeout=watch_timeout(self._timeouts),
            **self._selector,
        )
        try:
            if response.status != 200:
                body = await response.content.read(64 * 1024)
                if response.status == 410:
                    raise _Expired()
                raise ApiError(f"watch {self.name}: {_status_text(response.status, body, response.content_type)}",
                               status=response.status)
            events = 0
            while True:
                try:
                    line = await response.content.readuntil(b"\n", max_size=MAX_WATCH_LINE_BYTES)
                except asyncio.TimeoutError:
                    raise _Silent() from None
                if not line:
                    lasted = time.monotonic() - started
                    if lasted < MIN_WATCH_SECONDS:
                        raise ApiError(f"watch {self.name}: the server ended the watch after {lasted:.2f} s "
                                       f"({events} events)")
                    return  # the server ended the watch (timeoutSeconds): resume
                if line.strip():
                    self._event(line)
                    events += 1
        finally:
            response.close()

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            raise ApiError(f"watch {self.name}: a line that is not JSON ({len(line)} bytes)") from None
        if not isinstance(event, dict):
            raise ApiError(f"watch {self.name}: a line that is not an event")
        kind, obj = event.get("type"), event.get("object")
        if kind is None and event.get("kind") == "Status":  # an error answered inside the stream
            kind, obj = "ERROR", event
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == 410:
                raise _Expired()
            message = obj.get("message") if isinstance(obj, dict) else None
            raise ApiError(f"watch {self.name}: error event {code}: {str(message)[:200]}", status=code)
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") or not isinstance(obj, dict):
            raise ApiError(f"watch {self.name}: an event of unknown type {str(kind)[:40]!r}")
        version = _resource_version(obj)
        if version is not None:
            self._resource_version = version
        self._recovered()
        if kind == "BOOKMARK":
            return
        key = key_of(obj)
        if key is None:
            self._skip(f"a {kind} event without an object name")
            return
        old = self.store.get(key)
        if kind == "DELETED":
            self.store.pop(key, None)
            self._notify(old, None)
        else:
            self.store[key] = obj
            self._notify(old, obj)

    def _notify(self, old: Obj | None, new: Obj | None) -> None:
        """Tell `on_change`; its failure, a bug, is logged and does not stop the informer
        (the store is updated already: stopping would leave what derives from it behind)."""
        try:
            self._on_change(old, new)
        except Exception:
            log.exception("%s informer: handling the change of %s failed (a bug in irsa-cache)", self.name,
                          "/".join(key_of(new or old) or ("?",)))

    def _recovered(self) -> None:
        if not self.healthy and self.unhealthy_since is not None:
            log.info("%s informer: the API server answers again", self.name)
        self.healthy = True
        self.server_available = True
        self.last_error = None
        self.unhealthy_since = None

    def _skip(self, what: str) -> None:
        metrics.WATCH_SKIPPED.labels(informer=self.name).inc()
        log.warning("%s informer: skipped %s", self.name, what)

    def _restart(self, reason: str) -> None:
        metrics.WATCH_RESTARTS.labels(informer=self.name, reason=reason).inc()


def _resource_version(document: Any) -> str | None:
    meta = document.get("metadata") if isinstance(document, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return "the API server did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to the API server ({describe(exc.os_error)})"
    return describe(exc)


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
