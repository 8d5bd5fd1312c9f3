"""mode's wait family: wait for awaitables or events, or until the service stops.

Each awaitable runs in a task of its own in a task group of the caller; the first to
finish (or all of them, for ``wait_many``), a stop of the service, or the timeout ends the
wait, and whatever is still running is cancelled. An awaitable that raises ends the wait
with its exception, raised as it is (not wrapped in a group).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import anyio

__all__ = ["WaitResult", "WaitResults", "race"]


class WaitResult(NamedTuple):
    """What ``Service.wait()`` and ``wait_many()`` return (mode's ``WaitResult``).

    Attributes:
        result: The awaitable's result (a list of results for ``wait_many``), or None if
            the service stopped first.
        stopped: True if the wait ended because the service was asked to stop.
    """

    result: Any
    stopped: bool


class WaitResults(NamedTuple):
    """What ``Service.wait_first()`` returns (mode's ``WaitResults``).

    Attributes:
        done: The awaitables (or events) that finished, in the order they were given.
        results: Their results, in the same order.
        stopped: True if the wait ended because the service was asked to stop.
    """

    done: list[Any]
    results: list[Any]
    stopped: bool


def _awaitable_of(item: object, what: str) -> Callable[[], Awaitable[Any]]:
    if inspect.isawaitable(item):
        return lambda: item
    wait: Callable[[], Awaitable[Any]] | None = getattr(item, "wait", None)
    if callable(wait):
        return wait  # an event: anyio's, asyncio's or trio's
    raise TypeError(f"{what} takes awaitables or events (with a wait() method), got {item!r}")


def _close_unstarted(items: Sequence[object]) -> None:
    # A coroutine cancelled before its task first ran was never awaited: close it, so
    # that Python does not warn about it on the caller's behalf.
    for item in items:
        if inspect.iscoroutine(item) and inspect.getcoroutinestate(item) == "CORO_CREATED":
            item.close()


async def race(
    items: Sequence[object],
    until_stopped: Callable[[], Awaitable[None]],
    *,
    every: bool,
    timeout: float | None,
    what: str,
) -> tuple[dict[int, Any], bool]:
    """Await ``items`` until the first (or, with ``every``, the last) finishes or a stop.

    Returns:
        The results by index of the items that finished, and whether a stop ended it.

    Raises:
        TypeError: if an item is neither awaitable nor an event.
        TimeoutError: if ``timeout`` seconds passed first.
        Exception: what an item raised.
    """
    try:
        starters = [_awaitable_of(item, what) for item in items]
    except TypeError:
        _close_unstarted(items)
        raise
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    stopped = False

    async def one(index: int, start: Callable[[], Awaitable[Any]], group: Any) -> None:
        try:
            results[index] = await start()
        except Exception as exc:
            errors.append(exc)
            group.cancel_scope.cancel()
            return
        if not every or len(results) == len(starters):
            group.cancel_scope.cancel()

    async def watch(group: Any) -> None:
        nonlocal stopped
        await until_stopped()
        stopped = True
        group.cancel_scope.cancel()

    try:
        with anyio.fail_after(timeout) if timeout is not None else nullcontext():
            async with anyio.create_task_group() as group:
                for index, start in enumerate(starters):
                    group.start_soon(one, index, start, group)
                group.start_soon(watch, group)
    finally:
        _close_unstarted(items)
    if errors:
        raise errors[0]
    return results, stopped
