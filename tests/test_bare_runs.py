"""A dependency with no work of its own waits for its stop bare: no task group until needed.

Nothing of such a service (no hooks, tasks, timers, resources or dependencies) runs while
it is RUNNING, so its run only waits for its stop; whatever needs a task group (a task, a
crash, a runtime dependency, a resource) still gets one, and everything observable is as
for any other service.
"""

from __future__ import annotations

import anyio
import pytest

from anyservice import Service, ServiceState, Supervisor

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]


class Idle(Service):
    """No hooks, no tasks: the shape that waits bare."""

    shutdown_timeout = 5.0


def _parent_of(*services: Service) -> Service:
    parent = Service(name="parent")
    for service in services:
        parent.add_dependency(service)
    return parent


@pytest.mark.parametrize("owner", ["parent", "supervisor"])
async def test_an_idle_dependency_holds_no_task_group_and_stops_at_once(owner: str) -> None:
    idle = Idle(name="idle")
    root = _parent_of(idle) if owner == "parent" else Supervisor(idle)
    async with root:
        run = idle._run
        assert run is not None
        assert idle.state is ServiceState.RUNNING
        assert run.task_group is None
        assert set(idle.tracebacks()) == {"idle (main)"}
        assert idle.stop_deadline == anyio.current_time() + idle.shutdown_timeout
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


async def test_idle_dependencies_stop_when_their_parent_stops() -> None:
    idles = [Idle(name=f"idle-{index}") for index in range(10)]
    parent = _parent_of(*idles)
    async with parent:
        assert all(idle.state is ServiceState.RUNNING for idle in idles)
        before = anyio.current_time()
    assert anyio.current_time() == before
    assert all(idle.state is ServiceState.STOPPED for idle in idles)


async def test_a_task_spawned_on_an_idle_dependency_runs_and_stops_with_it() -> None:
    idle = Idle(name="idle")
    events: list[str] = []

    async def extra() -> None:
        events.append("started")
        try:
            await anyio.sleep_forever()
        finally:
            events.append("ended")

    async with _parent_of(idle):
        idle.spawn(extra)
        await anyio.sleep(1)
        assert events == ["started"]
        run = idle._run
        assert run is not None
        assert run.task_group is not None
        assert await idle.stop() is True
        assert events == ["started", "ended"]
        assert idle.state is ServiceState.STOPPED


async def test_crash_from_outside_of_an_idle_dependency_crashes_it() -> None:
    idle = Idle(name="idle")
    # The same exception group as a dependency's crash in a task group of its own.
    with pytest.RaisesGroup(pytest.RaisesGroup(pytest.RaisesExc(ConnectionError, match="lost"))):
        async with _parent_of(idle):
            await anyio.sleep(0.5)
            await idle.crash(ConnectionError("lost"))
            await anyio.sleep(1)
    assert idle.state is ServiceState.CRASHED
    assert isinstance(idle.crash_reason, ConnectionError)


async def test_an_idle_dependency_takes_a_runtime_dependency_and_a_resource() -> None:
    idle = Idle(name="idle")
    released: list[float] = []

    class Resource:
        def __enter__(self) -> str:
            return "held"

        def __exit__(self, *exc_info: object) -> None:
            released.append(anyio.current_time() - t0)

    async with _parent_of(idle):
        t0 = anyio.current_time()
        await anyio.sleep(0.5)
        assert idle.add_context(Resource()) == "held"
        extra = await idle.add_runtime_dependency(Service(name="extra"))
        assert extra.state is ServiceState.RUNNING
        await anyio.sleep(1)
    assert released == [1.5]
    assert extra.state is ServiceState.STOPPED
    assert idle.state is ServiceState.STOPPED


async def test_an_idle_dependency_restarts_and_stops_again() -> None:
    idle = Idle(name="idle")
    async with _parent_of(idle):
        await idle.restart()
        assert idle.state is ServiceState.RUNNING
        assert idle.restart_count == 1
        await idle.restart()
        assert idle.restart_count == 2
    assert idle.state is ServiceState.STOPPED


async def test_a_dependency_that_can_see_an_idle_one_stops_before_it() -> None:
    idle = Idle(name="idle")
    seen: list[ServiceState] = []

    class Watcher(Service):
        async def on_stop(self) -> None:
            seen.append(idle.state)

    watcher = Watcher(name="watcher")
    async with _parent_of(idle, watcher):
        pass
    # Declared after it, so stopped before it: the idle one was still RUNNING.
    assert seen == [ServiceState.RUNNING]
    assert idle.state is ServiceState.STOPPED


async def test_an_idle_dependency_cancelled_from_outside_is_stopped() -> None:
    idle = Idle(name="idle")
    parent = _parent_of(idle)
    with anyio.move_on_after(1):
        async with parent:
            await anyio.sleep_forever()
    assert idle.state is ServiceState.STOPPED
    assert parent.state is ServiceState.STOPPED
