"""Run controls: due times, key= dedup, cancelling RUNNING runs, retry, listing, purge.

Broker-level promises on each broker with a fake clock (the conformance suite's fixtures);
the worker's side in-process on virtual time; submitters racing on several brokers sharing
one SQLite file or one PostgreSQL schema. (A RUNNING run cancelled on another process is in
``test_cluster_processes.py``.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import pytest

from anyservice import Backoff
from anyservice.taskqueue import (
    MemoryBroker,
    RunState,
    TaskQueue,
    TaskRunFailed,
    TaskRunTimeout,
    TaskWorker,
)
from anyservice.taskqueue.brokers import Broker
from tests._postgres import postgres_schema

from . import test_broker_conformance as conformance
from . import test_cluster_brokers as cluster_brokers
from .test_broker_conformance import LEASE, PAYLOAD, START, FakeClock

pytestmark = [pytest.mark.anyio]

#: Longest a real-time wait here may take before the test fails.
PROMPTLY = 10.0

clock = conformance.clock


broker_url = conformance.broker_url
broker = conformance.broker
shared_url, racers = cluster_brokers.shared_url, cluster_brokers.racers


# --- brokers -------------------------------------------------------------------------------


async def test_a_key_returns_the_unfinished_run_stored_under_it(broker: Broker) -> None:
    first, created = await broker.submit_once("daily-report", "say", PAYLOAD)
    again, created_again = await broker.submit_once("daily-report", "say", PAYLOAD)
    assert created
    assert not created_again
    assert again.id == first.id
    other, _ = await broker.submit_once("weekly-report", "say", PAYLOAD)
    assert other.id != first.id
    # Once finished, the key is free again.
    (claimed,) = await broker.claim("w", ["say"], limit=1, lease_seconds=LEASE)
    assert claimed.id == first.id
    assert await broker.complete("w", first.id, claimed.attempts, "null")
    fresh, created_fresh = await broker.submit_once("daily-report", "say", PAYLOAD)
    assert created_fresh
    assert fresh.id != first.id


async def test_runs_are_listed_newest_first_and_filtered(broker: Broker, clock: FakeClock) -> None:
    ids = []
    for task in ("a", "b", "a"):
        ids.append((await broker.submit(task, PAYLOAD)).id)
        clock.advance(10)
    listed = await broker.list_runs()
    assert [run.id for run in listed] == ids[::-1]
    assert [run.id for run in await broker.list_runs(task="a")] == [ids[2], ids[0]]
    assert [run.id for run in await broker.list_runs(since=START + 10)] == [ids[2], ids[1]]
    assert [run.id for run in await broker.list_runs(limit=1)] == [ids[2]]
    assert await broker.list_runs(state=RunState.FAILED) == []
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        await broker.list_runs(limit=0)
    with pytest.raises(ValueError, match="'DONE' is not a valid RunState"):
        await broker.list_runs(state="DONE")  # type: ignore[arg-type]


async def test_cancel_of_a_running_run_is_asked_of_its_owner(broker: Broker) -> None:
    run = await broker.submit("say", PAYLOAD)
    (claimed,) = await broker.claim("w", ["say"], limit=1, lease_seconds=LEASE)
    assert await broker.request_cancel(run.id) is RunState.RUNNING
    assert await broker.cancel_requests("w", [run.id]) == {run.id}
    assert await broker.cancel_requests("someone-else", [run.id]) == set()
    assert not await broker.end_cancelled("someone-else", run.id, claimed.attempts)
    # An earlier claim of the run is fenced off.
    assert not await broker.end_cancelled("w", claimed.id, claimed.attempts - 1)
    assert await broker.end_cancelled("w", claimed.id, claimed.attempts)
    record = await broker.get(run.id)
    assert record is not None
    assert (record.state, record.lease_owner) == (RunState.CANCELLED, None)
    # Finished: nothing more to cancel.
    assert await broker.request_cancel(run.id) is None
    assert await broker.request_cancel("no-such-run") is None


@contextlib.asynccontextmanager
async def watching(broker: Broker, asked: Callable[[list[str]], None]) -> AsyncIterator[None]:
    """``broker.watch_cancels(asked)`` for the block's duration."""
    async with anyio.create_task_group() as group:
        group.start_soon(broker.watch_cancels, asked)
        yield
        group.cancel_scope.cancel()


