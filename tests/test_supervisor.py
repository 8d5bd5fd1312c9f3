"""Supervisor strategies, restart types, intensity, backoff and nesting; health checks."""

from __future__ import annotations

import datetime
import itertools
import logging
import math
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyservice import (
    Backoff,
    Service,
    ServiceError,
    ServiceState,
    Supervisor,
    SupervisorError,
    UnhealthyError,
    task,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

NO_BACKOFF = Backoff(initial=0)


class Worker(Service):
    """Crashes ``crash_after`` seconds after each start while ``crashes`` is positive."""

    def __init__(self, name: str, log: list[str], crash_after: float | None = None) -> None:
        super().__init__(name=name)
        self.events = log
        self.crash_after = crash_after
        self.crashes = 1_000_000 if crash_after is not None else 0

    async def on_start(self) -> None:
        self.events.append(f"{self.name} start@{anyio.current_time():g}")

    async def on_stop(self) -> None:
        self.events.append(f"{self.name} stop@{anyio.current_time():g}")

    @task
    async def work(self) -> None:
        if self.crash_after is None or self.crashes <= 0:
            await anyio.sleep_forever()
        await anyio.sleep(self.crash_after or 0)
        self.crashes -= 1
        raise ConnectionError(f"{self.name} lost its connection")


async def run_supervisor(supervisor: Supervisor, seconds: float) -> None:
    async with supervisor:
        await anyio.sleep(seconds)


# ------------------------------------------------------------------ strategies


async def test_one_for_one_restarts_only_the_child_that_crashed() -> None:
    events: list[str] = []
    flaky = Worker("flaky", events, crash_after=1)
    flaky.crashes = 1
    steady = Worker("steady", events)
    supervisor = Supervisor(flaky, steady, backoff=NO_BACKOFF)
    await run_supervisor(supervisor, 5)
    assert flaky.restart_count == 1
    assert steady.restart_count == 0
    assert events == [
        "flaky start@0",
        "steady start@0",
        "flaky start@1",
        "steady stop@5",
        "flaky stop@5",
    ]


async def test_one_for_all_restarts_every_child() -> None:
    events: list[str] = []
    first = Worker("first", events)
    flaky = Worker("flaky", events, crash_after=1)
    flaky.crashes = 1
    last = Worker("last", events)
    supervisor = Supervisor(first, flaky, last, strategy="one_for_all", backoff=NO_BACKOFF)
    await run_supervisor(supervisor, 5)
    assert (first.restart_count, flaky.restart_count, last.restart_count) == (1, 1, 1)
    assert events[3:9] == [
        "last stop@1",
        "first stop@1",
        "first start@1",
        "flaky start@1",
        "last start@1",
        "last stop@5",
    ]


async def test_rest_for_one_restarts_the_child_and_those_after_it() -> None:
    events: list[str] = []
    first = Worker("first", events)
    flaky = Worker("flaky", events, crash_after=1)
    flaky.crashes = 1
    last = Worker("last", events)
    supervisor = Supervisor(first, flaky, last, strategy="rest_for_one", backoff=NO_BACKOFF)
    await run_supervisor(supervisor, 5)
    assert (first.restart_count, flaky.restart_count, last.restart_count) == (0, 1, 1)
    assert events[3:6] == ["last stop@1", "flaky start@1", "last start@1"]


# ------------------------------------------------------------------ restart types


class Finisher(Service):
    """Stops by itself one second after each start."""

    @task
    async def finish(self) -> None:
        await anyio.sleep(1)
        await self.stop()


async def test_permanent_child_is_restarted_even_after_a_clean_stop() -> None:
    child = Finisher()
    supervisor = Supervisor(max_restarts=10, within=1, backoff=NO_BACKOFF)
    supervisor.add_child(child, restart="permanent")
    await run_supervisor(supervisor, 3.5)
    assert child.restart_count == 3


async def test_transient_child_is_restarted_after_a_crash_only() -> None:
    finisher = Finisher()
    crasher = Worker("crasher", [], crash_after=1)
    crasher.crashes = 1
    supervisor = Supervisor(backoff=NO_BACKOFF)
    supervisor.add_child(finisher, restart="transient")
    supervisor.add_child(crasher, restart="transient")
    await run_supervisor(supervisor, 5)
    assert finisher.restart_count == 0
    assert finisher.state is ServiceState.STOPPED
    assert crasher.restart_count == 1
    assert supervisor.state is ServiceState.STOPPED


async def test_temporary_child_is_never_restarted() -> None:
    crasher = Worker("crasher", [], crash_after=1)
    supervisor = Supervisor(backoff=NO_BACKOFF)
    supervisor.add_child(crasher, restart="temporary")
    async with supervisor:
        await anyio.sleep(5)
        assert crasher.state is ServiceState.CRASHED
        assert supervisor.state is ServiceState.RUNNING
    assert crasher.restart_count == 0


# ------------------------------------------------------------------ intensity and backoff


async def test_beyond_the_intensity_the_supervisor_crashes_with_the_child_error_chained() -> None:
    crasher = Worker("crasher", [], crash_after=0.5)
    supervisor = Supervisor(crasher, max_restarts=3, within=10, backoff=NO_BACKOFF)
    with pytest.RaisesGroup(
        pytest.RaisesExc(SupervisorError, match="more than 3 restarts")
    ) as info:
        await run_supervisor(supervisor, 100)
    error = info.value.exceptions[0]
    # The child's own error, its crash_reason, not the group its task group raised.
    assert isinstance(error.__cause__, ConnectionError)
    assert error.__cause__ is crasher.crash_reason
    assert crasher.restart_count == 3
    assert supervisor.state is ServiceState.CRASHED
    assert anyio.current_time() == pytest.approx(2.0)


async def test_crashes_spread_out_beyond_the_window_are_restarted_forever() -> None:
    crasher = Worker("crasher", [], crash_after=6)
    supervisor = Supervisor(crasher, max_restarts=2, within=10, backoff=NO_BACKOFF)
    await run_supervisor(supervisor, 100)
    assert crasher.restart_count == 16
    assert supervisor.state is ServiceState.STOPPED


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_restarts=st.integers(min_value=0, max_value=4),
    within=st.integers(min_value=1, max_value=20),
    lifetimes=st.lists(st.integers(min_value=1, max_value=15), min_size=1, max_size=10),
)
async def test_supervisor_gives_up_exactly_when_n_restarts_fall_within_t(
    max_restarts: int, within: int, lifetimes: list[int]
) -> None:
    class Scripted(Service):
        """Crashes after lifetimes[i] seconds on its i-th start, then runs forever."""

        starts = 0

        @task
        async def work(self) -> None:
            index = self.starts
            self.starts += 1
            if index >= len(lifetimes):
                await anyio.sleep_forever()
            await anyio.sleep(lifetimes[index])
            raise RuntimeError("scripted crash")

    # The model: restart i happens when crash i does; refuse the first that would make
    # more than max_restarts restarts in a window of `within` seconds.
    now, expected_gave_up = 0, False
    accepted: list[int] = []
    for lifetime in lifetimes:
        now += lifetime
        recent = [moment for moment in accepted if now - moment < within]
        if len(recent) + 1 > max_restarts:
            expected_gave_up = True
            break
        accepted.append(now)

    child = Scripted()
    supervisor = Supervisor(child, max_restarts=max_restarts, within=within, backoff=NO_BACKOFF)
    gave_up = False
    try:
        await run_supervisor(supervisor, sum(lifetimes) + 1)
    except* SupervisorError:
        gave_up = True
    assert gave_up == expected_gave_up
    assert child.restart_count == len(accepted)


