"""The core's only backend-specific code: handing a call to a running event loop.

A synchronous ``request_stop()`` may come from another thread, or from a signal handler
that interrupts the event loop's own code between two bytecodes. Neither may touch the
loop's state directly; both may use the loop's thread-safe and signal-safe hand-over
(asyncio's ``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``), which runs the
call at the loop's next turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["LoopCaller", "call_in_loop", "loop_caller"]

#: Runs a call at the next turn of one event loop; raises if that loop is gone.
LoopCaller = Callable[[Callable[[], object]], None]


def loop_caller() -> LoopCaller:
    """The hand-over of the event loop running in this thread (asyncio or trio).

    Raises:
        RuntimeError: if no event loop runs in this thread.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:

        def call_soon(function: Callable[[], object]) -> None:
            loop.call_soon_threadsafe(function)

        return call_soon
    import trio  # only reached under trio, so only imported with it installed

    return trio.lowlevel.current_trio_token().run_sync_soon


def call_in_loop(caller: LoopCaller, function: Callable[[], object]) -> bool:
    """Hand ``function`` to the loop of ``caller``; False if that loop has finished."""
    try:
        caller(function)
    except RuntimeError:
        # asyncio: the loop is closed. trio raises RunFinishedError, a RuntimeError too.
        return False
    return True
