"""When timers fire: the interval grid and cron schedules, as pure functions of time.

Nothing here sleeps, reads a clock or touches anyio: callers pass clock readings in and get
due times back, so every rule can be tested exactly, without an event loop.
"""

from __future__ import annotations

import datetime
import enum
import math
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field

from croniter import croniter

from ._checks import MIN_INTERVAL, check_choice, check_clock_reading, check_seconds

__all__ = [
    "CronSchedule",
    "IntervalSchedule",
    "MissedTickPolicy",
    "TickOutcome",
    "TimerStats",
    "check_interval",
    "check_policy",
]

_UTC = datetime.UTC
_ONE_SECOND = datetime.timedelta(seconds=1)
_ONE_MICROSECOND = datetime.timedelta(microseconds=1)
# A date to probe a timezone or a cron expression from: any date does, as long as it is
# before any year a cron year field is likely to name.
_PROBE_DATE = datetime.datetime(2000, 1, 1)  # pragma: no mutate


def check_interval(value: object, what: str = "interval") -> float:
    """Validate a duration in seconds, such as a timer interval or ``loop_seconds``.

    Args:
        value: The duration the user gave: seconds as an int or float, a ``timedelta`` or a
            numeric string (mode's ``Seconds``).
        what: The name to put in the error message, e.g. ``"loop_seconds"``.

    Returns:
        ``value`` as a float: finite and at least :data:`MIN_INTERVAL` (one microsecond).

    Raises:
        TypeError: If ``value`` is not a duration (``bool`` is refused: ``True`` seconds is
            a bug, not a duration).
        ValueError: If ``value`` is NaN, infinite, below one microsecond (zero and negative
            included), or a string that is not a number.
    """
    return check_seconds(value, what, minimum=MIN_INTERVAL)


class MissedTickPolicy(enum.Enum):
    """What a timer does with the ticks that fall due while its body is still running.

    The three policies are tokio's ``MissedTickBehavior`` (``Skip``, ``Delay``, ``Burst``).
    """

    #: Stay on the original grid and drop the grid points that passed during the overrun.
    SKIP = "skip"
    #: Fire as soon as the body ends, then restart the grid from that moment.
    DELAY = "delay"
    #: Fire every missed grid point, back to back, until the timer is on time again.
    BURST = "burst"


def check_policy(value: MissedTickPolicy | str) -> MissedTickPolicy:
    """Turn a missed-tick policy given as the enum or its string value into the enum.

    Returns:
        The matching :class:`MissedTickPolicy`.

    Raises:
        ValueError: If ``value`` is neither a member nor the value of one.
    """
    return check_choice(value, "missed-tick policy", MissedTickPolicy)


@dataclass(frozen=True, slots=True)
class TickOutcome:
    """How one tick went, as :meth:`IntervalSchedule.advance` saw it.

    Attributes:
        lateness: Seconds between the tick's due time and the moment its body started (>= 0).
        overran: Whether the body was still running when the next grid point came.
        missed: How many grid points will not fire because of the missed-tick policy:
            those that passed during an overrun for ``SKIP``, all of them but the one the
            late tick stands in for with ``DELAY``, and none with ``BURST``.
    """

    lateness: float
    overran: bool
    missed: int


