"""The tick arithmetic of scheduled tasks, as pure functions: grids, missed ticks, workers.

A simulation runs the scheduler loop of several workers over virtual wall time against a
store that keeps one entry per (schedule, due) key, as the brokers do, and checks which
ticks end up stored: all of them, once each, whatever the workers' lateness; after a
downtime, what the missed-tick policy says.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyservice._schedule import CronSchedule
from anyservice.taskqueue._ticks import (
    CronGrid,
    IntervalGrid,
    MissedTicks,
    TickGrid,
    check_missed,
    grid_from,
    plan_ticks,
    tick_key,
)

PARIS = ZoneInfo("Europe/Paris")

intervals = st.sampled_from([0.25, 1.0, 2.5, 10.0, 60.0, 3600.0])
moments = st.floats(min_value=1.6e9, max_value=1.9e9, allow_nan=False)


def _paris(year: int, month: int, day: int, hour: int, minute: int = 0, *, fold: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=PARIS, fold=fold).timestamp()


# --- grids ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(intervals, moments)
def test_interval_next_after_is_the_first_grid_point_after(interval: float, moment: float) -> None:
    grid = IntervalGrid(interval)
    tick = grid.next_after(moment)
    assert tick > moment
    assert tick - interval <= moment
    index = tick / interval
    assert index == round(index)


@settings(max_examples=300)
@given(intervals, moments, st.integers(0, 50), st.integers(1, 20))
def test_interval_last_before_gives_the_latest_points_in_range(
    interval: float, moment: float, span: int, count: int
) -> None:
    grid = IntervalGrid(interval)
    after = moment - span * interval
    ticks = grid.last_before(moment, after, count)
    assert ticks == sorted(set(ticks))
    assert all(after < tick < moment for tick in ticks)
    assert len(ticks) <= count
    if ticks:
        assert grid.next_after(ticks[-1]) >= moment
        for earlier, later in itertools.pairwise(ticks):
            assert grid.next_after(earlier) == later
    everything = grid.last_before(moment, after, 10**6)
    assert ticks == everything[-count:]


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(
        [
            ("* * * * * */7", 600),
            ("*/5 * * * *", 7200),
            ("0 * * * *", 86400),
            ("30 2 * * *", 4 * 86400),
        ]
    ),
    st.floats(min_value=1.7e9, max_value=1.72e9, allow_nan=False),
    st.integers(1, 6),
)
def test_cron_last_before_agrees_with_walking_forward(
    expression_and_span: tuple[str, int], moment: float, count: int
) -> None:
    expression, span = expression_and_span
    grid = CronGrid(CronSchedule(expression, timezone="Europe/Paris"))
    after = moment - span
    walked: list[float] = []
    tick = grid.next_after(after)
    while tick < moment:
        walked.append(tick)
        tick = grid.next_after(tick)
    assert grid.last_before(moment, after, count) == walked[-count:]


def test_cron_ticks_follow_the_dst_rules_of_cron_schedule() -> None:
    # Europe/Paris skips 02:00-03:00 on 2024-03-31: 02:30 fires at the gap's end, 03:00.
    daily = CronGrid(CronSchedule("30 2 * * *", timezone="Europe/Paris"))
    assert daily.next_after(_paris(2024, 3, 30, 12)) == _paris(2024, 3, 31, 3)
    # ...and repeats 02:00-03:00 on 2024-10-27: an hourly job fires at both 02:00.
    hourly = CronGrid(CronSchedule("0 * * * *", timezone="Europe/Paris"))
    first = _paris(2024, 10, 27, 2)
    second = _paris(2024, 10, 27, 2, fold=1)
    assert second - first == 3600
    assert hourly.next_after(_paris(2024, 10, 27, 1, 30)) == first
    assert hourly.next_after(first) == second
    # A downtime across the change catches up on both, with "all".
    planned = plan_ticks(
        hourly,
        last=_paris(2024, 10, 27, 0),
        now=_paris(2024, 10, 27, 3, 30),
        awake_for=None,
        missed=MissedTicks.ALL,
    )
    assert planned == [_paris(2024, 10, 27, 1), first, second, _paris(2024, 10, 27, 3)]


# --- what users pass -----------------------------------------------------------------------


def test_grid_from_reads_cron_strings_numbers_and_timedeltas() -> None:
    cron = grid_from("*/5 * * * *", timezone="Europe/Paris")
    assert isinstance(cron, CronGrid)
    assert cron.cron.timezone == PARIS
    assert isinstance(grid_from(CronSchedule("@hourly")), CronGrid)
    every = grid_from(dt.timedelta(minutes=2))
    assert isinstance(every, IntervalGrid)
    assert every.interval == 120.0
    assert isinstance(grid_from(5), IntervalGrid)


@pytest.mark.parametrize("bad", [None, True, [1], b"* * * * *"])
def test_grid_from_refuses_what_is_no_schedule(bad: object) -> None:
    with pytest.raises(TypeError, match=r"schedule must be a cron expression.*got"):
        grid_from(bad)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_grid_from_refuses_bad_intervals_naming_them(bad: float) -> None:
    with pytest.raises(ValueError, match="schedule interval must be a finite number"):
        grid_from(bad)


def test_grid_from_refuses_a_bad_cron_expression_or_timezone() -> None:
    with pytest.raises(ValueError, match="invalid cron expression 'every day'"):
        grid_from("every day")
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        grid_from("* * * * *", timezone="Mars/Olympus")
    with pytest.raises(TypeError, match="timezone= goes with a cron expression"):
        grid_from(5, timezone="Europe/Paris")


def test_check_missed_takes_the_enum_or_its_value() -> None:
    assert check_missed("latest") is MissedTicks.LATEST
    assert check_missed(MissedTicks.ALL) is MissedTicks.ALL
    with pytest.raises(ValueError, match="missed must be 'skip', 'latest' or 'all', got 'burst'"):
        check_missed("burst")
    with pytest.raises(TypeError, match="got 1"):
        check_missed(1)


def test_tick_keys_agree_to_the_microsecond() -> None:
    assert tick_key(0.1 + 0.2) == tick_key(0.3)


# --- plan_ticks ----------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    intervals,
    moments,
    st.integers(0, 30),
    st.sampled_from(list(MissedTicks)),
    st.integers(1, 10),
    st.booleans(),
)
def test_plan_ticks_keeps_what_the_policy_says(
    interval: float, moment: float, down: int, missed: MissedTicks, catch_up: int, first: bool
) -> None:
    grid = IntervalGrid(interval)
    awake_for = grid.next_after(moment)
    last = awake_for - (down + 1) * interval
    now = awake_for + interval / 3
    planned = plan_ticks(
        grid,
        last=last,
        now=now,
        awake_for=None if first else awake_for,
        missed=missed,
        catch_up=catch_up,
    )
    assert list(planned) == sorted(set(planned))
    assert all(last < tick <= now for tick in planned)
    missed_ticks = [tick for tick in planned if tick != awake_for or first]
    if first:
        # On a first look nothing was woken for: every tick up to now was missed.
        assert awake_for not in planned or missed is not MissedTicks.SKIP
    else:
        assert planned[-1] == awake_for
    expected = {
        MissedTicks.SKIP: 0,
        MissedTicks.LATEST: min(1, down + first),
        MissedTicks.ALL: min(catch_up, down + first),
    }[missed]
    assert len(missed_ticks) == expected


def test_plan_ticks_stores_nothing_already_stored_or_never_run() -> None:
    grid = IntervalGrid(10)
    assert plan_ticks(grid, last=100.0, now=101.0, awake_for=100.0, missed=MissedTicks.ALL) == []
    # A schedule that never ran has nothing to catch up: only the tick woken for.
    assert plan_ticks(grid, last=None, now=101.0, awake_for=100.0, missed=MissedTicks.ALL) == [
        100.0
    ]
    assert plan_ticks(grid, last=None, now=101.0, awake_for=None, missed=MissedTicks.ALL) == []


def test_plan_ticks_refuses_a_tick_not_due_yet() -> None:
    with pytest.raises(ValueError, match=r"awake_for \(20.0\) is after now \(10.0\)"):
        plan_ticks(IntervalGrid(10), last=None, now=10.0, awake_for=20.0, missed=MissedTicks.SKIP)


# --- a cluster of workers, simulated -------------------------------------------------------


@dataclass
class _Worker:
    """One worker's scheduler loop, as ``keep_schedule`` runs it."""

    lateness: float
    up_from: float
    up_until: float
    awake_for: float | None = None


