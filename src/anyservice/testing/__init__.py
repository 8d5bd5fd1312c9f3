"""Test your services on asyncio and trio, on virtual time.

- :mod:`anyservice.testing.pytest_plugin`: runs each ``@pytest.mark.anyio`` test on both
  backends; ``@pytest.mark.virtual_time`` puts it on a virtual clock.
- :class:`VirtualTimeEventLoop`: asyncio's counterpart of trio's ``MockClock``.
- :func:`run`: run an async function on a backend, on virtual time, outside pytest.
- :func:`virtual_wall_clock`: make ``@crontab`` read wall time from the virtual clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar, TypeVarTuple, Unpack

import anyio

from .._timers import wall_clock
from ._clock import VirtualTimeEventLoop as VirtualTimeEventLoop
from ._clock import backend_options as backend_options
from ._clock import new_virtual_time_loop as new_virtual_time_loop

__all__ = [
    "VirtualTimeEventLoop",
    "backend_options",
    "new_virtual_time_loop",
    "run",
    "virtual_wall_clock",
]

T = TypeVar("T")
PosArgs = TypeVarTuple("PosArgs")


def run(
    func: Callable[[Unpack[PosArgs]], Awaitable[T]],
    *args: *PosArgs,
    backend: str = "asyncio",
    virtual_time: bool = True,
) -> T:
    """Run ``func(*args)`` to completion on ``backend``, on virtual time unless told not to."""
    return anyio.run(
        func,
        *args,
        backend=backend,
        backend_options=backend_options(backend, virtual_time=virtual_time),
    )


@contextmanager
def virtual_wall_clock(start: datetime.datetime) -> Iterator[None]:
    """Within this block, cron schedules see wall time as ``start`` plus elapsed virtual time.

    Enter it inside the event loop (wall time is ``start`` at the moment of entering), so a
    ``@crontab`` job can be tested across a day, or a DST change, in no real time.

    Raises:
        ValueError: if ``start`` is a naive datetime.
    """
    if start.utcoffset() is None:
        raise ValueError(f"virtual_wall_clock() needs an aware datetime, got {start!r}")
    epoch = start.timestamp()
    origin = anyio.current_time()
    with wall_clock(lambda: epoch + (anyio.current_time() - origin)):
        yield