class IntervalSchedule:
    """The due times of one running interval timer: a fixed grid plus a missed-tick policy.

    Tick ``k`` is due at ``anchor + k * interval``, computed from the integer ``k`` by one
    multiplication, so floating-point error never builds up however long the timer runs. The
    anchor is ``start`` and moves only when the ``DELAY`` policy re-anchors after an overrun.
    """

    __slots__ = ("_anchor", "_index", "_interval", "_policy")

    def __init__(
        self,
        interval: float,
        *,
        start: float,
        policy: MissedTickPolicy | str = MissedTickPolicy.SKIP,
        exec_first: bool = False,
    ) -> None:
        """Create the schedule of a timer started at ``start``.

        Args:
            interval: Seconds between ticks.
            start: A reading of the monotonic clock the timer runs on, in seconds.
            policy: What to do with ticks missed while the body overran.
            exec_first: Fire the first tick at ``start`` rather than one interval later.

        Raises:
            TypeError: If ``interval`` or ``start`` is not a number.
            ValueError: If ``interval`` is not finite and > 0, ``start`` is not finite, or
                ``policy`` is unknown.
        """
        self._interval = check_interval(interval)
        self._anchor = check_clock_reading(start, "start")
        self._policy = check_policy(policy)
        self._index = 0 if exec_first else 1

    @classmethod
    def checked(
        cls, interval: float, *, start: float, policy: MissedTickPolicy, exec_first: bool
    ) -> IntervalSchedule:
        """The schedule of arguments already checked (a ``@timer``'s, at each start).

        The checks of ``__init__`` are not repeated for every service a class starts.
        """
        schedule = cls.__new__(cls)
        schedule._interval = interval
        schedule._anchor = start
        schedule._policy = policy
        schedule._index = 0 if exec_first else 1
        return schedule

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._interval!r}, anchor={self._anchor!r}, "
            f"index={self._index!r}, policy={self._policy.value!r})"
        )

    @property
    def interval(self) -> float:
        """Seconds between two grid points."""
        return self._interval

    @property
    def policy(self) -> MissedTickPolicy:
        """The missed-tick policy."""
        return self._policy

    @property
    def anchor(self) -> float:
        """The clock reading of grid point 0: ``start``, or the end of the last ``DELAY``."""
        return self._anchor

    @property
    def index(self) -> int:
        """The grid index of the next tick."""
        return self._index

    @property
    def due(self) -> float:
        """The clock reading at which the next tick is due."""
        return self._grid(self._index)

    def _grid(self, index: int) -> float:
        return self._anchor + index * self._interval

    def _first_index_at_or_after(self, moment: float, lowest: int) -> int:
        # The quotient can round either way, but grid(k) is monotone in k, so stepping
        # from the estimate to the exact first grid point takes at most a step or two.
        index = max(lowest, math.ceil((moment - self._anchor) / self._interval))
        # Not mutated: stepping down too far (`index -= 2`, `grid(index + 1)`) is undone by
        # the loop after, and `index >= lowest` is the same because every caller's grid
        # point lowest - 1 is before moment.
        while index > lowest and self._grid(index - 1) >= moment:  # pragma: no mutate
            index -= 1  # pragma: no mutate
        while self._grid(index) < moment:
            index += 1
        return index

    def catch_up(self, started_at: float) -> int:
        """The due tick starts at ``started_at``: drop the grid points it came too late for.

        A tick is dropped only when its own start came after the next grid point: a tick
        woken late (a busy event loop) stands for the latest grid point at or before
        ``started_at``, and the points before that one are dropped. A tick that starts
        before (or at) the next grid point, however late, is not.

        Args:
            started_at: Clock reading when the due tick's body is about to start.

        Returns:
            How many grid points were dropped (0 when the tick is less than an interval late).

        Raises:
            ValueError: If ``started_at`` is not finite.
        """
        started_at = check_clock_reading(started_at, "started_at")
        ran = self._index
        if started_at <= self._grid(ran + 1):
            return 0
        # Grid point ran + 1 is before started_at, so any lower bound up to ran + 2 gives
        # the same index.
        above = ran + 1  # pragma: no mutate
        latest = self._first_index_at_or_after(started_at, above)
        if self._grid(latest) > started_at:
            latest -= 1
        self._index = latest
        return latest - ran

    def advance(self, started_at: float, finished_at: float) -> TickOutcome:
        """Record that the due tick ran, and move :attr:`due` to the next tick.

        Args:
            started_at: Clock reading when the tick's body started.
            finished_at: Clock reading when it finished.

        Returns:
            How late the tick started, whether it overran into the next grid point, and how
            many grid points the policy drops because of that.

        Raises:
            ValueError: If a reading is not finite or ``finished_at`` is before ``started_at``.
        """
        started_at = check_clock_reading(started_at, "started_at")
        finished_at = check_clock_reading(finished_at, "finished_at")
        if finished_at < started_at:
            raise ValueError(f"finished_at ({finished_at!r}) is before started_at ({started_at!r})")
        ran = self._index
        lateness = max(0.0, started_at - self._grid(ran))
        overran = finished_at > self._grid(ran + 1)
        if not overran or self._policy is MissedTickPolicy.BURST:
            self._index = ran + 1
            return TickOutcome(lateness=lateness, overran=overran, missed=0)

        # Grid point ran + 1 is before finished_at, so any lower bound up to ran + 2 (the
        # bound given) gives the same index.
        above = ran + 2  # pragma: no mutate
        on_time = self._first_index_at_or_after(finished_at, above)
        if self._policy is MissedTickPolicy.SKIP:
            self._index = on_time
            return TickOutcome(lateness=lateness, overran=True, missed=on_time - ran - 1)

        # DELAY: the immediate tick stands in for the first grid point that passed, so the
        # points dropped are the others up to and including finished_at.
        passed = on_time - ran - 1 + int(self._grid(on_time) == finished_at)
        self._anchor = finished_at
        self._index = 0
        return TickOutcome(lateness=lateness, overran=True, missed=passed - 1)