async def test_backoff_grows_between_consecutive_restarts_and_is_capped() -> None:
    events: list[str] = []
    crasher = Worker("crasher", events, crash_after=0)
    supervisor = Supervisor(
        crasher, max_restarts=100, within=1000, backoff=Backoff(initial=1, factor=2, maximum=4)
    )
    await run_supervisor(supervisor, 20)
    starts = [float(event.split("@")[1]) for event in events if "start" in event]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:6] == [1, 2, 4, 4, 4, 4]


async def test_restart_is_logged_with_its_reason_and_shown_in_the_tree(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = Worker("flaky", [], crash_after=1)
    flaky.crashes = 2
    supervisor = Supervisor(flaky, name="root", backoff=NO_BACKOFF)
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        async with supervisor:
            await anyio.sleep(5)
            tree = supervisor.dump_tree()
    assert "child flaky crashed: ConnectionError: flaky lost its connection" in caplog.text
    assert "restarting flaky (one_for_one)" in caplog.text
    assert tree == ("root [RUNNING] strategy=one_for_one\n└── flaky [RUNNING] restarts=2")


# ------------------------------------------------------------------ nesting and stopping


async def test_supervisors_nest() -> None:
    crasher = Worker("crasher", [], crash_after=1)
    crasher.crashes = 3
    inner = Supervisor(crasher, name="inner", max_restarts=1, within=100, backoff=NO_BACKOFF)
    outer = Supervisor(inner, name="outer", backoff=NO_BACKOFF)
    async with outer:
        await anyio.sleep(10)
        assert inner.restart_count == 1
        assert inner.state is ServiceState.RUNNING
        assert crasher.restart_count == 3
        assert "outer [RUNNING]" in outer.dump_tree()
        assert "    └── crasher [RUNNING] restarts=3" in outer.dump_tree()


async def test_stopping_the_supervisor_stops_children_gracefully_in_reverse() -> None:
    events: list[str] = []

    class Careful(Worker):
        shutdown_timeout = 10

        def __init__(self, name: str, log: list[str], flush_for: float) -> None:
            super().__init__(name, log)
            self.flush_for = flush_for

        @task
        async def flush(self) -> None:
            async with self.in_flight():
                await anyio.sleep(self.flush_for)
                self.events.append(f"{self.name} flushed@{anyio.current_time():g}")
            await anyio.sleep_forever()

    a, b = Careful("a", events, flush_for=5), Careful("b", events, flush_for=3)
    supervisor = Supervisor(a, b, shutdown_timeout=10)
    await run_supervisor(supervisor, 1)
    assert events == [
        "a start@0",
        "b start@0",
        "b stop@1",
        "b flushed@3",
        "a stop@3",
        "a flushed@5",
    ]


def test_supervisor_numbers_are_checked_naming_the_supervisor() -> None:
    with pytest.raises(ValueError, match=r"^Supervisor: max_restarts must be an int <= 2147483647"):
        Supervisor(max_restarts=2**63)
    with pytest.raises(TypeError, match=r"^Supervisor: max_restarts must be an int, got '3'$"):
        Supervisor(max_restarts="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^Supervisor: within must be a finite number of seconds"):
        Supervisor(within=math.inf)
    assert Supervisor(within=datetime.timedelta(minutes=1)).within == 60.0
    assert Supervisor(within="2.5").within == 2.5


async def test_start_child_at_runtime_and_bad_input() -> None:
    events: list[str] = []
    supervisor = Supervisor()
    with pytest.raises(ValueError, match="strategy must be one of"):
        Supervisor(strategy="one_for_some")
    with pytest.raises(ValueError, match="restart must be one of"):
        supervisor.add_child(Service(), restart="sometimes")
    with pytest.raises(ServiceError, match=r"start_child\(\) needs a RUNNING supervisor"):
        await supervisor.start_child(Service())
    async with supervisor:
        late = await supervisor.start_child(Worker("late", events))
        assert late.state is ServiceState.RUNNING
        with pytest.raises(ServiceError, match="use 'await start_child"):
            supervisor.add_child(Service())
    assert late.state is ServiceState.STOPPED


# ------------------------------------------------------------------ health


class Pinger(Service):
    monitoring_interval = 5.0
    healthcheck_timeout = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.answer: str = "ok"

    async def healthcheck(self) -> None:
        if self.answer == "hang":
            await anyio.sleep_forever()
        if self.answer != "ok":
            raise UnhealthyError(self.answer)


async def test_failing_healthcheck_crashes_the_service_with_its_reason() -> None:
    service = Pinger()
    with pytest.RaisesGroup(pytest.RaisesExc(UnhealthyError, match="replica lag 30s")):
        async with service:
            await anyio.sleep(7)
            service.answer = "replica lag 30s"
            await anyio.sleep_forever()
    assert anyio.current_time() == 10
    assert service.last_health is not None
    assert not service.last_health.healthy


async def test_hanging_healthcheck_counts_as_failed_after_its_timeout() -> None:
    service = Pinger()
    service.answer = "hang"
    with pytest.RaisesGroup(pytest.RaisesExc(UnhealthyError, match=r"did not answer within 1\.0s")):
        async with service:
            await anyio.sleep_forever()
    assert anyio.current_time() == 6


async def test_unhealthy_child_is_restarted_by_its_supervisor() -> None:
    pinger = Pinger()
    pinger.answer = "disk full"
    supervisor = Supervisor(pinger, max_restarts=100, within=1, backoff=NO_BACKOFF)
    await run_supervisor(supervisor, 12)
    assert pinger.restart_count == 2


async def test_check_health_on_demand_and_in_the_tree() -> None:
    async with Pinger() as service:
        health = await service.check_health()
        assert health.healthy
        assert "health=ok" in service.dump_tree()
        service.answer = "cache cold"
        health = await service.check_health()
        assert not health.healthy
        assert health.reason == "cache cold"
        assert "health=UNHEALTHY (cache cold)" in service.dump_tree()
        assert service.state is ServiceState.RUNNING


async def test_services_without_a_healthcheck_are_not_monitored() -> None:
    async with Service() as service:
        await anyio.sleep(100)
        assert service.last_health is None
        assert set(service.tracebacks()) == {"Service (main)"}


def test_bad_monitoring_interval_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match=r"Bad\.monitoring_interval"):

        class Bad(Service):
            monitoring_interval = 0

            async def healthcheck(self) -> None:
                pass


