"""When a scheduled task's ticks are due, and which of them to store: pure functions.

A scheduled task fires on a *tick grid* of wall-clock epoch seconds that every process
computes alike: a fixed interval on the grid ``anchor + k * interval`` (epoch 0 by
default, so any process agrees on it without talking to the others), or a cron
expression matched in a timezone (``CronSchedule``, with its daylight-saving rules).

Every worker serving a scheduled task runs the same loop: sleep until the next tick is
due, then ask :func:`plan_ticks` which ticks to store, given the latest tick any process
stored. Each tick is stored under the unique key (schedule, due time), so however many
workers store the same tick, the broker keeps one run of it.

Ticks between the latest stored one and the one a worker woke up for were missed: every
worker was down (or asleep) when they were due. The ``missed`` policy says what becomes
of them: ``"skip"`` drops them, ``"latest"`` runs the most recent once, ``"all"`` runs
them all, up to a bound, the most recent first kept.

Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import datetime
import enum
import math
import numbers
from collections.abc import Sequence

from .._schedule import CronSchedule, check_interval

__all__ = [
    "DEFAULT_CATCH_UP",
    "CronGrid",
    "IntervalGrid",
    "MissedTicks",
    "TickGrid",
    "check_missed",
    "grid_from",
    "plan_ticks",
    "tick_key",
]

#: Most missed ticks ``missed="all"`` stores after downtime.
DEFAULT_CATCH_UP = 100

_UTC = datetime.UTC


class MissedTicks(enum.Enum):
    """What a schedule does with the ticks nobody stored because every worker was down."""

    #: Drop them; only the next tick runs.
    SKIP = "skip"
    #: Run the most recent missed tick once, then go on with the next.
    LATEST = "latest"
    #: Run every missed tick (up to a bound, the most recent kept), then the next.
    ALL = "all"


def check_missed(value: object) -> MissedTicks:
    """The policy for ``value`` (a :class:`MissedTicks` or its string value).

    Raises:
        TypeError: ``value`` is not a string or a policy.
        ValueError: It names no policy.
    """
    if isinstance(value, MissedTicks):
        return value
    if not isinstance(value, str):
        raise TypeError(f"missed must be 'skip', 'latest' or 'all', got {value!r}")
    for policy in MissedTicks:
        if value == policy.value:
            return policy
    raise ValueError(f"missed must be 'skip', 'latest' or 'all', got {value!r}")


def tick_key(due: float) -> float:
    """The due time as stored: rounded to the microsecond, so every process agrees on it."""
    return round(due, 6)


class TickGrid:
    """The due times of a schedule, in wall-clock epoch seconds."""

    def next_after(self, moment: float) -> float:
        """The first tick strictly after ``moment``."""
        raise NotImplementedError

    def last_before(self, moment: float, after: float, count: int) -> list[float]:
        """Up to ``count`` of the latest ticks strictly between ``after`` and ``moment``.

        Oldest first.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """How the schedule reads to a user, e.g. ``"every 5s"``."""
        raise NotImplementedError


class IntervalGrid(TickGrid):
    """Ticks at ``anchor + k * interval``: computed by one multiplication, so no drift."""

    __slots__ = ("anchor", "interval")

    def __init__(self, interval: float, anchor: float = 0.0) -> None:
        self.interval: float = check_interval(interval, "schedule interval")
        given: object = anchor
        if isinstance(given, bool) or not isinstance(given, numbers.Real):
            raise TypeError(f"schedule anchor must be epoch seconds, got {anchor!r}")
        if not math.isfinite(given):
            raise ValueError(f"schedule anchor must be finite, got {anchor!r}")
        self.anchor: float = float(given)

    def __repr__(self) -> str:
        return f"IntervalGrid({self.interval!r}, anchor={self.anchor!r})"

    def _at(self, index: int) -> float:
        return self.anchor + index * self.interval

    def _first_index_after(self, moment: float) -> int:
        # The quotient may round either way; the grid is monotone, so step to the exact one.
        index = math.floor((moment - self.anchor) / self.interval)
        while self._at(index) > moment:
            index -= 1
        while self._at(index) <= moment:
            index += 1
        return index

    def next_after(self, moment: float) -> float:
        return self._at(self._first_index_after(moment))

    def last_before(self, moment: float, after: float, count: int) -> list[float]:
        if count <= 0:
            return []
        top = self._first_index_after(moment) - 1
        while self._at(top) >= moment:
            top -= 1
        low = max(self._first_index_after(after), top - count + 1)
        return [self._at(index) for index in range(low, top + 1)]

    def describe(self) -> str:
        return f"every {self.interval:g}s"


