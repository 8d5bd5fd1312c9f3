"""Virtual time for both backends.

On trio, virtual time is trio's own :class:`trio.testing.MockClock`. asyncio has no such
thing, so :class:`VirtualTimeEventLoop` provides it: an ordinary selector event loop whose
``time()`` is a virtual clock, and whose selector, whenever the loop would block waiting for
a timer, first polls for real I/O (threads finishing, signals, sockets) and, if nothing is
ready, jumps the clock straight to the timer instead of sleeping. This is what
``MockClock(autojump_threshold=0)`` does on trio, so a test reads the same on both.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["VirtualTimeEventLoop", "backend_options", "new_virtual_time_loop"]


class _JumpingSelector(selectors.BaseSelector):
    """A selector that turns "block until the next timer" into a jump of the virtual clock."""

    def __init__(
        self,
        loop_clock: _VirtualClock,
        autojump_threshold: float,
        next_timer: Callable[[], float | None],
    ) -> None:
        self._real = selectors.DefaultSelector()
        self._clock = loop_clock
        self._threshold = autojump_threshold
        self._next_timer = next_timer

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return self._real.select(0)
        # Wait for real events (a worker thread finishing, a signal) for at most the
        # threshold: with no timer pending there is nothing to jump to, so block for real.
        events = self._real.select(None if timeout is None else min(self._threshold, timeout))
        if events or timeout is None:
            return events
        target = self._clock.now + timeout
        when = self._next_timer()
        # Land exactly on the timer's due time: ``now + (when - now)`` can be an ulp off, and
        # a test comparing clock readings should see the very value it scheduled.
        exact = when is not None and abs(when - target) <= 1e-9 * max(1.0, abs(when))
        self._clock.now = max(self._clock.now, when if exact and when is not None else target)
        return []

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class _VirtualClock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class VirtualTimeEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on virtual time: sleeps and timeouts take no real time.

    Time starts at 0 and moves only when every task is waiting for a timer (after
    ``autojump_threshold`` real seconds of idleness, 0 by default), jumping to the next
    timer. Real I/O and worker threads still work; while they are pending the clock may jump
    past timers, as trio's ``MockClock`` does.
    """

    def __init__(self, autojump_threshold: float = 0.0) -> None:
        if autojump_threshold < 0:
            raise ValueError(f"autojump_threshold must be >= 0, got {autojump_threshold!r}")
        self._virtual_clock = _VirtualClock()
        super().__init__(
            _JumpingSelector(self._virtual_clock, autojump_threshold, self._next_timer_due)
        )

    def _next_timer_due(self) -> float | None:
        # asyncio keeps its timers in a heap, earliest first; the attribute is private but
        # has been stable since asyncio began.
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled", [])
        return scheduled[0].when() if scheduled else None

    def time(self) -> float:
        return self._virtual_clock.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by hand (it never moves backwards)."""
        if seconds < 0:
            raise ValueError(f"time can only move forward, got {seconds!r}")
        self._virtual_clock.now += seconds


def new_virtual_time_loop() -> VirtualTimeEventLoop:
    """A fresh :class:`VirtualTimeEventLoop`, usable as anyio's ``loop_factory``."""
    return VirtualTimeEventLoop()


def backend_options(backend: str, *, virtual_time: bool) -> dict[str, Any]:
    """anyio backend options that run ``backend`` on a virtual or the real clock.

    Raises:
        ValueError: for a backend other than ``"asyncio"`` or ``"trio"``.
    """
    if backend == "asyncio":
        return {"loop_factory": new_virtual_time_loop} if virtual_time else {}
    if backend == "trio":
        if not virtual_time:
            return {}
        import trio.testing

        return {"clock": trio.testing.MockClock(autojump_threshold=0)}
    raise ValueError(f"unknown backend {backend!r}: expected 'asyncio' or 'trio'")
