"""The interval grid and cron schedules, tested as pure functions of time."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyservice._schedule import (
    CronSchedule,
    IntervalSchedule,
    MissedTickPolicy,
    TickOutcome,
    TimerStats,
    check_interval,
    check_policy,
)

UTC = dt.UTC
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")

# ---------------------------------------------------------------------------------------
# check_interval and check_policy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 0.5, 1e-6, 10**6])
def test_check_interval_returns_a_float(value: float) -> None:
    assert check_interval(value) == float(value)
    assert type(check_interval(value)) is float


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(dt.timedelta(milliseconds=1500), 1.5), ("1.5", 1.5), (" 2 ", 2.0), ("1e-3", 0.001)],
)
def test_check_interval_takes_timedeltas_and_numeric_strings(value: object, seconds: float) -> None:
    assert check_interval(value) == seconds


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "nan", "-1"])
def test_check_interval_rejects_bad_values_naming_them(value: object) -> None:
    with pytest.raises(ValueError, match="loop_seconds must be a finite number") as info:
        check_interval(value, "loop_seconds")
    assert repr(value) in str(info.value)


def test_check_interval_names_an_int_too_large_for_a_float() -> None:
    with pytest.raises(ValueError, match=r"loop_seconds .* got 1000.*\(too large for a float\)"):
        check_interval(10**400, "loop_seconds")


@pytest.mark.parametrize("value", [1e-7, 1e-21, 5e-324, "1e-9"])
def test_check_interval_refuses_intervals_below_one_microsecond(value: object) -> None:
    with pytest.raises(ValueError, match=r"@timer interval must be at least 1e-06 seconds"):
        check_interval(value, "@timer interval")


@pytest.mark.parametrize("value", [True, None, [1], 1j, b"1"])
def test_check_interval_rejects_non_numbers(value: object) -> None:
    with pytest.raises(TypeError, match="interval must be a number"):
        check_interval(value)


@pytest.mark.parametrize("policy", list(MissedTickPolicy))
def test_policy_is_accepted_as_enum_or_string_value(policy: MissedTickPolicy) -> None:
    assert check_policy(policy) is policy
    assert check_policy(policy.value) is policy


@pytest.mark.parametrize("value", ["SKIP", "catch-up", "", None, 1])
def test_unknown_policy_error_lists_the_valid_values(value: object) -> None:
    message = f"missed-tick policy must be one of 'skip', 'delay', 'burst', got {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_policy(value)  # type: ignore[arg-type]


def test_interval_schedule_rejects_a_bad_policy() -> None:
    with pytest.raises(ValueError, match="'catch-up'"):
        IntervalSchedule(1.0, start=0.0, policy="catch-up")


@pytest.mark.parametrize("interval", [0, -1.0, math.nan, math.inf])
def test_interval_schedule_rejects_a_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        IntervalSchedule(interval, start=0.0)


@pytest.mark.parametrize("start", [math.nan, math.inf])
def test_interval_schedule_rejects_a_start_that_is_not_finite(start: float) -> None:
    with pytest.raises(ValueError, match=f"^start must be a finite clock reading, got {start!r}$"):
        IntervalSchedule(1.0, start=start)


# ---------------------------------------------------------------------------------------
# IntervalSchedule: worked examples
# ---------------------------------------------------------------------------------------


def test_first_tick_is_one_interval_after_start() -> None:
    schedule = IntervalSchedule(2.0, start=10.0)
    assert (schedule.index, schedule.due) == (1, 12.0)


def test_interval_schedule_repr_shows_its_grid() -> None:
    schedule = IntervalSchedule(2.0, start=10.0, policy="burst")
    assert repr(schedule) == "IntervalSchedule(2.0, anchor=10.0, index=1, policy='burst')"


def test_exec_first_fires_the_first_tick_at_start() -> None:
    schedule = IntervalSchedule(2.0, start=10.0, exec_first=True)
    assert (schedule.index, schedule.due) == (0, 10.0)


def test_an_on_time_tick_moves_to_the_next_grid_point() -> None:
    schedule = IntervalSchedule(1.0, start=0.0)
    assert schedule.advance(1.25, 1.5) == TickOutcome(lateness=0.25, overran=False, missed=0)
    assert (schedule.index, schedule.due) == (2, 2.0)


def test_skip_drops_the_grid_points_passed_during_an_overrun() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="skip")
    assert schedule.advance(1.0, 3.5) == TickOutcome(lateness=0.0, overran=True, missed=2)
    assert (schedule.index, schedule.due) == (4, 4.0)


def test_skip_body_ending_exactly_on_a_grid_point_makes_that_tick_due_now() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="skip")
    assert schedule.advance(1.0, 3.0) == TickOutcome(lateness=0.0, overran=True, missed=1)
    assert (schedule.index, schedule.due) == (3, 3.0)


def test_delay_fires_at_the_end_of_an_overrun_and_restarts_the_grid_there() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="delay")
    assert schedule.advance(1.0, 3.5) == TickOutcome(lateness=0.0, overran=True, missed=1)
    assert (schedule.anchor, schedule.index, schedule.due) == (3.5, 0, 3.5)
    assert schedule.advance(3.5, 3.75) == TickOutcome(lateness=0.0, overran=False, missed=0)
    assert schedule.due == 4.5


def test_catch_up_drops_the_points_a_late_start_came_too_late_for() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="skip")
    assert schedule.catch_up(1.75) == 0
    assert schedule.due == 1.0
    assert schedule.catch_up(2.0) == 0
    assert schedule.catch_up(3.5) == 2
    assert (schedule.index, schedule.due) == (3, 3.0)


def test_a_late_start_exactly_on_a_grid_point_stands_for_that_point() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="skip")
    # Due at 1, started at 3: the tick is grid point 3's, so points 1 and 2 are dropped.
    assert schedule.catch_up(3.0) == 2
    assert (schedule.index, schedule.due) == (3, 3.0)


def test_catch_up_rejects_a_reading_that_is_not_finite_naming_it() -> None:
    schedule = IntervalSchedule(1.0, start=0.0)
    with pytest.raises(ValueError, match=r"^started_at must be a finite clock reading, got nan$"):
        schedule.catch_up(math.nan)
    assert schedule.index == 1


def test_burst_fires_every_missed_grid_point_back_to_back() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="burst")
    assert schedule.advance(1.0, 3.5) == TickOutcome(lateness=0.0, overran=True, missed=0)
    assert schedule.due == 2.0
    assert schedule.advance(3.5, 3.5) == TickOutcome(lateness=1.5, overran=True, missed=0)
    assert schedule.advance(3.5, 3.5) == TickOutcome(lateness=0.5, overran=False, missed=0)
    assert schedule.due == 4.0


def test_a_tick_started_early_has_no_lateness() -> None:
    schedule = IntervalSchedule(1.0, start=0.0)
    assert schedule.advance(0.999, 1.0).lateness == 0.0


def test_advance_rejects_a_finish_before_the_start() -> None:
    schedule = IntervalSchedule(1.0, start=0.0)
    with pytest.raises(ValueError, match="before started_at"):
        schedule.advance(2.0, 1.0)


def test_advance_rejects_readings_that_are_not_finite() -> None:
    schedule = IntervalSchedule(1.0, start=0.0)
    with pytest.raises(ValueError, match=r"^finished_at must be a finite clock reading, got nan$"):
        schedule.advance(1.0, math.nan)
    with pytest.raises(ValueError, match=r"^started_at must be a finite clock reading, got inf$"):
        schedule.advance(math.inf, 1.0)


def test_a_far_away_finish_is_found_at_once_not_by_walking_the_grid() -> None:
    # Ten billion grid points passed: a step-by-step search would hang the timer's loop.
    schedule = IntervalSchedule(1e-3, start=0.0, policy="skip")
    outcome = schedule.advance(0.001, 1e7 + 0.0005)
    assert schedule.index == 10**10 + 1
    assert outcome.missed == 10**10 - 1


def test_no_drift_after_ten_thousand_on_time_ticks() -> None:
    start, interval = 1234.5, 0.1
    schedule = IntervalSchedule(interval, start=start)
    accumulated = start + interval
    for _ in range(10**4):
        due = schedule.due
        schedule.advance(due, due)
        accumulated += interval
    assert schedule.index == 10**4 + 1
    assert schedule.due == start + (10**4 + 1) * interval
    # The same schedule kept by repeated addition is off by now (by 1e-9 s; after ten
    # ticks already): the test can see drift. More ticks would only slow mutation testing,
    # which runs this test against every mutant of the grid.
    assert accumulated != schedule.due


# (moment, index): the quotient (moment - anchor) / interval rounds to one grid point too
# few in the first case and one too many in the second (where the moment is exactly grid
# point `index`), so the grid search must correct it.
ROUNDED_QUOTIENTS = [(13948.100000000002, 139481), (79792.80000000002, 797927)]


@pytest.mark.parametrize(("moment", "index"), ROUNDED_QUOTIENTS)
def test_skip_corrects_a_rounded_quotient_to_the_first_grid_point_not_passed(
    moment: float, index: int
) -> None:
    schedule = IntervalSchedule(0.1, start=0.1, policy="skip")
    outcome = schedule.advance(0.2, moment)
    assert schedule.index == index
    assert schedule.due == 0.1 + index * 0.1
    assert schedule.due >= moment > 0.1 + (index - 1) * 0.1
    assert outcome == TickOutcome(lateness=0.0, overran=True, missed=index - 2)


@pytest.mark.parametrize(("moment", "index"), ROUNDED_QUOTIENTS)
def test_delay_counts_the_passed_points_across_a_rounded_quotient(
    moment: float, index: int
) -> None:
    schedule = IntervalSchedule(0.1, start=0.1, policy="delay")
    outcome = schedule.advance(0.2, moment)
    # Grid points 2 .. index - 1 passed, and index too when the body ended exactly on it
    # (the second case); the immediate tick stands in for one of them.
    passed = index - 2 + int(0.1 + index * 0.1 == moment)
    assert outcome == TickOutcome(lateness=0.0, overran=True, missed=passed - 1)
    assert (schedule.anchor, schedule.index, schedule.due) == (moment, 0, moment)


def test_delay_drops_a_grid_point_the_body_ended_exactly_on() -> None:
    schedule = IntervalSchedule(1.0, start=0.0, policy="delay")
    # Tick 1 ran from 1 to 4: points 2, 3 and 4 passed (4 at the very end), one stands in.
    assert schedule.advance(1.0, 4.0) == TickOutcome(lateness=0.0, overran=True, missed=2)


@pytest.mark.parametrize(
    ("interval", "late_after"), [(0.005, 0.0005), (0.01, 0.001), (3600.0, 0.001)]
)
def test_a_timer_is_late_after_a_tenth_of_its_interval_at_most_a_millisecond(
    interval: float, late_after: float
) -> None:
    stats = TimerStats.for_interval(interval)
    assert (stats.interval, stats.late_after) == (interval, late_after)
    assert (stats.ticks, stats.late_ticks, stats.mean_lateness) == (0, 0, 0.0)


def test_timer_stats_record_lateness_and_durations() -> None:
    stats = TimerStats(late_after=0.5)
    stats.record(0.5, 2.0)  # exactly late_after: not late
    stats.record(1.5, 0.25)
    stats.record(0.75, 0.5)
    stats.record(0.0, 1.0)
    assert (stats.ticks, stats.late_ticks) == (4, 2)
    assert (stats.worst_lateness, stats.total_lateness, stats.mean_lateness) == (
        1.5,
        2.75,
        2.75 / 4,
    )
    assert (stats.last_duration, stats.worst_duration) == (1.0, 2.0)
    assert (stats.overruns, stats.missed, stats.errors) == (0, 0, 0)


# ---------------------------------------------------------------------------------------
# IntervalSchedule: properties, checked against a brute-force model of the grid
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """One run of a timer body, as the timer loop would drive it."""

    wake_delay: float  # how long after it became runnable the body started, in intervals
    ends_on_grid: bool  # end exactly on a grid point (edge cases), else after `duration`
    duration: float  # in intervals; with ends_on_grid, grid points past the next one


ticks = st.builds(
    Tick,
    wake_delay=st.one_of(st.just(0.0), st.floats(0, 1.5)),
    ends_on_grid=st.booleans(),
    duration=st.one_of(st.floats(0, 5), st.integers(0, 5).map(float)),
)
intervals = st.floats(1e-3, 1e4)
starts = st.floats(-1e6, 1e6)


@dataclass(frozen=True)
class Grid:
    anchor: float
    index: int
    due: float


@dataclass(frozen=True)
class Step:
    anchor: float  # of the grid the tick ran on
    index: int  # of the tick that ran
    started_at: float
    finished_at: float
    outcome: TickOutcome
    after: Grid


def drive(schedule: IntervalSchedule, plan: Sequence[Tick]) -> list[Step]:
    """Run ticks the way a timer loop does, recording the schedule before and after each."""
    steps = []
    now = schedule.anchor
    for tick in plan:
        anchor, index, interval = schedule.anchor, schedule.index, schedule.interval
        started_at = max(now, schedule.due) + tick.wake_delay * interval
        if tick.ends_on_grid:
            finished_at = max(started_at, anchor + (index + 1 + int(tick.duration)) * interval)
        else:
            finished_at = started_at + tick.duration * interval
        outcome = schedule.advance(started_at, finished_at)
        after = Grid(schedule.anchor, schedule.index, schedule.due)
        steps.append(Step(anchor, index, started_at, finished_at, outcome, after))
        now = finished_at
    return steps


def first_grid_index_at_or_after(anchor: float, interval: float, lowest: int, t: float) -> int:
    return next(k for k in itertools.count(lowest) if anchor + k * interval >= t)


def grid_points_passed(anchor: float, interval: float, index: int, t: float) -> int:
    """Count grid points after `index` that are at or before `t`."""
    k = index + 1
    while anchor + k * interval <= t:
        k += 1
    return k - index - 1


@settings(max_examples=150)
@given(intervals, starts, st.lists(ticks, max_size=30), st.sampled_from(MissedTickPolicy))
def test_lateness_is_how_late_the_body_started(
    interval: float, start: float, plan: list[Tick], policy: MissedTickPolicy
) -> None:
    for step in drive(IntervalSchedule(interval, start=start, policy=policy), plan):
        due = step.anchor + step.index * interval
        assert step.outcome.lateness == max(0.0, step.started_at - due)
        assert step.outcome.lateness >= 0


@settings(max_examples=150)
@given(intervals, starts, st.lists(ticks, max_size=30), st.sampled_from(MissedTickPolicy))
def test_overran_means_the_body_ended_after_the_next_grid_point(
    interval: float, start: float, plan: list[Tick], policy: MissedTickPolicy
) -> None:
    for step in drive(IntervalSchedule(interval, start=start, policy=policy), plan):
        next_point = step.anchor + (step.index + 1) * interval
        assert step.outcome.overran == (step.finished_at > next_point)


@settings(max_examples=150)
@given(intervals, starts, st.lists(ticks, max_size=30), st.booleans())
def test_skip_stays_on_the_grid_at_the_first_point_not_yet_passed(
    interval: float, start: float, plan: list[Tick], exec_first: bool
) -> None:
    schedule = IntervalSchedule(interval, start=start, policy="skip", exec_first=exec_first)
    for step in drive(schedule, plan):
        after = step.after
        assert after.anchor == start
        assert after.due == start + after.index * interval
        assert math.isclose(after.due - start, after.index * interval, rel_tol=1e-9, abs_tol=1e-6)
        expected = first_grid_index_at_or_after(start, interval, step.index + 1, step.finished_at)
        assert after.index == expected
        assert after.index > step.index
        assert after.due >= step.finished_at
        assert step.outcome.missed == after.index - step.index - 1
        assert step.outcome.overran == (step.outcome.missed > 0)


@settings(max_examples=150)
@given(intervals, starts, st.lists(ticks, max_size=30))
def test_burst_fires_every_grid_point_in_order(
    interval: float, start: float, plan: list[Tick]
) -> None:
    steps = drive(IntervalSchedule(interval, start=start, policy="burst"), plan)
    assert [step.after.index for step in steps] == list(range(2, len(plan) + 2))
    for step in steps:
        assert step.after.due == start + step.after.index * interval
        assert step.outcome.missed == 0


@settings(max_examples=150)
@given(intervals, starts, st.lists(ticks, max_size=30))
def test_delay_reanchors_at_the_end_of_an_overrun(
    interval: float, start: float, plan: list[Tick]
) -> None:
    for step in drive(IntervalSchedule(interval, start=start, policy="delay"), plan):
        after = step.after
        if step.outcome.overran:
            assert (after.anchor, after.index, after.due) == (step.finished_at, 0, step.finished_at)
            passed = grid_points_passed(step.anchor, interval, step.index, step.finished_at)
            # The immediate tick stands in for one of the passed points.
            assert step.outcome.missed == passed - 1
        else:
            assert (after.anchor, after.index) == (step.anchor, step.index + 1)
            assert after.due == step.anchor + after.index * interval
            assert step.outcome.missed == 0


@settings(max_examples=100)
@given(intervals, starts, st.lists(ticks, max_size=30), st.sampled_from(MissedTickPolicy))
def test_due_never_moves_backwards(
    interval: float, start: float, plan: list[Tick], policy: MissedTickPolicy
) -> None:
    schedule = IntervalSchedule(interval, start=start, policy=policy)
    previous = schedule.due
    for step in drive(schedule, plan):
        assert step.after.due >= previous
        previous = step.after.due


# ---------------------------------------------------------------------------------------
# CronSchedule: construction and errors
# ---------------------------------------------------------------------------------------


def test_cron_timezone_defaults_to_utc() -> None:
    schedule = CronSchedule("0 0 * * *")
    assert schedule.timezone is UTC
    fire = schedule.next_after(dt.datetime(2024, 5, 1, 12, tzinfo=PARIS))
    assert fire == dt.datetime(2024, 5, 2, tzinfo=UTC)
    assert fire.tzinfo is UTC


def test_cron_accepts_a_tzinfo_object() -> None:
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    schedule = CronSchedule("30 2 * * *", timezone=india)
    fire = schedule.next_after(dt.datetime(2024, 5, 1, tzinfo=UTC))
    assert fire == dt.datetime(2024, 5, 2, 2, 30, tzinfo=india)


def test_cron_repr_shows_expression_and_timezone() -> None:
    schedule = CronSchedule("*/5 * * * *", timezone="Europe/Paris")
    assert repr(schedule) == "CronSchedule('*/5 * * * *', timezone='Europe/Paris')"


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("61 * * * *", "out of range"),
        ("* * * *", "columns"),
        ("", "columns"),
        ("every minute", "columns"),
    ],
)
def test_bad_cron_expression_raises_value_error_naming_it(expression: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression") as info:
        CronSchedule(expression)
    assert repr(expression) in str(info.value)
    assert reason in str(info.value)


def test_cron_expression_matching_no_date_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"'0 0 30 2 \*' matches no date"):
        CronSchedule("0 0 30 2 *")


def test_cron_expression_must_be_a_string() -> None:
    with pytest.raises(TypeError, match=r"^cron expression must be a string, got int$"):
        CronSchedule(5)  # type: ignore[arg-type]


def test_a_year_field_in_the_past_is_accepted_until_asked_for_a_fire_time() -> None:
    # Only fires at the very first second of 1990: probed from just before it.
    schedule = CronSchedule("0 0 1 1 * 0 1990")
    assert schedule.next_after(dt.datetime(1989, 6, 1, tzinfo=UTC)) == dt.datetime(
        1990, 1, 1, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="never fires after 1990-01-01T00:00:00"):
        schedule.next_after(dt.datetime(1990, 1, 1, tzinfo=UTC))


def test_a_star_year_field_fires_every_year() -> None:
    schedule = CronSchedule("0 0 1 1 * 0 *")
    assert schedule.next_after(dt.datetime(2030, 6, 1, tzinfo=UTC)) == dt.datetime(
        2031, 1, 1, tzinfo=UTC
    )


def test_delay_until_next_can_be_less_than_a_second() -> None:
    schedule = CronSchedule("*/5 * * * *")
    now = dt.datetime(2024, 1, 1, 10, 4, 59, 750000, tzinfo=UTC)
    assert schedule.delay_until_next(now) == 0.25


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "europe/paris", "", "../etc/passwd"])
def test_unknown_timezone_raises_value_error_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match="unknown timezone") as info:
        CronSchedule("* * * * *", timezone=name)
    assert repr(name) in str(info.value)


def test_a_timezone_missing_from_the_database_suggests_tzdata() -> None:
    message = (
        "unknown timezone 'Mars/Olympus_Mons': not in the IANA time zone database "
        "(is the tzdata package installed?)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CronSchedule("* * * * *", timezone="Mars/Olympus_Mons")


def test_timezone_of_the_wrong_type_raises_type_error() -> None:
    message = "timezone must be an IANA name, a tzinfo or None, got int"
    with pytest.raises(TypeError, match=f"^{message}$"):
        CronSchedule("* * * * *", timezone=2)  # type: ignore[arg-type]


class NoOffsetAfter2010(dt.tzinfo):
    """A broken tzinfo: no UTC offset from 2010 on."""

    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None if moment is not None and moment.year >= 2010 else dt.timedelta(0)

    def dst(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return dt.timedelta(0)

    def tzname(self, moment: dt.datetime | None) -> str:
        return "broken"

    def fromutc(self, moment: dt.datetime) -> dt.datetime:
        return moment


class NoOffset(NoOffsetAfter2010):
    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None


def test_a_tzinfo_that_gives_no_offset_is_refused() -> None:
    zone = NoOffset()
    with pytest.raises(ValueError, match=f"^timezone {re.escape(repr(zone))} gives no UTC offset$"):
        CronSchedule("* * * * *", timezone=zone)


def test_a_tzinfo_that_stops_giving_offsets_is_named_when_it_does() -> None:
    schedule = CronSchedule("0 * * * *", timezone=NoOffsetAfter2010())
    with pytest.raises(ValueError, match=r"has a tzinfo that gives no UTC offset$"):
        schedule.next_after(dt.datetime(2020, 1, 1, tzinfo=UTC))


def test_a_moment_that_is_not_a_datetime_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^moment must be a datetime, got date$"):
        CronSchedule("* * * * *").next_after(dt.date(2024, 1, 1))  # type: ignore[arg-type]


def test_naive_moment_raises_value_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CronSchedule("* * * * *").next_after(dt.datetime(2024, 1, 1))


def test_schedule_whose_years_are_past_raises_when_asked_for_the_next_fire() -> None:
    schedule = CronSchedule("0 12 1 1 * 0 2020")
    assert schedule.next_after(dt.datetime(2019, 6, 1, tzinfo=UTC)) == dt.datetime(
        2020, 1, 1, 12, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="never fires after 2021-01-01"):
        schedule.next_after(dt.datetime(2021, 1, 1, tzinfo=UTC))


def test_never_firing_again_is_reported_from_inside_a_repeated_hour_too() -> None:
    # Every minute of 26 October 2024 only; asked from the first 02:30 of the 27th, a wall
    # time Paris repeats: the search for an earlier second occurrence finds nothing either.
    schedule = CronSchedule("* * 26 10 * 0 2024", timezone=PARIS)
    first_half_past_two = dt.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS)
    assert first_half_past_two.utcoffset() == dt.timedelta(hours=2)
    with pytest.raises(ValueError, match=re.escape("never fires after 2024-10-27T00:30:00+00:00")):
        schedule.next_after(first_half_past_two)
    last = schedule.next_after(dt.datetime(2024, 10, 26, 23, 58, tzinfo=PARIS))
    assert last == dt.datetime(2024, 10, 26, 23, 59, tzinfo=PARIS)


# ---------------------------------------------------------------------------------------
# CronSchedule: fire times, across daylight-saving changes
# ---------------------------------------------------------------------------------------


def local(
    tz: ZoneInfo,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    *,
    fold: int = 0,
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold)


def fires(expression: str, tz: ZoneInfo, since: dt.datetime, count: int) -> list[dt.datetime]:
    """The next `count` fire times after `since`, in UTC so that fold is honoured."""
    schedule = CronSchedule(expression, timezone=tz)
    moments = []
    for _ in range(count):
        since = schedule.next_after(since)
        assert since.tzinfo is tz
        moments.append(since)
    return [moment.astimezone(UTC) for moment in moments]


def utc(*moments: dt.datetime) -> list[dt.datetime]:
    return [moment.astimezone(UTC) for moment in moments]


# Europe/Paris, 2024: 02:00 CET jumps to 03:00 CEST on 31 March, 03:00 CEST falls back to
# 02:00 CET on 27 October. America/New_York: 02:00 EST jumps to 03:00 EDT on 10 March,
# 02:00 EDT falls back to 01:00 EST on 3 November.
DST_CASES = [
    # A fixed time in the gap fires once, at the end of the gap.
    (
        "30 2 * * *",
        local(PARIS, 2024, 3, 30, 3),
        utc(local(PARIS, 2024, 3, 31, 3), local(PARIS, 2024, 4, 1, 2, 30)),
    ),
    (
        "30 2 * * *",
        local(NEW_YORK, 2024, 3, 9, 3),
        utc(local(NEW_YORK, 2024, 3, 10, 3), local(NEW_YORK, 2024, 3, 11, 2, 30)),
    ),
    # A fixed time that occurs twice fires at its first occurrence only.
    (
        "30 2 * * *",
        local(PARIS, 2024, 10, 26, 3),
        utc(local(PARIS, 2024, 10, 27, 2, 30), local(PARIS, 2024, 10, 28, 2, 30)),
    ),
    (
        "30 1 * * *",
        local(NEW_YORK, 2024, 11, 2, 3),
        utc(local(NEW_YORK, 2024, 11, 3, 1, 30), local(NEW_YORK, 2024, 11, 4, 1, 30)),
    ),
    (
        "30 2 * * *",
        local(NEW_YORK, 2024, 11, 2, 3),
        utc(local(NEW_YORK, 2024, 11, 3, 2, 30), local(NEW_YORK, 2024, 11, 4, 2, 30)),
    ),
    # A fixed time just after the change fires once a day as usual.
    (
        "0 3 * * *",
        local(PARIS, 2024, 3, 30, 4),
        utc(local(PARIS, 2024, 3, 31, 3), local(PARIS, 2024, 4, 1, 3)),
    ),
    (
        "0 3 * * *",
        local(PARIS, 2024, 10, 26, 4),
        utc(local(PARIS, 2024, 10, 27, 3), local(PARIS, 2024, 10, 28, 3)),
    ),
    (
        "0 3 * * *",
        local(NEW_YORK, 2024, 3, 9, 4),
        utc(local(NEW_YORK, 2024, 3, 10, 3), local(NEW_YORK, 2024, 3, 11, 3)),
    ),
    (
        "0 3 * * *",
        local(NEW_YORK, 2024, 11, 2, 4),
        utc(local(NEW_YORK, 2024, 11, 3, 3), local(NEW_YORK, 2024, 11, 4, 3)),
    ),
    # Hourly: the skipped hour does not fire, the repeated hour fires twice; in real time
    # that is exactly one fire an hour throughout.
    (
        "0 * * * *",
        local(PARIS, 2024, 3, 31, 0, 30),
        utc(
            local(PARIS, 2024, 3, 31, 1), local(PARIS, 2024, 3, 31, 3), local(PARIS, 2024, 3, 31, 4)
        ),
    ),
    (
        "0 * * * *",
        local(PARIS, 2024, 10, 27, 1, 30),
        utc(
            local(PARIS, 2024, 10, 27, 2),
            local(PARIS, 2024, 10, 27, 2, fold=1),
            local(PARIS, 2024, 10, 27, 3),
        ),
    ),
    (
        "0 * * * *",
        local(NEW_YORK, 2024, 3, 10, 0, 30),
        utc(local(NEW_YORK, 2024, 3, 10, 1), local(NEW_YORK, 2024, 3, 10, 3)),
    ),
    (
        "0 * * * *",
        local(NEW_YORK, 2024, 11, 3, 0, 30),
        utc(
            local(NEW_YORK, 2024, 11, 3, 1),
            local(NEW_YORK, 2024, 11, 3, 1, fold=1),
            local(NEW_YORK, 2024, 11, 3, 2),
        ),
    ),
    # Every five minutes stays every five real minutes.
    (
        "*/5 * * * *",
        local(PARIS, 2024, 3, 31, 1, 50),
        utc(
            local(PARIS, 2024, 3, 31, 1, 55),
            local(PARIS, 2024, 3, 31, 3),
            local(PARIS, 2024, 3, 31, 3, 5),
        ),
    ),
    (
        "*/5 * * * *",
        local(PARIS, 2024, 10, 27, 2, 50),
        utc(
            local(PARIS, 2024, 10, 27, 2, 55),
            local(PARIS, 2024, 10, 27, 2, 0, fold=1),
            local(PARIS, 2024, 10, 27, 2, 5, fold=1),
        ),
    ),
    (
        "*/5 * * * *",
        local(NEW_YORK, 2024, 3, 10, 1, 50),
        utc(
            local(NEW_YORK, 2024, 3, 10, 1, 55),
            local(NEW_YORK, 2024, 3, 10, 3),
            local(NEW_YORK, 2024, 3, 10, 3, 5),
        ),
    ),
    (
        "*/5 * * * *",
        local(NEW_YORK, 2024, 11, 3, 1, 50),
        utc(
            local(NEW_YORK, 2024, 11, 3, 1, 55),
            local(NEW_YORK, 2024, 11, 3, 1, 0, fold=1),
            local(NEW_YORK, 2024, 11, 3, 1, 5, fold=1),
        ),
    ),
]


@pytest.mark.parametrize(("expression", "since", "expected"), DST_CASES)
def test_fire_times_across_daylight_saving_changes(
    expression: str, since: dt.datetime, expected: list[dt.datetime]
) -> None:
    tz = since.tzinfo
    assert isinstance(tz, ZoneInfo)
    assert fires(expression, tz, since, len(expected)) == expected


def test_hourly_fires_on_the_second_occurrence_from_inside_the_first() -> None:
    since = local(PARIS, 2024, 10, 27, 2, 30)
    assert fires("0 * * * *", PARIS, since, 2) == utc(
        local(PARIS, 2024, 10, 27, 2, fold=1), local(PARIS, 2024, 10, 27, 3)
    )


def test_every_five_minutes_from_inside_the_first_occurrence_continues_in_it() -> None:
    since = local(PARIS, 2024, 10, 27, 2, 30)
    assert fires("*/5 * * * *", PARIS, since, 1) == utc(local(PARIS, 2024, 10, 27, 2, 35))


def test_hourly_from_inside_the_second_occurrence_waits_for_the_next_hour() -> None:
    since = local(PARIS, 2024, 10, 27, 2, 30, fold=1)
    assert fires("0 * * * *", PARIS, since, 1) == utc(local(PARIS, 2024, 10, 27, 3))


def test_seconds_field_keeps_its_real_period_through_the_repeated_hour() -> None:
    since = local(PARIS, 2024, 10, 27, 2, 59, 45)
    assert fires("* * * * * */30", PARIS, since, 3) == utc(
        local(PARIS, 2024, 10, 27, 2, 0, 0, fold=1),
        local(PARIS, 2024, 10, 27, 2, 0, 30, fold=1),
        local(PARIS, 2024, 10, 27, 2, 1, 0, fold=1),
    )


def test_restricted_hours_fire_once_per_wall_time_and_once_for_the_whole_gap() -> None:
    since = local(PARIS, 2024, 3, 31, 1, 40)
    assert fires("*/20 1-3 * * *", PARIS, since, 3) == utc(
        local(PARIS, 2024, 3, 31, 3),
        local(PARIS, 2024, 3, 31, 3, 20),
        local(PARIS, 2024, 3, 31, 3, 40),
    )


def test_timezone_without_daylight_saving_fires_at_the_same_local_time_daily() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    assert fires("30 2 * * *", tokyo, local(tokyo, 2024, 3, 30, 12), 3) == utc(
        local(tokyo, 2024, 3, 31, 2, 30),
        local(tokyo, 2024, 4, 1, 2, 30),
        local(tokyo, 2024, 4, 2, 2, 30),
    )


def test_next_after_is_strictly_after_a_fire_time() -> None:
    schedule = CronSchedule("0 * * * *", timezone="Europe/Paris")
    moment = local(PARIS, 2024, 5, 1, 12)
    assert schedule.next_after(moment) == local(PARIS, 2024, 5, 1, 13)


def test_delay_until_next_counts_real_seconds_across_the_repeated_hour() -> None:
    schedule = CronSchedule("0 * * * *", timezone="Europe/Paris")
    # Wall-clock subtraction would say 02:00 is half an hour *before* 02:30.
    assert schedule.delay_until_next(local(PARIS, 2024, 10, 27, 2, 30)) == 1800.0
    assert schedule.delay_until_next(local(PARIS, 2024, 3, 31, 1, 30)) == 1800.0


# ---------------------------------------------------------------------------------------
# CronSchedule: properties, checked against a brute-force scan of every minute
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """A cron expression with only minutes and hours set, and a matcher written by hand."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]

    @property
    def every_hour(self) -> bool:
        return len(self.hours) == 24

    def matches(self, wall: dt.datetime) -> bool:
        return wall.minute in self.minutes and wall.hour in self.hours


