"""``Service.itertimer()``: mode's drift-free timer loop inside a task of the service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import anyio

from .._schedule import IntervalSchedule, MissedTickPolicy, check_interval

__all__ = ["itertimer"]


class _Sleeper(Protocol):
    @property
    def should_stop(self) -> bool: ...

    async def _sleep_until(self, deadline: float) -> bool: ...


async def itertimer(
    service: _Sleeper,
    interval: float,
    *,
    policy: MissedTickPolicy | str = MissedTickPolicy.SKIP,
    exec_first: bool = False,
) -> AsyncIterator[float]:
    """Yield on the grid of ``interval`` until ``service`` stops (mode's ``itertimer``).

    Each value is the tick's lateness in seconds. The loop body counts as the tick's body for
    the missed-tick policy. Iteration ends as soon as a stop is requested.
    """
    schedule = IntervalSchedule(
        check_interval(interval, "itertimer interval"),
        start=anyio.current_time(),
        policy=policy,
        exec_first=exec_first,
    )
    while not service.should_stop:
        due = schedule.due
        if not await service._sleep_until(due):
            return
        started = anyio.current_time()
        yield max(0.0, started - due)
        schedule.advance(started, max(started, anyio.current_time()))
