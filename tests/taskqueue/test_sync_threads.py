"""Sync task bodies in worker threads: a thread runs queued sync runs back to back.

Real time throughout (threads do not follow a virtual clock); every wait is bounded. Where
a test needs two runs to go through one thread, it makes the runner woken for the second
patient enough (``THREAD_PATIENCE``) that only the thread can take it, and the thread's
series long enough (``THREAD_BATCH_SECONDS``) not to end in between.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

from anyservice import ServiceState
from anyservice.taskqueue import (
    RunState,
    StopTaskWorker,
    TaskQueue,
    TaskRunFailed,
    TaskWorker,
    _execution,
    current_run,
)

from . import test_worker_prefect as prefect
from .test_worker import PROMPTLY, wait_until

pytestmark = pytest.mark.anyio

queue = prefect.queue


@pytest.fixture(autouse=True)
def no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """As without OpenTelemetry: once a test of spans set the process's tracer provider,
    every run would have a span to record, which takes a thread hop of its own."""
    monkeypatch.setattr(_execution, "otel", None)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Queued sync runs go through the thread running the first; the hops are listed."""
    monkeypatch.setattr(_execution, "THREAD_PATIENCE", PROMPTLY)
    monkeypatch.setattr(_execution, "THREAD_BATCH_SECONDS", PROMPTLY)
    hops: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(function, "__func__", None) is _execution.Runners._thread_loop:
            hops.append(args[0])
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    return hops


async def test_sync_runs_back_to_back_in_one_thread_keep_their_own_outcome_and_context(
    queue: TaskQueue, one_thread: list[object]
) -> None:
    marker: contextvars.ContextVar[int] = contextvars.ContextVar("marker")

    @queue.task(retries=1)
    def body(n: int) -> list[Any]:
        context = current_run()
        assert context is not None
        seen = marker.get(None)
        marker.set(n)  # Not to be seen by the next body, as with a thread hop of its own.
        if n == 2:
            raise ValueError(f"bad {n}")
        return [context.run_id, context.attempt, n, seen, threading.get_ident()]

    first, second, third = await body.delay_many([(1,), (2,), (3,)])
    async with TaskWorker(body, limit=3) as worker:
        one = await first.result(timeout=PROMPTLY)
        three = await third.result(timeout=PROMPTLY)
        with pytest.raises(TaskRunFailed) as caught:
            await second.result(timeout=PROMPTLY)
    assert one[:4] == [first.id, 1, 1, None]
    assert three[:4] == [third.id, 1, 3, None]
    assert one[4] == three[4] != threading.get_ident()
    # The failure was retried once, then failed: its own error, its own attempts.
    failure = caught.value
    assert (failure.attempts, failure.error_type) == (2, "ValueError")
    assert failure.error_message == "bad 2"
    assert worker.counts["completed"] == 2
    assert (worker.counts["retried"], worker.counts["failed"]) == (1, 1)
    # The first three bodies took one hop; the retry (claimed later) another.
    assert len(one_thread) == 2


async def test_a_body_in_a_thread_calls_into_the_event_loop_as_its_own_run(
    queue: TaskQueue, one_thread: list[object]
) -> None:
    async def which_run() -> str | None:
        await anyio.lowlevel.checkpoint()
        context = current_run()
        return None if context is None else context.run_id

    @queue.task
    def body() -> list[str | None]:
        context = current_run()
        assert context is not None
        return [context.run_id, anyio.from_thread.run(which_run)]

    runs = await body.delay_many([()] * 3)
    async with TaskWorker(body, limit=3):
        for run in runs:
            assert await run.result(timeout=PROMPTLY) == [run.id, run.id]
    assert len(one_thread) == 1


async def test_cancelling_the_second_run_of_a_thread_cancels_only_it(
    queue: TaskQueue, one_thread: list[object]
) -> None:
    started = threading.Event()

    @queue.task
    def body(n: int) -> str:
        if n == 1:
            return "first"
        started.set()
        deadline = time.monotonic() + PROMPTLY
        while time.monotonic() < deadline:
            anyio.from_thread.check_cancelled()
            time.sleep(0.005)
        return "never cancelled"

    first, second = await body.delay_many([(1,), (2,)])
    async with TaskWorker(body, limit=2, lease_seconds=0.3) as worker:
        await anyio.to_thread.run_sync(started.wait, PROMPTLY)
        assert await second.cancel(timeout=PROMPTLY)
        assert await first.result(timeout=PROMPTLY) == "first"
    assert second.state is RunState.CANCELLED
    assert (worker.counts["completed"], worker.counts["cancelled"]) == (1, 1)
    assert len(one_thread) == 1


