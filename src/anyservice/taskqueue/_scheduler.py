"""Scheduled tasks: a run per tick, once across the cluster, stored by any worker.

``queue.schedule(task, "*/5 * * * *")`` (or ``@queue.task(schedule=...)``) defines a
:class:`Schedule`. Every :class:`~anyservice.taskqueue.TaskWorker` that serves the task
runs :func:`keep_schedule` in its scope: it sleeps until the next tick is due and stores
it with ``broker.submit_tick``, whose unique key (schedule, due time) lets one store win
however many workers try. The run is due at the tick's due time, so whichever worker is
free claims it at once. The tick arithmetic is ``_ticks.py``'s, pure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from ._errors import BrokerError
from ._leases import TickResult
from ._ticks import DEFAULT_CATCH_UP, MissedTicks, TickGrid, check_missed, plan_ticks
from .brokers import Broker

__all__ = ["Schedule", "ScheduledTask", "define_schedule", "keep_schedule"]


class _Queue(Protocol):
    @property
    def broker(self) -> Broker: ...

    @property
    def max_attempts(self) -> int: ...


class ScheduledTask(Protocol):
    """What a schedule needs of its task (a ``Task`` has it all)."""

    @property
    def name(self) -> str: ...

    @property
    def queue(self) -> _Queue: ...

    @property
    def retries(self) -> int: ...

    @property
    def stored_retry_delay(self) -> float: ...

    @property
    def timeout(self) -> float | None: ...

    @property
    def priority(self) -> int: ...

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str: ...


#: Backoff after a broker error while storing ticks.
_RETRY_AFTER = 0.5
#: Shortest sleep while the broker's clock has not reached the due time yet.
_CLOCK_STEP = 0.001


@dataclass(eq=False)
class Schedule:
    """A task that runs on a schedule: one run per tick across every worker.

    Made by ``queue.schedule()`` or ``@queue.task(schedule=...)``.

    Attributes:
        name: Unique per queue; ticks are stored under it, so every process must agree.
        task: The task each tick runs.
        grid: When the ticks are due.
        payload: The JSON arguments every run gets.
        missed: What becomes of ticks nobody stored because every worker was down.
        overlap: Whether a tick may start while the previous run is RUNNING; if not,
            that tick is skipped (and counted).
        catch_up: Most missed ticks ``missed="all"`` runs.
        counts: What this process's workers did with the ticks: ``stored`` (won the
            store), ``taken`` (another worker had stored it), ``skipped`` (overlap).
    """

    name: str
    task: ScheduledTask
    grid: TickGrid
    payload: str
    missed: MissedTicks = MissedTicks.SKIP
    overlap: bool = False
    catch_up: int = DEFAULT_CATCH_UP
    counts: dict[str, int] = field(
        default_factory=lambda: {result.value: 0 for result in TickResult}
    )

    def __repr__(self) -> str:
        return f"<Schedule {self.name!r} of {self.task.name!r} {self.grid.describe()}>"


def define_schedule(
    task: ScheduledTask,
    grid: TickGrid,
    name: object,
    *,
    args: object,
    kwargs: object,
    missed: object,
    overlap: object,
    catch_up: object,
) -> Schedule:
    """A checked :class:`Schedule` (see ``TaskQueue.schedule`` for the options).

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range, or arguments
            that do not fit the task or JSON.
    """
    if not isinstance(name, str):
        raise TypeError(f"schedule name must be a str, got {name!r}")
    if not name:
        raise ValueError("schedule name must not be empty")
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    if isinstance(catch_up, bool) or not isinstance(catch_up, int):
        raise TypeError(f"catch_up must be an int, got {catch_up!r}")
    if catch_up < 1:
        raise ValueError(f"catch_up must be >= 1, got {catch_up!r}")
    if not isinstance(args, tuple | list):
        raise TypeError(f"args must be a tuple or list, got {args!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, got {kwargs!r}")
    return Schedule(
        name=name,
        task=task,
        grid=grid,
        payload=task.encode(tuple(args), dict(kwargs or {})),
        missed=check_missed(missed),
        overlap=overlap,
        catch_up=catch_up,
    )


async def _store(
    schedule: Schedule, due: float, log: logging.LoggerAdapter[Any], *, overlap: bool
) -> TickResult:
    task = schedule.task
    broker = task.queue.broker
    stored = await broker.submit_tick(
        schedule.name,
        due,
        task.name,
        schedule.payload,
        overlap=overlap,
        retries=task.retries,
        retry_delay=task.stored_retry_delay,
        timeout=task.timeout,
        max_attempts=max(task.queue.max_attempts, task.retries + 1),
        priority=task.priority,
    )
    schedule.counts[stored.result.value] += 1
    if stored.result is TickResult.SKIPPED:
        log.warning(
            "schedule %r: tick due at %s skipped: the previous run is still running "
            "(overlap=False)",
            schedule.name,
            due,
        )
    return stored.result


async def keep_schedule(schedule: Schedule, log: logging.LoggerAdapter[Any]) -> None:
    """Store the schedule's ticks as they fall due, forever (cancel to stop)."""
    broker = schedule.task.queue.broker
    awake_for: float | None = None
    while True:
        try:
            latest = (await broker.tick_counts(schedule.name)).latest
            now = broker.now()
            # The ticks of one plan (a catch-up and the current one) are queued together:
            # only a run from before them can make them wait.
            overlap = schedule.overlap
            for due in plan_ticks(
                schedule.grid,
                last=latest,
                now=now,
                awake_for=awake_for,
                missed=schedule.missed,
                catch_up=schedule.catch_up,
            ):
                if await _store(schedule, due, log, overlap=overlap) is TickResult.STORED:
                    overlap = True
        except BrokerError as exc:
            log.warning("schedule %r: broker error while storing ticks: %s", schedule.name, exc)
            await anyio.sleep(_RETRY_AFTER)
            continue
        due = schedule.grid.next_after(max(now, latest) if latest is not None else now)
        # The broker's clock is wall time and anyio's is monotonic: sleep until the broker
        # says the tick is due, never waking early for it.
        while (remaining := due - broker.now()) > 0:  # noqa: ASYNC110 - a clock, no event
            await anyio.sleep(max(remaining, _CLOCK_STEP))
        awake_for = due
