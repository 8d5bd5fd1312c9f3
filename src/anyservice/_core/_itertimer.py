"""``Service.itertimer()``: mode's drift-free timer loop inside a task of the service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import anyio

from .._schedule import IntervalSchedule, MissedTickPolicy, TimerStats, check_interval
from ._specs import check_name

__all__ = ["itertimer"]


class _Sleeper(Protocol):
    @property
    def should_stop(self) -> bool: ...

    @property
    def timer_stats(self) -> dict[str, TimerStats]: ...

    async def _sleep_until(self, deadline: float) -> bool: ...


async def itertimer(
    service: _Sleeper,
    interval: float,
    *,
    policy: MissedTickPolicy | str = MissedTickPolicy.SKIP,
    exec_first: bool = False,
    name: str | None = None,
) -> AsyncIterator[float]:
    """Yield on the grid of ``interval`` until ``service`` stops (mode's ``itertimer``).

    Each value is the tick's lateness in seconds. The loop body counts as the tick's body for
    the missed-tick policy. Iteration ends as soon as a stop is requested. With a ``name``,
    the loop's statistics are kept in ``service.timer_stats[name]``, as a ``@timer``'s.
    """
    check_name(name, "itertimer name")
    seconds = check_interval(interval, "itertimer interval")
    schedule = IntervalSchedule(
        seconds, start=anyio.current_time(), policy=policy, exec_first=exec_first
    )
    stats: TimerStats | None = None
    if name is not None:
        stats = service.timer_stats[name] = TimerStats.for_interval(seconds)
    while not service.should_stop:
        due = schedule.due
        if not await service._sleep_until(due):
            return
        started = anyio.current_time()
        yield max(0.0, started - due)
        finished = max(started, anyio.current_time())
        outcome = schedule.advance(started, finished)
        if stats is not None:
            stats.record(max(0.0, started - due), finished - started)
            stats.missed += outcome.missed
            stats.overruns += int(outcome.overran)
