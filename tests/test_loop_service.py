"""LoopService: Prefect's behaviours, on scopes, on virtual time, both backends."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal

import anyio
import pytest

from anyservice import LoopService, ServiceState, run_services

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]


class Counting(LoopService):
    """Records when each run started, and its hooks."""

    def __init__(self, *args: object, body: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.starts: list[float] = []
        self.hooks: list[str] = []
        self.body = body

    async def on_start(self) -> None:
        await super().on_start()
        self.hooks.append("start")

    async def on_stop(self) -> None:
        self.hooks.append("stop")

    async def run_once(self) -> None:
        self.starts.append(anyio.current_time())
        await anyio.sleep(self.body)


def test_loop_seconds_defaults_to_60_and_can_be_overridden() -> None:
    assert Counting().loop_seconds == 60

    class Faster(Counting):
        loop_seconds = 5

    assert Faster().loop_seconds == 5
    assert Faster(loop_seconds=2).loop_seconds == 2
    assert Counting(loop_seconds=0.5).loop_seconds == 0.5


def test_name_is_the_class_name() -> None:
    assert Counting().name == "Counting"
    assert Counting(name="cleanup").name == "cleanup"


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon"])
def test_bad_loop_seconds_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="loop_seconds must be a"):
        Counting(loop_seconds=bad)


@pytest.mark.parametrize(("given", "seconds"), [(dt.timedelta(minutes=2), 120.0), ("0.5", 0.5)])
def test_loop_seconds_may_be_a_timedelta_or_a_numeric_string(
    given: dt.timedelta | str, seconds: float
) -> None:
    assert Counting(loop_seconds=given).loop_seconds == seconds


async def test_start_with_loops_returns_stopped_after_n_runs() -> None:
    service = Counting(loop_seconds=5)
    t0 = anyio.current_time()
    await service.start(loops=3)
    assert service.state is ServiceState.STOPPED
    assert [start - t0 for start in service.starts] == [0, 5, 10]
    assert service.loops_run == 3


async def test_next_run_starts_loop_seconds_after_the_previous_started() -> None:
    service = Counting(loop_seconds=5, body=2)
    t0 = anyio.current_time()
    await service.start(loops=4)
    assert [start - t0 for start in service.starts] == [0, 5, 10, 15]


async def test_overrun_logs_prefects_warning_and_runs_again_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Counting(loop_seconds=5, body=7)
    t0 = anyio.current_time()
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        await service.start(loops=3)
    assert [start - t0 for start in service.starts] == [0, 7, 14]
    assert (
        "Counting took 7.000 seconds to run, which is longer than its loop interval of "
        "5.0 seconds." in caplog.text
    )


async def test_exception_in_run_once_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(LoopService):
        runs = 0

        async def run_once(self) -> None:
            self.runs += 1
            if self.runs == 2:
                raise ConnectionError("database went away")

    service = Flaky(loop_seconds=1)
    with caplog.at_level(logging.ERROR, logger="anyservice"):
        await service.start(loops=4)
    assert service.runs == 4
    assert service.timer_stats["run_once"].errors == 1
    assert "ConnectionError: database went away" in caplog.text


async def test_run_once_not_implemented_propagates() -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(NotImplementedError, match="must implement")):
        await LoopService(loop_seconds=1).start(loops=1)


async def test_repeated_starts_run_hooks_once_per_start() -> None:
    service = Counting(loop_seconds=1)
    await service.start(loops=2)
    await service.start(loops=1)
    assert service.hooks == ["start", "stop", "start", "stop"]
    assert len(service.starts) == 3
    assert service.loops_run == 1


async def test_early_stop_is_faster_than_the_interval() -> None:
    service = Counting(loop_seconds=60)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        await anyio.sleep(1)
        before = anyio.current_time()
        assert await service.stop() is True
        assert anyio.current_time() == before
    assert len(service.starts) == 1


async def test_run_in_progress_gets_the_grace_period() -> None:
    service = Counting(loop_seconds=60, body=3, shutdown_timeout=10)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        await anyio.sleep(1)
        await service.stop()
        assert anyio.current_time() == pytest.approx(3)


async def test_stop_block_from_inside_run_once_does_not_deadlock() -> None:
    class Quitter(LoopService):
        async def run_once(self) -> None:
            await self.stop(block=True)

    service = Quitter(loop_seconds=1)
    with anyio.fail_after(10):
        await service.start()
    assert service.state is ServiceState.STOPPED


async def test_start_rejects_a_bad_loops_count() -> None:
    with pytest.raises(ValueError, match="Counting: loops must be an int >= 1, got 0"):
        await Counting().start(loops=0)
    with pytest.raises(TypeError, match="Counting: loops must be an int, got '3'"):
        await Counting().start(loops="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loops must be an int <= 2147483647"):
        await Counting().start(loops=2**63)


async def test_signals_stop_it_gracefully_when_enabled() -> None:
    service = Counting(loop_seconds=10, handle_signals=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.start)
        await service.wait_for(ServiceState.RUNNING)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        with anyio.fail_after(5):
            await service.wait_for(ServiceState.STOPPED)
    assert service.hooks == ["start", "stop"]


async def test_signals_are_left_alone_by_default() -> None:
    before = signal.getsignal(signal.SIGTERM)
    service = Counting(loop_seconds=10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.start)
        await service.wait_for(ServiceState.RUNNING)
        assert signal.getsignal(signal.SIGTERM) is before
        await service.stop()


async def test_run_services_stops_them_all_on_one_signal() -> None:
    first, second = Counting(loop_seconds=3, name="first"), Counting(loop_seconds=7, name="second")
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_services, first, second)
        await first.wait_for(ServiceState.RUNNING)
        await second.wait_for(ServiceState.RUNNING)
        await anyio.sleep(10)
        os.kill(os.getpid(), signal.SIGINT)
        with anyio.fail_after(5):
            await first.wait_for(ServiceState.STOPPED)
            await second.wait_for(ServiceState.STOPPED)
    assert len(first.starts) == 4
    assert len(second.starts) == 2


async def test_run_services_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one service"):
        await run_services()
    service = Counting()
    with pytest.raises(ValueError, match="given twice"):
        await run_services(service, service)
