"""Timers and cron jobs on a service: ``@timer``, ``@crontab`` and ``itertimer()``.

A timer sleeps (idle: a stop ends it at once) until its next grid point, then runs its body
in flight (a stop lets it finish within the grace period). When the grid point comes is the
schedule's business (:mod:`anyservice._schedule`), which never accumulates error.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TypeVar, cast

import anyio

from . import _hooks
from ._checks import Seconds, check_choice, check_coroutine_function
from ._core import (
    BackgroundSpec,
    Host,
    attach_spec,
    check_name,
    idle_released,
    idle_until,
    serving_scope,
)
from ._schedule import (
    CronSchedule,
    IntervalSchedule,
    MissedTickPolicy,
    TickOutcome,
    TimerStats,
    check_interval,
    check_policy,
)

__all__ = [
    "CronSpec",
    "TimerSpec",
    "crontab",
    "timer",
    "wall_clock",
]

F = TypeVar("F", bound=Callable[..., Any])
OnError = Literal["crash", "log"]

_wall_clock: ContextVar[Callable[[], float]] = ContextVar(
    "anyservice_wall_clock", default=time.time
)


@contextmanager
def wall_clock(clock: Callable[[], float]) -> Iterator[None]:
    """Make cron schedules read wall time (epoch seconds) from ``clock`` in this context.

    Cron jobs fire at wall-clock times, which a virtual clock does not move; tests use
    :func:`anyservice.testing.virtual_wall_clock`, built on this.
    """
    token = _wall_clock.set(clock)
    try:
        yield
    finally:
        _wall_clock.reset(token)


class _PeriodicSpec(BackgroundSpec):
    """What ``@timer`` and ``@crontab`` share: run the body in flight, keep stats, errors."""

    #: Exceptions that crash the service even with ``on_error="log"``.
    propagate: tuple[type[Exception], ...] = ()
    #: Between ticks only the library's own sleep is on the stack: the body runs in flight.
    idle_runs_user_code = False

    def __init__(self, function: Callable[[Any], Awaitable[None]], *, on_error: OnError) -> None:
        super().__init__(function)
        self.on_error = cast(
            OnError, check_choice(on_error, f"{self.describe()}: on_error", ("crash", "log"))
        )

    def new_stats(self) -> TimerStats:
        return TimerStats()

    async def call(self, service: Host) -> None:
        await self.function(service)

    async def run_body(self, service: Host, stats: TimerStats, due: float) -> tuple[float, float]:
        """Run the body once, in flight; returns when it started and finished."""
        started = anyio.current_time()
        async with service.in_flight():
            try:
                await self.call(service)
            except self.propagate:
                raise
            except Exception:
                if self.on_error == "crash":
                    raise
                stats.errors += 1
                service.log.exception("%s raised; the schedule goes on", self.describe())
        finished = anyio.current_time()
        lateness = max(0.0, started - due)
        stats.record(lateness, finished - started)
        observe = _hooks.timer_tick
        if observe is not None:
            observe(service, self.name, lateness)
        return started, finished

    def stats_for(self, service: Host) -> TimerStats:
        stats = self.new_stats()
        service.timer_stats[self.name] = stats
        return stats


class TimerSpec(_PeriodicSpec):
    """A ``@timer``: the body on a fixed grid of the backend's monotonic clock."""

    kind = "timer"
    enters_own_scope = True

    def __init__(
        self,
        function: Callable[[Any], Awaitable[None]],
        interval: Seconds,
        *,
        policy: MissedTickPolicy | str,
        exec_first: bool,
        on_error: OnError,
        name: str | None = None,
    ) -> None:
        self.interval = check_interval(interval, f"@timer {function.__name__!r} interval")
        # What each start's statistics are made with: worked out once, not per service.
        self._late_after = TimerStats.for_interval(self.interval).late_after
        self.policy = check_policy(policy)
        self.exec_first = bool(exec_first)
        super().__init__(function, on_error=on_error)
        if name is not None:
            self.name = name

    def interval_for(self, service: Host) -> float:
        return self.interval

    def new_stats(self) -> TimerStats:
        return TimerStats(interval=self.interval, late_after=self._late_after)

    def prepare(
        self, service: Host, now: float | None = None
    ) -> tuple[TimerStats, IntervalSchedule]:
        """The statistics and the schedule of a run of the timer, starting ``now``."""
        stats = service.timer_stats[self.name] = self.new_stats()
        schedule = IntervalSchedule.checked(
            self.interval_for(service),
            start=anyio.current_time() if now is None else now,
            policy=self.policy,
            exec_first=self.exec_first,
        )
        return stats, schedule

    def prepare_bare(self, service: Host, now: float) -> tuple[float, object] | None:
        if self.exec_first:
            return None  # due at once: nothing to wait for
        prepared = self.prepare(service, now)
        return prepared[1].due, prepared

    def resume_bare(self, service: Host, state: object, due_now: bool) -> Coroutine[Any, Any, None]:
        return self.serve(service, cast(tuple[TimerStats, IntervalSchedule], state), due_now)

    def run(self, service: Host) -> Coroutine[Any, Any, None]:
        # The loop's own coroutine, not one around it: a frame less held while it idles.
        return self.serve(service, self.prepare(service), False)

    async def serve(
        self, service: Host, prepared: tuple[TimerStats, IntervalSchedule], due_now: bool
    ) -> None:
        """Tick until released; ``due_now``: the first due time has come already."""
        stats, schedule = prepared
        skip = self.policy is MissedTickPolicy.SKIP
        due = schedule.due
        if not due_now:
            await idle_until(due)
            if idle_released():
                return  # the service stops: the timer ends, as if cancelled while idle
        # Due: from here the body, and what follows it, run in the slot's scope.
        with serving_scope():
            while True:
                if skip:
                    due = self.catch_up(service, stats, schedule, due)
                await self.tick(service, stats, schedule, due)
                due = schedule.due
                await idle_until(due)
                if idle_released():
                    return

    async def tick(
        self, service: Host, stats: TimerStats, schedule: IntervalSchedule, due: float
    ) -> None:
        """Run one due tick and account for it; the schedule moves to the next."""
        started, finished = await self.run_body(service, stats, due)
        if self.policy is MissedTickPolicy.SKIP and finished - started <= schedule.interval:
            # The body alone fits in an interval: if it still ended past the next grid
            # point, a late start did that, and the next tick runs at once, late, rather
            # than being counted as an overrun and skipped. (Never before its start:
            # the time between the wake-up and the start, a slow log handler's, say,
            # may already be past that point.)
            finished = max(started, min(finished, due + schedule.interval))
        outcome = schedule.advance(started, finished)
        stats.missed += outcome.missed
        if outcome.overran:
            stats.overruns += 1
            self.report_overrun(service, stats, finished - started, outcome)
        else:
            stats._overrunning = False
        await self.after_tick(service)

    def catch_up(
        self, service: Host, stats: TimerStats, schedule: IntervalSchedule, due: float
    ) -> float:
        """Drop the ticks a late wake-up came too late for; returns the due time of the tick."""
        woke = anyio.current_time()
        dropped = schedule.catch_up(woke)
        if not dropped:
            stats._waking_late = False
            return due
        stats.missed += dropped
        if not stats._waking_late:
            # One warning per run of late wake-ups, as for overruns.
            stats._waking_late = True
            service.log.warning(
                "%s woke up %.6fs late, past the next grid point (the event loop was busy, "
                "not the body); policy %r skips %s tick(s) to the latest grid point",
                self.describe(),
                woke - due,
                self.policy.value,
                dropped,
            )
        return schedule.due

    async def after_tick(self, service: Host) -> None:
        """Called after each tick has been accounted for."""

    def report_overrun(
        self, service: Host, stats: TimerStats, duration: float, outcome: TickOutcome
    ) -> None:
        if not stats._overrunning:
            # One warning per run of overruns, not one per tick forever.
            stats._overrunning = True
            service.log.warning(
                "%s overran: the body took %.6fs against an interval of %ss; policy %r %s",
                self.describe(),
                duration,
                self.interval,
                self.policy.value,
                _POLICY_EFFECT[self.policy].format(missed=outcome.missed),
            )