# ------------------------------------------------------------------ start and stop races


class SlowStarter(Service):
    """Takes ``seconds`` in ``on_start``, so a stop can land while it starts."""

    def __init__(self, name: str, seconds: float = 1.0) -> None:
        super().__init__(name=name)
        self.seconds = seconds
        self.stops = 0

    async def on_start(self) -> None:
        await anyio.sleep(self.seconds)

    async def on_stop(self) -> None:
        self.stops += 1


async def test_a_supervisor_stopped_as_soon_as_it_runs_stops_cleanly() -> None:
    a, b = Worker("a", []), Worker("b", [])
    supervisor = Supervisor(a, b)
    async with supervisor:
        pass
    assert supervisor.state is ServiceState.STOPPED
    assert (a.state, b.state) == (ServiceState.STOPPED, ServiceState.STOPPED)
    assert supervisor.crash_reason is None


async def test_a_supervisor_stopped_after_one_checkpoint_stops_cleanly() -> None:
    supervisor = Supervisor(Worker("a", []), Worker("b", []))
    async with supervisor:
        await anyio.lowlevel.checkpoint()
    assert supervisor.state is ServiceState.STOPPED


async def test_async_with_a_supervisor_returns_once_every_child_is_running() -> None:
    first, second = SlowStarter("first", 1), SlowStarter("second", 2)
    async with Supervisor(first, second) as supervisor:
        assert supervisor.state is ServiceState.RUNNING
        assert (first.state, second.state) == (ServiceState.RUNNING, ServiceState.RUNNING)
        # In order: the second started once the first was RUNNING.
        assert anyio.current_time() == pytest.approx(3.0)