ALL_HOURS = frozenset(range(24))
PATTERNS = [
    Pattern("*/5 * * * *", frozenset(range(0, 60, 5)), ALL_HOURS),
    Pattern("0 * * * *", frozenset({0}), ALL_HOURS),
    Pattern("30 * * * *", frozenset({30}), ALL_HOURS),
    Pattern("0 0 * * *", frozenset({0}), frozenset({0})),
    Pattern("30 1 * * *", frozenset({30}), frozenset({1})),
    Pattern("30 2 * * *", frozenset({30}), frozenset({2})),
    Pattern("0 3 * * *", frozenset({0}), frozenset({3})),
    Pattern("*/15 1-3 * * *", frozenset(range(0, 60, 15)), frozenset({1, 2, 3})),
]

# Daylight-saving changes in 2024: whole-hour ones, a 30-minute one (Lord Howe) and ones at
# midnight (Santiago), each as (zone, a UTC instant within a few hours of the change).
TRANSITIONS = [
    ("Europe/Paris", dt.datetime(2024, 3, 31, 1, tzinfo=UTC)),
    ("Europe/Paris", dt.datetime(2024, 10, 27, 1, tzinfo=UTC)),
    ("America/New_York", dt.datetime(2024, 3, 10, 7, tzinfo=UTC)),
    ("America/New_York", dt.datetime(2024, 11, 3, 6, tzinfo=UTC)),
    ("Australia/Lord_Howe", dt.datetime(2024, 4, 6, 15, tzinfo=UTC)),
    ("Australia/Lord_Howe", dt.datetime(2024, 10, 5, 15, 30, tzinfo=UTC)),
    ("America/Santiago", dt.datetime(2024, 4, 7, 3, tzinfo=UTC)),
    ("America/Santiago", dt.datetime(2024, 9, 8, 4, tzinfo=UTC)),
]
WINDOW = dt.timedelta(hours=40)
MINUTE = dt.timedelta(minutes=1)


