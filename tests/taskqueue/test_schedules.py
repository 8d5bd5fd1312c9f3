"""Scheduled tasks in-process: workers store each tick once, overlap and missed ticks.

On virtual time, through a memory broker on the backend's clock: a minute of ticks costs
nothing, and a run starts exactly at its tick (the grid is epoch-anchored, so the ticks are
multiples of the interval on that clock).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import anyio
import pytest

from anyservice._schedule import CronSchedule
from anyservice.taskqueue import MemoryBroker, TaskQueue, TaskWorker, current_run
from anyservice.taskqueue._ticks import CronGrid, IntervalGrid, MissedTicks

pytestmark = [pytest.mark.anyio]


@pytest.fixture
async def queue() -> AsyncIterator[TaskQueue]:
    async with TaskQueue(broker=MemoryBroker(clock=anyio.current_time)) as queue:
        yield queue


async def sleep_until(moment: float) -> None:
    await anyio.sleep(moment - anyio.current_time())


def next_multiple(interval: float, after: float | None = None) -> float:
    return IntervalGrid(interval).next_after(anyio.current_time() if after is None else after)


@pytest.mark.virtual_time
async def test_two_workers_run_each_tick_once_at_its_due_time(queue: TaskQueue) -> None:
    started: list[float] = []

    @queue.task(schedule=10)
    async def beat() -> None:
        started.append(anyio.current_time())

    first = next_multiple(10)
    async with TaskWorker(beat), TaskWorker(beat):
        await sleep_until(first + 55)
    assert started == [first + 10 * k for k in range(6)]
    assert await queue.schedule_counts("beat") == {
        "runs": 6,
        "skipped": 0,
        "latest": first + 50,
    }
    counts = queue.schedules["beat"].counts
    assert counts["stored"] == 6
    assert counts["taken"] == 6


@pytest.mark.virtual_time
async def test_schedule_passes_its_arguments_and_keeps_its_own_name(queue: TaskQueue) -> None:
    said: list[str] = []

    @queue.task
    async def say(message: str, *, loud: bool = False) -> None:
        said.append(message.upper() if loud else message)

    queue.schedule(say, 30, args=("hi",), kwargs={"loud": True}, name="greeting")
    queue.schedule(say, dt.timedelta(seconds=30), args=["ho"])
    first = next_multiple(30)
    async with TaskWorker(say):
        await sleep_until(first + 1)
    assert sorted(said) == ["HI", "ho"]
    assert sorted(queue.schedules) == ["greeting", "say"]


@pytest.mark.virtual_time
async def test_without_overlap_ticks_during_a_long_run_are_skipped_and_counted(
    queue: TaskQueue,
) -> None:
    started: list[float] = []

    @queue.task(schedule=10)
    async def slow() -> None:
        started.append(anyio.current_time())
        await anyio.sleep(25)

    first = next_multiple(10)
    async with TaskWorker(slow):
        await sleep_until(first + 41)
    # Runs last 25 s: the ticks at +10 and +20, then +40, come while one is running.
    assert started == [first, first + 30]
    counts = await queue.schedule_counts("slow")
    assert counts == {"runs": 2, "skipped": 3, "latest": first + 40}
    assert queue.schedules["slow"].counts["skipped"] == 3


@pytest.mark.virtual_time
async def test_with_overlap_every_tick_runs_even_while_the_last_one_does(queue: TaskQueue) -> None:
    started: list[float] = []

    @queue.task(schedule=10, overlap=True)
    async def slow() -> None:
        started.append(anyio.current_time())
        await anyio.sleep(25)

    first = next_multiple(10)
    async with TaskWorker(slow):
        await sleep_until(first + 31)
    assert started == [first, first + 10, first + 20, first + 30]


@pytest.mark.virtual_time
@pytest.mark.parametrize(
    ("missed", "expected"),
    [
        # Down from +25 to +75: the ticks +30 .. +70 were missed.
        ("skip", [0, 10, 20, 80, 90]),
        ("latest", [0, 10, 20, 70, 80, 90]),
        ("all", [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
    ],
)
async def test_after_every_worker_was_down_the_missed_policy_decides(
    queue: TaskQueue, missed: str, expected: list[float]
) -> None:
    ran: list[tuple[float, float]] = []

    @queue.task
    async def beat() -> None:
        # Which tick this run stands for, and when it started.
        context = current_run()
        assert context is not None
        record = await queue.broker.get(context.run_id)
        assert record is not None
        ran.append((record.scheduled_at - first, anyio.current_time() - first))

    queue.schedule(beat, 10, missed=missed)
    first = next_multiple(10)
    async with TaskWorker(beat):
        await sleep_until(first + 25)
    await sleep_until(first + 75)
    async with TaskWorker(beat):
        await sleep_until(first + 95)
    assert sorted(tick for tick, _ in ran) == expected
    # A missed tick runs at the restart; the others on time.
    assert all(at == (75 if 20 < tick < 80 else tick) for tick, at in ran)


@pytest.mark.virtual_time
async def test_a_cron_schedule_runs_on_its_wall_times(queue: TaskQueue) -> None:
    started: list[float] = []

    @queue.task(schedule=CronSchedule("* * * * * */15"))  # every 15 s (seconds field last)
    async def quarter() -> None:
        started.append(anyio.current_time())

    assert isinstance(queue.schedules["quarter"].grid, CronGrid)
    first = CronGrid(CronSchedule("* * * * * */15")).next_after(anyio.current_time())
    async with TaskWorker(quarter):
        await sleep_until(first + 46)
    assert started == [first + 15 * k for k in range(4)]


@pytest.mark.virtual_time
async def test_a_worker_not_serving_the_task_stores_no_ticks(queue: TaskQueue) -> None:
    @queue.task(schedule=10)
    async def beat() -> None:
        pass

    @queue.task
    async def other() -> None:
        pass

    async with TaskWorker(other):
        await anyio.sleep(60)
    assert (await queue.schedule_counts("beat"))["runs"] == 0


def test_schedule_options_are_checked_at_the_call() -> None:
    queue = TaskQueue("memory://")
    other = TaskQueue("memory://")

    @queue.task
    async def say(message: str) -> None:
        pass

    @other.task
    async def elsewhere() -> None:
        pass

    with pytest.raises(TypeError, match="say"):
        queue.schedule(say, 10)  # no argument for `message`
    with pytest.raises(TypeError, match="not JSON"):
        queue.schedule(say, 10, args=(object(),))
    with pytest.raises(ValueError, match="belongs to another queue"):
        queue.schedule(elsewhere, 10)
    with pytest.raises(TypeError, match=r"needs a task made by @queue\.task"):
        queue.schedule(print, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missed must be 'skip', 'latest' or 'all', got 'some'"):
        queue.schedule(say, 10, args=("x",), missed="some")
    with pytest.raises(ValueError, match="catch_up must be >= 1, got 0"):
        queue.schedule(say, 10, args=("x",), catch_up=0)
    with pytest.raises(TypeError, match="overlap must be a bool, got 'no'"):
        queue.schedule(say, 10, args=("x",), overlap="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid cron expression"):
        queue.schedule(say, "soon", args=("x",))
    queue.schedule(say, 10, args=("x",))
    with pytest.raises(ValueError, match="schedule name 'say' is already taken"):
        queue.schedule(say, 20, args=("y",))
    with pytest.raises(
        ValueError, match="schedule interval must be a finite number of seconds > 0, got -5"
    ):

        @queue.task(schedule=-5)
        async def never() -> None:
            pass

    assert queue.schedules["say"].missed is MissedTicks.SKIP
    assert "every 10s" in repr(queue.schedules["say"])
