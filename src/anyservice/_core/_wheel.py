"""One sleeping task that wakes the idle timers of a service's dependencies when they are due.

A timer between ticks only waits: for its next grid point, or for its service to stop. With
a sleep of its own it can only be woken early by cancelling a scope around it, and on a
stop of a thousand such services that is a thousand cancellations (anyio names the
cancelling task in each: a ``repr()`` of it, every time). Here the timers of the services
one run owns wait on an event each instead: the wheel, one task in the owning run's task
group, sleeps until the earliest due time and sets the events that are due; a stop sets its
service's event itself. Nothing else changes: each timer still computes its own grid point
and runs its own body, in its own service's task, with its policy and statistics.

The wheel is made at the first timer that waits on it and closed by its run once every
dependency has been told to stop (see ``Run.execute``); a timer that finds it closed, or
whose service has no owner, sleeps on its own as before. A dependency whose only work is
its timer waits for its first tick here before it has even opened its task group (see
``_run._enter_bare``).
"""

from __future__ import annotations

import heapq
import itertools
import math

import anyio
import anyio.abc

from ._backend import Waiter

__all__ = ["Wheel"]

#: Below this many entries, woken-early entries are left for the wheel to drop when due.
_COMPACT_AT = 64


class Wheel:
    """The due times of idle timers, in a heap, and the one task that wakes them."""

    __slots__ = ("_alarm", "_closed", "_count", "_early", "_heap", "_scope")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Waiter]] = []
        # Ties in the heap are broken by arrival, never by comparing events.
        self._count = itertools.count()
        #: Set to wake the wheel early: an entry earlier than the one it sleeps until.
        self._alarm: anyio.Event | None = None
        self._scope = anyio.CancelScope()
        self._closed = False
        #: Entries whose event was set early (their service stopped), still in the heap.
        self._early = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def wake_at(self, due: float, event: Waiter) -> None:
        """Set ``event`` at ``due`` (backend clock), or soon after."""
        heap = self._heap
        entry = (due, next(self._count), event)
        heapq.heappush(heap, entry)
        alarm = self._alarm
        if alarm is not None and heap[0] is entry:
            alarm.set()

    def woken_early(self) -> None:
        """An event given to :meth:`wake_at` was set by someone else (a stop)."""
        self._early += 1
        heap = self._heap
        if self._early >= _COMPACT_AT and 2 * self._early > len(heap):
            # Most entries are for services that stopped: drop them now rather than hold
            # them until their due times, which may be hours away.
            heap[:] = [entry for entry in heap if not entry[2].is_set()]
            heapq.heapify(heap)
            self._early = 0

    async def run(self) -> None:
        """Wake the due entries until closed; the task of the owning run's task group."""
        heap = self._heap
        with self._scope:
            while True:
                now = anyio.current_time()
                while heap and heap[0][0] <= now:
                    event = heapq.heappop(heap)[2]
                    if event.is_set():
                        self._early -= 1
                    event.set()
                alarm = self._alarm = anyio.Event()
                with anyio.move_on_at(heap[0][0] if heap else math.inf):
                    await alarm.wait()
                self._alarm = None

    def close(self) -> None:
        """End the wheel's task; timers that wait later sleep on their own."""
        self._closed = True
        self._scope.cancel()
