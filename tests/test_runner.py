"""``anyservice.run``: exit codes, signals and SIGUSR1 stacks, in this process, both backends.

Each test calls the synchronous runner, which runs its own event loop on a real clock; the
signals are sent by a task of the service to this process once the service is RUNNING.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Literal

import anyio
import pytest

from anyservice import Service, ServiceState, task
from anyservice._runner import run

Backend = Literal["asyncio", "trio"]
BACKENDS: list[Backend] = ["asyncio", "trio"]
# A bound on waits that end at once when the runner works.
BOUND = 10.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    name: Backend = request.param
    return name


@pytest.fixture
def restore_signal_handlers() -> Iterator[None]:
    """The asyncio backend resets handlers to the defaults; put pytest's back, whatever."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {signum: signal.getsignal(signum) for signum in signals}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


class OneTask(Service):
    """Runs ``body`` (sync or async) as its single task once RUNNING, then stops."""

    shutdown_timeout = 5.0

    def __init__(self, body: Callable[[OneTask], object]) -> None:
        super().__init__()
        self.body = body

    @task
    async def work(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        result = self.body(self)
        if inspect.isawaitable(result):
            await result
        await self.stop()


def kill_self(signum: signal.Signals) -> None:
    os.kill(os.getpid(), signum)


# ------------------------------------------------------------------ exit codes


def test_a_service_that_stops_exits_0(backend: Backend) -> None:
    service = OneTask(lambda service: None)
    assert run(service, backend=backend) == 0
    assert service.state is ServiceState.STOPPED


def test_a_crash_exits_1_and_its_traceback_is_logged_once(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(service: OneTask) -> None:
        raise ConnectionError("upstream closed the connection")

    service = OneTask(crash)
    with caplog.at_level(logging.INFO, logger="anyservice"):
        assert run(service, backend=backend) == 1
    assert service.state is ServiceState.CRASHED
    assert caplog.text.count("Traceback") == 1
    tracebacks = [record for record in caplog.records if record.exc_info is not None]
    assert len(tracebacks) == 1
    assert tracebacks[0].name == "anyservice"
    assert tracebacks[0].service == "OneTask"  # type: ignore[attr-defined]
    (summary,) = [record for record in caplog.records if record.name == "anyservice.runner"]
    assert summary.getMessage() == (
        "OneTask crashed (ConnectionError('upstream closed the connection')): exit code 1"
    )


@pytest.mark.parametrize(("code", "expected"), [(3, 3), (0, 0), (None, 0), ("bye", 1)])
def test_system_exit_in_a_service_gives_its_code(
    backend: Backend, code: int | str | None, expected: int
) -> None:
    def leave(service: OneTask) -> None:
        raise SystemExit(code)

    assert run(OneTask(leave), backend=backend) == expected


def test_keyboard_interrupt_in_a_service_exits_130(backend: Backend) -> None:
    def interrupt(service: OneTask) -> None:
        raise KeyboardInterrupt

    assert run(OneTask(interrupt), backend=backend, handle_signals=False) == 130


def test_an_error_before_the_service_runs_is_logged_with_its_traceback(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    class Forgetful(Service):
        def __init__(self) -> None:
            pass  # no super().__init__(): run() refuses it

    with caplog.at_level(logging.INFO, logger="anyservice"):
        assert run(Forgetful(), backend=backend) == 1
    (failure,) = [record for record in caplog.records if record.exc_info is not None]
    assert failure.name == "anyservice.runner"
    assert "did not call super().__init__()" in caplog.text


def test_bad_arguments_are_refused_before_running() -> None:
    with pytest.raises(TypeError, match="needs a Service"):
        run(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of asyncio, trio"):
        run(OneTask(lambda service: None), backend="curio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold must be a finite number of seconds > 0"):
        run(OneTask(lambda service: None), blocking_threshold=0)


# ------------------------------------------------------------------ signals


@pytest.mark.usefixtures("restore_signal_handlers")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_gracefully_and_exits_0(
    backend: Backend, signum: signal.Signals, caplog: pytest.LogCaptureFixture
) -> None:
    class Busy(Service):
        shutdown_timeout = 5.0
        finished = False

        @task
        async def work(self) -> None:
            await self.wait_for(ServiceState.RUNNING)
            async with self.in_flight():
                kill_self(signum)
                await self.wait_for(ServiceState.STOPPING)
                await anyio.sleep(0.01)
                self.finished = True

    service = Busy()
    with caplog.at_level(logging.INFO, logger="anyservice"):
        assert run(service, backend=backend) == 0
    assert service.finished
    assert service.state is ServiceState.STOPPED
    assert f"received {signum.name}: stopping Busy gracefully" in caplog.text


@pytest.mark.usefixtures("restore_signal_handlers")
@pytest.mark.parametrize(("second", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_second_signal_stops_at_once_with_128_plus_its_number(
    backend: Backend, second: signal.Signals, code: int
) -> None:
    class Stubborn(Service):
        # Were the second signal ignored, the grace period would end the test, exit code 0.
        shutdown_timeout = BOUND
        cut_short = False

        @task
        async def work(self) -> None:
            await self.wait_for(ServiceState.RUNNING)
            async with self.in_flight():
                kill_self(signal.SIGINT)
                await self.wait_for(ServiceState.STOPPING)
                kill_self(second)
                try:
                    await anyio.sleep(2 * BOUND)
                except anyio.get_cancelled_exc_class():
                    self.cut_short = True
                    raise

    service = Stubborn()
    assert run(service, backend=backend) == code
    assert service.cut_short
    assert service.state is ServiceState.STOPPED


class CallOnRecord(logging.Handler):
    def __init__(self, call: Callable[[], None]) -> None:
        super().__init__()
        self.call = call

    def emit(self, record: logging.LogRecord) -> None:
        self.call()


@pytest.mark.usefixtures("restore_signal_handlers")
def test_sigusr1_logs_the_tree_and_the_task_stacks(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    runner_log = logging.getLogger("anyservice.runner")

    async def ask_for_stacks(service: OneTask) -> None:
        # The runner logs from its signal task, in this event loop: the handler may set it.
        dumped = anyio.Event()
        handler = CallOnRecord(dumped.set)
        runner_log.addHandler(handler)
        try:
            kill_self(signal.SIGUSR1)
            with anyio.fail_after(BOUND):
                await dumped.wait()
        finally:
            runner_log.removeHandler(handler)

    with caplog.at_level(logging.INFO, logger="anyservice"):
        assert run(OneTask(ask_for_stacks), backend=backend) == 0
    dump = next(record for record in caplog.records if record.name == "anyservice.runner")
    assert dump.levelno == logging.WARNING
    text = dump.getMessage()
    assert "received SIGUSR1" in text
    assert "OneTask [RUNNING]" in text
    assert "--- OneTask (main)" in text
    assert "--- OneTask.work" in text
    assert "in ask_for_stacks" in text  # where the task is waiting


@pytest.mark.usefixtures("restore_signal_handlers")
def test_a_stop_signal_during_the_start_is_not_lost(backend: Backend) -> None:
    class SlowStart(Service):
        async def on_start(self) -> None:
            kill_self(signal.SIGTERM)
            await anyio.sleep(2 * BOUND)

    service = SlowStart(shutdown_timeout=BOUND)
    assert run(service, backend=backend) == 0
    assert service.state is ServiceState.STOPPED


@pytest.mark.usefixtures("restore_signal_handlers")
def test_ctrl_c_without_handle_signals_exits_130(backend: Backend) -> None:
    async def interrupt(service: OneTask) -> None:
        kill_self(signal.SIGINT)
        # Ended at once by the backend's own Ctrl-C handling; were it not, exit code 0.
        await anyio.sleep(BOUND)

    assert run(OneTask(interrupt), backend=backend, handle_signals=False) == 130


def test_without_handle_signals_the_handlers_are_left_alone(backend: Backend) -> None:
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {signum: signal.getsignal(signum) for signum in signals}
    seen: dict[signal.Signals, object] = {}

    def look(service: OneTask) -> None:
        seen.update({signum: signal.getsignal(signum) for signum in signals})

    assert run(OneTask(look), backend=backend, handle_signals=False) == 0
    # Not SIGINT while running: asyncio and trio each install their own Ctrl-C handling.
    assert seen[signal.SIGTERM] is before[signal.SIGTERM]
    assert seen[signal.SIGUSR1] is before[signal.SIGUSR1]
    assert {signum: signal.getsignal(signum) for signum in signals} == before


@pytest.mark.usefixtures("restore_signal_handlers")
def test_with_handle_signals_the_runner_receives_them(backend: Backend) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def look(service: OneTask) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))

    assert run(OneTask(look), backend=backend) == 0
    assert seen != [before]