async def until_heard(canceller: Broker, run_id: str, heard: list[list[str]]) -> None:
    """Ask for RUNNING ``run_id``'s cancel until the watch hears of it: a watch may still be
    starting when first asked (a PostgreSQL one connects and LISTENs first); asking again
    is harmless, as the request is only stored again."""
    with anyio.fail_after(PROMPTLY):
        while True:
            assert await canceller.request_cancel(run_id) is RunState.RUNNING
            with anyio.move_on_after(0.05):
                while not any(run_id in ids for ids in heard):  # noqa: ASYNC110 - a callback
                    await anyio.sleep(0.005)
                return


async def test_a_watch_of_cancels_hears_of_a_running_run_cancelled_on_its_broker(
    broker: Broker,
) -> None:
    heard: list[list[str]] = []
    run = await broker.submit("say", PAYLOAD)
    scheduled = await broker.submit("say", PAYLOAD)
    await broker.claim("w", ["say"], limit=1, lease_seconds=LEASE)
    async with watching(broker, heard.append):
        await until_heard(broker, run.id, heard)
        # The watch hears now: a SCHEDULED run's cancel, then the RUNNING one's again.
        assert await broker.request_cancel(scheduled.id) is RunState.CANCELLED
        heard.clear()
        await until_heard(broker, run.id, heard)
    # Only the RUNNING run's request is told of (hints come in order, so the SCHEDULED
    # one's would have come first): a SCHEDULED run was cancelled outright.
    assert {i for ids in heard for i in ids} == {run.id}


async def test_a_watch_of_cancels_hears_of_one_asked_on_another_broker(
    racers: list[Broker],
) -> None:
    # Two brokers on one database, as two processes have.
    worker, other = racers[0], racers[1]
    heard: list[list[str]] = []
    run = await other.submit("say", PAYLOAD)
    await worker.claim("w", ["say"], limit=1, lease_seconds=LEASE)
    async with watching(worker, heard.append):
        await until_heard(other, run.id, heard)
    assert [run.id] in heard


async def test_cancel_of_a_scheduled_run_is_at_once(broker: Broker) -> None:
    run = await broker.submit("say", PAYLOAD)
    assert await broker.request_cancel(run.id) is RunState.CANCELLED
    assert await broker.claim("w", ["say"], limit=1, lease_seconds=LEASE) == []


async def test_a_finished_run_can_be_requeued_as_a_new_series(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD)
    assert await broker.requeue(run.id) is None  # not finished
    (claimed,) = await broker.claim("w", ["say"], limit=1, lease_seconds=LEASE)
    assert await broker.fail("w", run.id, claimed.attempts, conformance.BOOM, retry=False)
    clock.advance(5)
    again = await broker.requeue(run.id, retries=2)
    assert again is not None
    assert (again.state, again.attempts, again.retries_left) == (RunState.SCHEDULED, 0, 2)
    assert again.scheduled_at == START + 5
    assert again.finished_at is None
    assert again.error == conformance.BOOM  # kept until a new attempt ends
    (claimed,) = await broker.claim("w2", ["say"], limit=1, lease_seconds=LEASE)
    assert claimed.attempts == 1


async def test_purge_deletes_what_finished_before_the_cutoff(
    broker: Broker, clock: FakeClock
) -> None:
    old = await broker.submit("say", PAYLOAD)
    assert await broker.request_cancel(old.id) is RunState.CANCELLED
    clock.advance(100)
    recent = await broker.submit("say", PAYLOAD)
    assert await broker.request_cancel(recent.id) is RunState.CANCELLED
    waiting = await broker.submit("say", PAYLOAD)
    assert await broker.purge(50) == 1  # it is now START + 100
    assert await broker.get(old.id) is None
    assert await broker.get(recent.id) is not None
    assert await broker.get(waiting.id) is not None


