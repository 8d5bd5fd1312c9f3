"""Backend-specific code: calling into an event loop from another thread without waiting,
and watching a socket from inside one.

anyio's ``from_thread.run_sync`` blocks the calling thread until the event loop has run
the function. A database thread that finishes a batch of statements must hand the
results to each caller's event loop and go on with the next batch at once, so this
module schedules the call and returns, through each backend's own thread-safe hook
(asyncio's ``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import anyio.lowlevel

__all__ = ["LoopHandle", "LoopReader"]

_log = logging.getLogger("anyservice.taskqueue")

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

    __slots__ = ("_schedule", "_schedule_here", "current_task", "native")

    def __init__(self) -> None:
        native = anyio.lowlevel.current_token().native_token
        #: The backend's own loop object (asyncio's loop, trio's token): one per loop.
        self.native = native
        schedule = getattr(native, "call_soon_threadsafe", None)  # asyncio's loop
        #: The backend's own current task object, from the loop's thread: a fraction of
        #: what ``anyio.get_current_task()`` costs, which makes a ``TaskInfo`` each time.
        self.current_task: Callable[[], object]
        if schedule is None:
            schedule = native.run_sync_soon  # type: ignore[attr-defined]  # a TrioToken
            import trio

            self.current_task = trio.lowlevel.current_task
        else:
            import asyncio

            self.current_task = asyncio.current_task
        self._schedule: Callable[[Callable[[], object]], object] = schedule
        # From the loop's own thread asyncio needs no wake-up of the loop (a write to its
        # self-pipe, then a pass to read it); trio has no other way.
        self._schedule_here: Callable[[Callable[[], object]], object] = getattr(
            native, "call_soon", schedule
        )

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

    def call_soon_here(self, function: Callable[[], object]) -> None:
        """:meth:`call_soon`, from the event loop's own thread (cheaper on asyncio)."""
        self._schedule_here(function)

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run ``function()`` in the event loop soon; never blocks, never raises.

        A loop that has already closed is not called: its callers are gone too.
        """
        try:
            self._schedule(function)
        except RuntimeError:
            pass  # asyncio: the loop is closed; trio: RunFinishedError (a RuntimeError).


class LoopReader:
    """Calls ``on_readable()`` in an event loop each time a socket has data to read.

    No thread of its own: the event loop watches the socket with the rest of its I/O
    (asyncio's ``add_reader``, a trio system task in ``wait_readable``), so what wakes
    is the loop itself, where a thread in ``recv`` would have to wake and then hand over
    to the loop. ``on_readable`` runs in the loop's thread and should not raise (what it
    raises is logged, and the watch goes on).

    Made by :meth:`start` inside the event loop; :meth:`stop` from any thread.
    """

    __slots__ = ("_handle", "_on_readable", "_scope", "_sock", "_thread")

    def __init__(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        self._sock = sock
        self._on_readable = on_readable
        self._handle = LoopHandle.current()
        self._thread = threading.get_ident()
        self._scope: Any = None

    @classmethod
    def start(cls, sock: socket.socket, on_readable: Callable[[], None]) -> LoopReader | None:
        """Watch ``sock`` in the running event loop; ``None`` if this loop cannot."""
        reader = cls(sock, on_readable)
        native: Any = reader._handle.native
        add_reader = getattr(native, "add_reader", None)
        try:
            if add_reader is not None:  # asyncio (and uvloop)
                add_reader(sock.fileno(), _asyncio_context().run, on_readable)
            elif type(native).__module__.startswith("trio"):
                import trio

                trio.lowlevel.spawn_system_task(reader._watch, name="anyservice wake-ups")
            else:
                return None
        except (NotImplementedError, RuntimeError):
            return None  # e.g. asyncio's proactor loop on Windows: no readers
        return reader

    async def _watch(self) -> None:
        import trio

        with trio.CancelScope() as scope:
            self._scope = scope
            while True:
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                except trio.ClosedResourceError:
                    return
                try:
                    self._on_readable()
                except Exception:
                    # A system task's exception would end the whole run: report it, and
                    # go on watching (asyncio's loop does the same for a reader).
                    _log.exception("handling a readable socket failed")

    def stop(self) -> None:
        """Stop watching and close the socket, in the loop's thread (soon, if called from
        another); at once if that loop has ended."""
        if threading.get_ident() == self._thread:
            self._stop_here()
            return
        try:
            self._handle._schedule(self._stop_here)
        except RuntimeError:
            self._sock.close()  # The loop has ended: nothing watches the socket any more.

    def _stop_here(self) -> None:
        native: Any = self._handle.native
        remove_reader = getattr(native, "remove_reader", None)
        if remove_reader is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # a closed loop
                remove_reader(self._sock.fileno())
        elif self._scope is not None:
            import trio

            self._scope.cancel()
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


def _asyncio_context() -> contextvars.Context:
    """A copy of the current context in which anyio works outside a task, as in a
    reader's callback: sniffio tells asyncio by its current task, and a callback runs
    in none (without sniffio, anyio takes any running loop for asyncio's)."""
    context = contextvars.copy_context()
    try:
        import sniffio
    except ImportError:
        return context
    context.run(sniffio.current_async_library_cvar.set, "asyncio")
    return context
