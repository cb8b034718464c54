"""List-then-watch of one Kubernetes resource, kept in memory, told of every change.

The loop is the one the API documents ("efficient detection of changes"): list,
then watch from the list's resourceVersion with bookmarks, resume each watch that
ends from the last resourceVersion seen, list again on 410 Gone. On any failure
it backs off with jitter and lists again when the server answers. It never ends
by itself and never busy-loops. A relist diffs against the store, so changes and
deletions missed during an outage are still seen.

Objects are kept as the API's raw JSON (dicts): the directory reads a handful of
fields and the models' validation would only cost time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from daemon import metrics

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)
OnChange = Callable[[Obj | None, Obj | None], None]  # (old, new); None = absent

WATCH_TIMEOUT_SECONDS = 300  # the server ends each watch after this; we resume at once
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


async def raw_json(response: Any) -> Any:
    """The body of a call made with `_preload_content=False`, which does not raise on errors."""
    body = await response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=body[:200].decode(errors="replace"))
    return json.loads(body)


def key_of(obj: Obj) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


class _Expired(Exception):
    """The resourceVersion we hold is older than the server's history: list again."""


class Informer:
    """Keeps `store` equal to the server's view of one resource; calls `on_change` per change."""

    def __init__(
        self,
        *,
        name: str,
        list_call: Callable[..., Awaitable[Any]],
        on_change: OnChange,
        field_selector: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.store: dict[Key, Obj] = {}
        self.synced = asyncio.Event()  # set after the first successful list
        self.healthy = False  # false while the server cannot be reached
        self._list_call = list_call
        self._on_change = on_change
        self._selector = {"field_selector": field_selector} if field_selector else {}
        self._rng = rng or random.Random()
        self._resource_version: str | None = None

    async def run(self) -> None:
        """List and watch until cancelled."""
        failures = 0
        while True:
            try:
                if self._resource_version is None:
                    await self._relist()
                await self._watch()
                failures = 0
            except _Expired:
                self._restart("expired")
                self._resource_version = None  # relist at once: the server is fine
            except asyncio.CancelledError:
                raise
            except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                failures += 1
                self.healthy = False
                # List again once back: it proves the server answers (a resumed watch
                # says nothing until its first event) and the diff catches what was missed.
                self._resource_version = None
                self._restart("error")
                delay = self._rng.uniform(0, min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2**failures))
                log.warning("%s informer: %s; retrying in %.1f s", self.name, _describe(exc), delay)
                await asyncio.sleep(delay)

    async def _relist(self) -> None:
        document = await raw_json(await self._list_call(_preload_content=False, **self._selector))
        fresh = {key_of(item): item for item in document.get("items", [])}
        old_store, self.store = self.store, fresh
        for key, item in fresh.items():
            if old_store.get(key) != item:
                self._on_change(old_store.get(key), item)
        for key, item in old_store.items():
            if key not in fresh:
                self._on_change(item, None)
        self._resource_version = document["metadata"]["resourceVersion"]
        self.healthy = True
        self.synced.set()
        log.info("%s informer: listed %d at resourceVersion %s", self.name, len(fresh), self._resource_version)

    async def _watch(self) -> None:
        watcher = watch.Watch()
        try:
            stream = watcher.stream(
                self._list_call,
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT_SECONDS,
                **self._selector,
            )
            async for event in stream:
                self._apply(event["type"], event["raw_object"])
        except ApiException as exc:
            if exc.status == 410:  # the client turns the server's ERROR event into this
                raise _Expired() from exc
            raise
        finally:
            await watcher.close()

    def _apply(self, kind: str, obj: Obj) -> None:
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired()
            raise ValueError(f"watch error: {obj.get('message')}")
        self._resource_version = obj["metadata"]["resourceVersion"]
        self.healthy = True
        if kind == "BOOKMARK":
            return
        key = key_of(obj)
        old = self.store.get(key)
        if kind == "DELETED":
            self.store.pop(key, None)
            self._on_change(old, None)
        else:  # ADDED, MODIFIED
            self.store[key] = obj
            self._on_change(old, obj)

    def _restart(self, reason: str) -> None:
        metrics.WATCH_RESTARTS.labels(informer=self.name, reason=reason).inc()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        if exc.status == 410:
            return "resourceVersion expired"
        return f"API server answered {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
