"""The core's only backend-specific code: a loop's hand-over, and the current task.

A synchronous ``request_stop()`` may come from another thread, or from a signal handler
that interrupts the event loop's own code between two bytecodes. Neither may touch the
loop's state directly; both may use the loop's thread-safe and signal-safe hand-over,
asyncio's ``call_soon_threadsafe`` or trio's ``TrioToken.run_sync_soon``, which runs the
call at the loop's next turn. anyio's own event loop token does the same, but taking it
costs several times what a service's whole start costs here, and every run takes one.

An idle timer waits for one wake-up (see ``_wheel``): the backend's own one-shot wait, an
asyncio future or a trio ``Event``, where anyio's ``Event`` on asyncio is an object, an
``asyncio.Event`` and its waiters' deque (about 0.9 KiB) per wait.

Each run also keeps its task, for the stacks of ``tracebacks()``: the backend's own task
object, which costs nothing to keep, where anyio's ``TaskInfo`` is an object (and a weak
reference) of its own per task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = [
    "Waiter",
    "call_in_loop",
    "clock",
    "current_loop",
    "current_task",
    "new_waiter",
    "task_coroutine",
]


def current_loop() -> object:
    """The running loop's hand-over: the asyncio loop, or trio's token.

    Raises:
        RuntimeError: if no event loop runs in this thread.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        import trio  # reached only under trio, so only imported where it is installed

        return trio.lowlevel.current_trio_token()


def clock(loop: object) -> Callable[[], float]:
    """The backend's clock for ``loop`` (what :func:`current_loop` returned).

    What ``anyio.current_time()`` reads, without its look-up of the running backend (a
    third of what a timer's start costs in calls).
    """
    if isinstance(loop, asyncio.AbstractEventLoop):
        return loop.time
    import trio

    return trio.current_time


def current_task() -> object:
    """The calling task, as the backend knows it (an ``asyncio.Task``, a trio ``Task``)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    if task is not None:
        return task
    import trio

    return trio.lowlevel.current_task()


def task_coroutine(task: object) -> object:
    """The coroutine a task from :func:`current_task` runs."""
    if isinstance(task, asyncio.Task):
        return task.get_coro()
    return getattr(task, "coro", None)


class Waiter(Protocol):
    """One wake-up: ``set()`` (at most once matters), ``is_set()``, ``await wait()``."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


class _FutureWaiter:
    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():  # done: already set, or its wait was cancelled
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._future.done()

    def wait(self) -> Awaitable[None]:
        # The future itself: awaiting it costs no coroutine frame, and a cancellation of
        # the task (anyio's, on asyncio) cancels it.
        return self._future


def new_waiter(loop: object) -> Waiter:
    """A one-shot wait for a task of ``loop`` (what :func:`current_loop` returned)."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        return _FutureWaiter(loop)
    import trio

    event: Waiter = trio.Event()
    return event


def call_in_loop(loop: object, function: Callable[[], object]) -> bool:
    """Run ``function`` at the next turn of ``loop``; False if that loop has finished."""
    try:
        if isinstance(loop, asyncio.AbstractEventLoop):
            loop.call_soon_threadsafe(_in_a_task, loop, function)
        else:
            handover: Any = loop
            handover.run_sync_soon(function)
    except RuntimeError:
        # asyncio's loop is closed, or trio's run has finished (RunFinishedError).
        return False
    return True


def _in_a_task(loop: asyncio.AbstractEventLoop, function: Callable[[], object]) -> None:
    # A bare callback does not tell anyio which backend runs (there is no current task);
    # a task does.
    async def call() -> None:
        function()

    loop.create_task(call())
