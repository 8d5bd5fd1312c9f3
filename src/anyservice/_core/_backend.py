"""The core's only backend-specific code: a loop's hand-over, and the current task.

A synchronous ``request_stop()`` may come from another thread, or from a signal handler
that interrupts the event loop's own code between two bytecodes. Neither may touch the
loop's state directly; both may use the loop's thread-safe and signal-safe hand-over,
asyncio's ``call_soon_threadsafe`` or trio's ``TrioToken.run_sync_soon``, which runs the
call at the loop's next turn. anyio's own event loop token does the same, but taking it
costs several times what a service's whole start costs here, and every run takes one.

Each run also keeps its task, for the stacks of ``tracebacks()``: the backend's own task
object, which costs nothing to keep, where anyio's ``TaskInfo`` is an object (and a weak
reference) of its own per task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["call_in_loop", "current_loop", "current_task", "task_coroutine"]


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