@pytest.mark.parametrize("stop_at", [0.0, 0.5, 1.0, 1.5, 2.5, 3.0])
async def test_a_stop_at_any_moment_of_the_start_is_a_clean_stop(stop_at: float) -> None:
    first, second = SlowStarter("first", 1), SlowStarter("second", 2)
    supervisor = Supervisor(first, second)
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        await anyio.sleep(stop_at)
        assert await supervisor.stop() is True
    assert supervisor.state is ServiceState.STOPPED
    assert supervisor.crash_reason is None
    for child in (first, second):
        assert child.state in (ServiceState.INIT, ServiceState.STOPPED), (child, stop_at)
        assert child.crash_reason is None


async def test_supervisor_error_cause_is_the_childs_own_exception() -> None:
    crasher = Worker("crasher", [], crash_after=1)
    supervisor = Supervisor(crasher, max_restarts=0, backoff=NO_BACKOFF)
    with pytest.RaisesGroup(pytest.RaisesExc(SupervisorError)) as info:
        await run_supervisor(supervisor, 10)
    cause = info.value.exceptions[0].__cause__
    assert type(cause) is ConnectionError
    assert cause is crasher.crash_reason


# ------------------------------------------------------------------ order where it shows


class _Plain(Service):
    """Runs none of the user's code at start or stop: it cannot tell when it starts."""

    @task
    async def idle(self) -> None:
        await anyio.sleep_forever()


class _Watcher(Service):
    """Notes, at its start and its stop, the state of the services it watches."""

    def __init__(self, name: str, log: list[str], watched: Sequence[Service]) -> None:
        super().__init__(name=name)
        self.events = log
        self.watched = watched

    def _note(self, what: str) -> None:
        states = ",".join(f"{s.name}={s.state.name}" for s in self.watched)
        self.events.append(f"{self.name} {what}: {states}")

    async def on_start(self) -> None:
        self._note("start")

    async def on_stop(self) -> None:
        self._note("stop")


async def test_children_that_cannot_tell_start_and_stop_together_between_the_others() -> None:
    events: list[str] = []
    plain = [_Plain(name=f"p{i}") for i in range(3)]
    first = _Watcher("first", events, plain)
    last = _Watcher("last", events, plain)
    async with Supervisor(first, *plain, last) as supervisor:
        assert all(s.state is ServiceState.RUNNING for s in supervisor.children())
    assert events == [
        "first start: p0=INIT,p1=INIT,p2=INIT",
        "last start: p0=RUNNING,p1=RUNNING,p2=RUNNING",
        "last stop: p0=RUNNING,p1=RUNNING,p2=RUNNING",
        # The plain children are STOPPED before the one declared before them stops.
        "first stop: p0=STOPPED,p1=STOPPED,p2=STOPPED",
    ]


async def test_one_for_all_restarts_children_started_together() -> None:
    plain = [_Plain(name=f"p{i}") for i in range(3)]
    crasher = Worker("crasher", [], crash_after=1)
    crasher.crashes = 1
    supervisor = Supervisor(*plain, crasher, strategy="one_for_all", backoff=NO_BACKOFF)
    async with supervisor:
        await anyio.sleep(2)
        assert [s.restart_count for s in plain] == [1, 1, 1]
        assert all(s.state is ServiceState.RUNNING for s in supervisor.children())
    assert all(s.state is ServiceState.STOPPED for s in supervisor.children())
