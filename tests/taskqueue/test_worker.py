"""The worker in-process: running runs, retries, timeouts, limits, leases, stopping, bad rows.

Runs go through a real SQLite file and a real PostgreSQL database where time does not
matter, through a memory broker and PostgreSQL with a fake wall clock where leases must
expire on cue, and through a memory broker on the backend's clock, under ``virtual_time``,
where a test waits for a delay to pass (or for nothing to happen for a while). Real-time
waits are bounded by fail_after.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

from anyservice import ServiceState
from anyservice.taskqueue import (
    MemoryBroker,
    RunRecord,
    RunState,
    SqliteBroker,
    Task,
    TaskQueue,
    TaskRun,
    TaskRunFailed,
    TaskWorker,
    current_run,
    serve,
)
from anyservice.taskqueue._errors import BrokerError
from anyservice.taskqueue._serialize import MAX_NESTING
from anyservice.taskqueue.brokers import broker_from_url
from tests._postgres import postgres_schema

pytestmark = pytest.mark.anyio

#: Bound on every wait for something a worker does promptly.
PROMPTLY = 10.0


class FakeClock:
    """Wall-clock time for a broker, moved only by the test (leases expire on cue)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "postgresql"])
async def clocked_queue(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[TaskQueue]:
    """A queue whose leases and retry delays follow ``clock``."""
    if request.param == "memory":
        async with TaskQueue(broker=MemoryBroker(clock=clock)) as queue:
            yield queue
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        async with TaskQueue(broker=broker_from_url(url, clock=clock)) as queue:
            yield queue


@pytest.fixture
async def virtual_queue() -> AsyncIterator[TaskQueue]:
    """A queue in memory on the backend's clock: with ``virtual_time``, waits cost nothing."""
    async with TaskQueue(broker=MemoryBroker(clock=anyio.current_time)) as queue:
        yield queue


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
async def sqlite_queue(db_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{db_path}") as queue:
        yield queue


@pytest.fixture(params=["sqlite", "postgresql"])
async def queue(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[TaskQueue]:
    """A queue on a real database, where time does not matter."""
    if request.param == "sqlite":
        async with TaskQueue(f"sqlite:///{db_path}") as queue:
            yield queue
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        async with TaskQueue(url) as queue:
            yield queue


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``PROMPTLY`` seconds."""
    with anyio.move_on_after(PROMPTLY):
        while not condition():  # noqa: ASYNC110 - worker state has no event to wait on
            await anyio.sleep(0.005)
        return
    pytest.fail(f"not within {PROMPTLY:g} s: {what}")


@pytest.mark.virtual_time
async def test_wait_until_fails_naming_what_never_happened() -> None:
    with pytest.raises(pytest.fail.Exception, match="not within 10 s: the moon turned blue"):
        await wait_until(lambda: False, "the moon turned blue")
    await wait_until(lambda: True, "already true")


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``await check()`` until true, for at most ``PROMPTLY`` seconds."""
    with anyio.fail_after(PROMPTLY):
        while not await check():  # noqa: ASYNC110 - the broker's rows have no event either
            await anyio.sleep(0.005)


async def state_of(queue: TaskQueue, run_id: str) -> RunState:
    record = await queue.broker.get(run_id)
    assert record is not None
    return record.state


# ------------------------------------------------------------------ running runs


async def test_async_task_result_comes_back_through_the_database(queue: TaskQueue) -> None:
    @queue.task
    async def say(message: str, *, loud: bool = False) -> dict[str, Any]:
        return {"said": message.upper() if loud else message, "tuple": (1, 2)}

    async with TaskWorker(say) as worker:
        run = await say.delay("hi", loud=True)
        assert await run.result(timeout=PROMPTLY) == {"said": "HI", "tuple": [1, 2]}
        assert (run.state, run.attempts) == (RunState.COMPLETED, 1)
    # The waiter may wake before the worker has counted the run: count once it stopped.
    assert worker.counts["completed"] == 1
    assert worker.state is ServiceState.STOPPED


async def test_sync_task_runs_in_a_worker_thread(queue: TaskQueue) -> None:
    @queue.task
    def where() -> int:
        return threading.get_ident()

    async with TaskWorker(where):
        run = await where.delay()
        assert await run.result(timeout=PROMPTLY) != threading.get_ident()


async def test_a_task_knows_which_run_it_executes(queue: TaskQueue) -> None:
    contexts: list[object] = []

    @queue.task
    async def who() -> list[Any]:
        context = current_run()
        assert context is not None
        # One object for the whole attempt: in the tasks the body starts too.
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: anyio.to_thread.run_sync(lambda: contexts.append(current_run()))
            )
        contexts.extend([context, current_run()])
        return [context.run_id, context.task, context.attempt, context.worker]

    @queue.task
    def who_in_a_thread() -> str | None:
        context = current_run()
        assert context is current_run()
        return None if context is None else context.run_id

    async with TaskWorker(who, who_in_a_thread) as worker:
        run = await who.delay()
        assert await run.result(timeout=PROMPTLY) == [run.id, "who", 1, worker.client_id]
        threaded = await who_in_a_thread.delay()
        assert await threaded.result(timeout=PROMPTLY) == threaded.id
        again = await who.delay()
        assert await again.result(timeout=PROMPTLY) == [again.id, "who", 1, worker.client_id]
    first, second = contexts[:3], contexts[3:]
    assert all(context is first[0] for context in first)
    assert all(context is second[0] for context in second)
    assert first[0] is not second[0]


async def test_a_failed_run_carries_the_exception_type_message_and_traceback(
    queue: TaskQueue,
) -> None:
    @queue.task
    async def divide(a: int, b: int) -> float:
        return a / b

    async with TaskWorker(divide):
        run = await divide.delay(1, 0)
        with pytest.raises(TaskRunFailed) as caught:
            await run.result(timeout=PROMPTLY)
    failure = caught.value
    assert (failure.state, failure.attempts) == (RunState.FAILED, 1)
    assert (failure.error_type, failure.error_message) == ("ZeroDivisionError", "division by zero")
    assert "return a / b" in failure.traceback
    # The traceback starts at the task's own code, not in the worker or the event loop.
    assert failure.traceback.count("File ") == 1
    assert str(failure).startswith(
        f"run {run.id} of task 'divide' FAILED after 1 attempt: "
        "ZeroDivisionError: division by zero\n\nTraceback in the worker:\nTraceback"
    )


async def test_a_sync_task_failure_keeps_only_the_task_frames(queue: TaskQueue) -> None:
    @queue.task
    def boom() -> None:
        raise KeyError("nope")

    async with TaskWorker(boom):
        run = await boom.delay()
        with pytest.raises(TaskRunFailed, match="KeyError: 'nope'") as caught:
            await run.result(timeout=PROMPTLY)
    assert caught.value.traceback.count("File ") == 1


async def test_failures_are_retried_until_one_succeeds(queue: TaskQueue) -> None:
    @queue.task(retries=3)
    async def flaky() -> int:
        context = current_run()
        assert context is not None
        if context.attempt < 3:
            raise ConnectionError(f"attempt {context.attempt} failed")
        return context.attempt

    async with TaskWorker(flaky) as worker:
        run = await flaky.delay()
        assert await run.result(timeout=PROMPTLY) == 3
    assert (run.attempts, run.record.retries_left) == (3, 1)
    assert run.error is None
    assert (worker.counts["retried"], worker.counts["completed"]) == (2, 1)


async def test_a_run_out_of_retries_fails_with_its_last_error(queue: TaskQueue) -> None:
    @queue.task(retries=1)
    async def hopeless() -> None:
        context = current_run()
        assert context is not None
        raise ValueError(f"no luck on attempt {context.attempt}")

    async with TaskWorker(hopeless):
        run = await hopeless.delay()
        with pytest.raises(TaskRunFailed, match="FAILED after 2 attempts: ValueError: no luck on"):
            await run.result(timeout=PROMPTLY)
    assert run.error is not None
    assert run.error.message == "no luck on attempt 2"


@pytest.mark.virtual_time
async def test_a_retry_waits_for_its_delay(virtual_queue: TaskQueue) -> None:
    queue = virtual_queue
    failures: list[float] = []

    @queue.task(retries=1, retry_delay=60)
    async def flaky() -> str:
        context = current_run()
        assert context is not None
        if context.attempt == 1:
            failures.append(anyio.current_time())
            raise ConnectionError("down")
        return "up"

    async with TaskWorker(flaky):
        run = await flaky.delay()

        async def failed_once() -> bool:
            return await run.refresh() is RunState.SCHEDULED and run.error is not None

        await eventually(failed_once)
        due = run.record.scheduled_at
        assert failures[0] + 60 <= due < failures[0] + 61
        await anyio.sleep(due - 0.1 - anyio.current_time())
        assert await run.refresh() is RunState.SCHEDULED  # not due: not claimed
        assert await run.result(timeout=PROMPTLY) == "up"
        assert anyio.current_time() >= due


async def test_an_async_run_past_its_timeout_fails_with_a_timeout_error(queue: TaskQueue) -> None:
    cancelled = anyio.Event()

    @queue.task(timeout=0.05)
    async def slow() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with TaskWorker(slow):
        run = await slow.delay()
        with pytest.raises(TaskRunFailed) as caught:
            await run.result(timeout=PROMPTLY)
    assert cancelled.is_set()
    assert caught.value.error_type == "anyservice.taskqueue.TaskTimeoutError"
    assert caught.value.error_message == "task 'slow' took longer than its timeout of 0.05 s"
    assert caught.value.traceback == ""


async def test_a_timed_out_run_is_retried(queue: TaskQueue) -> None:
    @queue.task(timeout=0.05, retries=1)
    async def slow_once() -> int:
        context = current_run()
        assert context is not None
        if context.attempt == 1:
            await anyio.sleep_forever()
        return context.attempt

    async with TaskWorker(slow_once):
        run = await slow_once.delay()
        assert await run.result(timeout=PROMPTLY) == 2


async def test_a_sync_run_past_its_timeout_fails_and_its_thread_is_left_to_finish(
    queue: TaskQueue,
) -> None:
    release = threading.Event()
    finished = threading.Event()

    @queue.task(timeout=0.05)
    def stuck() -> str:
        release.wait(PROMPTLY)
        finished.set()
        return "too late"

    try:
        async with TaskWorker(stuck):
            run = await stuck.delay()
            with pytest.raises(TaskRunFailed, match="left running to finish") as caught:
                await run.result(timeout=PROMPTLY)
            assert caught.value.error_type == "anyservice.taskqueue.TaskTimeoutError"
            assert not finished.is_set()  # FAILED while the thread still runs
    finally:
        release.set()
    await anyio.to_thread.run_sync(finished.wait, PROMPTLY)
    assert await run.refresh() is RunState.FAILED  # its late result is discarded


async def test_a_result_that_is_not_json_fails_the_run_without_retrying(
    queue: TaskQueue,
) -> None:
    @queue.task(retries=3)
    async def make_set() -> set[int]:
        return {1}

    async with TaskWorker(make_set):
        run = await make_set.delay()
        with pytest.raises(
            TaskRunFailed, match="result of task 'make_set' is not JSON-serialisable: set"
        ):
            await run.result(timeout=PROMPTLY)
    assert run.attempts == 1


async def test_arguments_nested_to_the_limit_run_and_one_level_more_is_refused_at_delay(
    queue: TaskQueue,
) -> None:
    @queue.task
    async def depth(value: Any) -> list[Any]:
        levels = 0
        while isinstance(value, list):
            levels, value = levels + 1, value[0] if value else None
        return [levels, value]

    def nested(levels: int) -> list[Any]:
        value: list[Any] = []
        for _ in range(levels - 1):
            value = [value]
        return value

    async with TaskWorker(depth):
        run = await depth.delay(nested(MAX_NESTING))
        assert await run.result(timeout=PROMPTLY) == [MAX_NESTING, None]
    with pytest.raises(
        TypeError,
        match=f"^argument 'value' of task 'depth' is not JSON-serialisable: nested deeper than "
        f"{MAX_NESTING} lists and objects$",
    ):
        await depth.delay(nested(MAX_NESTING + 1))
    assert (await queue.counts())[RunState.SCHEDULED] == 0


async def test_a_sync_task_can_submit_another_run(queue: TaskQueue) -> None:
    @queue.task
    async def child(n: int) -> int:
        return n + 1

    @queue.task
    def parent() -> str:
        return child.delay_sync(41).id

    async with TaskWorker(parent, child):
        child_id = await (await parent.delay()).result(timeout=PROMPTLY)
        child_run = await queue.get_run(child_id)
        assert await child_run.result(timeout=PROMPTLY) == 42


# ------------------------------------------------------------------ limits


@contextlib.asynccontextmanager
async def ten_runs_three_claimed_ahead(
    task: Task[[], None],
) -> AsyncIterator[tuple[TaskWorker, list[TaskRun[None]]]]:
    """A worker (limit 2, prefetch 3) with ten runs of ``task``, three claimed ahead; on
    exit, all ten completed."""
    async with TaskWorker(task, limit=2, prefetch=3) as worker:
        runs = [await task.delay() for _ in range(10)]
        await wait_until(lambda: worker.status()["prefetched"] == 3, "three runs claimed ahead")
        yield worker, runs
        for run in runs:
            await run.wait(timeout=PROMPTLY)
    assert worker.counts["completed"] == 10


@pytest.mark.virtual_time
async def test_limit_bounds_the_runs_in_flight_runs_claimed_ahead_included(
    virtual_queue: TaskQueue,
) -> None:
    queue = virtual_queue
    gate = anyio.Event()
    running = most = 0

    @queue.task
    async def hold() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await gate.wait()
        running -= 1

    async with ten_runs_three_claimed_ahead(hold) as (worker, runs):
        # A minute of the worker polling for work, in virtual time: no third run starts.
        await anyio.sleep(60)
        assert running == 2
        states = [await state_of(queue, run.id) for run in runs]
        # Claimed ahead: leased and RUNNING, held by this worker, not yet started.
        assert states.count(RunState.RUNNING) == 5
        assert states.count(RunState.SCHEDULED) == 5
        status = worker.status()
        assert (status["current"], status["available"], status["limit"]) == (2, 0, 2)
        assert (status["prefetch"], status["prefetched"], len(status["in_flight"])) == (3, 3, 5)
        gate.set()
    assert most == 2


async def test_no_limit_runs_everything_at_once(queue: TaskQueue) -> None:
    gate = anyio.Event()
    running = 0

    @queue.task
    async def hold() -> None:
        nonlocal running
        running += 1
        await gate.wait()

    async with TaskWorker(hold, limit=None) as worker:
        runs = [await hold.delay() for _ in range(30)]
        await wait_until(lambda: running == 30, "all runs in flight")
        assert worker.status()["available"] is None
        gate.set()
        for run in runs:
            await run.wait(timeout=PROMPTLY)


# ------------------------------------------------------------------ prefetch


@pytest.mark.parametrize(
    ("options", "prefetch"),
    [
        ({}, 10),
        ({"limit": 1}, 1),
        ({"limit": 50}, 50),
        ({"limit": 60}, 40),
        ({"limit": 100}, 0),
        ({"limit": 500}, 0),
        ({"limit": None}, 0),
        ({"limit": None, "prefetch": 7}, 0),
        ({"limit": 10, "prefetch": 0}, 0),
        ({"limit": 10, "prefetch": 500}, 500),
    ],
)
async def test_prefetch_defaults_to_the_limit_up_to_100_runs_a_claim(
    virtual_queue: TaskQueue, options: dict[str, Any], prefetch: int
) -> None:
    @virtual_queue.task
    async def say() -> None: ...

    assert TaskWorker(say, **options).prefetch == prefetch


async def test_sync_runs_claimed_ahead_wait_their_turn_within_the_limit(
    queue: TaskQueue,
) -> None:
    gate = threading.Event()
    lock = threading.Lock()
    running = most = 0

    @queue.task
    def hold() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait(PROMPTLY)
        with lock:
            running -= 1

    async with ten_runs_three_claimed_ahead(hold):
        await wait_until(lambda: running == 2, "two bodies running")
        gate.set()
    assert most == 2


async def test_a_stop_hands_back_the_runs_claimed_ahead_at_once(
    queue: TaskQueue, caplog: pytest.LogCaptureFixture
) -> None:
    started, gate = anyio.Event(), anyio.Event()

    @queue.task
    async def hold() -> str:
        started.set()
        await gate.wait()
        return "done"

    async with TaskWorker(hold, limit=1, prefetch=2, shutdown_timeout=PROMPTLY) as worker:
        first = await hold.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        ahead = [await hold.delay() for _ in range(2)]
        await wait_until(lambda: worker.status()["prefetched"] == 2, "two runs claimed ahead")
        async with anyio.create_task_group() as group:
            caplog.set_level(logging.INFO, logger="anyservice")
            group.start_soon(worker.stop)

            async def handed_back() -> bool:
                states = [await state_of(queue, run.id) for run in ahead]
                return states == [RunState.SCHEDULED] * 2

            # Not kept until the run in flight finishes: another worker may take them now.
            await eventually(handed_back)
            assert await state_of(queue, first.id) is RunState.RUNNING
            gate.set()
    assert worker.state is ServiceState.STOPPED
    assert await first.result(timeout=PROMPTLY) == "done"
    for run in ahead:
        record = await queue.broker.get(run.id)
        assert record is not None
        assert (record.state, record.attempts, record.lease_owner) == (RunState.SCHEDULED, 0, None)
    assert worker.counts["handed_back"] == 2
    assert worker.counts["completed"] == 1
    # Routine, not a warning: they never started.
    handed = [r for r in caplog.records if "handed back before it started" in r.getMessage()]
    assert [record.levelno for record in handed] == [logging.INFO] * 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"limit": 0}, ValueError, "limit must be an int >= 1, got 0"),
        ({"limit": -3}, ValueError, "limit must be an int >= 1"),
        ({"limit": 2**63}, ValueError, "limit must be an int <= 2147483647"),
        ({"limit": 2.5}, TypeError, "limit must be an int, got 2.5"),
        ({"limit": True}, TypeError, "limit must be an int, got True"),
        ({"lease_seconds": 0}, ValueError, "lease_seconds must be a finite number of seconds > 0"),
        ({"lease_seconds": 1e-9}, ValueError, "lease_seconds must be at least 0.05 seconds"),
        ({"lease_seconds": math.inf}, ValueError, "lease_seconds must be a finite number"),
        ({"lease_seconds": [30]}, TypeError, "lease_seconds must be a number"),
        ({"status_server_port": -1}, ValueError, "status_server_port must be an int >= 0"),
        ({"status_server_port": 70000}, ValueError, "status_server_port must be an int <= 65535"),
        ({"status_server_port": "8080"}, TypeError, "status_server_port must be an int"),
        ({"status_server_host": 123}, TypeError, "status_server_host must be a host name"),
        ({"status_server_host": ""}, ValueError, "status_server_host must be a non-empty"),
        ({"shutdown_timeout": -1}, ValueError, "shutdown_timeout"),
        ({"shutdown_timeout": math.inf}, ValueError, "shutdown_timeout must be a finite number"),
        ({"prefetch": -1}, ValueError, "TaskWorker: prefetch must be an int >= 0, got -1"),
        ({"prefetch": 2.5}, TypeError, "TaskWorker: prefetch must be an int, got 2.5"),
        ({"prefetch": "4"}, TypeError, "TaskWorker: prefetch must be an int"),
    ],
)
async def test_bad_worker_options_are_refused(
    queue: TaskQueue, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    @queue.task
    async def say() -> None: ...

    with pytest.raises(error, match=message):
        TaskWorker(say, **kwargs)


async def test_a_worker_needs_tasks_of_one_queue(queue: TaskQueue) -> None:
    other = TaskQueue("memory://")

    @queue.task
    async def say() -> None: ...

    @other.task
    async def shout() -> None: ...

    with pytest.raises(TypeError, match=r"give the tasks to serve"):
        TaskWorker()
    with pytest.raises(TypeError, match=r"is not a task; decorate it with @queue\.task"):
        TaskWorker(say, print)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different queues"):
        TaskWorker(say, shout)


async def test_serve_refuses_an_unknown_backend_before_running_anything(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    with pytest.raises(ValueError, match="backend must be one of 'asyncio', 'trio', got 'curio'"):
        serve(say, backend="curio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        serve(say, limit=0)
    with pytest.raises(ValueError, match="prefetch must be an int >= 0, got -2"):
        serve(say, prefetch=-2)


async def test_worker_durations_may_be_timedeltas_or_numeric_strings(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    worker = TaskWorker(say, lease_seconds=datetime.timedelta(minutes=1), shutdown_timeout="5")
    assert (worker.lease_seconds, worker.shutdown_timeout) == (60.0, 5.0)


# ------------------------------------------------------------------ stopping


async def test_stop_lets_a_run_in_flight_finish(queue: TaskQueue) -> None:
    started = anyio.Event()

    @queue.task
    async def work() -> str:
        started.set()
        await anyio.sleep(0.2)
        return "done"

    worker = TaskWorker(work, shutdown_timeout=PROMPTLY)
    async with worker:
        run = await work.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        assert await worker.stop()
        assert worker.state is ServiceState.STOPPED
    assert await run.refresh() is RunState.COMPLETED
    assert (run.attempts, await run.result()) == (1, "done")


async def test_stop_claims_nothing_new(queue: TaskQueue) -> None:
    started = anyio.Event()

    @queue.task
    async def work() -> None:
        started.set()
        await anyio.sleep(0.1)

    async with TaskWorker(work, limit=1, shutdown_timeout=PROMPTLY) as worker:
        first = await work.delay()
        second = await work.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        assert await worker.stop()
    assert await first.refresh() is RunState.COMPLETED
    assert await second.refresh() is RunState.SCHEDULED
    assert second.attempts == 0


async def test_at_the_stop_deadline_a_run_is_handed_back_at_once(
    queue: TaskQueue, caplog: pytest.LogCaptureFixture
) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    @queue.task
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    worker = TaskWorker(endless, shutdown_timeout=0.1)
    with caplog.at_level(logging.WARNING, logger="anyservice"):
        async with worker:
            run = await endless.delay()
            with anyio.fail_after(PROMPTLY):
                await started.wait()
            assert await worker.stop()
    assert cancelled.is_set()
    record = await queue.broker.get(run.id)
    assert record is not None
    # Handed back, not left to its 30 s lease: claimable now, the attempt not counted.
    assert (record.state, record.attempts, record.lease_owner) == (RunState.SCHEDULED, 0, None)
    assert worker.counts["handed_back"] == 1
    assert "handed back unfinished (its worker was cancelled)" in caplog.text


async def test_a_sync_task_that_checks_for_cancellation_is_handed_back_at_the_deadline(
    queue: TaskQueue,
) -> None:
    started = threading.Event()

    @queue.task
    def cooperative() -> None:
        started.set()
        while True:
            anyio.from_thread.check_cancelled()
            time.sleep(0.005)

    async with TaskWorker(cooperative, shutdown_timeout=0.1) as worker:
        run = await cooperative.delay()
        await anyio.to_thread.run_sync(started.wait, PROMPTLY)
        assert await worker.stop()
    assert await run.refresh() is RunState.SCHEDULED
    assert (run.attempts, worker.counts["handed_back"]) == (0, 1)


async def test_a_handed_back_run_is_finished_by_the_next_worker(queue: TaskQueue) -> None:
    first_attempt = anyio.Event()

    @queue.task
    async def patient() -> int:
        context = current_run()
        assert context is not None
        if not first_attempt.is_set():
            first_attempt.set()
            await anyio.sleep_forever()
        return context.attempt

    async with TaskWorker(patient, shutdown_timeout=0.05) as worker:
        run = await patient.delay()
        with anyio.fail_after(PROMPTLY):
            await first_attempt.wait()
        await worker.stop()
    async with TaskWorker(patient):
        assert await run.result(timeout=PROMPTLY) == 1  # the handed-back claim did not count


async def test_an_idle_worker_stops_without_waiting_for_its_grace_period(
    queue: TaskQueue,
) -> None:
    @queue.task
    async def say() -> None: ...

    worker = TaskWorker(say, shutdown_timeout=3600)
    async with worker:
        await (await say.delay()).wait(timeout=PROMPTLY)
        with anyio.fail_after(PROMPTLY):
            assert await worker.stop()


# ------------------------------------------------------------------ leases


async def steal(queue: TaskQueue, clock: FakeClock, task: str) -> None:
    """Play another worker that takes a run over once its lease has expired."""
    with anyio.fail_after(PROMPTLY):
        while True:
            clock.now += 3600
            if await queue.broker.claim("thief", [task], limit=1, lease_seconds=3600):
                return
            await anyio.sleep(0.01)


async def test_a_run_whose_lease_is_lost_is_cancelled_here(
    clocked_queue: TaskQueue, clock: FakeClock
) -> None:
    queue = clocked_queue
    started, cancelled = anyio.Event(), anyio.Event()

    @queue.task
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with TaskWorker(endless, lease_seconds=0.06) as worker:
        run = await endless.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        await steal(queue, clock, "endless")
        with anyio.fail_after(PROMPTLY):
            await cancelled.wait()
        await wait_until(lambda: not worker.status()["current"], "run forgotten")
        assert worker.state is ServiceState.RUNNING
        # Once a lease expired the worker itself may have claimed the run again before the
        # thief did: each of its attempts was lost, and the thief holds the last.
        record = await queue.broker.get(run.id)
        assert record is not None
        assert (record.state, record.lease_owner) == (RunState.RUNNING, "thief")
        assert worker.counts["lost"] == record.attempts - 1 >= 1


async def test_a_thread_that_lost_its_lease_records_nothing(
    clocked_queue: TaskQueue, clock: FakeClock
) -> None:
    queue = clocked_queue
    started, release = threading.Event(), threading.Event()

    @queue.task
    def blocking() -> str:
        started.set()
        release.wait(PROMPTLY)
        return "late"

    try:
        async with TaskWorker(blocking, lease_seconds=0.06) as worker:
            run = await blocking.delay()
            await anyio.to_thread.run_sync(started.wait, PROMPTLY)
            await steal(queue, clock, "blocking")
            await wait_until(lambda: worker.counts["lost"] >= 1, "lease loss noticed")
            release.set()
            await wait_until(lambda: not worker.status()["current"], "thread returned")
    finally:
        release.set()
    record = await queue.broker.get(run.id)
    assert record is not None
    assert (record.state, record.lease_owner, record.result) == (RunState.RUNNING, "thief", None)


async def test_leases_are_renewed_while_a_run_is_in_flight(
    clocked_queue: TaskQueue, clock: FakeClock
) -> None:
    queue = clocked_queue
    started, gate = anyio.Event(), anyio.Event()

    @queue.task
    async def hold() -> None:
        started.set()
        await gate.wait()

    # Long enough that a heartbeat on a loaded machine (every lease / 3 of real time)
    # renews it in time: a lease the worker saw run out would make it drop the outcome.
    lease = 1.5
    async with TaskWorker(hold, limit=1, prefetch=1, lease_seconds=lease) as worker:
        run = await hold.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        # Claimed ahead of the limit: it waits for the run in flight, leased all the same.
        ahead = await hold.delay()
        await wait_until(lambda: worker.status()["prefetched"] == 1, "a run claimed ahead")
        first = (await queue.broker.get(run.id)).lease_expires_at  # type: ignore[union-attr]
        clock.now += 1

        async def renewed() -> bool:
            records = [await queue.broker.get(one.id) for one in (run, ahead)]
            expiries = {record.lease_expires_at for record in records if record is not None}
            return expiries == {clock.now + lease}

        await eventually(renewed)
        assert first == clock.now - 1 + lease
        gate.set()
        await run.wait(timeout=PROMPTLY)
        await ahead.wait(timeout=PROMPTLY)
    assert (run.state, ahead.state, ahead.attempts) == (RunState.COMPLETED,) * 2 + (1,)


async def test_a_run_that_keeps_killing_workers_ends_crashed() -> None:
    clock = FakeClock()
    queue = TaskQueue(broker=MemoryBroker(clock=clock), max_attempts=2)

    @queue.task
    async def deadly() -> None: ...

    run = await deadly.delay()
    for dead_worker in ("dead-1", "dead-2"):
        assert await queue.broker.claim(dead_worker, ["deadly"], limit=1, lease_seconds=1)
        clock.now += 2  # the worker died: its lease expires
    async with TaskWorker(deadly):
        with pytest.raises(TaskRunFailed, match="CRASHED after 2 attempts: RunAbandonedError"):
            await run.result(timeout=PROMPTLY)


async def test_two_workers_on_one_queue_run_each_run_once(queue: TaskQueue) -> None:
    ran: list[str] = []

    @queue.task
    async def record() -> None:
        context = current_run()
        assert context is not None
        ran.append(context.run_id)
        await anyio.lowlevel.checkpoint()

    async with TaskWorker(record, name="one"), TaskWorker(record, name="two"):
        runs = [await record.delay() for _ in range(200)]
        for run in runs:
            await run.wait(timeout=PROMPTLY)
    assert sorted(ran) == sorted(run.id for run in runs)


# ------------------------------------------------------------------ bad rows, bad storage


async def test_an_undecodable_payload_fails_that_run_and_the_worker_goes_on(
    queue: TaskQueue,
) -> None:
    @queue.task
    async def say(message: str) -> str:
        return message

    async with TaskWorker(say) as worker:
        corrupt = await queue.broker.submit("say", '{"args": ["unterminated"')
        with pytest.raises(TaskRunFailed, match="run arguments is not valid JSON") as caught:
            await (await queue.get_run(corrupt.id)).result(timeout=PROMPTLY)
        assert caught.value.error_type == "anyservice.taskqueue.PayloadError"
        assert await (await say.delay("still here")).result(timeout=PROMPTLY) == "still here"
        assert worker.state is ServiceState.RUNNING


async def test_a_corrupt_row_fails_that_run_and_the_worker_goes_on(
    sqlite_queue: TaskQueue, db_path: Path
) -> None:
    queue = sqlite_queue

    @queue.task
    async def say(message: str) -> str:
        return message

    gate = anyio.Event()

    @queue.task
    async def blocker() -> None:
        await gate.wait()

    async with TaskWorker(say, blocker, limit=1) as worker:
        busy = await blocker.delay()  # keeps the worker from claiming the next run yet

        async def busy_running() -> bool:
            return await state_of(queue, busy.id) is RunState.RUNNING

        await eventually(busy_running)
        corrupt = await say.delay("x")
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            conn.execute("UPDATE anyservice_runs SET attempts = 'many' WHERE id = ?", (corrupt.id,))
            conn.commit()
        gate.set()
        with pytest.raises(TaskRunFailed, match=r"CorruptRunError: .*attempts 'many'"):
            await (await queue.get_run(corrupt.id)).result(timeout=PROMPTLY)
        assert await (await say.delay("fine")).result(timeout=PROMPTLY) == "fine"
        assert worker.state is ServiceState.RUNNING


@contextlib.contextmanager
def database_locked(path: Path) -> Iterator[None]:
    """Hold the file's write lock, as another process in a long transaction would."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


class ClaimCountingBroker(SqliteBroker):
    """A SQLite broker that counts the claims tried through it."""

    claims = 0

    async def claim(
        self,
        owner: str,
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> list[RunRecord]:
        self.claims += 1
        return await super().claim(
            owner, tasks, limit=limit, lease_seconds=lease_seconds, concurrency=concurrency
        )


async def test_a_locked_database_never_crashes_the_worker(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = ClaimCountingBroker(db_path, lock_timeout=0.05)
    queue = TaskQueue(broker=broker)

    @queue.task
    async def say(message: str) -> str:
        return message

    with caplog.at_level(logging.WARNING, logger="anyservice"):
        async with TaskWorker(say) as worker:
            due = time.time() + 0.1
            run = await queue.broker.submit("say", '{"args":["hi"],"kwargs":{}}', scheduled_at=due)
            with database_locked(db_path):
                await wait_until(lambda: worker.healthz()[0] is False, "broker trouble seen")
                assert "database is locked" in worker.healthz()[1]["reason"]
                # The worker goes on claiming (and meeting the lock) after the failure.
                seen = broker.claims
                await wait_until(lambda: broker.claims > seen + 2, "claims tried again")
                assert worker.state is ServiceState.RUNNING
            assert await (await queue.get_run(run.id)).result(timeout=PROMPTLY) == "hi"
            await wait_until(lambda: worker.healthz()[0], "healthy again")
    assert "broker error while claiming runs" in caplog.text


@pytest.mark.parametrize(
    ("lease", "attempts"),
    [
        # Locked out for less than the lease: the record is retried until it lands.
        (30.0, 1),
        # Locked out past the lease: the worker gives up at its end, and this very worker
        # claims the run again as a new attempt.
        (1.0, 2),
    ],
)
async def test_a_record_locked_out_is_retried_while_the_lease_lasts_then_run_again(
    db_path: Path, lease: float, attempts: int
) -> None:
    queue = TaskQueue(broker=SqliteBroker(db_path, lock_timeout=0.05))
    finishing, locked = anyio.Event(), anyio.Event()

    @queue.task
    async def say(message: str) -> str:
        context = current_run()
        if context is not None and context.attempt == 1:
            finishing.set()
            await locked.wait()
        return message

    async with TaskWorker(say, lease_seconds=lease) as worker:
        run = await say.delay("hi")
        with anyio.fail_after(PROMPTLY):
            await finishing.wait()
        # Another connection holds the write lock (a real one, as another process's long
        # transaction would): neither the record nor a renewal can get through.
        with database_locked(db_path):
            locked.set()
            await wait_until(lambda: worker.healthz()[0] is False, "the record meets the lock")
            assert str(db_path) in worker.healthz()[1]["reason"]
            if attempts > 1:
                await wait_until(lambda: worker.counts["not_recorded"] == 1, "record given up")
            assert await state_of(queue, run.id) is RunState.RUNNING
        assert await run.result(timeout=PROMPTLY) == "hi"
        assert (run.record.attempts, run.record.lease_owner) == (attempts, None)
        await wait_until(lambda: worker.counts["completed"] == 1, "the outcome counted")
        assert worker.counts["not_recorded"] == attempts - 1
        await wait_until(lambda: worker.healthz()[0], "healthy again")


def remove_database(path: Path, replacement: Path | None) -> None:
    """Delete the database file (and its WAL and SHM files), or move ``replacement`` over it.

    The move is one rename, as restoring a backup over the file would be: a worker
    checking the file meanwhile sees the old file or the new one, never no file (which
    it would rightly report deleted).
    """
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if replacement is None:
        path.unlink()
    else:
        replacement.replace(path)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_worker_whose_database_file_goes_away_reports_unhealthy_naming_it(
    db_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = TaskQueue(f"sqlite:///{db_path}")

    @queue.task
    async def say() -> None: ...

    with caplog.at_level(logging.WARNING, logger="anyservice"):
        async with TaskWorker(say) as worker:
            assert worker.healthz()[0]
            other = db_path.with_name("other.db")
            if how == "replaced":
                async with SqliteBroker(other):
                    pass
            remove_database(db_path, replacement=other if how == "replaced" else None)
            await wait_until(lambda: worker.healthz()[0] is False, "the file's loss noticed")
            reason = worker.healthz()[1]["reason"]
            assert f"SQLite database {db_path} was {how}" in reason
    assert f"SQLite database {db_path} was {how}" in caplog.text


# ------------------------------------------------------------------ retention


async def test_a_worker_purges_the_runs_its_queue_no_longer_keeps(clock: FakeClock) -> None:
    queue = TaskQueue(broker=MemoryBroker(clock=clock), retention=60)

    @queue.task
    async def say() -> None: ...

    async with queue:
        old = await say.delay()
        assert await old.cancel()
        clock.now += 61
        recent = await say.delay()
        assert await recent.cancel()

        async with TaskWorker(say):

            async def purged() -> bool:
                return await queue.broker.get(old.id) is None

            await eventually(purged)
        assert await queue.broker.get(recent.id) is not None


class HeartbeatCountingBroker(MemoryBroker):
    """A memory broker on the backend's clock that counts the heartbeats sent to it."""

    def __init__(self) -> None:
        super().__init__(clock=anyio.current_time)
        self.heartbeats = 0

    async def heartbeat(
        self, owner: str, leases: Mapping[str, int], *, lease_seconds: float
    ) -> set[str]:
        self.heartbeats += 1
        return await super().heartbeat(owner, leases, lease_seconds=lease_seconds)


@pytest.mark.virtual_time
async def test_leases_are_renewed_once_an_interval_not_at_every_batch_of_runs() -> None:
    broker = HeartbeatCountingBroker()
    async with TaskQueue(broker=broker) as queue:

        @queue.task
        async def brief(seconds: float) -> None:
            await anyio.sleep(seconds)

        # Renewals every 10 s; fifty short runs one at a time take 5 s in all, and the
        # worker drains after each: nothing needs renewing.
        async with TaskWorker(brief, limit=1, lease_seconds=30):
            runs = await brief.map([0.1] * 50)
            for run in runs:
                await run.wait(timeout=PROMPTLY)
            assert broker.heartbeats == 0
            # A run of 25 s is renewed at 10 s and 20 s.
            await (await brief.delay(25)).wait(timeout=60)
            assert broker.heartbeats == 2


class CompletionCountingBroker(MemoryBroker):
    """A memory broker that counts the calls recording results, and the results in each;
    its first ``refusals`` claims that carry results fail, storing nothing."""

    def __init__(self, refusals: int = 0) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.singles = 0
        self.refusals = refusals

    async def complete_many(self, owner: str, results: Mapping[str, tuple[int, str]]) -> set[str]:
        self.batches.append(len(results))
        return await super().complete_many(owner, results)

    async def complete_and_claim(
        self,
        owner: str,
        results: Mapping[str, tuple[int, str]],
        tasks: Collection[str],
        **options: Any,
    ) -> tuple[set[str], list[RunRecord]]:
        if results and self.refusals:
            self.refusals -= 1
            raise BrokerError("the storage is unavailable")
        if results:
            self.batches.append(len(results))
        return await super().complete_and_claim(owner, results, tasks, **options)

    async def complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        self.singles += 1
        return await super().complete(owner, run_id, attempt, result)


@pytest.mark.virtual_time
async def test_runs_that_finish_together_are_recorded_in_one_broker_call() -> None:
    broker = CompletionCountingBroker()
    async with TaskQueue(broker=broker) as queue:

        @queue.task
        async def double(number: int) -> int:
            return 2 * number

        runs = await double.map(range(20))
        async with TaskWorker(double, limit=20):
            assert [await run.result(timeout=PROMPTLY) for run in runs] == [
                2 * number for number in range(20)
            ]
        # Claimed at once, the twenty no-op runs finish in one pass of the event loop.
        assert (broker.batches, broker.singles) == ([20], 0)
        for run in runs:
            stored = await broker.get(run.id)
            assert stored is not None
            assert stored.state is RunState.COMPLETED


@pytest.mark.virtual_time
async def test_a_run_finishing_later_is_recorded_without_waiting_for_the_others() -> None:
    broker = CompletionCountingBroker()
    async with TaskQueue(broker=broker) as queue:
        release = anyio.Event()

        @queue.task
        async def wait_for(held: bool) -> bool:
            if held:
                await release.wait()
            return held

        quick, held = await wait_for.map([False, True])
        async with TaskWorker(wait_for, limit=2):
            assert await quick.result(timeout=PROMPTLY) is False
            assert broker.batches == [1]
            release.set()
            assert await held.result(timeout=PROMPTLY) is True
        assert broker.batches == [1, 1]


# --- runners that do not wait for their run's record -----------------------------------------


class _GatedBroker(MemoryBroker):
    """A memory broker whose recording of results waits for a gate (on its own or with
    the next claim): results stay in the worker's batch, unrecorded, for as long as a
    test needs."""

    def __init__(self) -> None:
        super().__init__(clock=anyio.current_time)
        self.gate = anyio.Event()
        self.batches: list[set[str]] = []

    async def complete_many(self, owner: str, results: Mapping[str, tuple[int, str]]) -> set[str]:
        await self.gate.wait()
        done = await super().complete_many(owner, results)
        self.batches.append(done)
        return done

    async def complete_and_claim(
        self,
        owner: str,
        results: Mapping[str, tuple[int, str]],
        tasks: Collection[str],
        **options: Any,
    ) -> tuple[set[str], list[RunRecord]]:
        if results:
            await self.gate.wait()
        done, claimed = await super().complete_and_claim(owner, results, tasks, **options)
        if results:
            self.batches.append(done)
        return done, claimed


@pytest.mark.virtual_time
async def test_a_runner_takes_its_next_run_while_the_last_ones_result_is_recorded() -> None:
    broker = _GatedBroker()
    async with TaskQueue(broker=broker) as queue:
        second_started = anyio.Event()

        @queue.task
        async def first() -> str:
            return "first"

        @queue.task
        async def second() -> str:
            second_started.set()
            return "second"

        # Claimed together; the first's result waits at the gate, and its runner went on
        # to the second meanwhile (a second runner starts only for runs that wait).
        one, two = await first.delay(), await second.delay()
        async with TaskWorker(first, second, limit=2) as worker:
            with anyio.fail_after(30):
                await second_started.wait()
            assert await one.refresh() is RunState.RUNNING
            broker.gate.set()
            assert await one.result(timeout=30) == "first"
            assert await two.result(timeout=30) == "second"
        assert worker.counts["completed"] == 2


@pytest.mark.virtual_time
async def test_the_next_claim_waits_for_the_last_result_and_stores_it_first() -> None:
    broker = _GatedBroker()
    async with TaskQueue(broker=broker) as queue:
        first_ran, second_started = anyio.Event(), anyio.Event()

        @queue.task
        async def first() -> str:
            first_ran.set()
            return "first"

        @queue.task
        async def second() -> str:
            second_started.set()
            return (await one.refresh()).value

        async with TaskWorker(first, second, limit=1, prefetch=0) as worker:
            one = await first.delay()
            with anyio.fail_after(30):
                await first_ran.wait()
            two = await second.delay()
            # The free slot's claim carries the first's result: nothing is claimed until
            # the call that stores it goes through.
            await anyio.sleep(1)
            assert not second_started.is_set()
            assert await one.refresh() is RunState.RUNNING
            broker.gate.set()
            assert await two.result(timeout=30) == RunState.COMPLETED.value
        assert broker.batches[0] == {one.id}
        assert worker.counts["completed"] == 2


@pytest.mark.virtual_time
async def test_results_whose_claim_failed_are_recorded_all_the_same() -> None:
    broker = CompletionCountingBroker(refusals=3)
    async with TaskQueue(broker=broker) as queue:

        @queue.task
        async def double(number: int) -> int:
            return 2 * number

        async with TaskWorker(double, limit=5, prefetch=0) as worker:
            runs = await double.map(range(20))
            assert [await run.result(timeout=60) for run in runs] == [
                2 * number for number in range(20)
            ]
        # Nothing lost or run twice: every run completed once, at its first attempt.
        assert broker.refusals == 0
        assert worker.counts["completed"] == 20
        assert {run.attempts for run in runs} == {1}
        assert sum(broker.batches) == 20


@pytest.mark.virtual_time
async def test_a_run_cancelled_while_its_predecessors_result_is_unrecorded() -> None:
    broker = _GatedBroker()
    async with TaskQueue(broker=broker) as queue:
        endless_started = anyio.Event()
        cleaned_up: list[str] = []

        @queue.task
        async def quick(label: str) -> str:
            return label

        @queue.task
        async def endless() -> None:
            endless_started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cleaned_up.append("endless")

        # Claimed together: the quick run's result waits at the gate while the endless
        # run's body runs in another runner.
        stopped, before = await endless.delay(), await quick.delay("before")
        async with TaskWorker(quick, endless, limit=2, lease_seconds=30) as worker:
            with anyio.fail_after(30):
                await endless_started.wait()
            await wait_until(lambda: len(worker.status()["in_flight"]) == 2, "both claimed")
            # Cancelled through the heartbeat while the first result still waits to be
            # recorded: only the endless run's body is stopped.
            assert await stopped.cancel(timeout=60)
            assert cleaned_up == ["endless"]
            assert await before.refresh() is RunState.RUNNING
            broker.gate.set()
            assert await before.result(timeout=30) == "before"
            # The same runner, in a fresh cancel scope, runs what comes next.
            after = await quick.delay("after")
            assert await after.result(timeout=30) == "after"
        assert (worker.counts["completed"], worker.counts["cancelled"]) == (2, 1)
        assert stopped.state is RunState.CANCELLED


class FlakyWatchBroker(MemoryBroker):
    """A memory broker whose first watch of cancel requests fails."""

    def __init__(self) -> None:
        super().__init__(clock=anyio.current_time)
        self.watches = 0

    async def _watch_cancels(self) -> None:
        self.watches += 1
        if self.watches == 1:
            raise BrokerError("the watch broke")
        await super()._watch_cancels()


@pytest.mark.virtual_time
async def test_a_broken_watch_of_cancels_is_watched_again_and_cancels_still_arrive() -> None:
    broker = FlakyWatchBroker()
    queue = TaskQueue(broker=broker)
    started = anyio.Event()

    @queue.task
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    async with queue, TaskWorker(endless, lease_seconds=600) as worker:
        run = await endless.delay()
        await started.wait()
        await wait_until(lambda: broker.watches == 2, "the watch made again")
        asked = anyio.current_time()
        assert await run.cancel(timeout=60)
        assert anyio.current_time() - asked < 600 / 3  # told, not found at a heartbeat
        assert worker.counts["cancelled"] == 1
