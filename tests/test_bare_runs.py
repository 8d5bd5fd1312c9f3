"""Dependencies that wait bare: no task group of their own until something needs one.

A dependency whose only work is one ``@timer`` waits so for its first tick (the "timer"
shape); one with no work at all (no hooks, tasks, timers, resources or dependencies: the
"idle" shape) waits so for its stop. Nothing of either runs meanwhile; whatever needs a
task group (a task, a crash, a runtime dependency, a resource) still gets one, and
everything observable is as for any other service.
"""

from __future__ import annotations

import anyio
import pytest

from anyservice import Service, ServiceState, Supervisor, timer

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

shapes = pytest.mark.parametrize("shape", ["timer", "idle"])


class Ticker(Service):
    """One timer, nothing else: the shape whose timer idles on its owner's wheel."""

    shutdown_timeout = 5.0

    def __init__(self, name: str, ticks: list[float]) -> None:
        super().__init__(name=name)
        self.ticks = ticks

    @timer(1.0)
    async def tick(self) -> None:
        self.ticks.append(anyio.current_time())


class Idle(Service):
    """No hooks, no tasks: the shape that waits bare for its stop."""

    shutdown_timeout = 5.0


def bare(shape: str, ticks: list[float]) -> Service:
    """A service of ``shape`` named after it; a timer's ticks go to ``ticks``."""
    return Ticker(shape, ticks) if shape == "timer" else Idle(name=shape)


def parent_of(*services: Service) -> Service:
    parent = Service(name="parent")
    for service in services:
        parent.add_dependency(service)
    return parent


@pytest.mark.parametrize("owner", ["parent", "supervisor"])
async def test_an_idle_dependency_holds_no_task_group_and_stops_at_once(owner: str) -> None:
    idle = Idle(name="idle")
    root = parent_of(idle) if owner == "parent" else Supervisor(idle)
    async with root:
        run = idle._run
        assert run is not None
        assert idle.state is ServiceState.RUNNING
        assert run.task_group is None
        assert set(idle.tracebacks()) == {"idle (main)"}
        before = anyio.current_time()
        assert await idle.stop() is True
        assert anyio.current_time() == before
        assert idle.state is ServiceState.STOPPED
    assert root.state is ServiceState.STOPPED


async def test_a_root_service_with_no_work_runs_in_its_task_group_as_before() -> None:
    idle = Idle(name="idle")
    async with idle:
        run = idle._run
        assert run is not None
        assert run.task_group is not None
    assert idle.state is ServiceState.STOPPED


async def test_idle_dependencies_stop_at_once_when_their_parent_stops() -> None:
    idles = [Idle(name=f"idle-{index}") for index in range(10)]
    async with parent_of(*idles):
        assert all(idle.state is ServiceState.RUNNING for idle in idles)
        before = anyio.current_time()
    assert anyio.current_time() == before
    assert all(idle.state is ServiceState.STOPPED for idle in idles)


@shapes
async def test_a_task_spawned_on_a_bare_dependency_runs_and_stops_with_it(shape: str) -> None:
    ticks: list[float] = []
    service = bare(shape, ticks)
    events: list[str] = []

    async def extra() -> None:
        events.append("started")
        try:
            await anyio.sleep_forever()
        finally:
            events.append("ended")

    async with parent_of(service):
        t0 = anyio.current_time()
        await anyio.sleep(0.5)
        service.spawn(extra)
        await anyio.sleep(2)
        assert events == ["started"]
        run = service._run
        assert run is not None
        assert run.task_group is not None
        assert await service.stop() is True
        assert events == ["started", "ended"]
        assert service.state is ServiceState.STOPPED
    # A timer kept its grid from the start, not from the spawn.
    assert [at - t0 for at in ticks] == ([1, 2] if shape == "timer" else [])