async def test_purge_goes_through_many_runs_in_batches(broker: Broker, clock: FakeClock) -> None:
    for _ in range(1_200):
        run = await broker.submit("say", PAYLOAD)
        assert await broker.request_cancel(run.id) is RunState.CANCELLED
    clock.advance(10)
    assert await broker.purge(5) == 1_200
    assert sum((await broker.counts()).values()) == 0
    with pytest.raises(
        ValueError, match="older_than must be a finite number of seconds >= 0, got -1"
    ):
        await broker.purge(-1)


async def test_submitters_racing_on_one_key_store_one_run(racers: list[Broker]) -> None:
    got: list[tuple[str, bool]] = []

    async def submit(each: Broker) -> None:
        for _ in range(10):
            run, created = await each.submit_once("only-one", "say", PAYLOAD)
            got.append((run.id, created))

    async with anyio.create_task_group() as group:
        for each in racers:
            group.start_soon(submit, each)
    assert len(got) == 40
    assert len({run_id for run_id, _ in got}) == 1
    assert sum(created for _, created in got) == 1
    assert (await racers[0].counts())[RunState.SCHEDULED] == 1


# --- the queue and the worker --------------------------------------------------------------


@pytest.fixture
async def queue() -> AsyncIterator[TaskQueue]:
    async with TaskQueue(broker=MemoryBroker(clock=anyio.current_time)) as queue:
        yield queue


@pytest.mark.virtual_time
async def test_apply_async_runs_at_a_time_or_after_a_countdown(queue: TaskQueue) -> None:
    started: dict[str, float] = {}

    @queue.task
    async def note(label: str) -> None:
        started[label] = anyio.current_time()

    now = anyio.current_time()
    async with TaskWorker(note):
        later = await note.apply_async(("countdown",), countdown=30)
        at = await note.apply_async(kwargs={"label": "at"}, at=now + 60)
        soon = await note.apply_async(["soon"])
        for run in (later, at, soon):
            await run.wait(timeout=120)
    assert started["soon"] - now < 1
    assert now + 30 <= started["countdown"] < now + 31
    assert now + 60 <= started["at"] < now + 61


@pytest.mark.virtual_time
async def test_apply_async_with_a_key_returns_the_pending_run(queue: TaskQueue) -> None:
    @queue.task
    async def report() -> str:
        return "done"

    first = await report.apply_async(key="report", countdown=10)
    second = await report.apply_async(key="report")
    assert second.id == first.id
    async with TaskWorker(report):
        assert await first.result(timeout=60) == "done"
    third = await report.apply_async(key="report")
    assert third.id != first.id


