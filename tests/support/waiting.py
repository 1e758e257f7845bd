"""Wait for a condition instead of sleeping a fixed time before asserting it: a fixed sleep is too short
on a loaded machine and wasted on an idle one."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Call `predicate` until it returns something truthy, and return that. AssertionError once
    `timeout_s` have passed without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.01
) -> Any:
    """`wait_until` inside an event loop: yields to it between checks, so background tasks progress.
    `predicate` may return an awaitable (e.g. `lambda: sink.all()`); its result is what counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