def _resolve_timezone(timezone: str | datetime.tzinfo | None) -> datetime.tzinfo:
    if timezone is None:
        return _UTC
    if isinstance(timezone, datetime.tzinfo):
        tz = timezone
    elif isinstance(timezone, str):
        try:
            tz = zoneinfo.ZoneInfo(timezone)
        except zoneinfo.ZoneInfoNotFoundError:
            raise ValueError(
                f"unknown timezone {timezone!r}: not in the IANA time zone database "
                "(is the tzdata package installed?)"
            ) from None
        except (ValueError, OSError) as exc:
            raise ValueError(f"unknown timezone {timezone!r}: {exc}") from None
    else:
        raise TypeError(
            f"timezone must be an IANA name, a tzinfo or None, got {type(timezone).__name__}"
        )
    if _PROBE_DATE.replace(tzinfo=tz).utcoffset() is None:
        raise ValueError(f"timezone {timezone!r} gives no UTC offset")
    return tz


def _utcoffset(moment: datetime.datetime) -> datetime.timedelta:
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"{moment!r} has a tzinfo that gives no UTC offset")
    return offset


class CronSchedule:
    """The fire times of a cron expression, in local wall time of one timezone.

    The expression is whatever ``croniter`` accepts: 5 fields, 6 (seconds last) or 7 (then
    the year), and ``@hourly``-style aliases. It is matched against local wall-clock time in
    ``timezone``, which a daylight-saving change makes skip ahead or repeat. How that is
    handled depends on whether the expression fires in every hour of the day:

    * Every hour (the hour field is ``*`` or covers 0-23, as in ``*/5 * * * *`` or
      ``0 * * * *``): the schedule follows the clock. It fires at each real instant whose
      local wall time matches, so a wall time skipped by a spring-forward change does not
      fire, and one repeated by a fall-back change fires at both of its occurrences:
      ``0 * * * *`` fires at 02:00 CEST and again at 02:00 CET. The real time between fires
      never grows or shrinks, and no instant fires twice.
    * Some hours only (``30 2 * * *``, ``0 */2 * * *``): each matching local wall time fires
      exactly once per day, like Vixie cron's fixed-time jobs. A wall time inside a
      spring-forward gap fires at the first instant after the gap (02:30 fires at 03:00 on
      the day Europe/Paris skips 02:00-03:00); a wall time that occurs twice fires at its
      first occurrence only.

    Several wall times that land on the same instant fire once.
    """

    __slots__ = ("_every_hour", "_expression", "_timezone")

    def __init__(self, expression: str, *, timezone: str | datetime.tzinfo | None = None) -> None:
        """Parse and check a cron expression.

        Args:
            expression: The cron expression, e.g. ``"*/5 * * * *"``.
            timezone: An IANA name such as ``"Europe/Paris"``, a ``tzinfo`` following
                PEP 495 (``zoneinfo`` does), or None for UTC.

        Raises:
            TypeError: If ``expression`` is not a string or ``timezone`` has the wrong type.
            ValueError: If the expression is invalid or matches no date at all, or the
                timezone is unknown.
        """
        if not isinstance(expression, str):
            raise TypeError(f"cron expression must be a string, got {type(expression).__name__}")
        self._timezone = _resolve_timezone(timezone)
        try:
            parsed = croniter(expression)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {expression!r}: {exc}") from exc
        self._expression = expression
        expanded: list[list[int | str]] = parsed.expanded
        # croniter writes a full list of hours as "*"; the set comparison is for releases
        # that might list them instead, so with this one it is never true (not mutated).
        lists_every_hour = set(expanded[1]) == set(range(24))  # pragma: no mutate
        self._every_hour = expanded[1] == ["*"] or lists_every_hour
        # A year field makes "never fires" depend on the year it is asked from; start the
        # probe just before the earliest year it names. Without one, the Gregorian calendar
        # repeats every 400 years: probing from now (None) would find the same answer.
        probe_from = _PROBE_DATE  # pragma: no mutate
        if len(expanded) == 7 and expanded[6] != ["*"]:
            years = [int(year) for year in expanded[6]]
            probe_from = datetime.datetime(min(years), 1, 1) - _ONE_SECOND
        try:
            croniter(expression, probe_from).get_next()
        except ValueError as exc:
            raise ValueError(f"cron expression {expression!r} matches no date: {exc}") from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._expression!r}, timezone={str(self._timezone)!r})"

    @property
    def expression(self) -> str:
        """The cron expression as given."""
        return self._expression

    @property
    def timezone(self) -> datetime.tzinfo:
        """The timezone whose wall-clock time the expression is matched against."""
        return self._timezone

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        """Find the first fire time strictly after ``moment``.

        Daylight-saving changes are handled as the class documentation says.
        Python compares and subtracts datetimes that share a tzinfo by wall time, ignoring
        ``fold``; compare results after converting them to UTC.

        Args:
            moment: An aware datetime, in any timezone.

        Returns:
            An aware datetime in the schedule's timezone (with ``fold`` set on the second
            occurrence of a repeated wall time).

        Raises:
            TypeError: If ``moment`` is not a datetime.
            ValueError: If ``moment`` is naive, or the expression never fires after it (a
                year field in the past).
        """
        if not isinstance(moment, datetime.datetime):
            raise TypeError(f"moment must be a datetime, got {type(moment).__name__}")
        if moment.utcoffset() is None:
            raise ValueError(f"moment must be a timezone-aware datetime, got {moment!r}")
        # Not mutated: astimezone(None), the system's zone at that instant, is a fixed
        # offset too, and everything below compares and adds instants, never wall times.
        instant = moment.astimezone(_UTC)  # pragma: no mutate
        local = instant.astimezone(self._timezone)
        wall = local.replace(tzinfo=None)
        # On the first pass through a repeated stretch, the matching wall times already
        # passed will come round again, and the first of them may beat every wall time ahead.
        behind: datetime.datetime | None = None
        if self._every_hour and local.fold == 0:
            early, late = self._offsets(wall)
            # Not mutated: with early == late, a stretch of no length holds no repeat.
            if early > late:  # pragma: no mutate
                behind = self._first_repeat_after(instant, wall, early - late)
        candidates = self._walls_from(wall, instant)
        while True:
            candidate = next(candidates)
            first, repeat = self._instants(candidate)
            if first is not None and first > instant:
                fire = first if behind is None else min(first, behind)
                return fire.astimezone(self._timezone)
            # Anywhere else, a second occurrence still to come is earlier than any first
            # occurrence of a later wall time.
            if behind is None and repeat is not None and repeat > instant:
                return repeat.astimezone(self._timezone)

    def delay_until_next(self, now: datetime.datetime) -> float:
        """Seconds from ``now`` until :meth:`next_after` ``(now)``.

        Returns:
            A positive number of seconds.

        Raises:
            TypeError: If ``now`` is not a datetime.
            ValueError: If ``now`` is naive or the expression never fires after it.
        """
        # In UTC, because datetimes sharing a tzinfo subtract by wall time. Not mutated: any
        # other fixed offset (astimezone(None)) gives the same difference.
        fire = self.next_after(now).astimezone(_UTC)  # pragma: no mutate
        start = now.astimezone(_UTC)  # pragma: no mutate
        return max(0.0, (fire - start).total_seconds())

    def _walls_from(
        self, start: datetime.datetime, moment: datetime.datetime
    ) -> Iterator[datetime.datetime]:
        """Yield the matching wall times from ``start`` (whole seconds) on, in order."""
        # croniter is given naive wall times so that it does plain calendar arithmetic: its
        # own DST handling is bypassed, and each wall time is resolved to instants below.
        # Not mutated: croniter's next whole second after x.000001 - 1 s is the one after
        # x - 1 s, so microsecond=1 is the same.
        whole = start.replace(microsecond=0)  # pragma: no mutate
        first = whole - _ONE_SECOND
        walk = croniter(self._expression, first)
        while True:
            try:
                wall: datetime.datetime = walk.get_next(datetime.datetime)
            except ValueError as exc:
                raise ValueError(
                    f"cron expression {self._expression!r} never fires after "
                    f"{moment.isoformat()}: {exc}"
                ) from exc
            yield wall

    def _offsets(self, wall: datetime.datetime) -> tuple[datetime.timedelta, datetime.timedelta]:
        # Not mutated: every wall time passed in has fold=0 already (croniter's, or a local
        # time at its first occurrence), so dropping fold=0 is the same.
        return (
            _utcoffset(wall.replace(tzinfo=self._timezone, fold=0)),  # pragma: no mutate
            _utcoffset(wall.replace(tzinfo=self._timezone, fold=1)),
        )

    def _instants(
        self, wall: datetime.datetime
    ) -> tuple[datetime.datetime | None, datetime.datetime | None]:
        """Resolve a matching wall time to its first and second firing instants, in UTC."""
        # PEP 495: fold=0 resolves with the offset in force before a transition and fold=1
        # with the one after, so the two differ exactly in a gap (early < late) or in a
        # repeated stretch (early > late).
        early, late = self._offsets(wall)
        if early == late:
            return (wall - early).replace(tzinfo=_UTC), None
        if early > late:  # pragma: no mutate (early == late returned above)
            first = (wall - early).replace(tzinfo=_UTC)
            if self._every_hour:
                return first, (wall - late).replace(tzinfo=_UTC)
            return first, None
        if self._every_hour:
            return None, None
        gap_end = self._transition(
            (wall - late).replace(tzinfo=_UTC), (wall - early).replace(tzinfo=_UTC)
        )
        return gap_end, None

    def _transition(self, before: datetime.datetime, after: datetime.datetime) -> datetime.datetime:
        """Return the first instant in ``(before, after]`` that has ``after``'s UTC offset."""
        target = _utcoffset(after.astimezone(self._timezone))
        while after - before > _ONE_MICROSECOND:
            # Not mutated: halving with / (rounded to the microsecond) instead of // moves
            # the same bounds to the same microsecond.
            middle = before + (after - before) // 2  # pragma: no mutate
            if _utcoffset(middle.astimezone(self._timezone)) == target:
                after = middle
            else:
                before = middle
        return after

    def _first_repeat_after(
        self, instant: datetime.datetime, wall: datetime.datetime, repeat: datetime.timedelta
    ) -> datetime.datetime | None:
        """Return the earliest second occurrence of a matching wall time up to ``wall``.

        ``instant`` is the first occurrence of ``wall``, inside a stretch of wall time that
        the clock repeats ``repeat`` later; every second occurrence of the stretch is after
        ``instant``.
        """
        fall_back = self._transition(instant, instant + repeat)
        stretch_start = fall_back.astimezone(self._timezone).replace(tzinfo=None)
        candidate = next(self._walls_from(stretch_start, instant))
        if candidate > wall:
            return None
        return self._instants(candidate)[1]


