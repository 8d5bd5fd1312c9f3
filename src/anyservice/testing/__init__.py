"""Test your services on asyncio and trio, on virtual time.

- :mod:`anyservice.testing.pytest_plugin`: runs each ``@pytest.mark.anyio`` test on both
  backends; ``@pytest.mark.virtual_time`` puts it on a virtual clock.
- :class:`VirtualTimeEventLoop`: asyncio's counterpart of trio's ``MockClock``.
- :func:`run`: run an async function on a backend, on virtual time, outside pytest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio

from ._clock import VirtualTimeEventLoop as VirtualTimeEventLoop
from ._clock import backend_options as backend_options
from ._clock import new_virtual_time_loop as new_virtual_time_loop

__all__ = ["VirtualTimeEventLoop", "backend_options", "new_virtual_time_loop", "run"]

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
