"""The names users bring from mode, Prefect and core_service, each doing what they expect."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import pytest

from anyservice import (
    Diag,
    LoopService,
    Service,
    ServiceError,
    ServiceState,
    WaitResult,
    WaitResults,
    requirements,
    task,
    timer,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]


# ---------------------------------------------------------------- states and questions


async def test_state_compares_with_modes_lowercase_strings() -> None:
    service = Service()
    assert service.state == "init"
    async with service:
        assert service.state == "running"
        assert service.state != "RUNNING"
        assert f"{service.state}" == "running"
    assert service.state == "stopped"
    assert ServiceState("crashed") is ServiceState.CRASHED


def test_states_print_and_serialise_readably() -> None:
    service = Service(name="db")
    assert repr(service) == "<Service 'db' INIT>"
    assert service.describe() == "db [INIT]"
    assert json.dumps({"state": service.state}) == '{"state": "init"}'
    assert str(ServiceState.STOPPING) == "stopping"


async def test_crashed_and_running_follow_the_state() -> None:
    class Failing(Service):
        @task
        async def work(self) -> None:
            await anyio.sleep(1)
            raise ConnectionError("gone")

    service = Failing()
    assert not service.running
    assert not service.crashed
    with pytest.RaisesGroup(ConnectionError):
        async with service:
            assert service.running
            await anyio.sleep(2)
    assert service.crashed
    assert not service.running


def test_label_and_shortlabel_are_modes_and_may_be_overridden() -> None:
    class Consumer(Service):
        pass

    assert Consumer().label == "Consumer"
    assert Consumer(name="orders").label == "Consumer: orders"
    assert Consumer(name="orders").shortlabel == "orders"

    class Agent(Service):
        @property
        def label(self) -> str:
            return "Agent of orders"

    assert Agent().label == "Agent of orders"


async def test_logger_is_the_same_logger_as_log(caplog: pytest.LogCaptureFixture) -> None:
    service = Service(name="prefect-style")
    assert service.logger is service.log
    with caplog.at_level(logging.INFO, logger="anyservice"):
        service.logger.info("hello")
    (record,) = caplog.records
    assert record.getMessage() == "[prefect-style] hello"


async def test_every_service_logs_through_one_logger_with_its_name_in_the_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = logging.StreamHandler(stream := _Lines())
    handler.setFormatter(logging.Formatter("%(service)s|%(levelname)s|%(message)s"))
    library = logging.getLogger("anyservice")
    library.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="anyservice"):
            for index in range(3):
                Service(name=f"unique-{index}").log.info("hi", extra={"request": 7})
    finally:
        library.removeHandler(handler)
    assert {record.name for record in caplog.records} == {"anyservice"}
    assert [record.service for record in caplog.records] == [  # type: ignore[attr-defined]
        "unique-0",
        "unique-1",
        "unique-2",
    ]
    assert all(record.request == 7 for record in caplog.records)  # type: ignore[attr-defined]
    assert stream.lines[0] == "unique-0|INFO|[unique-0] hi"
    assert "anyservice.unique-0" not in logging.Logger.manager.loggerDict


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.extend(line for line in text.splitlines() if line)

    def flush(self) -> None:
        pass


async def test_human_tracebacks_show_each_task_where_it_waits() -> None:
    class Sleeper(Service):
        @task
        async def nap(self) -> None:
            await anyio.sleep(100)

    async with Sleeper() as service:
        await anyio.sleep(1)
        text = service.human_tracebacks()
    assert "Sleeper.nap:" in text
    assert "in nap" in text


async def test_transition_with_sets_the_flag_while_awaiting() -> None:
    service = Service()
    seen: list[set[str]] = []

    async def flush() -> str:
        seen.append(set(service.diag.flags))
        return "flushed"

    assert await service.transition_with("FLUSH", flush()) == "flushed"
    assert seen == [{"FLUSH"}]
    assert service.diag.flags == set()


def test_diag_class_attribute_picks_the_diag_of_a_service() -> None:
    class LoudDiag(Diag):
        def set_flag(self, flag: str) -> None:
            super().set_flag(flag.upper())

    class Flagged(Service):
        Diag = LoudDiag

    service = Flagged()
    assert type(service.diag) is LoudDiag
    service.diag.set_flag("busy")
    assert service.diag.flags == {"BUSY"}
    assert Diag(service).service_name == "Flagged"  # mode's Diag takes the service


def test_abstract_class_cannot_be_instantiated_but_its_subclasses_can() -> None:
    class Base(Service):
        abstract = True

    class Concrete(Base):
        pass

    with pytest.raises(TypeError, match="Base is abstract"):
        Base()
    assert Concrete().name == "Concrete"
    assert Concrete.abstract is False


# ---------------------------------------------------------------- hooks


async def test_on_restart_runs_before_the_new_start_not_at_the_first() -> None:
    events: list[str] = []

    class Restartable(Service):
        async def on_restart(self) -> None:
            events.append(f"restart {self.restart_count}")

        async def on_start(self) -> None:
            events.append("start")

    async with Restartable() as service:
        await service.restart()
    assert events == ["start", "restart 1", "start"]


async def test_on_restart_runs_when_a_supervisor_restarts_a_child() -> None:
    from anyservice import Backoff, Supervisor

    events: list[str] = []

    class Flaky(Service):
        async def on_restart(self) -> None:
            events.append("restart")

        @task
        async def work(self) -> None:
            events.append("work")
            if len(events) == 1:
                raise ConnectionResetError("dropped")
            await anyio.sleep_forever()

    child = Flaky()
    async with Supervisor(child, backoff=Backoff(initial=0.1)):
        await anyio.sleep(1)
    assert events == ["work", "restart", "work"]
    assert child.restart_count == 1


async def test_monitoring_task_is_a_hook_that_runs_for_the_life_of_the_service() -> None:
    checks: list[float] = []

    class Watched(Service):
        async def monitoring_task(self) -> None:
            while True:
                checks.append(anyio.current_time())
                await anyio.sleep(5)

    start = anyio.current_time()
    async with Watched():
        await anyio.sleep(12)
    assert [round(at - start) for at in checks] == [0, 5, 10]


async def test_default_monitoring_task_crashes_on_an_unhealthy_check() -> None:
    class Sick(Service):
        monitoring_interval = 1.0

        async def healthcheck(self) -> None:
            raise ConnectionError("no database")

    with pytest.RaisesGroup(pytest.RaisesExc(Exception, match="unhealthy")):
        async with Sick():
            await anyio.sleep(5)


# ---------------------------------------------------------------- the wait family


async def test_wait_returns_the_result_of_the_first_to_finish() -> None:
    async def after(seconds: float, value: str) -> str:
        await anyio.sleep(seconds)
        return value

    async with Service() as service:
        assert await service.wait(after(1, "one")) == WaitResult("one", False)
        assert await service.wait(after(3, "slow"), after(1, "fast")) == ("fast", False)


async def test_wait_returns_stopped_when_the_service_is_asked_to_stop() -> None:
    event = anyio.Event()
    async with Service() as service, anyio.create_task_group() as tg:

        async def stop_later() -> None:
            await anyio.sleep(2)
            await service.stop(block=False)

        tg.start_soon(stop_later)
        assert await service.wait(event) == WaitResult(None, True)
        assert await service.wait_for_stopped(event) is True


async def test_wait_with_an_event_returns_when_it_is_set() -> None:
    event = anyio.Event()
    async with Service() as service, anyio.create_task_group() as tg:

        async def set_later() -> None:
            await anyio.sleep(1)
            event.set()

        tg.start_soon(set_later)
        result = await service.wait(event)
        assert result.stopped is False
        assert await service.wait_for_stopped(event) is False


async def test_wait_cancels_the_awaitables_that_did_not_finish() -> None:
    cancelled: list[bool] = []

    async def slow() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    async def fast() -> int:
        await anyio.sleep(1)
        return 1

    async with Service() as service:
        assert await service.wait(slow(), fast()) == (1, False)
        assert cancelled == [True]
        assert anyio.current_time() < 2


async def test_wait_on_a_stopped_service_returns_at_once_and_closes_the_coroutine() -> None:
    service = Service()
    async with service:
        pass
    coroutine = anyio.sleep(5)
    assert await service.wait(coroutine) == (None, True)
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"


async def test_wait_times_out_with_timeout_error() -> None:
    async with Service() as service:
        with pytest.raises(TimeoutError):
            await service.wait(anyio.Event(), timeout=2)
        with pytest.raises(TimeoutError):
            await service.wait(timeout=1)


async def test_wait_raises_what_the_awaitable_raised() -> None:
    async def fails() -> None:
        raise KeyError("missing")

    async with Service() as service:
        with pytest.raises(KeyError):
            await service.wait(fails())


async def test_wait_refuses_what_is_neither_awaitable_nor_an_event() -> None:
    async def never() -> None:
        await anyio.sleep(1)  # pragma: no cover - closed unstarted

    service = Service()
    with pytest.raises(TypeError, match="takes awaitables or events"):
        await service.wait(never(), 42)
    with pytest.raises(TypeError, match="timeout must be a number"):
        await service.wait(timeout=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a number of seconds, got the string"):
        await service.wait(timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds >= 0"):
        await service.wait(timeout=-1)


async def test_wait_many_returns_every_result_in_order() -> None:
    async def after(seconds: float, value: int) -> int:
        await anyio.sleep(seconds)
        return value

    async with Service() as service:
        assert await service.wait_many([after(3, 1), after(1, 2)]) == WaitResult([1, 2], False)
        assert await service.wait_many([]) == WaitResult([], False)


async def test_wait_many_ends_with_a_stop() -> None:
    async with Service() as service, anyio.create_task_group() as tg:
        tg.start_soon(_stop_after, service, 1)
        assert await service.wait_many([anyio.sleep(5), anyio.Event().wait()]) == (None, True)


async def test_wait_first_says_which_finished() -> None:
    fast, slow = anyio.Event(), anyio.Event()
    async with Service() as service, anyio.create_task_group() as tg:

        async def set_fast() -> None:
            await anyio.sleep(1)
            fast.set()

        tg.start_soon(set_fast)
        result = await service.wait_first(slow, fast)
        assert result == WaitResults([fast], [None], False)
        tg.start_soon(_stop_after, service, 1)
        assert await service.wait_first(slow) == WaitResults([], [], True)


async def test_wait_until_stopped_returns_at_the_stop_request() -> None:
    async with Service() as service, anyio.create_task_group() as tg:
        tg.start_soon(_stop_after, service, 3)
        await service.wait_until_stopped()
        assert anyio.current_time() >= 3
        assert service.should_stop


async def test_wait_until_stopped_from_a_task_that_holds_work_in_flight() -> None:
    saw: list[bool] = []

    class Flusher(Service):
        @task
        async def work(self) -> None:
            async with self.in_flight():
                saw.append((await self.wait(anyio.Event())).stopped)

    async with Flusher() as service:
        await anyio.sleep(1)
        await service.stop()
    assert saw == [True]


async def _stop_after(service: Service, seconds: float) -> None:
    await anyio.sleep(seconds)
    await service.stop(block=False)


# ---------------------------------------------------------------- shutdown flag


async def test_wait_for_shutdown_makes_a_stop_wait_for_set_shutdown() -> None:
    events: list[tuple[str, float]] = []

    class Producer(Service):
        wait_for_shutdown = True

        async def on_stop(self) -> None:
            events.append(("on_stop", anyio.current_time()))

        @task
        async def flush(self) -> None:
            async with self.in_flight():
                await self.wait_until_stopped()
                await anyio.sleep(2)  # the last messages leave
                events.append(("flushed", anyio.current_time()))
                self.set_shutdown()

    async with Producer(shutdown_timeout=10) as service:
        await anyio.sleep(1)
    assert [name for name, _ in events] == ["on_stop", "flushed"]
    assert events[1][1] - events[0][1] == pytest.approx(2)
    assert service.state is ServiceState.STOPPED


async def test_wait_for_shutdown_is_bounded_by_the_shutdown_timeout() -> None:
    class Forgetful(Service):
        wait_for_shutdown = True

    async with Forgetful(shutdown_timeout=3) as service:
        stopped_at = anyio.current_time()
    assert anyio.current_time() - stopped_at == pytest.approx(3)
    assert service.state is ServiceState.STOPPED


async def test_set_shutdown_before_the_stop_lets_it_go_through_at_once() -> None:
    class Early(Service):
        wait_for_shutdown = True

    async with Early(shutdown_timeout=3) as service:
        service.set_shutdown()
        stopped_at = anyio.current_time()
    assert anyio.current_time() == stopped_at


# ---------------------------------------------------------------- starting and resetting


async def test_maybe_start_starts_once() -> None:
    service = Service()
    async with anyio.create_task_group() as tg:
        assert await service.maybe_start(tg) is True
        assert service.state is ServiceState.RUNNING
        assert await service.maybe_start(tg) is False
        await service.stop()


async def test_maybe_start_from_inside_a_running_service_makes_a_runtime_dependency() -> None:
    producer = Service(name="producer")

    class App(Service):
        async def on_started(self) -> None:
            assert await producer.maybe_start() is True

    async with App() as app:
        assert producer in app.dependencies
        assert producer.state is ServiceState.RUNNING
    assert producer.state is ServiceState.STOPPED


async def test_maybe_start_of_a_dependency_runs_it_under_its_owner() -> None:
    class Once(Service):
        @task
        async def work(self) -> None:
            await anyio.sleep(1)
            await self.stop()

    dependency = Once()
    owner = Service(name="owner")
    owner.add_dependency(dependency)
    async with owner:
        await dependency.wait_for(ServiceState.STOPPED)
        assert await dependency.maybe_start() is True
        assert dependency.state is ServiceState.RUNNING
    assert dependency.state is ServiceState.STOPPED


async def test_maybe_start_without_a_host_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match=r"needs a task group"):
        await Service().maybe_start()
    dependency = Service(name="dep")
    Service(name="owner").add_dependency(dependency)
    with pytest.raises(ServiceError, match="needs its owner 'owner' running"):
        await dependency.maybe_start()


async def test_service_reset_makes_a_stopped_service_init_again() -> None:
    dependency = Service(name="dep")
    service = Service()
    service.add_dependency(dependency)
    async with service:
        with pytest.raises(ServiceError, match="service_reset"):
            service.service_reset()
    assert service.should_stop
    service.service_reset()
    assert service.state is ServiceState.INIT
    assert dependency.state is ServiceState.INIT
    assert not service.should_stop
    async with service:
        assert dependency.state is ServiceState.RUNNING


async def test_service_reset_forgets_a_crash_and_a_kept_stop() -> None:
    service = Service()
    await service.crash(RuntimeError("boom"))
    assert service.crashed
    service.service_reset()
    assert service.crash_reason is None
    await service.stop()  # kept for the next run, which service_reset() forgets
    assert service.state is ServiceState.STOPPED
    service.service_reset()
    async with service:
        assert service.state is ServiceState.RUNNING


# ---------------------------------------------------------------- dependencies and resources


async def test_add_runtime_dependency_from_on_start() -> None:
    producer = Service(name="producer")

    class App(Service):
        async def on_start(self) -> None:
            await self.add_runtime_dependency(producer)
            assert producer.state is ServiceState.RUNNING

    async with App() as app:
        assert producer in app.dependencies
    assert producer.state is ServiceState.STOPPED


async def test_a_context_manager_instance_on_a_second_start_names_the_resource_and_fix() -> None:
    @contextmanager
    def connection() -> Iterator[str]:
        yield "conn"

    service = Service(name="db")
    service.add_context(connection())
    async with service:
        pass
    with pytest.raises(ServiceError, match=r"db: the resource .* pass a factory"):
        async with service:
            pass  # pragma: no cover


async def test_a_context_manager_instance_on_a_restart_crashes_with_the_fix() -> None:
    @asynccontextmanager
    async def pool() -> AsyncIterator[None]:
        yield

    service = Service(name="db")
    service.add_context(pool())
    with pytest.RaisesGroup(pytest.RaisesExc(ServiceError, match="pass a factory")):
        async with service:
            with pytest.raises(ServiceError, match="restart failed"):
                await service.restart()


async def test_a_factory_serves_every_start() -> None:
    entered: list[int] = []

    @contextmanager
    def connection() -> Iterator[None]:
        entered.append(1)
        yield

    service = Service()
    service.add_context(connection)
    for _ in range(3):
        async with service:
            pass
    assert len(entered) == 3


async def test_exit_stacks_are_closed_when_the_run_stops() -> None:
    closed: list[str] = []

    @contextmanager
    def sync_thing() -> Iterator[None]:
        yield
        closed.append("sync")

    @asynccontextmanager
    async def async_thing() -> AsyncIterator[None]:
        yield
        closed.append("async")

    class Holder(Service):
        async def on_start(self) -> None:
            self.exit_stack.enter_context(sync_thing())
            await self.async_exit_stack.enter_async_context(async_thing())
            assert self.exit_stack is self.exit_stack

    service = Holder()
    async with service:
        assert closed == []
    assert sorted(closed) == ["async", "sync"]
    async with service:  # a fresh pair per run
        pass
    assert len(closed) == 4
    with pytest.raises(ServiceError, match="belong to a running service"):
        service.exit_stack  # noqa: B018 - the property is what raises


# ---------------------------------------------------------------- timers


async def test_timer_name_names_its_statistics_and_task() -> None:
    class Ticker(Service):
        @timer(1.0, name="heartbeat")
        async def beat(self) -> None:
            pass

    async with Ticker() as service:
        await anyio.sleep(3.5)
        assert service.timer_stats["heartbeat"].ticks == 3
        assert "Ticker.heartbeat" in service.tracebacks()


def test_timer_name_must_be_a_non_empty_str() -> None:
    with pytest.raises(TypeError, match="@timer name must be a str"):
        timer(1.0, name=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="@timer name must not be empty"):
        timer(1.0, name="")


async def test_itertimer_name_keeps_its_statistics() -> None:
    class Poller(Service):
        @task
        async def poll(self) -> None:
            async for _ in self.itertimer(2.0, name="poll-loop"):
                await anyio.sleep(0.5)

    async with Poller() as service:
        await anyio.sleep(7)
        stats = service.timer_stats["poll-loop"]
    assert stats.ticks == 3
    assert stats.last_duration == pytest.approx(0.5)


# ---------------------------------------------------------------- Prefect


async def test_stop_takes_block_by_position() -> None:
    async with Service() as service:
        assert await service.stop(False) is False
        await service.wait_for(ServiceState.STOPPED)


async def test_request_stop_from_sync_code_stops_at_the_next_turn() -> None:
    async with Service() as service:
        service.request_stop()
        await service.wait_for(ServiceState.STOPPED)


async def test_request_stop_before_start_keeps_the_stop() -> None:
    service = Service()
    service.request_stop()
    async with service:
        pass
    assert service.state is ServiceState.STOPPED


class Looper(LoopService):
    loop_seconds = 1

    async def on_start(self) -> None:  # no super(): the loop count must not depend on it
        pass

    async def run_once(self) -> None:
        pass


async def test_loop_service_started_twice_runs_its_loops_again() -> None:
    service = Looper()
    await service.start(loops=3)
    assert service.loops_run == 3
    await service.start(loops=3)
    assert service.loops_run == 3
    assert service.state is ServiceState.STOPPED


async def test_run_services_takes_a_list_as_prefect_does() -> None:
    from anyservice import run_services

    first, second = Looper(name="a"), Looper(name="b")
    first._loops = second._loops = 2
    await run_services([first, second], handle_signals=False)
    assert first.loops_run == second.loops_run == 2
    with pytest.raises(TypeError, match="takes services"):
        await run_services([first, "b"], handle_signals=False)  # type: ignore[list-item]


# ---------------------------------------------------------------- core_service


class Named(Service):
    def __init__(self, order: list[str], name: str) -> None:
        super().__init__(name=name)
        self.order = order

    async def on_start(self) -> None:
        self.order.append(self.name)


async def test_requirements_with_names_start_in_dependency_order() -> None:
    order: list[str] = []

    class Api(Service):
        @requirements("db", "cache")
        def web(self) -> Service:
            return Named(order, "web")

        @requirements("db")
        def cache(self) -> Service:
            return Named(order, "cache")

        @requirements()
        def db(self) -> Iterable[Service]:
            return [Named(order, "db")]

    async with Api() as api:
        assert [service.name for service in api.dependencies] == ["db", "cache", "web"]
    assert order == ["db", "cache", "web"]


def test_requirements_that_make_a_cycle_are_refused_at_class_definition() -> None:
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):

        class Cyclic(Service):
            @requirements("b")
            def a(self) -> Service:
                return Service()  # pragma: no cover

            @requirements("a")
            def b(self) -> Service:
                return Service()  # pragma: no cover


def test_requirements_naming_an_unknown_method_are_refused() -> None:
    with pytest.raises(ValueError, match=r"@requirements\('nosuch'\) names no @requirements"):

        class Typo(Service):
            @requirements("nosuch")
            def a(self) -> Service:
                return Service()  # pragma: no cover

    with pytest.raises(TypeError, match="takes method names"):
        requirements("db", 3)  # type: ignore[call-overload]


async def test_bare_requirements_still_work() -> None:
    class App(Service):
        @requirements
        def deps(self) -> list[Service]:
            return [Service(name="x")]

    async with App() as app:
        assert [service.name for service in app.dependencies] == ["x"]