class CronGrid(TickGrid):
    """Ticks where a cron expression matches local wall time (see ``CronSchedule``)."""

    __slots__ = ("cron",)

    def __init__(self, cron: CronSchedule) -> None:
        self.cron = cron

    def __repr__(self) -> str:
        return f"CronGrid({self.cron!r})"

    def next_after(self, moment: float) -> float:
        fire = self.cron.next_after(datetime.datetime.fromtimestamp(moment, _UTC))
        return fire.timestamp()

    def _between(self, start: float, moment: float) -> list[float]:
        ticks: list[float] = []
        tick = self.next_after(start)
        while tick < moment:
            ticks.append(tick)
            tick = self.next_after(tick)
        return ticks

    def last_before(self, moment: float, after: float, count: int) -> list[float]:
        if count <= 0 or moment <= after:
            return []
        # Croniter only walks forward: look back over a window that doubles until it holds
        # enough ticks, so a long downtime costs a few walks over its end, not all of it.
        window = 1.0
        while True:
            start = max(after, moment - window)
            ticks = self._between(start, moment)
            if len(ticks) >= count or start == after:
                return ticks[-count:]
            window *= 2

    def describe(self) -> str:
        return f"cron {self.cron.expression!r} in {self.cron.timezone}"


def grid_from(schedule: object, *, timezone: str | datetime.tzinfo | None = None) -> TickGrid:
    """The tick grid of what a user passed as ``schedule=``.

    A string is a cron expression (matched in ``timezone``, UTC by default); a
    :class:`CronSchedule` is used as it is; a number of seconds or a ``timedelta`` is a
    fixed interval on the epoch grid; a :class:`TickGrid` is used as it is.

    Raises:
        TypeError: ``schedule`` is none of these, or ``timezone`` came with a non-cron one.
        ValueError: A bad cron expression or timezone, or an interval that is not > 0.
    """
    if isinstance(schedule, TickGrid):
        grid = schedule
    elif isinstance(schedule, str):
        return CronGrid(CronSchedule(schedule, timezone=timezone))
    elif isinstance(schedule, CronSchedule):
        grid = CronGrid(schedule)
    elif isinstance(schedule, datetime.timedelta):
        grid = IntervalGrid(schedule.total_seconds())
    elif isinstance(schedule, int | float) and not isinstance(schedule, bool):
        grid = IntervalGrid(schedule)
    else:
        raise TypeError(
            "schedule must be a cron expression, a CronSchedule, a number of seconds or a "
            f"timedelta, got {schedule!r}"
        )
    if timezone is not None:
        raise TypeError(
            "timezone= goes with a cron expression string; give the CronSchedule its "
            f"timezone instead (schedule={schedule!r})"
        )
    return grid


def plan_ticks(
    grid: TickGrid,
    *,
    last: float | None,
    now: float,
    awake_for: float | None,
    missed: MissedTicks,
    catch_up: int = DEFAULT_CATCH_UP,
) -> Sequence[float]:
    """The ticks a worker should store now, oldest first.

    Args:
        grid: The schedule's tick grid.
        last: The latest tick stored by any process, or ``None`` if none ever was.
        now: The current wall-clock time.
        awake_for: The tick this worker slept until (due, so ``<= now``), or ``None`` on
            the worker's first look, when it slept for nothing.
        missed: What to do with the ticks after ``last`` that nobody stored in time:
            those before ``awake_for``, or on a first look every tick up to ``now``.
        catch_up: Most missed ticks ``MissedTicks.ALL`` stores.

    Returns:
        The missed ticks the policy keeps, then ``awake_for`` unless already stored.
        Nothing is stored for a schedule that has never run but the tick woken for: a
        new schedule has nothing to catch up on.
    """
    if awake_for is not None and awake_for > now:
        raise ValueError(f"awake_for ({awake_for!r}) is after now ({now!r})")
    current = [] if awake_for is None or (last is not None and last >= awake_for) else [awake_for]
    if last is None:
        return current
    # On a first look every tick up to now (included) went by unstored.
    bound = awake_for if awake_for is not None else math.nextafter(now, math.inf)
    if missed is MissedTicks.SKIP or bound <= last:
        return current
    count = 1 if missed is MissedTicks.LATEST else catch_up
    return [*grid.last_before(bound, last, count), *current]