def _simulate(
    grid: TickGrid,
    workers: list[_Worker],
    missed: MissedTicks,
    end: float,
    catch_up: int = 1000,
) -> list[float]:
    """Every store of a tick, in order; the store keeps the first of each key."""
    stored: dict[float, int] = {}
    attempts: list[float] = []
    # Events: (time, worker index). A worker looks at up_from, then at each due tick.
    events = [(worker.up_from, index) for index, worker in enumerate(workers)]
    heapq.heapify(events)
    while events:
        now, index = heapq.heappop(events)
        worker = workers[index]
        if now > worker.up_until or now > end:
            continue
        latest = max(stored, default=None)
        for due in plan_ticks(
            grid,
            last=latest,
            now=now,
            awake_for=worker.awake_for,
            missed=missed,
            catch_up=catch_up,
        ):
            attempts.append(due)
            stored.setdefault(tick_key(due), index)
        latest = max(stored, default=None)
        due = grid.next_after(max(now, latest) if latest is not None else now)
        worker.awake_for = due
        heapq.heappush(events, (due + worker.lateness, index))
    return sorted(stored)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([1.0, 5.0, 60.0]),
    st.lists(st.floats(0, 0.4), min_size=1, max_size=4),
    st.floats(0, 100),
)
def test_workers_that_stay_up_store_every_tick_once(
    interval: float, lateness: list[float], offset: float
) -> None:
    # Each worker wakes late by its own fraction of the interval; one is up throughout.
    grid = IntervalGrid(interval)
    start = 1_700_000_000.0 + offset
    end = start + 40 * interval
    workers = [
        _Worker(late * interval, start + i * 0.01, math.inf) for i, late in enumerate(lateness)
    ]
    stored = _simulate(grid, workers, MissedTicks.SKIP, end)
    # Every tick after the first worker came up, until the end (a last one may be cut off).
    everything = grid.last_before(end + interval, start, 10**6)
    assert stored == everything[: len(stored)]
    assert len(stored) >= len(everything) - 2


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(MissedTicks)),
    st.integers(2, 15),
    st.lists(st.floats(0, 0.25), min_size=1, max_size=4),
)
def test_after_a_downtime_the_policy_decides_what_runs(
    missed: MissedTicks, down_ticks: int, lateness: list[float]
) -> None:
    grid = IntervalGrid(10.0)
    start = 1_700_000_003.0
    crash = start + 100
    restart = crash + down_ticks * 10 + 5
    end = restart + 100
    # Every worker dies at ``crash`` and a new set comes up at ``restart``, both 3 s or
    # more from a tick, more than any worker is late by.
    before = [_Worker(late * 10, start, crash) for late in lateness]
    after = [_Worker(late * 10, restart, math.inf) for late in lateness]
    stored = _simulate(grid, before + after, missed, end)
    down = set(grid.last_before(restart, crash, 10**6))
    kept = sorted(set(stored) & down)
    if missed is MissedTicks.SKIP:
        assert kept == []
    elif missed is MissedTicks.LATEST:
        assert kept == [max(down)]
    else:
        assert kept == sorted(down)
    # Outside the downtime, every tick once.
    up = set(grid.last_before(crash, start, 10**6)) | set(grid.last_before(end, restart, 10**6))
    assert set(stored) - down == up