@functools.cache
def minutes_around(zone: str, around: dt.datetime) -> tuple[list[dt.datetime], list[dt.datetime]]:
    """Every minute within WINDOW of `around`, as UTC instants and as local wall times."""
    tz = ZoneInfo(zone)
    instants = [around - WINDOW + k * MINUTE for k in range(2 * WINDOW // MINUTE + 1)]
    walls = [instant.astimezone(tz).replace(tzinfo=None, fold=0) for instant in instants]
    return instants, walls


@functools.cache
def oracle_fire_times(zone: str, around: dt.datetime, pattern: Pattern) -> list[dt.datetime]:
    """Every fire time within WINDOW of `around`, by the documented rules."""
    instants, walls = minutes_around(zone, around)
    if pattern.every_hour:
        return [i for i, wall in zip(instants, walls, strict=True) if pattern.matches(wall)]
    occurrences: dict[dt.datetime, list[dt.datetime]] = {}
    for instant, wall in zip(instants, walls, strict=True):
        occurrences.setdefault(wall, []).append(instant)
    fire_times = set()
    first_wall, last_wall = min(walls), max(walls)
    wall = first_wall
    while wall <= last_wall:
        if pattern.matches(wall):
            if wall in occurrences:
                fire_times.add(occurrences[wall][0])
            elif first_wall < wall < last_wall:
                # Skipped by the clock: the first instant whose wall time is past it.
                fire_times.add(next(i for i, w in zip(instants, walls, strict=True) if w > wall))
        wall += MINUTE
    return sorted(fire_times)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(TRANSITIONS),
    st.sampled_from(PATTERNS),
    st.one_of(
        st.floats(-30 * 3600, 6 * 3600),
        # Near the change, and exactly on whole minutes, where the rules have edges.
        st.floats(-2 * 3600, 2 * 3600),
        st.integers(-180, 180).map(lambda minutes: minutes * 60.0),
    ),
    st.sampled_from([UTC, PARIS, NEW_YORK, None]),
)
def test_next_after_matches_a_minute_by_minute_scan(
    transition: tuple[str, dt.datetime],
    pattern: Pattern,
    offset_seconds: float,
    shown_in: dt.tzinfo | None,
) -> None:
    zone, around = transition
    moment = around + dt.timedelta(seconds=offset_seconds)
    # The caller's timezone must not matter, only the instant.
    moment = moment.astimezone(shown_in or ZoneInfo(zone))
    expected = next(t for t in oracle_fire_times(zone, around, pattern) if t > moment)
    fire = CronSchedule(pattern.expression, timezone=zone).next_after(moment)
    assert fire.astimezone(UTC) == expected
    assert fire.tzinfo == ZoneInfo(zone)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(TRANSITIONS), st.sampled_from(PATTERNS))
