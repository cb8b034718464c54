"""An autouse fixture for test modules with synchronous tests; import it into the module.

looptime's plugin asks the event loop policy for a loop even in a sync test, which
creates one that nobody closes; its ResourceWarning would then fail whichever test the
garbage collector happens to run in (warnings are errors here).
"""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def close_the_loop_made_for_a_sync_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """looptime's plugin asks the event loop policy for a loop even in a sync test, which
    creates one that nobody closes; its ResourceWarning would then fail whichever test the
    garbage collector happens to run in. Close it where it was made."""
    yield
    if not inspect.iscoroutinefunction(request.function):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # none set (this fixture already cleared it): nothing was made
            return
        if not loop.is_running():
            loop.close()
            asyncio.set_event_loop(None)
