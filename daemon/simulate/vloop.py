"""An asyncio event loop on virtual time: when nothing is ready, time jumps to the next timer.

The simulated daemons are the real `CredentialCache` and `StsBudget`, which schedule
with `loop.time()`, `call_at`, `asyncio.sleep` and `wait_for`: on this loop they run
unchanged, and hours of cluster life pass in seconds. There is no I/O: a simulation
has none, and a wait on nothing would never end (`DeadlockError`).

Why not asyncio's own loop with a clock-moving selector: its timer heap orders
`TimerHandle`s through a Python `__lt__`, which a simulation with millions of timers
pays for on every push and pop. Here timers sit in the heap as `(when, sequence, ...)`
tuples, compared in C; cancelled ones are skipped when they surface. The model's own
events (`schedule`) skip the `TimerHandle` altogether: a plain function and one argument.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from collections.abc import Callable
from typing import Any

_HANDLE = object()  # marks a heap item holding an asyncio TimerHandle, not a plain callback


class DeadlockError(RuntimeError):
    """Nothing is ready and nothing is scheduled, yet the awaited result is not in."""


class _Handle(asyncio.Handle):
    """asyncio's Handle without the per-handle debug check (this loop never debugs)."""

    __slots__ = ()

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop,
                 context: contextvars.Context | None) -> None:
        self._context = context if context is not None else contextvars.copy_context()
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """`time()` starts at 0 and moves only to the next due timer."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._timers: list[tuple[float, int, Any, Any]] = []
        self._sequence = itertools.count()
        self._frozen = False
        self.events = 0  # callbacks run: the cost measure of a simulation
        self.errors: list[dict[str, Any]] = []  # what asyncio would only have logged
        self.set_exception_handler(lambda loop, context: self.errors.append(context))

    def time(self) -> float:
        return self._now

    def schedule(self, when: float, callback: Callable[[Any], object], argument: Any) -> None:
        """Run `callback(argument)` at loop time `when` (no handle: it cannot be cancelled)."""
        if not self._frozen:
            heapq.heappush(self._timers, (when, next(self._sequence), callback, argument))

    # --- asyncio's scheduling, on the tuple heap ---

    def call_at(self, when: float, callback: Callable[..., object], *args: Any,
                context: Any = None) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        if self._frozen:
            handle.cancel()
            return handle
        heapq.heappush(self._timers, (when, next(self._sequence), handle, _HANDLE))
        handle._scheduled = True  # noqa: SLF001 - what BaseEventLoop.call_at sets
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any,
                   context: Any = None) -> asyncio.TimerHandle:
        return self.call_at(self._now + delay, callback, *args, context=context)

    def call_soon(self, callback: Callable[..., object], *args: Any, context: Any = None) -> asyncio.Handle:
        handle = _Handle(callback, args, self, context)
        self._ready.append(handle)  # type: ignore[attr-defined]
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any,
                             context: Any = None) -> asyncio.Handle:
        raise RuntimeError("a simulation has no threads")

    def freeze(self) -> None:
        """The simulation has ended: forget every timer and accept no new one (ready
        callbacks still run, so that what is cancelled can unwind)."""
        self._timers.clear()
        self._frozen = True

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # skipped when it surfaces

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def _run_once(self) -> None:
        """Run what is ready; with nothing ready, jump to the next timer and run what is due."""
        ready = self._ready  # type: ignore[attr-defined]
        timers = self._timers
        if not ready:
            while timers and timers[0][3] is _HANDLE and timers[0][2].cancelled():
                heapq.heappop(timers)
            if not timers:
                raise DeadlockError("nothing is scheduled, and what the simulation waits for cannot come")
            if timers[0][0] > self._now:
                self._now = timers[0][0]
        now = self._now
        while timers and timers[0][0] <= now:
            _, _, callback, argument = heapq.heappop(timers)
            if argument is _HANDLE:
                callback._scheduled = False  # noqa: SLF001
                if not callback.cancelled():
                    ready.append(callback)
            else:
                self.events += 1
                callback(argument)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle.cancelled():
                self.events += 1
                handle._run()  # noqa: SLF001 - what BaseEventLoop._run_once calls
