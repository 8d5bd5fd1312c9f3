"""The Service core: lifecycle, stop semantics, dependencies, resources, diagnostics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import anyio.lowlevel
import pytest

from anyservice import (
    Diag,
    Service,
    ServiceError,
    ServiceState,
    requirements,
    task,
    transitions_to,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]


class Recorder(Service):
    """Records its hooks in a shared list, to check the order of start and stop."""

    def __init__(self, log: list[str], name: str | None = None, **kwargs: float) -> None:
        super().__init__(name=name, **kwargs)
        self.events = log

    async def on_first_start(self) -> None:
        self.events.append(f"{self.name}.on_first_start")

    async def on_start(self) -> None:
        self.events.append(f"{self.name}.on_start")

    async def on_started(self) -> None:
        self.events.append(f"{self.name}.on_started")

    async def on_stop(self) -> None:
        self.events.append(f"{self.name}.on_stop")

    async def on_shutdown(self) -> None:
        self.events.append(f"{self.name}.on_shutdown")


class Counted:
    """A resource that counts how often it is entered and released."""

    def __init__(self, log: list[str] | None = None, name: str = "resource") -> None:
        self.entered = 0
        self.released = 0
        self.log = log
        self.name = name

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Counted]:
        self.entered += 1
        if self.log is not None:
            self.log.append(f"{self.name}.enter")
        try:
            yield self
        finally:
            self.released += 1
            if self.log is not None:
                self.log.append(f"{self.name}.release")


# ------------------------------------------------------------------ starting and stopping


async def test_async_with_returns_once_running_and_stops_on_exit() -> None:
    events: list[str] = []
    service = Recorder(events)
    async with service as entered:
        assert entered is service
        assert service.state is ServiceState.RUNNING
        assert events[-1] == "Recorder.on_started"
    assert service.state is ServiceState.STOPPED
    assert events[-2:] == ["Recorder.on_stop", "Recorder.on_shutdown"]


async def test_run_under_task_group_start_returns_once_running() -> None:
    service = Service()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        assert service.state is ServiceState.RUNNING
        assert await service.stop() is True
        assert service.state is ServiceState.STOPPED


async def test_run_blocks_until_stopped() -> None:
    service = Service()
    returned_at: list[float] = []

    async def run_it() -> None:
        await service.run()
        returned_at.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_it)
        await service.wait_for(ServiceState.RUNNING)
        await anyio.sleep(7)
        assert returned_at == []
        await service.stop()
    assert returned_at == [7]


async def test_order_of_start_and_stop_mirrors() -> None:
    events: list[str] = []
    first, second = Recorder(events, "first"), Recorder(events, "second")
    parent = Recorder(events, "parent")
    parent.add_dependency(first)
    parent.add_dependency(second)
    resource = Counted(events, "parent.resource")
    await parent.add_async_context(resource)

    class Worker(Recorder):
        @task
        async def work(self) -> None:
            self.events.append(f"{self.name}.task")
            try:
                await anyio.sleep_forever()
            finally:
                self.events.append(f"{self.name}.task_stopped")

    events.clear()
    worker = Worker(events, "worker")
    worker.add_dependency(parent)
    async with worker:
        await anyio.lowlevel.checkpoint()
    assert events == [
        "first.on_first_start",
        "first.on_start",
        "first.on_started",
        "second.on_first_start",
        "second.on_start",
        "second.on_started",
        "parent.on_first_start",
        "parent.on_start",
        "parent.resource.enter",
        "parent.on_started",
        "worker.on_first_start",
        "worker.on_start",
        "worker.on_started",
        "worker.task",
        "worker.on_stop",
        "worker.task_stopped",
        "worker.on_shutdown",
        "parent.on_stop",
        "parent.resource.release",
        "parent.on_shutdown",
        "second.on_stop",
        "second.on_shutdown",
        "first.on_stop",
        "first.on_shutdown",
    ]


async def test_idle_service_stops_at_once_whatever_its_shutdown_timeout() -> None:
    class Idle(Service):
        shutdown_timeout = 3600.0

        @task
        async def consume(self) -> None:
            await anyio.sleep_forever()

    async with Idle() as service:
        await anyio.sleep(1)
        before = anyio.current_time()
        assert await service.stop() is True
        assert anyio.current_time() == before


async def test_shutdown_timeout_is_a_constructor_argument_too() -> None:
    assert Service().shutdown_timeout == 30.0
    assert Service(shutdown_timeout=2.5).shutdown_timeout == 2.5

    class Quick(Service):
        shutdown_timeout = 1.0

    assert Quick().shutdown_timeout == 1.0


# ------------------------------------------------------------------ work in flight and grace


async def test_work_in_flight_finishes_within_grace_then_task_ends() -> None:
    handled: list[float] = []

    class Consumer(Service):
        shutdown_timeout = 10.0

        @task
        async def consume(self) -> None:
            while True:
                async with self.in_flight():
                    await anyio.sleep(4)
                    handled.append(anyio.current_time())
                await anyio.sleep(100)

    async with Consumer() as service:
        await anyio.sleep(1)
        assert await service.stop() is True
        assert anyio.current_time() == 4
    assert handled == [4]


async def test_work_in_flight_is_cancelled_at_the_grace_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Slow(Service):
        shutdown_timeout = 2.0

        @task
        async def consume(self) -> None:
            async with self.in_flight():
                await anyio.sleep(100)

    async with Slow() as service:
        await anyio.sleep(1)
        with caplog.at_level(logging.WARNING, logger="anyservice"):
            assert await service.stop() is True
        assert anyio.current_time() == 3
    assert "did not stop within shutdown_timeout=2.0s" in caplog.text
    assert "in flight: consume" in caplog.text


async def test_sleep_ends_at_a_stop_and_should_stop_says_so() -> None:
    woke: list[float] = []

    class Seed(Service):
        @task
        async def loop(self) -> None:
            async with self.in_flight():
                while not self.should_stop:
                    await self.sleep(30)
                woke.append(anyio.current_time())

    async with Seed() as service:
        await anyio.sleep(45)
        assert not service.should_stop
        await service.stop()
    assert woke == [45]


# ------------------------------------------------------------------ stop from anywhere


async def test_stop_from_inside_task_does_not_deadlock() -> None:
    class SelfStopping(Service):
        @task
        async def work(self) -> None:
            async with self.in_flight():
                await anyio.sleep(1)
                await self.stop()
                pytest.fail("stop() from inside must unwind the caller")

    service = SelfStopping()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        with anyio.fail_after(5):
            await service.wait_for(ServiceState.STOPPED)
    assert anyio.current_time() == 1


@pytest.mark.parametrize("hook", ["on_start", "on_started", "on_stop", "on_shutdown"])
async def test_stop_from_inside_a_hook_does_not_deadlock(hook: str) -> None:
    class Stopper(Service):
        pass

    service = Stopper()

    async def stop_self() -> None:
        await service.stop()

    setattr(service, hook, stop_self)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        with anyio.fail_after(5):
            await service.stop()
    assert service.state is ServiceState.STOPPED


async def test_stop_before_start_is_never_lost() -> None:
    events: list[str] = []
    service = Recorder(events)
    assert await service.stop() is True
    assert service.state is ServiceState.STOPPED
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
    assert service.state is ServiceState.STOPPED
    assert events == []


async def test_stop_concurrent_with_start_cuts_the_start_short() -> None:
    events: list[str] = []

    class SlowStart(Recorder):
        async def on_start(self) -> None:
            await super().on_start()
            await anyio.sleep(10)
            self.events.append("never")

    dependency = Recorder(events, "dependency")
    service = SlowStart(events, "slow")
    service.add_dependency(dependency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.run)
        await service.wait_for(ServiceState.STARTING)
        await anyio.sleep(1)
        assert await service.stop() is True
    assert service.state is ServiceState.STOPPED
    assert dependency.state is ServiceState.STOPPED
    assert "never" not in events
    assert "slow.on_stop" not in events
    assert events[-2:] == ["dependency.on_stop", "dependency.on_shutdown"]
    assert anyio.current_time() == 1


async def test_stop_requested_before_run_task_begins_under_task_group_start() -> None:
    service = Service()
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.run)
        await service.stop()
    assert service.state is ServiceState.STOPPED


async def test_two_concurrent_stops_both_return() -> None:
    class Lingering(Service):
        shutdown_timeout = 5.0

        @task
        async def work(self) -> None:
            async with self.in_flight():
                await anyio.sleep(2)

    results: list[bool] = []
    async with Lingering() as service:

        async def stop() -> None:
            results.append(await service.stop())

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            tg.start_soon(stop)
    assert results == [True, True]
    assert anyio.current_time() == 2


async def test_non_blocking_stop_returns_at_once() -> None:
    class Lingering(Service):
        @task
        async def work(self) -> None:
            async with self.in_flight():
                await anyio.sleep(2)

    async with Lingering() as service:
        assert await service.stop(block=False) is False
        assert service.state is ServiceState.STOPPING
        await service.wait_for(ServiceState.STOPPED)


async def test_task_swallowing_cancellation_is_reported_not_waited_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Stubborn(Service):
        shutdown_timeout = 1.0

        @task
        async def swallow_cancellation(self) -> None:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(50)
                raise

    service = Stubborn()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        with caplog.at_level(logging.ERROR, logger="anyservice"):
            assert await service.stop(timeout=5) is False
        assert anyio.current_time() == 5
        assert "still not stopped after 5.0s" in caplog.text
        assert "swallow_cancellation" in caplog.text
    assert service.state is ServiceState.STOPPED


async def test_stop_rejects_a_bad_timeout() -> None:
    with pytest.raises(ValueError, match="stop\\(timeout=\\) must be >= 0"):
        await Service().stop(timeout=-1)


# ------------------------------------------------------------------ crashes


async def test_error_in_a_task_leaves_the_block_and_crashes_the_service() -> None:
    class Failing(Service):
        @task
        async def work(self) -> None:
            await anyio.sleep(3)
            raise ValueError("broken pipe")

    service = Failing()
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="broken pipe")):
        async with service:
            await anyio.sleep_forever()
    assert service.state is ServiceState.CRASHED
    assert isinstance(service.crash_reason, ValueError)
    assert "raised in 'work' of service 'Failing'" in "".join(service.crash_reason.__notes__)


async def test_crash_cancels_sleeping_tasks_at_once() -> None:
    cancelled_at: list[float] = []

    class Crashy(Service):
        shutdown_timeout = 100.0

        @task
        async def sleeper(self) -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled_at.append(anyio.current_time())

        @task
        async def failer(self) -> None:
            await anyio.sleep(2)
            raise RuntimeError("boom")

    with pytest.RaisesGroup(RuntimeError):
        async with Crashy():
            await anyio.sleep_forever()
    assert cancelled_at == [2]


async def test_error_in_body_of_async_with_leaves_unwrapped_and_service_stops() -> None:
    service = Service()
    with pytest.raises(KeyError):
        async with service:
            raise KeyError("from the body")
    assert service.state is ServiceState.STOPPED


async def test_error_in_on_start_leaves_nothing_running() -> None:
    events: list[str] = []
    resource = Counted()
    started_tasks: list[str] = []

    class BadStart(Recorder):
        async def on_start(self) -> None:
            raise OSError("no database")

        @task
        async def work(self) -> None:
            started_tasks.append("work")

    dependency = Recorder(events, "dependency")
    service = BadStart(events, "bad")
    service.add_dependency(dependency)
    await service.add_async_context(resource)
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="no database")):
        async with service:
            pytest.fail("must not get here")
    assert service.state is ServiceState.CRASHED
    assert dependency.state is ServiceState.STOPPED
    assert events[-2:] == ["dependency.on_stop", "dependency.on_shutdown"]
    assert (resource.entered, resource.released) == (0, 0)
    assert started_tasks == []
    assert "raised in on_start() of service 'bad'" in "".join(
        service.crash_reason.__notes__  # type: ignore[union-attr]
    )


async def test_on_stop_raising_crashes_but_still_releases_and_stops_dependencies() -> None:
    events: list[str] = []
    resource = Counted()

    class BadStop(Recorder):
        async def on_stop(self) -> None:
            raise RuntimeError("cannot flush")

    dependency = Recorder(events, "dependency")
    service = BadStop(events, "bad")
    service.add_dependency(dependency)
    await service.add_async_context(resource)
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="cannot flush")):
        async with service:
            pass
    assert service.state is ServiceState.CRASHED
    assert (resource.entered, resource.released) == (1, 1)
    assert dependency.state is ServiceState.STOPPED


async def test_crash_on_purpose() -> None:
    class Quitter(Service):
        @task
        async def work(self) -> None:
            await anyio.sleep(1)
            await self.crash(ConnectionError("lost"))
            pytest.fail("crash() must unwind the caller")

    service = Quitter()
    with pytest.RaisesGroup(ConnectionError):
        async with service:
            await anyio.sleep_forever()
    assert service.state is ServiceState.CRASHED
    assert isinstance(service.crash_reason, ConnectionError)


async def test_crash_from_outside() -> None:
    service = Service()
    with pytest.RaisesGroup(ValueError):
        async with service:
            await service.crash(ValueError("told to"))
            await anyio.sleep_forever()
    assert service.state is ServiceState.CRASHED


async def test_dependency_crash_crashes_the_dependent() -> None:
    class Flaky(Service):
        @task
        async def work(self) -> None:
            await anyio.sleep(1)
            raise TimeoutError("upstream")

    dependency = Flaky()
    parent = Service(name="parent")
    parent.add_dependency(dependency)
    with pytest.RaisesGroup(pytest.RaisesGroup(TimeoutError)):
        async with parent:
            await anyio.sleep_forever()
    assert dependency.state is ServiceState.CRASHED
    assert parent.state is ServiceState.CRASHED
    assert isinstance(parent.crash_reason, TimeoutError)


async def test_crash_is_logged_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(Service):
        @task
        async def work(self) -> None:
            raise TimeoutError("upstream")

    parent = Service(name="parent")
    parent.add_dependency(Flaky())
    with (
        caplog.at_level(logging.ERROR, logger="anyservice"),
        pytest.RaisesGroup(pytest.RaisesGroup(TimeoutError)),
    ):
        async with parent:
            await anyio.sleep_forever()
    with_traceback = [record for record in caplog.records if record.exc_info]
    assert len(with_traceback) == 1
    assert with_traceback[0].name == "anyservice"
    assert with_traceback[0].service == "Flaky"  # type: ignore[attr-defined]
    assert any(
        "[parent] crashed" in record.getMessage() and "logged above" in record.getMessage()
        for record in caplog.records
    )


# ------------------------------------------------------------------ tasks


async def test_task_workers_run_n_copies() -> None:
    seen: list[str] = []

    class Pool(Service):
        @task(workers=3)
        async def work(self) -> None:
            seen.append("worker")
            await anyio.sleep_forever()

    async with Pool():
        await anyio.sleep(0.1)
    assert seen == ["worker"] * 3


async def test_periodic_task_sleeps_between_runs() -> None:
    ran_at: list[float] = []

    class Periodic(Service):
        @task(periodic=True, sleep_interval=10)
        async def check(self) -> None:
            ran_at.append(anyio.current_time())
            await anyio.sleep(1)

    async with Periodic():
        await anyio.sleep(25)
    assert ran_at == [0, 11, 22]


async def test_task_returning_ends_quietly_and_service_keeps_running() -> None:
    class OneShot(Service):
        @task
        async def once(self) -> None:
            await anyio.sleep(1)

    async with OneShot() as service:
        await anyio.sleep(5)
        assert service.state is ServiceState.RUNNING


async def test_subclass_inherits_and_can_drop_tasks() -> None:
    ran: list[str] = []

    class Base(Service):
        @task
        async def a(self) -> None:
            ran.append("a")

        @task
        async def b(self) -> None:
            ran.append("b")

    class Child(Base):
        async def b(self) -> None:  # no decorator: no longer a task
            ran.append("child b")

    async with Child():
        await anyio.sleep(0.1)
    assert ran == ["a"]


async def test_add_future_and_spawn_run_in_the_scope_and_stop_with_it() -> None:
    finished: list[str] = []

    async def forever(label: str) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            finished.append(label)

    async with Service() as service:
        service.add_future(forever("future"))
        service.spawn(lambda: forever("spawned"))
        await anyio.sleep(1)
        assert finished == []
    assert sorted(finished) == ["future", "spawned"]


async def test_spawn_on_a_stopped_service_is_an_error() -> None:
    service = Service()

    async def nothing() -> None:
        pass

    with pytest.raises(ServiceError, match="only add tasks while STARTING or RUNNING"):
        service.spawn(nothing)


async def test_from_awaitable_stops_when_the_awaitable_completes() -> None:
    async def job() -> None:
        await anyio.sleep(3)

    service = Service.from_awaitable(job)
    assert service.name == "test_from_awaitable_stops_when_the_awaitable_completes.<locals>.job"
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
    assert service.state is ServiceState.STOPPED
    assert anyio.current_time() == 3


# ------------------------------------------------------------------ dependencies


async def test_add_runtime_dependency_starts_it_at_once() -> None:
    events: list[str] = []
    parent = Recorder(events, "parent")
    async with parent:
        late = Recorder(events, "late")
        assert await parent.add_runtime_dependency(late) is late
        assert late.state is ServiceState.RUNNING
    assert late.state is ServiceState.STOPPED
    assert events.index("parent.on_shutdown") < events.index("late.on_stop")


async def test_remove_dependency_stops_it() -> None:
    parent = Service(name="parent")
    dependency = parent.add_dependency(Service(name="dependency"))
    async with parent:
        await parent.remove_dependency(dependency)
        assert dependency.state is ServiceState.STOPPED
        assert parent.dependencies == ()
        assert parent.state is ServiceState.RUNNING


async def test_requirements_declare_dependencies() -> None:
    class Database(Service):
        pass

    class App(Service):
        def __init__(self) -> None:
            super().__init__()
            self.db = Database()

        @requirements
        def needs(self) -> list[Service]:
            return [self.db]

    app = App()
    async with app:
        assert app.db.state is ServiceState.RUNNING
        assert app.dependencies == (app.db,)
    assert app.db.state is ServiceState.STOPPED


async def test_bad_dependencies_are_refused_at_the_call() -> None:
    parent = Service(name="parent")
    child = Service(name="child")
    parent.add_dependency(child)
    with pytest.raises(ValueError, match="already belongs to 'parent'"):
        parent.add_dependency(child)
    with pytest.raises(ValueError, match="cannot depend on itself"):
        parent.add_dependency(parent)
    with pytest.raises(ValueError, match="makes a cycle"):
        child.add_dependency(parent)
    with pytest.raises(TypeError, match="must be a Service"):
        parent.add_dependency("db")  # type: ignore[arg-type]
    async with parent:
        with pytest.raises(ServiceError, match="use 'await add_runtime_dependency"):
            parent.add_dependency(Service())
    with pytest.raises(ServiceError, match="needs a STARTING or RUNNING service"):
        await parent.add_runtime_dependency(Service())


# ------------------------------------------------------------------ resources


async def test_resources_are_released_exactly_once_on_stop_crash_and_restart() -> None:
    resource = Counted()
    sync_released: list[str] = []

    @contextmanager
    def sync_resource() -> Iterator[str]:
        try:
            yield "value"
        finally:
            sync_released.append("released")

    class Holder(Service):
        async def on_start(self) -> None:
            assert self.add_context(sync_resource()) == "value"

    service = Holder()
    await service.add_async_context(resource)
    async with service:
        assert (resource.entered, resource.released) == (1, 0)
        await service.restart()
        assert (resource.entered, resource.released) == (2, 1)
    assert (resource.entered, resource.released) == (2, 2)
    assert sync_released == ["released", "released"]

    with pytest.RaisesGroup(ValueError):
        async with service:
            await service.crash(ValueError("x"))
            await anyio.sleep_forever()
    assert (resource.entered, resource.released) == (3, 3)
    assert sync_released == ["released"] * 3


async def test_resource_release_after_a_crash_is_not_cancelled() -> None:
    closed: list[str] = []

    @asynccontextmanager
    async def connection() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await anyio.sleep(0.5)
            closed.append("closed")

    class Crashy(Service):
        @task
        async def fail(self) -> None:
            raise RuntimeError("boom")

    service = Crashy()
    await service.add_async_context(connection)
    with pytest.RaisesGroup(RuntimeError):
        async with service:
            await anyio.sleep_forever()
    assert closed == ["closed"]


async def test_add_context_refuses_what_is_not_a_context_manager() -> None:
    with pytest.raises(TypeError, match="not a context manager"):
        Service().add_context(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------ restart


async def test_restart_runs_in_fresh_scopes_without_first_start() -> None:
    events: list[str] = []
    service = Recorder(events)
    async with service:
        await service.restart()
        assert service.state is ServiceState.RUNNING
        assert service.restart_count == 1
        await service.restart()
        assert service.restart_count == 2
    assert events.count("Recorder.on_first_start") == 1
    assert events.count("Recorder.on_start") == 3
    assert events.count("Recorder.on_shutdown") == 3


async def test_restart_needs_a_running_service() -> None:
    with pytest.raises(ServiceError, match="restart\\(\\) needs a RUNNING service, not INIT"):
        await Service().restart()


async def test_restart_from_inside_a_task() -> None:
    starts: list[float] = []

    class Restarter(Service):
        async def on_start(self) -> None:
            starts.append(anyio.current_time())

        @task
        async def work(self) -> None:
            await anyio.sleep(5)
            if self.restart_count == 0:
                await self.restart()

    async with Restarter() as service:
        await anyio.sleep(12)
        assert service.restart_count == 1
    assert starts == [0, 5]


# ------------------------------------------------------------------ names, states, logging


async def test_name_defaults_to_class_name_and_shows_in_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Poller(Service):
        pass

    assert Poller().name == "Poller"
    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with Poller(name="poller-eu"):
            pass
    messages = [
        (record.name, record.service, record.getMessage())  # type: ignore[attr-defined]
        for record in caplog.records
    ]
    assert ("anyservice", "poller-eu", "[poller-eu] started") in messages
    assert ("anyservice", "poller-eu", "[poller-eu] stopped") in messages


async def test_lifecycle_log_level_can_be_lowered(caplog: pytest.LogCaptureFixture) -> None:
    class Quiet(Service):
        lifecycle_log_level = logging.DEBUG

    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with Quiet():
            pass
    assert caplog.records == []


async def test_wait_for_a_state() -> None:
    service = Service()
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.run)
        assert await service.wait_for(ServiceState.RUNNING) is ServiceState.RUNNING
        tg.start_soon(service.stop)
        assert await service.wait_for(ServiceState.STOPPED) is ServiceState.STOPPED


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="shutdown_timeout must be >= 0"):
        Service(shutdown_timeout=-1)
    with pytest.raises(ValueError, match="shutdown_timeout must be >= 0"):
        Service(shutdown_timeout=float("nan"))
    with pytest.raises(ValueError, match="non-empty str"):
        Service(name="")


def test_task_decorator_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="needs an 'async def' method"):
        task(lambda self: None)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        task(workers=0)(_async_noop)
    with pytest.raises(ValueError, match="periodic=True needs a sleep_interval"):
        task(periodic=True)(_async_noop)
    with pytest.raises(ValueError, match="sleep_interval only applies with periodic=True"):
        task(sleep_interval=1.0)(_async_noop)


async def _async_noop(self: object) -> None:
    pass


async def test_forgetting_super_init_is_a_clear_error() -> None:
    class Forgetful(Service):
        def __init__(self) -> None:
            pass

    with pytest.raises(ServiceError, match=r"did not call super\(\)\.__init__\(\)"):
        await Forgetful().run()


async def test_running_twice_at_once_is_refused() -> None:
    async with Service() as service:
        with pytest.raises(ServiceError, match="already running"):
            await service.run()


# ------------------------------------------------------------------ diagnostics


async def test_tracebacks_show_where_each_task_waits() -> None:
    class Waiter(Service):
        @task
        async def waiting_for_messages(self) -> None:
            await anyio.sleep_forever()

    async with Waiter() as service:
        await anyio.sleep(0.1)
        stacks = service.tracebacks()
    assert set(stacks) == {"Waiter (main)", "Waiter.waiting_for_messages"}
    assert "in waiting_for_messages" in stacks["Waiter.waiting_for_messages"]
    assert "await anyio.sleep_forever()" in stacks["Waiter.waiting_for_messages"]


async def test_dump_tree_shows_names_states_and_children() -> None:
    root = Service(name="root")
    left = root.add_dependency(Service(name="left"))
    left.add_dependency(Service(name="leaf"))
    root.add_dependency(Service(name="right"))
    async with root:
        assert root.dump_tree() == (
            "root [RUNNING]\n├── left [RUNNING]\n│   └── leaf [RUNNING]\n└── right [RUNNING]"
        )


async def test_diag_flags_and_transitions_to() -> None:
    class Flusher(Service):
        @transitions_to("FLUSHING")
        async def flush(self) -> str:
            assert "FLUSHING" in self.diag.flags
            return "done"

    service = Flusher()
    assert isinstance(service.diag, Diag)
    assert await service.flush() == "done"
    assert "FLUSHING" not in service.diag.flags
    assert "FLUSHING" in service.diag.last_transition
    service.diag.set_flag("WAITING")
    assert "flags=WAITING" in service.describe()


async def test_tasks_finish_their_cleanup_before_resources_are_released_at_the_deadline() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def resource() -> AsyncIterator[None]:
        try:
            yield
        finally:
            events.append("resource released")

    class Worker(Service):
        shutdown_timeout = 1.0

        async def on_start(self) -> None:
            await self.add_async_context(resource())

        @task
        async def work(self) -> None:
            try:
                async with self.in_flight():
                    await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.5)
                    events.append("task cleanup done")
                raise

    async with Worker() as service:
        await service.stop()
    assert events == ["task cleanup done", "resource released"]


async def test_crash_of_a_crashed_service_keeps_it_crashed_with_the_newer_reason() -> None:
    service = Service()
    await service.crash(ValueError("first"))
    await service.crash(KeyError("second"))
    assert service.state is ServiceState.CRASHED
    assert isinstance(service.crash_reason, KeyError)


async def test_stop_before_a_queued_rerun_begins_is_not_lost() -> None:
    service = Service()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        assert await service.stop() is True
        tg.start_soon(service.run)
        assert await service.stop() is True
        await anyio.sleep(1)
        assert service.state is ServiceState.STOPPED


async def test_a_stop_during_restart_wins() -> None:
    class Lingering(Service):
        shutdown_timeout = 5.0

        @task
        async def work(self) -> None:
            async with self.in_flight():
                await anyio.sleep(1)
            await anyio.sleep_forever()

    errors: list[BaseException] = []

    async def restart(service: Service) -> None:
        try:
            await service.restart()
        except ServiceError as exc:
            errors.append(exc)

    service = Lingering()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        tg.start_soon(restart, service)
        await service.wait_for(ServiceState.STOPPING)
        assert await service.stop() is True
    assert service.state is ServiceState.STOPPED
    assert [str(error) for error in errors] == [
        "Lingering: restart interrupted: the service was stopped"
    ]


async def test_remove_dependency_while_the_parent_stops() -> None:
    class Slow(Service):
        shutdown_timeout = 5.0

        @task
        async def work(self) -> None:
            async with self.in_flight():
                await anyio.sleep(2)
            await anyio.sleep_forever()

    parent = Slow(name="parent")
    dependency = parent.add_dependency(Slow(name="dependency"))
    async with anyio.create_task_group() as tg:
        await tg.start(parent.run)
        await parent.stop(block=False)
        await parent.remove_dependency(dependency)
        assert dependency.state is ServiceState.STOPPED
        assert parent.dependencies == ()
        await parent.wait_for(ServiceState.STOPPED)


async def test_crash_at_any_point_of_a_stop_is_never_lost() -> None:
    # The stop ends with the task group waiting for its tasks to finish unwinding, when
    # trio's nursery no longer takes new ones: a crash() then must still count.
    class Worker(Service):
        @task
        async def work(self) -> None:
            await anyio.sleep_forever()

    for checkpoints in range(12):
        parent = Worker(name="parent")
        raised: list[BaseException] = []

        async def run_it(
            service: Service,
            raised: list[BaseException],
            *,
            task_status: anyio.abc.TaskStatus[None],
        ) -> None:
            try:
                await service.run(task_status=task_status)
            except BaseException as exc:  # recorded, checked below
                raised.append(exc)

        async with anyio.create_task_group() as tg:
            await tg.start(run_it, parent, raised)
            await parent.stop(block=False)
            for _ in range(checkpoints):
                await anyio.lowlevel.checkpoint()
            was_running = parent._run is not None
            await parent.crash(ValueError("late"))
        assert parent.state is ServiceState.CRASHED, checkpoints
        assert isinstance(parent.crash_reason, ValueError)
        # Landed in the run: run() raises it; after the run: it is recorded.
        assert bool(raised) == was_running, checkpoints
