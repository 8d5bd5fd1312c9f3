"""Waking the tasks that wait for a change to the runs, in this process."""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from ._loop_backends import LoopHandle

__all__ = ["RECHECK_INTERVAL", "ChangeNotifier"]

#: The longest a waiter without a poll sleeps before it compares the generations again:
#: a change :meth:`ChangeNotifier.notify` records in another thread (another event loop,
#: such as a sync caller's) sets no event of this one's.
RECHECK_INTERVAL = 1.0


@dataclass(eq=False)
class _Waiter:
    event: anyio.Event
    thread: int
    work_only: bool
    loop: LoopHandle


class ChangeNotifier:
    """Counts changes to runs and wakes the tasks waiting for one.

    Two generation counters: ``changes`` moves on every write, ``work`` only on writes
    that made a run claimable: a submit, a release, or a failure that was retried (the
    run is SCHEDULED again). A failure that ended the run FAILED is a change, not work.
    Waiters compare a generation they saw earlier with the current one, so a change
    between "look" and "wait" is never missed.

    Brokers of one SQLite file in one process share a notifier, and they may run in
    different threads with their own event loops. An anyio event can only be set from its
    own loop, so :meth:`notify` sets the events of waiters in the calling thread (whose
    loop is the caller's) and waiters elsewhere see the new generation at their next poll;
    :meth:`notify_from_thread` wakes every waiter, through its own loop, from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes = 0
        self._work = 0
        self._waiters: list[_Waiter] = []
        self._cancel_watchers: list[tuple[Callable[[list[str]], None], int, LoopHandle]] = []

    def generation(self, *, work: bool) -> int:
        """The current ``work`` (or ``changes``) generation."""
        return self._work if work else self._changes

    def notify(self, *, work: bool) -> None:
        """Record a change (one that may have made work claimable, if ``work``)."""
        thread = threading.get_ident()
        with self._lock:
            self._changes += 1
            if work:
                self._work += 1
            ready = [w for w in self._waiters if w.thread == thread and (work or not w.work_only)]
            for waiter in ready:
                self._waiters.remove(waiter)
        for waiter in ready:
            waiter.event.set()

    def notify_from_thread(self, *, work: bool, claimed: bool = False) -> int:
        """:meth:`notify`, from any thread: every waiter is woken in its own event loop
        (at once if that is the caller's, through the loop otherwise). ``claimed``: the
        work was claimed already (for a waiting claim loop), so waiters for work alone
        are not woken. Returns the new ``work`` generation."""
        thread = threading.get_ident()
        with self._lock:
            self._changes += 1
            if work:
                self._work += 1
            wake_work = work and not claimed
            ready = [w for w in self._waiters if wake_work or not w.work_only]
            generation = self._work
            for waiter in ready:
                self._waiters.remove(waiter)
        for waiter in ready:
            if waiter.thread == thread:
                waiter.event.set()
            else:
                waiter.loop.call_soon(waiter.event.set)
        return generation

    @contextmanager
    def watching_cancels(self, asked: Callable[[list[str]], None]) -> Iterator[None]:
        """While in the block, :meth:`cancel_asked` calls ``asked(run_ids)`` in this event
        loop (the caller's)."""
        watcher = (asked, threading.get_ident(), LoopHandle.current())
        with self._lock:
            self._cancel_watchers.append(watcher)
        try:
            yield
        finally:
            with self._lock:
                self._cancel_watchers.remove(watcher)

    def cancel_asked(self, run_ids: list[str]) -> None:
        """From any thread: a user asked for these RUNNING runs to be cancelled; tell
        every watcher (at once if its loop is the caller's, through its loop otherwise)."""
        thread = threading.get_ident()
        with self._lock:
            watchers = list(self._cancel_watchers)
        for asked, home, loop in watchers:
            if home == thread:
                asked(run_ids)
            else:
                loop.call_soon(functools.partial(asked, run_ids))

    async def wait(
        self,
        *,
        work: bool,
        since: int,
        timeout: float,
        poll: Callable[[], Awaitable[None]] | None = None,
        poll_interval: float = 0.005,
    ) -> None:
        """Return once the generation differs from ``since``, or after ``timeout`` seconds.

        ``poll``, if given, is awaited every ``poll_interval`` seconds to detect changes
        nobody notifies about (another process's commits); it calls :meth:`notify` itself.
        Without one, the generation is still compared every :data:`RECHECK_INTERVAL`.
        """
        if self.generation(work=work) != since or timeout <= 0:
            await anyio.lowlevel.checkpoint()
            return
        # The wait below is the checkpoint: no pass of the loop before it, which would
        # keep a submitter waiting for its run on the CPU its worker may need.
        deadline = anyio.current_time() + timeout
        waiter = _Waiter(anyio.Event(), threading.get_ident(), work, LoopHandle.current())
        with self._lock:
            self._waiters.append(waiter)
        try:
            while self.generation(work=work) == since:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return
                step = min(remaining, RECHECK_INTERVAL if poll is None else poll_interval)
                with anyio.move_on_after(step):
                    await waiter.event.wait()
                if poll is not None and self.generation(work=work) == since:
                    await poll()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
