"""The submitting side: TaskQueue, @queue.task, delay(), TaskRun — and every bad input."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from anyservice.taskqueue import (
    DEFAULT_URL,
    AsyncTask,
    MemoryBroker,
    RunState,
    SyncTask,
    TaskQueue,
    TaskRunFailed,
    TaskRunNotFound,
    TaskRunTimeout,
    TaskWorker,
    current_run,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:
        yield queue


# ------------------------------------------------------------------ defining tasks


async def test_bare_decorator_names_the_task_after_the_function(queue: TaskQueue) -> None:
    @queue.task
    async def say(message: str) -> str:
        return message

    assert isinstance(say, AsyncTask)
    assert (say.name, say.retries, say.retry_delay, say.timeout) == ("say", 0, 0.0, None)
    assert say.__name__ == "say"
    assert queue.tasks == {"say": say}


async def test_decorator_with_options_keeps_them(queue: TaskQueue) -> None:
    @queue.task(name="greeting", retries=3, retry_delay=0.5, timeout=2)
    def say(message: str) -> str:
        return message

    assert isinstance(say, SyncTask)
    assert (say.name, say.retries, say.retry_delay, say.timeout) == ("greeting", 3, 0.5, 2.0)
    assert not say.is_async


async def test_calling_a_task_runs_the_function_in_process(queue: TaskQueue) -> None:
    @queue.task
    async def shout(message: str) -> str:
        assert current_run() is None
        return message.upper()

    @queue.task
    def whisper(message: str) -> str:
        return message.lower()

    assert await shout("hi") == "HI"
    assert whisper("HI") == "hi"
    assert (await queue.counts())[RunState.SCHEDULED] == 0


async def test_a_task_name_is_unique_per_queue(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    with pytest.raises(ValueError, match=r"task name 'say' is already taken.*name="):

        @queue.task(name="say")
        async def other() -> None: ...


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retries": -1}, ValueError, "@queue.task retries must be an int >= 0, got -1"),
        ({"retries": 2**63}, ValueError, "@queue.task retries must be an int <= 2147483646"),
        ({"retries": "3"}, TypeError, "@queue.task retries must be an int, got '3'"),
        ({"retry_delay": 10**400}, ValueError, r"retry_delay .*\(too large for a float\)"),
        ({"retry_delay": "soon"}, ValueError, "retry_delay must be a number of seconds"),
        ({"retries": 1.5}, TypeError, "retries must be an int"),
        ({"retries": True}, TypeError, "retries must be an int"),
        ({"retry_delay": -1}, ValueError, "retry_delay"),
        ({"retry_delay": math.inf}, ValueError, "retry_delay"),
        ({"retry_delay": [1]}, TypeError, "retry_delay must be a number"),
        ({"timeout": 0}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": -2}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": b"5"}, TypeError, "timeout must be a number"),
        ({"timeout": math.inf}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"name": ""}, ValueError, "name must not be empty"),
        ({"name": 3}, TypeError, "name must be a str"),
    ],
)
async def test_bad_task_options_fail_at_decoration(
    queue: TaskQueue, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        queue.task(**options)


async def test_task_durations_may_be_timedeltas_or_numeric_strings(queue: TaskQueue) -> None:
    @queue.task(retry_delay=timedelta(seconds=2), timeout="1.5")
    async def say() -> None: ...

    assert (say.retry_delay, say.timeout) == (2.0, 1.5)


async def test_the_most_retries_still_store_a_run(queue: TaskQueue) -> None:
    @queue.task(retries=2**31 - 2)
    async def say() -> None: ...

    run = await say.delay()
    assert run.record.max_attempts == 2**31 - 1


async def test_generators_and_tasks_cannot_be_tasks(queue: TaskQueue) -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1

    def more_numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="not a generator"):
        queue.task(numbers)
    with pytest.raises(TypeError, match="not a generator"):
        queue.task(more_numbers)

    @queue.task
    async def say() -> None: ...

    with pytest.raises(TypeError, match="already a task"):
        queue.task(say)


# ------------------------------------------------------------------ the queue


async def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported scheme 'redis'; supported: sqlite, memory"):
        TaskQueue("redis://localhost/0")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"url": "memory://", "broker": MemoryBroker()}, ValueError, "not both"),
        ({"url": 3}, TypeError, "url must be a str"),
        ({"max_attempts": 0}, ValueError, "max_attempts must be an int >= 1, got 0"),
        ({"max_attempts": 2**63}, ValueError, "max_attempts must be an int <= 2147483647"),
        ({"max_attempts": 2.0}, TypeError, "max_attempts must be an int"),
    ],
)
async def test_bad_queue_arguments_are_refused(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        TaskQueue(**kwargs)


async def test_default_queue_is_a_wal_sqlite_file_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANYSERVICE_TASKQUEUE_URL", raising=False)
    queue = TaskQueue()
    assert queue.url == DEFAULT_URL == "sqlite:///anyservice.db"

    @queue.task
    async def say() -> None: ...

    await say.delay()
    await queue.close()
    with sqlite3.connect(tmp_path / "anyservice.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_the_url_comes_from_the_environment_when_none_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("ANYSERVICE_TASKQUEUE_URL", url)
    assert TaskQueue().url == url
    assert TaskQueue().location == str(tmp_path / "shared.db")
    # A URL given in the code wins over the environment.
    assert TaskQueue("memory://").url == "memory://"
    monkeypatch.setenv("ANYSERVICE_TASKQUEUE_URL", "  ")
    with pytest.raises(ValueError, match="ANYSERVICE_TASKQUEUE_URL environment variable is set"):
        TaskQueue()


@pytest.mark.parametrize("url", ["", " "])
def test_an_empty_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="TaskQueue url must not be empty"):
        TaskQueue(url)


def test_a_queue_in_a_missing_directory_is_refused_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "runs.db"
    with pytest.raises(ValueError, match=f"its directory {re.escape(str(missing.parent))} does"):
        TaskQueue(f"sqlite:///{missing}")
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        TaskQueue(f"sqlite:///{tmp_path / 'plain' / 'runs.db'}")


async def test_a_worker_logs_and_serves_the_absolute_path_of_its_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    queue = TaskQueue("sqlite:///relative.db")

    @queue.task
    async def say() -> None: ...

    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with TaskWorker(say) as worker:
            assert worker.status()["database"] == str(tmp_path / "relative.db")
    assert f"serving say from {tmp_path / 'relative.db'} with limit 10" in caplog.text


async def test_a_queue_used_without_async_with_stays_open_until_closed() -> None:
    broker = MemoryBroker()
    queue = TaskQueue(broker=broker)

    @queue.task
    async def say() -> None: ...

    run = await say.delay()
    assert await run.refresh() is RunState.SCHEDULED
    await queue.close()
    with pytest.raises(Exception, match="not open"):
        await broker.get(run.id)
    assert await run.refresh() is RunState.SCHEDULED  # opened again on use


# ------------------------------------------------------------------ delay()


async def test_delay_stores_a_scheduled_run_with_the_task_options(queue: TaskQueue) -> None:
    @queue.task(retries=2, retry_delay=1.5, timeout=9)
    async def say(message: str, *, loud: bool = False) -> str:
        return message

    run = await say.delay("hi", loud=True)

    assert run.state is RunState.SCHEDULED
    assert (run.task, run.attempts, len(run.id)) == ("say", 0, 32)
    assert run.record.payload == '{"args":["hi"],"kwargs":{"loud":true}}'
    assert (run.record.retries_left, run.record.retry_delay, run.record.timeout) == (2, 1.5, 9)
    assert run.record.max_attempts == 5
    assert await run.refresh() is RunState.SCHEDULED
    assert repr(run) == f"<TaskRun {run.id} of 'say' SCHEDULED>"


async def test_many_retries_raise_max_attempts_so_a_crash_does_not_end_them(
    queue: TaskQueue,
) -> None:
    @queue.task(retries=9)
    async def say() -> None: ...

    assert (await say.delay()).record.max_attempts == 10


async def test_non_serialisable_argument_is_named_at_delay(queue: TaskQueue) -> None:
    @queue.task
    async def remind(message: str, when: Any = None) -> None: ...

    with pytest.raises(
        TypeError, match="argument 'when' of task 'remind' is not JSON-serialisable: datetime"
    ):
        await remind.delay("hi", datetime.now())
    with pytest.raises(TypeError, match=r"argument 'when' of task 'remind'.*: set"):
        await remind.delay("hi", when={1, 2})
    assert (await queue.counts())[RunState.SCHEDULED] == 0


async def test_arguments_that_do_not_fit_the_signature_fail_at_delay(queue: TaskQueue) -> None:
    @queue.task
    async def say(message: str) -> None: ...

    with pytest.raises(TypeError, match="task 'say': missing a required argument: 'message'"):
        await say.delay()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"task 'say'.*unexpected keyword argument 'loud'"):
        await say.delay("hi", loud=True)  # type: ignore[call-arg]


async def test_each_call_shape_is_judged_alike_every_time(queue: TaskQueue) -> None:
    # Whether a call fits depends only on how many arguments and which keywords: the
    # verdict is remembered per shape, a refusal as well as a fit.
    @queue.task
    async def say(message: str) -> None: ...

    for _ in range(2):
        with pytest.raises(TypeError, match="task 'say': missing a required argument"):
            await say.delay()  # type: ignore[call-arg]
        await say.delay("hi")
        await say.delay(message="ho")
        with pytest.raises(TypeError, match=r"task 'say'.*unexpected keyword argument 'loud'"):
            await say.delay("hi", loud=True)  # type: ignore[call-arg]
    assert (await queue.counts())[RunState.SCHEDULED] == 4


async def test_delay_sync_refuses_to_block_a_running_event_loop(queue: TaskQueue) -> None:
    @queue.task
    async def say(message: str) -> None: ...

    with pytest.raises(RuntimeError, match=r"use 'await say\.delay\(\.\.\.\)' there"):
        say.delay_sync("hi")


def test_delay_sync_stores_a_run_from_plain_code(tmp_path: Path) -> None:
    queue = TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}")

    @queue.task
    def say(message: str) -> str:
        return message

    run = say.delay_sync("hi")
    assert run.state is RunState.SCHEDULED

    async def read_back() -> RunState:
        async with queue:
            return await run.refresh()

    assert anyio.run(read_back) is RunState.SCHEDULED
    with pytest.raises(TaskRunTimeout, match=r"did not finish within 0\.01 s"):
        run.result_sync(timeout=0.01)
    with pytest.raises(TypeError, match="argument 'message' of task 'say'"):
        say.delay_sync({1})  # type: ignore[arg-type]


# ------------------------------------------------------------------ waiting for runs


async def test_result_timeout_says_the_timeout_and_the_state(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    run = await say.delay()
    with pytest.raises(TaskRunTimeout) as caught:
        await run.result(timeout=0.05)
    assert isinstance(caught.value, TimeoutError)
    # The database's absolute path: a run nobody runs may sit in a file no worker serves.
    assert queue.location == queue.url.removeprefix("sqlite:///")  # made from an absolute path
    assert str(caught.value) == (
        f"run {run.id} of task 'say' in {queue.location} did not finish within 0.05 s "
        "(it is SCHEDULED); the run goes on"
    )
    assert (caught.value.timeout, caught.value.state) == (0.05, RunState.SCHEDULED)
    assert caught.value.database == queue.location
    with pytest.raises(TaskRunTimeout):
        await run.wait(timeout=0)


@pytest.mark.parametrize("timeout", [-1, math.nan, math.inf])
async def test_bad_wait_timeouts_are_refused(queue: TaskQueue, timeout: float) -> None:
    @queue.task
    async def say() -> None: ...

    run = await say.delay()
    with pytest.raises(ValueError, match="timeout"):
        await run.wait(timeout)


async def test_a_cancelled_run_raises_task_run_failed(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    run = await say.delay()
    assert await run.cancel()
    assert run.state is RunState.CANCELLED
    with pytest.raises(TaskRunFailed, match="was cancelled before a worker ran it") as caught:
        await run.result(timeout=1)
    assert caught.value.state is RunState.CANCELLED
    assert caught.value.error_type is None
    assert not await run.cancel()


async def test_runs_can_be_looked_up_by_id(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    run = await say.delay()
    found = await queue.get_run(run.id)
    assert (found.id, found.task, found.state) == (run.id, "say", RunState.SCHEDULED)
    with pytest.raises(TaskRunNotFound, match="no run 'nope'"):
        await queue.get_run("nope")


def test_the_package_exports_exactly_what_all_lists() -> None:
    import anyservice.taskqueue as taskqueue

    public = {name for name in vars(taskqueue) if not name.startswith("_")}
    assert public == set(taskqueue.__all__)
    for name in taskqueue.__all__:
        module = getattr(getattr(taskqueue, name), "__module__", "anyservice.taskqueue")
        assert module.startswith("anyservice.taskqueue"), name


# ------------------------------------------------------------------ retention


def test_retention_is_seven_days_unless_told() -> None:
    assert TaskQueue("memory://").retention == 7 * 24 * 3600
    assert TaskQueue("memory://", retention=timedelta(hours=1)).retention == 3600
    assert TaskQueue("memory://", retention=90).retention == 90
    assert TaskQueue("memory://", retention=None).retention is None


@pytest.mark.parametrize(
    ("retention", "error"),
    [
        (0, ValueError),
        (-5, ValueError),
        (math.inf, ValueError),
        (timedelta(0), ValueError),
        ("7d", ValueError),  # a string, but not a number of seconds
        ([7], TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_retention_is_refused(retention: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="retention"):
        TaskQueue("memory://", retention=retention)


async def test_purge_keeps_runs_younger_than_the_retention_unless_told() -> None:
    now = [1_700_000_000.0]
    queue = TaskQueue(broker=MemoryBroker(clock=lambda: now[0]), retention=60)

    @queue.task
    async def say() -> None: ...

    async with queue:
        old = await say.delay()
        assert await old.cancel()
        now[0] += 30
        assert await queue.purge() == 0
        assert await queue.purge(older_than=timedelta(seconds=10)) == 1
        with pytest.raises(TaskRunNotFound):
            await queue.get_run(old.id)


async def test_purge_without_a_retention_needs_an_age() -> None:
    async with TaskQueue("memory://", retention=None) as queue:
        with pytest.raises(ValueError, match="older_than"):
            await queue.purge()
        with pytest.raises(ValueError, match="older_than"):
            await queue.purge(older_than=0)
        assert await queue.purge(older_than=1) == 0