async def test_cancelling_a_run_its_thread_finished_does_not_reach_the_next_body(
    queue: TaskQueue,
    one_thread: list[object],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first's outcome waits in the thread, unrecorded, while the second runs.
    monkeypatch.setattr(_execution, "THREAD_RESULTS_EVERY", PROMPTLY)
    started, release = threading.Event(), threading.Event()
    checks: list[str] = []

    @queue.task
    def body(n: int) -> str:
        if n == 1:
            return "first"
        started.set()
        release.wait(PROMPTLY)
        try:
            anyio.from_thread.check_cancelled()
        except BaseException as exc:
            checks.append(type(exc).__name__)
            raise
        checks.append("not cancelled")
        return "second"

    caplog.set_level(logging.INFO, logger="anyservice")
    first, second = await body.delay_many([(1,), (2,)])
    try:
        async with TaskWorker(body, limit=2, lease_seconds=0.3):
            await anyio.to_thread.run_sync(started.wait, PROMPTLY)
            async with anyio.create_task_group() as group:
                cancelled: list[bool] = []

                async def cancel_first() -> None:
                    cancelled.append(await first.cancel(timeout=PROMPTLY))

                group.start_soon(cancel_first)
                # The worker sees the request while the first's outcome waits in the thread.
                await wait_until(
                    lambda: (
                        f"run {first.id} of 'body'" in caplog.text
                        and "cancellation asked for" in caplog.text
                    ),
                    "the cancellation of the first run noticed",
                )
                release.set()
            assert await second.result(timeout=PROMPTLY) == "second"
    finally:
        release.set()
    assert cancelled == [False]  # It had finished otherwise: COMPLETED stands.
    assert await first.result(timeout=PROMPTLY) == "first"
    assert checks == ["not cancelled"]
    assert len(one_thread) == 1


async def test_a_blocking_sync_body_does_not_hold_back_a_queued_run(queue: TaskQueue) -> None:
    release = threading.Event()

    @queue.task
    def body(n: int) -> int:
        if n == 1:
            release.wait(PROMPTLY)
        return n

    first, second = await body.delay_many([(1,), (2,)])
    try:
        async with TaskWorker(body, limit=2):
            # Taken by another runner while the first body blocks in its thread.
            assert await second.result(timeout=PROMPTLY) == 2
            assert not release.is_set()
            assert await first.refresh() is RunState.RUNNING
            release.set()
            assert await first.result(timeout=PROMPTLY) == 1
    finally:
        release.set()


async def test_what_a_thread_finished_is_recorded_while_its_next_body_blocks(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_execution, "THREAD_PATIENCE", PROMPTLY)  # the thread takes both
    release = threading.Event()

    @queue.task
    def body(n: int) -> int:
        if n == 2:
            release.wait(PROMPTLY)
        return threading.get_ident()

    first, second = await body.delay_many([(1,), (2,)])
    try:
        async with TaskWorker(body, limit=2):
            thread = await first.result(timeout=PROMPTLY)
            assert not release.is_set()
            release.set()
            assert await second.result(timeout=PROMPTLY) == thread
    finally:
        release.set()


async def test_a_forced_stop_while_a_thread_runs_queued_bodies_ends_after_the_current_one(
    queue: TaskQueue, one_thread: list[object]
) -> None:
    del one_thread  # Only its settings: the hops are not what this test is about.
    lock = threading.Lock()
    bodies: list[int] = []

    @queue.task
    def tick(n: int) -> int:
        with lock:
            bodies.append(n)
        if n == 3:
            time.sleep(0.3)  # past the stop's deadline: the stop is forced meanwhile
        return n

    runs = await tick.delay_many([(n,) for n in range(50)])
    worker = TaskWorker(tick, limit=50, shutdown_timeout=0.05)
    async with worker:
        await wait_until(lambda: 3 in bodies, "the slow body started")
        with anyio.fail_after(PROMPTLY):
            assert await worker.stop()  # forced: a body outlived the deadline
    # The thread returned once its body in flight had; no other body started.
    assert bodies == [0, 1, 2, 3]
    states = [await run.refresh() for run in runs]
    # The runs not started were handed back at once, not left to their leases.
    assert states[4:] == [RunState.SCHEDULED] * (len(runs) - 4)
    assert worker.counts["handed_back"] >= len(runs) - 4
    # Those that ran before the slow one were recorded meanwhile, while the stop waited.
    assert states[:3] == [RunState.COMPLETED] * 3


async def test_a_sync_body_raising_stop_task_worker_in_a_series_stops_the_worker(
    queue: TaskQueue, one_thread: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    del one_thread  # Its settings: the three runs go to one thread.

    @queue.task
    def body(n: int) -> int:
        if n == 2:
            raise StopTaskWorker
        return n

    first, second, third = await body.delay_many([(1,), (2,), (3,)])
    worker = TaskWorker(body, limit=3)
    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with anyio.create_task_group() as group:
            group.start_soon(worker.start)
            with anyio.fail_after(PROMPTLY):
                await worker.wait_for(ServiceState.STOPPED)
    assert await first.result(timeout=PROMPTLY) == 1
    # Handed back, its attempt not counted.
    assert (await second.refresh(), second.attempts) == (RunState.SCHEDULED, 0)
    assert await third.refresh() in (RunState.SCHEDULED, RunState.COMPLETED)
    assert "raised StopTaskWorker: stopping" in caplog.text