def test_apply_async_checks_its_options() -> None:
    queue = TaskQueue("memory://")

    @queue.task
    async def say(message: str) -> None: ...

    async def main() -> None:
        with pytest.raises(ValueError, match="at= or countdown=, not both"):
            await say.apply_async(("x",), at=1.0, countdown=1.0)
        with pytest.raises(TypeError, match="needs an aware datetime"):
            await say.apply_async(("x",), at=dt.datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="countdown must be a finite number of seconds >= 0"):
            await say.apply_async(("x",), countdown=-1)
        with pytest.raises(TypeError, match="args must be a tuple or list, got 'x'"):
            await say.apply_async("x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key must not be empty"):
            await say.apply_async(("x",), key="")
        with pytest.raises(TypeError, match="say"):
            await say.apply_async()
        run = await say.apply_async(("x",), at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        assert run.record.scheduled_at == dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()

    anyio.run(main)


@pytest.mark.virtual_time
async def test_a_worker_runs_due_runs_by_priority_the_tasks_or_the_runs_own(
    queue: TaskQueue,
) -> None:
    order: list[str] = []

    @queue.task
    async def plain(label: str) -> None:
        order.append(label)

    @queue.task(priority=2)
    async def urgent(label: str) -> None:
        order.append(label)

    runs = [
        await plain.delay("plain"),
        await urgent.delay("urgent"),
        await plain.apply_async(("most urgent",), priority=3),
        await urgent.apply_async(("demoted",), priority=-1),
        *await plain.delay_many([("plain again",)]),
    ]
    assert [run.record.priority for run in runs] == [0, 2, 3, -1, 0]
    async with TaskWorker(plain, urgent, limit=1):
        for run in await queue.runs():
            await run.wait(timeout=60)
    assert order == ["most urgent", "urgent", "plain", "plain again", "demoted"]


def test_priority_options_are_checked() -> None:
    queue = TaskQueue("memory://")
    with pytest.raises(TypeError, match=r"@queue.task priority must be an int, got 1\.5"):
        queue.task(priority=1.5)  # type: ignore[call-overload]

    @queue.task(priority=-(2**31 - 1))
    async def say() -> None: ...

    assert say.priority == -(2**31 - 1)

    async def main() -> None:
        with pytest.raises(ValueError, match="apply_async\\(\\) priority must be an int <="):
            await say.apply_async(priority=2**31)
        with pytest.raises(TypeError, match="apply_async\\(\\) priority must be an int"):
            await say.apply_async(priority=True)

    anyio.run(main)


@pytest.mark.virtual_time
async def test_workers_run_no_more_of_a_task_at_once_than_its_concurrency(
    queue: TaskQueue,
) -> None:
    running: list[str] = []
    peak: list[int] = []
    started: dict[str, float] = {}

    @queue.task(concurrency=2)
    async def crunch(label: str) -> None:
        running.append(label)
        peak.append(len(running))
        started[label] = anyio.current_time()
        await anyio.sleep(10)
        running.remove(label)

    @queue.task
    async def quick(label: str) -> None:
        started[label] = anyio.current_time()

    assert crunch.concurrency == 2
    assert quick.concurrency is None
    now = anyio.current_time()
    async with TaskWorker(crunch, quick, limit=10), TaskWorker(crunch, quick, limit=10):
        runs = await crunch.map([f"c{number}" for number in range(5)])
        runs.append(await quick.delay("quick"))
        for run in runs:
            await run.wait(timeout=120)
    assert max(peak) == 2
    # The other task is not held up, and a slot is taken again as soon as it is freed.
    assert started["quick"] - now < 1
    expected = [0, 0, 10, 10, 20]
    for number, due in enumerate(expected):
        assert due <= started[f"c{number}"] - now < due + 0.1


@pytest.mark.virtual_time
async def test_execute_task_run_is_held_to_the_tasks_concurrency_too(queue: TaskQueue) -> None:
    @queue.task(concurrency=1)
    async def crunch() -> str:
        return "done"

    first, second = await crunch.delay(), await crunch.delay()
    (elsewhere,) = await queue.broker.claim("elsewhere", ["crunch"], limit=1, lease_seconds=60)
    assert elsewhere.id == first.id
    async with TaskWorker(crunch, limit=1) as worker:
        # Due and unclaimed, but the one slot is taken elsewhere.
        assert await second.refresh() is RunState.SCHEDULED
        assert not await worker.execute_task_run(second)
        assert await queue.broker.complete("elsewhere", first.id, 1, '"done"')
        assert await second.result(timeout=5) == "done"


def test_concurrency_must_be_a_count_of_at_least_one() -> None:
    queue = TaskQueue("memory://")
    with pytest.raises(ValueError, match=r"@queue.task concurrency must be an int >= 1, got 0"):
        queue.task(concurrency=0)
    with pytest.raises(TypeError, match=r"@queue.task concurrency must be an int, got 2\.0"):
        queue.task(concurrency=2.0)  # type: ignore[call-overload]


@pytest.mark.virtual_time
async def test_cancelling_a_running_run_cancels_its_body_at_once(queue: TaskQueue) -> None:
    started = anyio.Event()
    cleaned_up: list[float] = []

    @queue.task
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned_up.append(anyio.current_time())

    async with TaskWorker(endless, lease_seconds=60) as worker:
        run = await endless.delay()
        await started.wait()
        asked = anyio.current_time()
        assert await run.cancel(timeout=60)
        assert run.state is RunState.CANCELLED
        assert len(cleaned_up) == 1
        # Told at once by the broker, not at the next heartbeat (a third of the lease).
        assert cleaned_up[0] - asked < 60 / 3
        assert worker.counts["cancelled"] == 1
    with pytest.raises(TaskRunFailed, match="was cancelled while it was running"):
        await run.result()
    assert not await run.cancel()


@pytest.mark.virtual_time
async def test_a_run_claimed_ahead_and_cancelled_ends_at_once_and_never_starts(
    queue: TaskQueue,
) -> None:
    started: list[str] = []
    gate = anyio.Event()

    @queue.task
    async def hold(label: str) -> None:
        started.append(label)
        await gate.wait()

    async with TaskWorker(hold, limit=1, prefetch=1, lease_seconds=30) as worker:
        first = await hold.delay("first")
        ahead = await hold.delay("ahead")
        with anyio.fail_after(60):
            while started != ["first"] or worker.status()["prefetched"] != 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        asked = anyio.current_time()
        # Not held until the run before it finishes, nor until the next heartbeat (10 s):
        # the cancel watch hears of the request and the run ends at once.
        assert await ahead.cancel(timeout=60)
        assert anyio.current_time() - asked < 1
        assert ahead.state is RunState.CANCELLED
        assert worker.status()["prefetched"] == 0
        gate.set()
        await first.wait(timeout=60)
    assert started == ["first"]
    assert worker.counts["cancelled"] == 1
    assert worker.counts["completed"] == 1


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-poll-only"])
def cancel_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, bool]]:
    """A database two brokers (two processes) share, and whether its workers are told of
    cancel requests at once: SQLite and PostgreSQL, and PostgreSQL without LISTEN."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'runs.db'}", True
        return
    options = {"listen": "false"} if request.param == "postgresql-poll-only" else {}
    with postgres_schema(request.getfixturevalue("postgres_url"), **options) as url:
        yield url, not options


async def test_a_running_run_cancelled_from_another_broker_stops_before_a_heartbeat(
    cancel_url: tuple[str, bool],
) -> None:
    # Real time, two brokers on one database as two processes would have. The worker
    # is full (limit=1): its claim loop waits for a slot, not for work, so only the
    # notification of the cancel can explain a stop before the first heartbeat.
    url, notified = cancel_url
    lease = 60.0 if notified else 3.0  # poll-only: the heartbeat (a third) finds it
    started = anyio.Event()
    queue = TaskQueue(url)

    @queue.task
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    other = TaskQueue(url)  # its broker is the other process's
    async with queue, other, TaskWorker(endless, limit=1, lease_seconds=lease) as worker:
        run = await endless.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        assert await other.broker.request_cancel(run.id) is RunState.RUNNING
        # Bounded: notified, well before the first heartbeat could have found the request.
        assert not notified or lease / 3 > PROMPTLY
        finished = await other.broker.wait_until_finished(run.id, timeout=PROMPTLY)
        assert finished is not None
        assert finished.state is RunState.CANCELLED
    assert worker.counts["cancelled"] == 1


@pytest.mark.virtual_time
async def test_cancel_says_false_when_the_run_finished_otherwise(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> str:
        return "done"

    run = await say.delay()
    # Its worker (standing in here) completes it before it looks for cancel requests.
    (claimed,) = await queue.broker.claim("elsewhere", ["say"], limit=1, lease_seconds=60)
    async with anyio.create_task_group() as group:
        group.start_soon(run.cancel, 60)
        await anyio.sleep(1)
        assert await queue.broker.complete("elsewhere", run.id, claimed.attempts, '"done"')
    assert not await run.cancel(timeout=60)
    assert run.state is RunState.COMPLETED


@pytest.mark.virtual_time
async def test_cancel_of_a_run_nobody_serves_times_out(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    run = await say.delay()
    (claimed,) = await queue.broker.claim("gone", ["say"], limit=1, lease_seconds=3600)
    assert claimed.id == run.id
    with pytest.raises(TaskRunTimeout):
        await run.cancel(timeout=5)


@pytest.mark.virtual_time
async def test_retry_runs_a_failed_run_again(queue: TaskQueue) -> None:
    attempts: list[int] = []

    @queue.task
    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("down")
        return "up"

    async with TaskWorker(flaky):
        run = await flaky.delay()
        assert await run.wait(timeout=60) is RunState.FAILED
        assert await run.retry()
        assert run.state is RunState.SCHEDULED
        assert await run.result(timeout=60) == "up"
    assert not await run.retry()  # COMPLETED: nothing to retry


@pytest.mark.virtual_time
async def test_queue_runs_lists_and_purges(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    @queue.task
    async def other() -> None: ...

    runs = [await say.delay(), await other.delay(), await say.delay()]
    assert [run.id for run in await queue.runs(task=say)] == [runs[2].id, runs[0].id]
    assert [run.id for run in await queue.runs(state="SCHEDULED", limit=1)] == [runs[2].id]
    assert await runs[0].cancel()
    assert [run.id for run in await queue.runs(state=RunState.CANCELLED)] == [runs[0].id]
    await anyio.sleep(3600)
    assert await queue.purge(older_than=60) == 1
    assert len(await queue.runs()) == 2
    with pytest.raises(ValueError, match="older_than must be a finite number of seconds > 0"):
        await queue.purge(older_than=-1)


@pytest.mark.virtual_time
async def test_retry_on_retries_only_the_exceptions_named(queue: TaskQueue) -> None:
    calls: list[str] = []

    @queue.task(retries=3, retry_on=(ConnectionError, TimeoutError))
    async def fetch(problem: str) -> None:
        calls.append(problem)
        raise ConnectionError("down") if problem == "network" else ValueError("bad input")

    async with TaskWorker(fetch):
        network = await fetch.delay("network")
        bad = await fetch.delay("input")
        assert await network.wait(timeout=60) is RunState.FAILED
        assert await bad.wait(timeout=60) is RunState.FAILED
    assert calls.count("network") == 4  # the first attempt and 3 retries
    assert calls.count("input") == 1  # not retried
    assert fetch.should_retry(TimeoutError())
    assert not fetch.should_retry(KeyError())


@pytest.mark.virtual_time
async def test_a_backoff_retry_delay_grows_with_each_retry_up_to_its_cap(
    queue: TaskQueue,
) -> None:
    began: list[float] = []

    @queue.task(retries=4, retry_delay=Backoff(initial=1, factor=2, maximum=3))
    async def flaky() -> None:
        began.append(anyio.current_time())
        raise ConnectionError("down")

    assert flaky.stored_retry_delay == 1.0
    async with TaskWorker(flaky):
        run = await flaky.delay()
        assert await run.wait(timeout=60) is RunState.FAILED
    assert run.record.retry_delay == 1.0
    waits = [later - earlier for earlier, later in itertools.pairwise(began)]
    for wait, delay in zip(waits, [1, 2, 3, 3], strict=True):
        assert delay <= wait < delay + 0.1


@pytest.mark.virtual_time
async def test_a_jittered_backoff_with_retry_on_retries_only_those_and_each_sooner(
    queue: TaskQueue,
) -> None:
    began: dict[str, list[float]] = {"network": [], "input": []}

    @queue.task(
        retries=3, retry_delay=Backoff(initial=8, maximum=8, jitter=0.5), retry_on=ConnectionError
    )
    async def fetch(problem: str) -> None:
        began[problem].append(anyio.current_time())
        raise ConnectionError("down") if problem == "network" else ValueError("bad input")

    async with TaskWorker(fetch):
        network = await fetch.delay("network")
        bad = await fetch.delay("input")
        assert await network.wait(timeout=120) is RunState.FAILED
        assert await bad.wait(timeout=120) is RunState.FAILED
    assert len(began["input"]) == 1  # not retried, backoff or not
    waits = [later - earlier for earlier, later in itertools.pairwise(began["network"])]
    assert len(waits) == 3
    # Jitter takes up to half of each 8 s delay off, drawn anew at each failure.
    assert all(4 <= wait < 8.1 for wait in waits), waits


def test_a_retry_delay_is_seconds_or_a_backoff() -> None:
    queue = TaskQueue("memory://")
    with pytest.raises(TypeError, match=r"@queue.task retry_delay must be"):
        queue.task(retry_delay=[1, 2])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"@queue.task retry_delay must be"):
        queue.task(retry_delay=-1)


def test_retry_on_must_name_exception_types() -> None:
    queue = TaskQueue("memory://")
    with pytest.raises(TypeError, match="retry_on must be an exception type or a tuple"):
        queue.task(retry_on=("ValueError",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry_on must be an exception type or a tuple"):
        queue.task(retry_on=())

    @queue.task(retry_on=KeyError)
    async def one() -> None: ...

    assert one.retry_on == (KeyError,)
