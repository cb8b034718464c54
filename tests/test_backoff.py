"""Retry loops that run for days: an upstream down over a weekend counts thousands of
failures, and no count may turn the backoff into an exception that ends the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from unittest import mock

import pytest

from daemon import tokens
from daemon.backoff import capped
from daemon.config import ApiTimeouts
from daemon.directory import informer

FAILURES = 2_000  # past 1,024, where 2 ** failures no longer converts to a float


def test_the_backoff_is_capped_whatever_the_count() -> None:
    assert capped(0.5, 30.0, 0) == 0.5
    assert capped(0.5, 30.0, 3) == 4.0
    assert capped(0.5, 30.0, 1_000_000) == 30.0


def failing_for(count: int) -> tuple[Callable[[float], Awaitable[None]], asyncio.Event]:
    """A sleep that takes no time, and an event set once `count` failures have been slept off."""
    done = asyncio.Event()
    real_sleep = asyncio.sleep
    calls = 0

    async def no_wait(seconds: float) -> None:
        nonlocal calls
        calls += 1
        if calls >= count:
            done.set()
        await real_sleep(0)

    return no_wait, done


async def run_until(coroutine: Any, done: asyncio.Event) -> None:
    task = asyncio.ensure_future(coroutine)
    await asyncio.wait([task, asyncio.ensure_future(done.wait())], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), f"the retry loop ended: {task.exception()!r}"
    assert done.is_set(), "the retry loop stopped retrying"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_informer_keeps_retrying_an_api_server_down_for_days() -> None:
    async def api_down(**_: Any) -> Any:
        raise ConnectionRefusedError("connection refused")

    watcher = informer.Informer(name="pod", list_call=api_down, on_change=lambda old, new: None,
                                timeouts=ApiTimeouts())
    no_wait, done = failing_for(FAILURES)
    with mock.patch.object(informer.asyncio, "sleep", no_wait), mock.patch.object(informer.log, "warning"):
        await run_until(watcher.run(), done)


async def test_key_loading_keeps_retrying_a_key_set_down_for_days() -> None:
    async def key_set_down() -> None:
        raise ConnectionRefusedError("connection refused")

    no_wait, done = failing_for(FAILURES)
    with mock.patch.object(tokens.asyncio, "sleep", no_wait), mock.patch.object(tokens.log, "warning"):
        await run_until(tokens.retry_until_done(key_set_down, on_failure=lambda reason: None), done)


def test_a_simulated_pod_restarted_thousands_of_times_waits_the_kubelets_cap() -> None:
    from daemon.simulate.sdk import CrashLoop

    crash_loop = CrashLoop()
    assert crash_loop.delay(1) == crash_loop.first_seconds
    assert crash_loop.delay(5_000) == crash_loop.max_seconds