_POLICY_EFFECT = {
    MissedTickPolicy.SKIP: "skips {missed} tick(s) to the next grid point",
    MissedTickPolicy.DELAY: "runs the next tick now and re-anchors the grid",
    MissedTickPolicy.BURST: "runs the missed ticks back to back",
}


class CronSpec(_PeriodicSpec):
    """A ``@crontab``: the body at the fire times of a cron expression, in wall time."""

    kind = "crontab"

    def __init__(
        self,
        function: Callable[[Any], Awaitable[None]],
        schedule: CronSchedule,
        *,
        on_error: OnError,
    ) -> None:
        self.schedule = schedule
        super().__init__(function, on_error=on_error)

    def describe(self) -> str:
        return f"crontab {self.name!r} ({self.schedule.expression})"

    async def run(self, service: Host) -> None:
        stats = self.stats_for(service)
        read_wall = _wall_clock.get()
        last_fire: datetime.datetime | None = None
        while True:
            # Recomputed from wall time each tick, so a wall clock set forward or back (or a
            # DST change) is followed; never the same fire time twice.
            wall = datetime.datetime.fromtimestamp(read_wall(), datetime.UTC)
            after = wall if last_fire is None or wall > last_fire else last_fire
            fire = self.schedule.next_after(after)
            delay = (fire - wall).total_seconds()
            due = anyio.current_time() + delay
            await anyio.sleep_until(due)
            last_fire = fire.astimezone(datetime.UTC)
            await self.run_body(service, stats, due)


