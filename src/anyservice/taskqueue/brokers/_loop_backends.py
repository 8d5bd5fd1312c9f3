"""Backend-specific code: calling into an event loop from another thread without waiting.

anyio's ``from_thread.run_sync`` blocks the calling thread until the event loop has run
the function. A database thread that finishes a batch of statements must hand the
results to each caller's event loop and go on with the next batch at once, so this
module schedules the call and returns, through each backend's own thread-safe hook
(asyncio's ``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable

import anyio.lowlevel

__all__ = ["LoopHandle"]

# The handle a task made last, with its thread: a task never changes event loop, and a
# context copied into a worker thread is told apart by the thread.
_current: contextvars.ContextVar[tuple[int, LoopHandle]] = contextvars.ContextVar(
    "anyservice_loop_handle"
)


class LoopHandle:
    """The current event loop, for calling into it from other threads.

    Made inside the event loop (``LoopHandle()``); :meth:`call_soon` may then be called
    from any thread.
    """

    __slots__ = ("_schedule", "native")

    def __init__(self) -> None:
        native = anyio.lowlevel.current_token().native_token
        #: The backend's own loop object (asyncio's loop, trio's token): one per loop.
        self.native = native
        schedule = getattr(native, "call_soon_threadsafe", None)  # asyncio's loop
        if schedule is None:
            schedule = native.run_sync_soon  # type: ignore[attr-defined]  # a TrioToken
        self._schedule: Callable[[Callable[[], object]], object] = schedule

    @classmethod
    def current(cls) -> LoopHandle:
        """The handle of the running event loop, made once per task and thread."""
        thread = threading.get_ident()
        cached = _current.get(None)
        if cached is not None and cached[0] == thread:
            return cached[1]
        handle = cls()
        _current.set((thread, handle))
        return handle

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run ``function()`` in the event loop soon; never blocks, never raises.

        A loop that has already closed is not called: its callers are gone too.
        """
        try:
            self._schedule(function)
        except RuntimeError:
            pass  # asyncio: the loop is closed; trio: RunFinishedError (a RuntimeError).
