"""@timer, @crontab and itertimer on a running service, on virtual time, both backends."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import math
import zoneinfo
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyservice import MissedTickPolicy, Service, ServiceState, crontab, task, timer
from anyservice.testing import virtual_wall_clock
from anyservice.testing._clock import VirtualTimeEventLoop

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

#: Where the service under test runs: on its own, or as a dependency of a parent, whose
#: timer wheel then wakes its timer (see ``running``).
_placement = ["alone"]


@pytest.fixture(autouse=True, params=["alone", "dependency"])
def placement(request: pytest.FixtureRequest) -> Iterator[str]:
    _placement[0] = request.param
    yield request.param
    _placement[0] = "alone"


@contextlib.asynccontextmanager
async def running(service: Service) -> AsyncIterator[Service]:
    """``async with service``, or with a parent of which it is the one dependency."""
    if _placement[0] == "alone":
        async with service:
            yield service
        return
    parent = Service(name="parent")
    parent.add_dependency(service)
    async with parent:
        yield service


def ticker(
    interval: float,
    durations: list[float],
    *,
    policy: MissedTickPolicy | str = "skip",
    exec_first: bool = False,
) -> tuple[Service, list[tuple[float, float]]]:
    """A service whose timer body takes ``durations[i]`` on tick i; records (start, end)."""
    runs: list[tuple[float, float]] = []

    class Ticker(Service):
        shutdown_timeout = 0.0

        @timer(interval, policy=policy, exec_first=exec_first)
        async def tick(self) -> None:
            started = anyio.current_time()
            index = len(runs)
            await anyio.sleep(durations[index] if index < len(durations) else 0)
            runs.append((started, anyio.current_time()))

    return Ticker(), runs


async def run_for(service: Service, seconds: float) -> float:
    """Run ``service`` for ``seconds`` of virtual time; returns its start time."""
    async with running(service):
        start = anyio.current_time()
        await anyio.sleep(seconds)
    return start


# ------------------------------------------------------------------ the grid


async def test_timer_ticks_on_the_grid_whatever_the_body_takes() -> None:
    service, runs = ticker(1.0, [0.3] * 20)
    t0 = await run_for(service, 10.5)
    assert [start - t0 for start, _ in runs] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


async def test_exec_first_fires_at_start() -> None:
    service, runs = ticker(2.0, [], exec_first=True)
    t0 = await run_for(service, 5)
    assert [start - t0 for start, _ in runs] == [0, 2, 4]


async def test_no_drift_over_many_ticks_of_an_unrepresentable_interval() -> None:
    service, runs = ticker(0.1, [0.01] * 5000)
    t0 = await run_for(service, 400.05)
    assert len(runs) == 4000
    assert runs[-1][0] - t0 == pytest.approx(4000 * 0.1, abs=1e-9)
    assert all(
        math.isclose(start - t0, (k + 1) * 0.1, abs_tol=1e-9) for k, (start, _) in enumerate(runs)
    )


async def test_skip_policy_goes_to_the_next_grid_point(caplog: pytest.LogCaptureFixture) -> None:
    service, runs = ticker(1.0, [2.5, 0.1, 0.1], policy="skip")
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        t0 = await run_for(service, 6.5)
    assert [start - t0 for start, _ in runs] == [1, 4, 5, 6]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "took 2.500000s against an interval of 1.0s" in warnings[0]
    assert "skips 2 tick(s)" in warnings[0]
    stats = service.timer_stats["tick"]
    assert (stats.overruns, stats.missed) == (1, 2)


async def test_delay_policy_reanchors_after_an_overrun() -> None:
    service, runs = ticker(1.0, [2.5, 0.1, 0.1], policy="delay")
    t0 = await run_for(service, 6)
    assert [start - t0 for start, _ in runs] == pytest.approx([1, 3.5, 4.5, 5.5])


async def test_burst_policy_catches_up() -> None:
    service, runs = ticker(1.0, [2.5, 0.1, 0.1, 0.1], policy="burst")
    t0 = await run_for(service, 4.5)
    assert [start - t0 for start, _ in runs] == pytest.approx([1, 3.5, 3.6, 4])


async def test_one_warning_per_run_of_overruns_not_per_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, _runs = ticker(1.0, [1.5] * 5 + [0.1] * 3 + [1.5] * 2)
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        await run_for(service, 30)
    assert len([r for r in caplog.records if "overran" in r.getMessage()]) == 2
    assert service.timer_stats["tick"].overruns == 7


@pytest.mark.parametrize("policy", list(MissedTickPolicy))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    interval=st.floats(min_value=0.01, max_value=50, allow_nan=False),
    factors=st.lists(st.floats(min_value=0, max_value=3.5), min_size=1, max_size=12),
)
async def test_ticks_land_where_the_policy_says_for_any_pattern(
    policy: MissedTickPolicy, interval: float, factors: list[float]
) -> None:
    durations = [factor * interval for factor in factors]
    service, runs = ticker(interval, durations, policy=policy)
    async with running(service):
        t0 = anyio.current_time()
        # Long enough for every body, each overrunning at most 3.5 intervals.
        await anyio.sleep(interval * 4 * (len(durations) + 1))

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * interval)

    anchor, index = t0, 1
    previous_end: float | None = None
    for start, end in runs:
        due = anchor + index * interval
        if previous_end is not None and previous_end > due:
            # The previous body overran this tick: where the next one starts is the policy's.
            if policy is MissedTickPolicy.BURST:
                assert close(start, previous_end)
            elif policy is MissedTickPolicy.SKIP:
                # The first grid point not before the end of the overrunning body.
                index = max(index, math.floor((previous_end - anchor) / interval) - 1)
                while anchor + index * interval < previous_end:
                    index += 1
                due = anchor + index * interval
                assert close(start, due)
                assert start >= previous_end - 1e-9
            else:
                assert close(start, previous_end)
                anchor, index = start, 0
        else:
            assert close(start, due)
        previous_end = end
        index += 1


# ------------------------------------------------------------------ a busy event loop


def block_the_event_loop(backend: str, seconds: float) -> None:
    """What ``time.sleep(seconds)`` in a task does, on the virtual clock: time passes and
    no other task runs until the caller awaits."""
    if backend == "trio":
        import trio.lowlevel
        import trio.testing

        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        clock.jump(seconds)
    else:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeEventLoop)
        loop.advance(seconds)


def busy_loop_ticker(
    backend: str, *, block_at: float, block_for: float, body: float
) -> tuple[Service, list[float]]:
    """A 10 ms timer whose body takes ``body``, beside a task that blocks the loop once."""
    starts: list[float] = []

    class Busy(Service):
        shutdown_timeout = 0.0

        @timer(0.01)
        async def tick(self) -> None:
            starts.append(anyio.current_time())
            if body:
                await anyio.sleep(body)

        @task
        async def hog(self) -> None:
            await anyio.sleep(block_at)
            block_the_event_loop(backend, block_for)

    return Busy(), starts


async def test_a_late_wake_up_with_a_short_body_is_not_an_overrun(
    anyio_backend: tuple[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    # The loop is blocked from 5 ms to 25 ms: the tick due at 10 ms wakes at 25 ms, after the
    # next grid point (20 ms), so it is dropped; the one due at 20 ms runs at once, late.
    service, starts = busy_loop_ticker(anyio_backend[0], block_at=0.005, block_for=0.02, body=0)
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        t0 = await run_for(service, 0.305)
    stats = service.timer_stats["tick"]
    assert (stats.ticks, stats.overruns, stats.missed) == (29, 0, 1)
    assert starts[0] - t0 == pytest.approx(0.025)
    assert [start - t0 for start in starts[1:4]] == pytest.approx([0.03, 0.04, 0.05])
    assert stats.worst_lateness == pytest.approx(0.005)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "woke up 0.015000s late" in warnings[0]
    assert "the event loop was busy, not the body" in warnings[0]
    assert "skips 1 tick(s)" in warnings[0]
    assert "overran" not in warnings[0]


async def test_a_tick_started_late_that_ends_past_the_next_point_is_followed_at_once(
    anyio_backend: tuple[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    # Blocked from 5 ms to 18 ms: the tick due at 10 ms starts at 18 ms, before the next grid
    # point, and its 4 ms body ends at 22 ms. Late start, short body: no overrun, nothing
    # missed; the tick due at 20 ms starts at 22 ms.
    service, starts = busy_loop_ticker(
        anyio_backend[0], block_at=0.005, block_for=0.013, body=0.004
    )
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        t0 = await run_for(service, 0.105)
    stats = service.timer_stats["tick"]
    assert (stats.overruns, stats.missed) == (0, 0)
    assert [start - t0 for start in starts[:4]] == pytest.approx([0.018, 0.022, 0.03, 0.04])
    assert stats.worst_lateness == pytest.approx(0.008)
    assert caplog.records == []


async def test_time_lost_between_the_wake_up_and_the_body_does_not_crash_the_timer(
    anyio_backend: tuple[str, object],
) -> None:
    # The late wake-up's warning goes to a handler that takes 35 ms (a slow disk, a loaded
    # machine): the tick then starts past the next grid point before its body runs. That
    # is a late tick; it used to crash the service with "finished_at is before started_at".
    backend = anyio_backend[0]

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "woke up" in record.getMessage():
                block_the_event_loop(backend, 0.035)

    service, starts = busy_loop_ticker(backend, block_at=0.005, block_for=0.02, body=0)
    handler = Slow(logging.WARNING)
    library = logging.getLogger("anyservice")
    library.addHandler(handler)
    try:
        t0 = await run_for(service, 0.205)
    finally:
        library.removeHandler(handler)
    assert service.state is ServiceState.STOPPED
    # Woke at 25 ms for the tick due at 10 ms, started it at 60 ms: the next ticks follow.
    assert starts[0] - t0 == pytest.approx(0.06)
    assert len(starts) >= 10


async def test_a_long_body_is_still_an_overrun_and_says_so(
    anyio_backend: tuple[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    # No late wake-up: the first body takes 25 ms on a 10 ms grid, the real cause.
    service, runs = ticker(0.01, [0.025])
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        t0 = await run_for(service, 0.105)
    assert [start - t0 for start, _ in runs[:3]] == pytest.approx([0.01, 0.04, 0.05])
    stats = service.timer_stats["tick"]
    assert (stats.overruns, stats.missed) == (1, 2)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "the body took 0.025000s against an interval of 0.01s" in warnings[0]


# ------------------------------------------------------------------ errors and stopping


async def test_error_in_a_timer_body_crashes_the_service_by_default() -> None:
    class Failing(Service):
        @timer(1.0)
        async def tick(self) -> None:
            raise ValueError("bad tick")

    service = Failing()
    start = anyio.current_time()
    # As a dependency, its group is inside its parent's.
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bad tick"), flatten_subgroups=True):
        await run_for(service, 5)
    assert service.state is ServiceState.CRASHED
    assert anyio.current_time() - start == 1


async def test_on_error_log_keeps_the_schedule(caplog: pytest.LogCaptureFixture) -> None:
    ticks: list[float] = []

    class Forgiving(Service):
        @timer(1.0, on_error="log")
        async def tick(self) -> None:
            ticks.append(anyio.current_time())
            raise ValueError("bad tick")

    service = Forgiving()
    with caplog.at_level(logging.ERROR, logger="anyservice"):
        t0 = await run_for(service, 3.5)
    assert [tick - t0 for tick in ticks] == [1, 2, 3]
    assert service.timer_stats["tick"].errors == 3
    assert "timer 'tick' raised; the schedule goes on" in caplog.text


async def test_idle_timer_stops_at_once() -> None:
    class Hourly(Service):
        shutdown_timeout = 60.0

        @timer(3600)
        async def tick(self) -> None:
            pass

    async with running(Hourly()) as service:
        await anyio.sleep(10)
        before = anyio.current_time()
        await service.stop()
        assert anyio.current_time() == before


async def test_timer_body_in_flight_gets_the_grace_period() -> None:
    finished: list[float] = []

    class Slow(Service):
        shutdown_timeout = 10.0

        @timer(1.0)
        async def tick(self) -> None:
            await anyio.sleep(3)
            finished.append(anyio.current_time())

    async with running(Slow()) as service:
        t0 = anyio.current_time()
        await anyio.sleep(2)
        await service.stop()
    assert [end - t0 for end in finished] == [4]


async def test_stop_from_inside_a_timer_body_does_not_deadlock() -> None:
    class Once(Service):
        @timer(1.0)
        async def tick(self) -> None:
            await self.stop()

    async with running(Once()) as service:
        with anyio.fail_after(5):
            await service.wait_for(ServiceState.STOPPED)


# ------------------------------------------------------------------ statistics


async def test_statistics_are_readable_while_running() -> None:
    service, _runs = ticker(1.0, [0.2, 1.5, 0.2, 0.2])
    async with running(service):
        t0 = anyio.current_time()
        await anyio.sleep(2.5)
        stats = service.timer_stats["tick"]
        assert (stats.ticks, stats.overruns) == (1, 0)
        await anyio.sleep(t0 + 6.5 - anyio.current_time())
    # Ticks at 1, 2 (overruns to 3.5: 3 is skipped), 4, 5 and 6.
    assert stats.ticks == 5
    assert stats.overruns == 1
    assert stats.missed == 1
    assert stats.late_ticks == 0
    assert stats.worst_lateness == pytest.approx(0, abs=1e-9)
    assert stats.worst_duration == pytest.approx(1.5)
    assert stats.mean_lateness == pytest.approx(0, abs=1e-9)


async def test_late_ticks_and_lateness_are_counted() -> None:
    class Starved(Service):
        @timer(1.0, policy="burst")
        async def tick(self) -> None:
            await anyio.sleep(1.25)

    service = Starved()
    await run_for(service, 5.1)
    stats = service.timer_stats["tick"]
    # Ticks due at 1, 2, 3, 4 start at 1, 2.25, 3.5, 4.75: ever later.
    assert stats.ticks == 3
    assert stats.late_ticks == 2
    assert stats.worst_lateness == pytest.approx(0.5)
    assert stats.mean_lateness == pytest.approx(0.25)


# ------------------------------------------------------------------ itertimer


async def test_itertimer_ticks_on_the_grid_and_ends_at_stop() -> None:
    seen: list[float] = []
    ended: list[float] = []

    class Iterating(Service):
        async def on_started(self) -> None:
            self.spawn(self.loop)

        async def loop(self) -> None:
            async with self.in_flight():
                async for lateness in self.itertimer(2.0):
                    assert lateness == pytest.approx(0, abs=1e-9)
                    seen.append(anyio.current_time())
                    await anyio.sleep(0.5)
                ended.append(anyio.current_time())

    async with Iterating() as service:
        t0 = anyio.current_time()
        await anyio.sleep(7)
        await service.stop()
    assert [tick - t0 for tick in seen] == [2, 4, 6]
    assert [end - t0 for end in ended] == [7]


async def test_itertimer_rejects_a_bad_interval() -> None:
    async with Service() as service:
        with pytest.raises(ValueError, match="itertimer interval"):
            async for _ in service.itertimer(0):
                pass


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("interval", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("one", ValueError),
        (10**400, ValueError),
        ([1], TypeError),
        (True, TypeError),
    ],
)
def test_bad_interval_raises_at_decoration(interval: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="@timer interval"):
        timer(interval)  # type: ignore[arg-type]


@pytest.mark.parametrize("interval", [1e-21, 5e-324, 9.99e-7])
def test_an_interval_below_one_microsecond_is_refused_at_decoration(interval: float) -> None:
    # Finer grid points than a clock reading can tell apart would spin the next-tick search.
    with pytest.raises(ValueError, match="@timer interval must be at least 1e-06 seconds"):

        class Tiny(Service):
            @timer(interval)
            async def tick(self) -> None:
                pass


async def test_a_timer_interval_may_be_a_timedelta_or_a_numeric_string() -> None:
    seen: list[float] = []

    class Mixed(Service):
        shutdown_timeout = 0.0

        @timer(datetime.timedelta(milliseconds=1500))
        async def by_timedelta(self) -> None:
            seen.append(1.5)

        @timer("2")
        async def by_string(self) -> None:
            seen.append(2.0)

    await run_for(Mixed(), 4.75)  # off the grid points, so no tick races the stop
    assert sorted(seen) == [1.5, 1.5, 1.5, 2.0, 2.0]


def test_bad_policy_and_on_error_raise_at_decoration() -> None:
    with pytest.raises(ValueError, match="missed-tick policy must be one of"):
        timer(1.0, policy="sometimes")

    async def tick(self: object) -> None:
        pass

    with pytest.raises(ValueError, match="on_error must be one of 'crash', 'log', got 'ignore'"):
        timer(1.0, on_error="ignore")(tick)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^@timer method must be an 'async def' function"):
        timer(1.0)(lambda self: None)


def test_bad_cron_expression_or_timezone_raises_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match="61 \\* \\* \\* \\*"):

        class BadExpression(Service):
            @crontab("61 * * * *")
            async def job(self) -> None:
                pass

    with pytest.raises(ValueError, match="Mars/Olympus_Mons"):

        class BadZone(Service):
            @crontab("0 * * * *", timezone="Mars/Olympus_Mons")
            async def job(self) -> None:
                pass


# ------------------------------------------------------------------ cron


def cron_service(expression: str, timezone: str) -> tuple[Service, list[datetime.datetime]]:
    fired: list[datetime.datetime] = []
    zone = zoneinfo.ZoneInfo(timezone)

    class Cron(Service):
        @crontab(expression, timezone=timezone)
        async def job(self) -> None:
            from anyservice._timers import _wall_clock

            fired.append(datetime.datetime.fromtimestamp(_wall_clock.get()(), zone))

    return Cron(), fired


async def test_crontab_fires_at_wall_times() -> None:
    service, fired = cron_service("*/15 * * * *", "UTC")
    start = datetime.datetime(2026, 6, 1, 12, 7, tzinfo=datetime.UTC)
    with virtual_wall_clock(start):
        await run_for(service, 3600)
    assert [moment.strftime("%H:%M") for moment in fired] == ["12:15", "12:30", "12:45", "13:00"]


async def test_crontab_across_spring_forward_fires_once_after_the_gap() -> None:
    service, fired = cron_service("30 2 * * *", "Europe/Paris")
    # 2027-03-28: clocks in Paris jump from 02:00 to 03:00.
    start = datetime.datetime(2027, 3, 27, 12, 0, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    with virtual_wall_clock(start):
        await run_for(service, 3 * 86400)
    assert [moment.isoformat() for moment in fired] == [
        "2027-03-28T03:00:00+02:00",
        "2027-03-29T02:30:00+02:00",
        "2027-03-30T02:30:00+02:00",
    ]


async def test_crontab_across_fall_back_fires_a_fixed_time_once() -> None:
    service, fired = cron_service("30 2 * * *", "Europe/Paris")
    # 2026-10-25: 02:00-03:00 happens twice in Paris.
    start = datetime.datetime(2026, 10, 24, 12, 0, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    with virtual_wall_clock(start):
        await run_for(service, 2 * 86400)
    assert [moment.isoformat() for moment in fired] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]


async def test_hourly_crontab_keeps_real_hours_across_fall_back() -> None:
    service, fired = cron_service("0 * * * *", "Europe/Paris")
    start = datetime.datetime(2026, 10, 25, 0, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    with virtual_wall_clock(start):
        await run_for(service, 4 * 3600)
    utc = [moment.astimezone(datetime.UTC) for moment in fired]
    assert len(fired) == 4
    assert all(b - a == datetime.timedelta(hours=1) for a, b in itertools.pairwise(utc))
    assert [moment.strftime("%H:%M%z") for moment in fired] == [
        "01:00+0200",
        "02:00+0200",
        "02:00+0100",
        "03:00+0100",
    ]


async def test_crontab_error_can_be_logged_instead_of_crashing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Nightly(Service):
        @crontab("0 0 * * *", on_error="log")
        async def job(self) -> None:
            raise RuntimeError("report failed")

    service = Nightly()
    with virtual_wall_clock(datetime.datetime(2026, 1, 1, 23, 0, tzinfo=datetime.UTC)):
        await run_for(service, 2 * 86400)
    assert service.timer_stats["job"].errors == 2
    assert service.state is ServiceState.STOPPED
