"""The timers of a service's dependencies idle on one wheel: the same ticks, one sleeper."""

from __future__ import annotations

import anyio
import pytest

from anyservice import Backoff, Service, ServiceState, Supervisor, timer
from anyservice._core._wheel import Wheel

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]


class Ticker(Service):
    """One timer, nothing else: the shape whose timer idles on its owner's wheel."""

    shutdown_timeout = 5.0

    def __init__(self, name: str, ticks: list[tuple[str, float]]) -> None:
        super().__init__(name=name)
        self.ticks = ticks

    @timer(1.0)
    async def tick(self) -> None:
        self.ticks.append((self.name, anyio.current_time()))


def wheel_tasks() -> list[str]:
    return [str(t.name) for t in anyio.get_running_tasks() if "(timer wheel)" in str(t.name)]


async def test_the_timers_of_many_dependencies_tick_on_their_grids_from_one_wheel() -> None:
    log: list[tuple[str, float]] = []
    parent = Service(name="parent")
    for index in range(20):
        parent.add_dependency(Ticker(f"t{index}", log))
    async with parent:
        t0 = anyio.current_time()
        await anyio.sleep(3.5)
        assert wheel_tasks() == ["parent (timer wheel)"]
    assert wheel_tasks() == []
    assert all(s.state is ServiceState.STOPPED for s in parent.dependencies)
    for index in range(20):
        assert [at - t0 for name, at in log if name == f"t{index}"] == [1, 2, 3]


async def test_a_dependency_idle_on_the_wheel_stops_at_once_and_the_others_tick_on() -> None:
    log: list[tuple[str, float]] = []
    first, second = Ticker("first", log), Ticker("second", log)
    parent = Service(name="parent")
    parent.add_dependency(first)
    parent.add_dependency(second)
    async with parent:
        t0 = anyio.current_time()
        await anyio.sleep(2.5)
        before = anyio.current_time()
        assert await first.stop() is True
        assert anyio.current_time() == before
        await anyio.sleep(2)
    assert [at - t0 for name, at in log if name == "first"] == [1, 2]
    assert [at - t0 for name, at in log if name == "second"] == [1, 2, 3, 4]


async def test_a_restarted_dependency_ticks_on_a_fresh_grid() -> None:
    log: list[tuple[str, float]] = []
    ticker = Ticker("ticker", log)
    parent = Service(name="parent")
    parent.add_dependency(ticker)
    async with parent:
        t0 = anyio.current_time()
        await anyio.sleep(1.5)
        await ticker.restart()
        await anyio.sleep(2.25)
    assert [at - t0 for _, at in log] == [1, 2.5, 3.5]
    assert ticker.timer_stats["tick"].ticks == 2


async def test_a_body_that_raises_under_a_supervisor_restarts_only_its_own_service() -> None:
    log: list[tuple[str, float]] = []

    class Flaky(Ticker):
        @timer(1.0)
        async def tick(self) -> None:
            log.append((self.name, anyio.current_time()))
            if anyio.current_time() - t0 < 1.5:
                raise RuntimeError("flaky tick")

    steady, flaky = Ticker("steady", log), Flaky("flaky", log)
    supervisor = Supervisor(steady, flaky, backoff=Backoff(initial=0))
    t0 = anyio.current_time()
    async with supervisor:
        await anyio.sleep(3.5)
        assert (steady.restart_count, flaky.restart_count) == (0, 1)
    assert [at - t0 for name, at in log if name == "steady"] == [1, 2, 3]
    # Restarted at 1: its grid starts again from there.
    assert [at - t0 for name, at in log if name == "flaky"] == [1, 2, 3]


async def test_the_wheel_wakes_entries_in_due_order_and_drops_those_woken_early() -> None:
    wheel = Wheel()
    woken: list[float] = []
    events = [anyio.Event() for _ in range(200)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(wheel.run)
        t0 = anyio.current_time()
        for index, event in enumerate(events):
            wheel.wake_at(t0 + 1000 + index, event)
        # A service's stop sets its event early; most of the heap is then stale.
        for event in events[:150]:
            event.set()
            wheel.woken_early()
        assert len(wheel._heap) < 100

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            woken.append(anyio.current_time() - t0)

        soon = [anyio.Event() for _ in range(3)]
        for delay, event in zip((3.0, 1.0, 2.0), soon, strict=True):
            wheel.wake_at(t0 + delay, event)
            tg.start_soon(wait, event)
        await anyio.sleep(5)
        assert woken == [1.0, 2.0, 3.0]
        wheel.close()
    assert wheel.closed
    assert not any(event.is_set() for event in events[150:])


# A dependency whose only work is its timer waits for its first tick with no task group of
# its own; whatever needs one (a task, a crash, a dependency, a resource) still gets it
# (tests/test_bare_runs.py, for it and for a dependency with no work at all).


async def test_an_idle_timer_dependency_holds_no_task_group_until_it_needs_one() -> None:
    ticker = Ticker("ticker", [])
    parent = Service(name="parent")
    parent.add_dependency(ticker)
    async with parent:
        await anyio.sleep(0.5)
        run = ticker._run
        assert run is not None
        assert run.task_group is None
        assert set(ticker.tracebacks()) == {"ticker (main)", "ticker.tick"}
        await anyio.sleep(1)
        # Ticked: from its first tick on it runs as any service, in a task group.
        assert run.task_group is not None