@shapes
async def test_crash_from_outside_of_a_bare_dependency_crashes_it(shape: str) -> None:
    service = bare(shape, [])
    # The same exception group as a dependency's crash in a task group of its own.
    with pytest.RaisesGroup(pytest.RaisesGroup(pytest.RaisesExc(ConnectionError, match="lost"))):
        async with parent_of(service):
            await anyio.sleep(0.5)
            await service.crash(ConnectionError("lost"))
            await anyio.sleep(1)
    assert service.state is ServiceState.CRASHED
    assert isinstance(service.crash_reason, ConnectionError)


@shapes
async def test_a_bare_dependency_takes_a_runtime_dependency_and_a_resource(shape: str) -> None:
    ticks: list[float] = []
    service = bare(shape, ticks)
    released: list[float] = []

    class Resource:
        def __enter__(self) -> str:
            return "held"

        def __exit__(self, *exc_info: object) -> None:
            released.append(anyio.current_time() - t0)

    async with parent_of(service):
        t0 = anyio.current_time()
        await anyio.sleep(0.5)
        assert service.add_context(Resource()) == "held"
        extra = await service.add_runtime_dependency(Service(name="extra"))
        assert extra.state is ServiceState.RUNNING
        await anyio.sleep(1)
    assert released == [1.5]
    assert extra.state is ServiceState.STOPPED
    assert service.state is ServiceState.STOPPED
    assert [at - t0 for at in ticks] == ([1] if shape == "timer" else [])


@shapes
async def test_a_stop_of_a_bare_dependency_with_a_grace_period_ends_it_at_once(
    shape: str,
) -> None:
    service = bare(shape, [])
    async with parent_of(service):
        await anyio.sleep(0.5)
        assert service.stop_deadline == anyio.current_time() + service.shutdown_timeout
        before = anyio.current_time()
        assert await service.stop() is True
        assert anyio.current_time() == before
        if shape == "timer":
            assert service.timer_stats["tick"].ticks == 0


@shapes
async def test_a_bare_dependency_restarts_and_stops_again(shape: str) -> None:
    service = bare(shape, [])
    async with parent_of(service):
        await service.restart()
        assert service.state is ServiceState.RUNNING
        assert service.restart_count == 1
        await service.restart()
        assert service.restart_count == 2
    assert service.state is ServiceState.STOPPED


async def test_a_dependency_that_can_see_an_idle_one_stops_before_it() -> None:
    idle = Idle(name="idle")
    seen: list[ServiceState] = []

    class Watcher(Service):
        async def on_stop(self) -> None:
            seen.append(idle.state)

    async with parent_of(idle, Watcher(name="watcher")):
        pass
    # Declared after it, so stopped before it: the idle one was still RUNNING.
    assert seen == [ServiceState.RUNNING]
    assert idle.state is ServiceState.STOPPED


@shapes
async def test_a_bare_dependency_cancelled_from_outside_is_stopped(shape: str) -> None:
    service = bare(shape, [])
    parent = parent_of(service)
    with anyio.move_on_after(0.5):
        async with parent:
            await anyio.sleep_forever()
    assert service.state is ServiceState.STOPPED
    assert parent.state is ServiceState.STOPPED


async def test_what_one_service_adds_is_its_own_and_not_another_s() -> None:
    # Services that hold nothing yet share their empty containers until they add to them.
    first, second = Service(name="first"), Service(name="second")
    first.add_dependency(Idle(name="dependency"))
    async with first, second:
        assert [service.name for service in first.dependencies] == ["dependency"]
        assert second.dependencies == ()
        second.spawn(anyio.sleep_forever, name="extra")
        await anyio.sleep(1)
        assert set(second.tracebacks()) == {"second (main)", "second.extra"}
        assert set(first.tracebacks()) == {"first (main)", "dependency (main)"}
        first_run, second_run = first._run, second._run
        assert first_run is not None
        assert second_run is not None
        assert [service.name for service in first_run.started_dependencies] == ["dependency"]
        assert second_run.started_dependencies == []
