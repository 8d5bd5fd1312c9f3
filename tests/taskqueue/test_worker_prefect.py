"""Prefect's names on the worker: start/stop, handle_sigterm, execute_task_run,
StopTaskWorker, and ``serve()`` awaited inside an event loop or called from plain code.

Runs go through a real SQLite file, in real time, with every wait bounded; ``serve()`` runs
in a real process that gets a real SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from anyservice import ServiceState
from anyservice.taskqueue import RunState, StopTaskWorker, TaskQueue, TaskWorker

from .test_worker import PROMPTLY, wait_until

pytestmark = pytest.mark.anyio

#: Bound on starting a Python process that imports the library, on a slow machine.
STARTUP = 30.0


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:
        yield queue


async def test_start_runs_the_worker_until_stop(queue: TaskQueue) -> None:
    @queue.task
    async def say(message: str) -> str:
        return message

    worker = TaskWorker(say)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.start)
        with anyio.fail_after(PROMPTLY):
            await worker.wait_for(ServiceState.RUNNING)
        run = await say.delay("hi")
        assert await run.result(timeout=PROMPTLY) == "hi"
        assert await worker.stop()
    assert worker.state is ServiceState.STOPPED


@pytest.mark.parametrize("caller", ["signal", "thread", "event loop"])
async def test_handle_sigterm_stops_the_worker_gracefully(queue: TaskQueue, caller: str) -> None:
    began, gate = anyio.Event(), anyio.Event()

    @queue.task
    async def hold() -> str:
        began.set()
        await gate.wait()
        return "done"

    worker = TaskWorker(hold)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.start)
            with anyio.fail_after(PROMPTLY):
                await worker.wait_for(ServiceState.RUNNING)
            run = await hold.delay()
            # Begun, not only claimed: a run claimed but not yet begun when the stop
            # comes is handed back at once, as a graceful stop does.
            with anyio.fail_after(PROMPTLY):
                await began.wait()
            if caller == "signal":
                signal.signal(signal.SIGTERM, worker.handle_sigterm)
                os.kill(os.getpid(), signal.SIGTERM)
            elif caller == "thread":
                await anyio.to_thread.run_sync(worker.handle_sigterm, signal.SIGTERM, None)
            else:
                worker.handle_sigterm(signal.SIGTERM, None)
            await wait_until(lambda: worker.should_stop, "stop requested")
            # Graceful: the run in flight finishes before the worker stops.
            assert worker.state is ServiceState.STOPPING
            gate.set()
            with anyio.fail_after(PROMPTLY):
                await worker.wait_for(ServiceState.STOPPED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert await run.result(timeout=PROMPTLY) == "done"


async def test_execute_task_run_runs_that_run_here_now(queue: TaskQueue) -> None:
    gate = anyio.Event()

    @queue.task
    async def hold() -> None:
        await gate.wait()

    @queue.task
    async def say(message: str) -> str:
        return message

    @queue.task
    async def elsewhere() -> None: ...

    async with TaskWorker(hold, say, limit=1) as worker:
        await hold.delay()
        await wait_until(lambda: worker.status()["current"] == 1, "the limit reached")
        run = await say.delay("hi")
        # The claim loop waits for capacity; an explicit request does not.
        assert await worker.execute_task_run(run)
        assert await run.refresh() is RunState.COMPLETED
        assert await run.result(timeout=PROMPTLY) == "hi"
        assert not await worker.execute_task_run(run.id)
        other = await elsewhere.delay()
        with pytest.raises(ValueError, match="of task 'elsewhere', which this worker does not"):
            await worker.execute_task_run(other)
        with pytest.raises(ValueError, match=r"no run '0+'"):
            await worker.execute_task_run("0" * 32)
        gate.set()
    with pytest.raises(RuntimeError, match="needs a running worker"):
        await worker.execute_task_run(run)


async def test_a_task_raising_stop_task_worker_stops_it_and_hands_its_run_back(
    queue: TaskQueue, caplog: pytest.LogCaptureFixture
) -> None:
    @queue.task
    async def quit_now() -> None:
        raise StopTaskWorker

    worker = TaskWorker(quit_now)
    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.start)
            run = await quit_now.delay()
            with anyio.fail_after(PROMPTLY):
                await worker.wait_for(ServiceState.STOPPED)
    assert await run.refresh() is RunState.SCHEDULED
    assert run.attempts == 0
    # A claim already under way when the stop came may take the handed-back run once more,
    # and hands it straight back.
    assert worker.counts["handed_back"] >= 1
    assert (worker.counts["completed"], worker.counts["failed"]) == (0, 0)
    assert "raised StopTaskWorker: stopping" in caplog.text


SERVING_PROCESS = textwrap.dedent(
    """
    import sys

    import anyio

    from anyservice.taskqueue import TaskQueue, serve

    url, backend, how = sys.argv[1:]
    queue = TaskQueue(url)

    @queue.task
    async def say(message: str) -> str:
        return message

    async def main() -> int:
        return await serve(say, status_server_port=0, shutdown_timeout=5)

    if how == "await":
        code = anyio.run(main, backend=backend)
    else:
        code = serve(say, backend=backend, status_server_port=0, shutdown_timeout=5)
    print(f"exit {code}", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("how", ["await", "call"])
async def test_serve_awaited_or_called_prints_one_line_and_stops_on_sigterm(
    tmp_path: Path, anyio_backend_name: str, how: str
) -> None:
    database = tmp_path / "runs.db"
    script = tmp_path / "serving.py"
    script.write_text(SERVING_PROCESS, encoding="utf-8")
    stderr = tmp_path / "stderr.txt"
    command = [sys.executable, str(script), f"sqlite:///{database}", anyio_backend_name, how]
    with open(stderr, "wb") as errors:  # noqa: ASYNC230 - before the process runs
        process = await anyio.open_process(command, stdout=subprocess.PIPE, stderr=errors)
    try:

        def errors_text() -> str:
            return stderr.read_text(encoding="utf-8", errors="replace")

        with anyio.fail_after(STARTUP):
            while "anyservice task worker" not in errors_text():
                assert process.returncode is None, errors_text()
                await anyio.sleep(0.05)
        # Logging is not configured in the process: the line is all it printed.
        (line,) = errors_text().splitlines()
        assert "serving say" in line
        assert f"from {database} (limit 10)" in line
        assert "status: http://127.0.0.1:" in line
        async with TaskQueue(f"sqlite:///{database}") as queue:
            run = await queue.get_run(
                (await queue.broker.submit("say", '{"args":["hi"],"kwargs":{}}')).id
            )
            assert await run.result(timeout=PROMPTLY) == "hi"
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(PROMPTLY):
            assert await process.wait() == 0
        assert process.stdout is not None
        assert (await process.stdout.receive()).decode().strip() == "exit 0"
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