def test_successive_fire_times_are_strictly_increasing_and_never_repeat(
    transition: tuple[str, dt.datetime], pattern: Pattern
) -> None:
    zone, around = transition
    schedule = CronSchedule(pattern.expression, timezone=zone)
    moment = around - dt.timedelta(hours=30)
    seen = []
    while moment < around + dt.timedelta(hours=6):
        moment = schedule.next_after(moment).astimezone(UTC)
        seen.append(moment)
    assert seen == sorted(set(seen))
    assert seen == [t for t in oracle_fire_times(zone, around, pattern) if seen[0] <= t <= seen[-1]]


@settings(max_examples=150)
@given(intervals, starts, st.floats(0, 50), st.booleans())
def test_catch_up_leaves_the_tick_less_than_an_interval_late(
    interval: float, start: float, late_by: float, exec_first: bool
) -> None:
    schedule = IntervalSchedule(interval, start=start, exec_first=exec_first)
    before = schedule.index
    due = schedule.due
    woke = due + late_by * interval
    dropped = schedule.catch_up(woke)
    assert schedule.index == before + dropped
    if woke <= start + (before + 1) * interval:
        assert dropped == 0
    else:
        assert dropped >= 1
        assert start + schedule.index * interval <= woke < start + (schedule.index + 1) * interval


@given(
    interval=st.floats(min_value=1e-6, max_value=1e6),
    start=st.floats(min_value=-1e9, max_value=1e9),
    policy=st.sampled_from(MissedTickPolicy),
    exec_first=st.booleans(),
)
def test_a_schedule_of_checked_arguments_is_the_checked_constructors(
    interval: float, start: float, policy: MissedTickPolicy, exec_first: bool
) -> None:
    made = IntervalSchedule(interval, start=start, policy=policy, exec_first=exec_first)
    trusted = IntervalSchedule.checked(interval, start=start, policy=policy, exec_first=exec_first)
    assert repr(trusted) == repr(made)
    assert (trusted.due, trusted.index, trusted.anchor) == (made.due, made.index, made.anchor)