@dataclass(slots=True)
class TimerStats:
    """Statistics of one timer, readable while it runs (``service.timer_stats[name]``).

    Attributes:
        ticks: Bodies run.
        late_ticks: Ticks whose body started more than ``late_after`` seconds after due.
        overruns: Bodies still running when the next tick was due.
        missed: Ticks dropped by the missed-tick policy.
        errors: Bodies that raised (with ``on_error="log"``; otherwise the first crashes).
        worst_lateness: The largest lateness seen, in seconds.
        total_lateness: Sum of the latenesses, for :attr:`mean_lateness`.
        last_duration: How long the last body took.
        worst_duration: The longest body.
        late_after: The lateness above which a tick counts as late.
    """

    interval: float | None = None
    late_after: float = 0.001
    ticks: int = 0
    late_ticks: int = 0
    overruns: int = 0
    missed: int = 0
    errors: int = 0
    worst_lateness: float = 0.0
    total_lateness: float = 0.0
    last_duration: float = 0.0
    worst_duration: float = 0.0
    _overrunning: bool = field(default=False, repr=False)
    _waking_late: bool = field(default=False, repr=False)

    @classmethod
    def for_interval(cls, interval: float) -> TimerStats:
        # "Late" is relative: a millisecond is late for a 10 ms timer, not for an hourly one.
        return cls(interval=interval, late_after=min(0.001, interval / 10))

    @property
    def mean_lateness(self) -> float:
        return self.total_lateness / self.ticks if self.ticks else 0.0

    def record(self, lateness: float, duration: float) -> None:
        self.ticks += 1
        self.total_lateness += lateness
        self.worst_lateness = max(self.worst_lateness, lateness)
        if lateness > self.late_after:
            self.late_ticks += 1
        self.last_duration = duration
        self.worst_duration = max(self.worst_duration, duration)