def timer(
    interval: Seconds,
    *,
    policy: MissedTickPolicy | str = MissedTickPolicy.SKIP,
    exec_first: bool = False,
    on_error: OnError = "crash",
    name: str | None = None,
) -> Callable[[F], F]:
    """Run a coroutine method every ``interval`` seconds, on a grid that never drifts.

    Tick ``k`` is due at ``t0 + k * interval`` on the backend's monotonic clock (``t0`` is
    when the service started its tasks; ``exec_first=True`` also fires at ``t0``). When a
    body overruns, ``policy`` decides: ``"skip"`` (default: the next grid point),
    ``"delay"`` (run now and re-anchor the grid) or ``"burst"`` (catch up); one warning per
    run of overruns says by how much. An exception in the body crashes the service
    (mode's behaviour) unless ``on_error="log"`` (Prefect's), which logs it and keeps the
    schedule. Statistics: ``service.timer_stats[name]``, where ``name`` (mode's) is the
    method's name unless given; it also names the timer's task.

    Raises:
        TypeError: if ``interval`` is not a number, ``name`` not a str, or the method is
            not ``async def``.
        ValueError: for an interval that is not finite and > 0, an unknown policy or an
            empty name.
    """

    check_interval(interval, "@timer interval")
    check_policy(policy)
    check_name(name, "@timer name")

    def decorate(function: F) -> F:
        check_coroutine_function(function, "@timer method")
        spec = TimerSpec(
            function, interval, policy=policy, exec_first=exec_first, on_error=on_error, name=name
        )
        return attach_spec(function, spec)

    return decorate


def crontab(
    expression: str,
    *,
    timezone: str | datetime.tzinfo | None = None,
    on_error: OnError = "crash",
) -> Callable[[F], F]:
    """Run a coroutine method at the times of a cron expression, in ``timezone`` (UTC default).

    Correct across daylight-saving changes (see :class:`~anyservice.CronSchedule` for the
    rules). A bad expression or timezone raises here, when the class is defined.

    Raises:
        ValueError: for a bad cron expression or an unknown timezone.
        TypeError: if the method is not ``async def``.
    """
    schedule = CronSchedule(expression, timezone=timezone)

    def decorate(function: F) -> F:
        check_coroutine_function(function, "@crontab method")
        return attach_spec(function, CronSpec(function, schedule, on_error=on_error))

    return decorate
