"""The cluster's promises, on every broker: a tick is stored once, a lease has one holder.

Same fixtures as the conformance suite (a fake wall clock, each broker kind); the races
are real: several brokers on one SQLite file, or on one PostgreSQL schema, store the same
ticks and take the same lease at once, as separate processes would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from anyservice.taskqueue._errors import BrokerError
from anyservice.taskqueue._leases import Lease, StoredTick, TickResult
from anyservice.taskqueue._records import RunState
from anyservice.taskqueue.brokers import BaseBroker, Broker, broker_from_url
from anyservice.taskqueue.brokers._memory import MemoryBroker
from anyservice.taskqueue.brokers._postgres import PostgresBroker
from anyservice.taskqueue.brokers._sqlite import SqliteBroker
from tests._postgres import postgres_schema

from . import test_broker_conformance as conformance
from .test_broker_conformance import LEASE, PAYLOAD, START, FakeClock

pytestmark = pytest.mark.anyio

# The conformance suite's fixtures: a fake clock, and each kind of broker on it.
clock = conformance.clock
broker_url = conformance.broker_url
broker = conformance.broker


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that several brokers (standing for processes) can share."""
    if request.param == "postgresql":
        with postgres_schema(request.getfixturevalue("postgres_url")) as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture
async def racers(shared_url: str) -> AsyncIterator[list[Broker]]:
    """Four brokers on one database, each with its own connections, as processes have."""
    brokers = [broker_from_url(shared_url) for _ in range(4)]
    try:
        for each in brokers:
            await each.open()
        yield brokers
    finally:
        for each in brokers:
            await each.close()


async def store(
    broker: Broker, due: float, *, overlap: bool = True, schedule: str = "nightly"
) -> StoredTick:
    return await broker.submit_tick(schedule, due, "say", PAYLOAD, overlap=overlap)


async def test_a_tick_is_stored_once_with_a_run_due_at_it(broker: Broker) -> None:
    first = await store(broker, START + 60)
    again = await store(broker, START + 60)
    assert first.result is TickResult.STORED
    assert again.result is TickResult.TAKEN
    assert again.run_id is None
    assert first.run_id is not None
    run = await broker.get(first.run_id)
    assert run is not None
    assert run.state is RunState.SCHEDULED
    assert run.scheduled_at == START + 60
    assert run.task == "say"
    assert run.payload == PAYLOAD
    counts = await broker.tick_counts("nightly")
    assert (counts.runs, counts.skipped, counts.latest) == (1, 0, START + 60)
    assert (await broker.counts())[RunState.SCHEDULED] == 1


async def test_ticks_of_other_schedules_and_times_are_their_own(broker: Broker) -> None:
    results = [
        (await store(broker, START + 1)).result,
        (await store(broker, START + 2)).result,
        (await store(broker, START + 1, schedule="hourly")).result,
    ]
    assert results == [TickResult.STORED] * 3
    assert (await broker.tick_counts("nightly")).runs == 2
    assert (await broker.tick_counts("hourly")).latest == START + 1
    never = await broker.tick_counts("never")
    assert (never.runs, never.skipped, never.latest) == (0, 0, None)


async def test_without_overlap_a_tick_is_skipped_while_the_last_run_is_running(
    broker: Broker, clock: FakeClock
) -> None:
    first = await store(broker, START, overlap=False)
    (running,) = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE)
    assert running.id == first.run_id
    skipped = await store(broker, START + 1, overlap=False)
    assert skipped.result is TickResult.SKIPPED
    assert skipped.run_id is None
    # Overlap allowed: the tick gets its run whatever is running.
    assert (await store(broker, START + 2)).result is TickResult.STORED
    assert await broker.complete("w1", running.id, running.attempts, "null")
    clock.advance(3)
    assert (await store(broker, START + 3, overlap=False)).result is TickResult.STORED
    counts = await broker.tick_counts("nightly")
    assert (counts.runs, counts.skipped) == (3, 1)
    # A skipped tick is stored: nobody stores it again later.
    assert (await store(broker, START + 1, overlap=False)).result is TickResult.TAKEN


async def test_a_scheduled_but_unclaimed_run_does_not_block_the_next_tick(broker: Broker) -> None:
    assert (await store(broker, START, overlap=False)).result is TickResult.STORED
    assert (await store(broker, START + 1, overlap=False)).result is TickResult.STORED


async def test_ticks_and_keyed_runs_keep_their_priority_for_the_claim(broker: Broker) -> None:
    plain = await broker.submit("say", PAYLOAD, scheduled_at=START - 1)
    tick = await broker.submit_tick("nightly", START, "say", PAYLOAD, priority=2)
    keyed, created = await broker.submit_once("only", "say", PAYLOAD, priority=1)
    assert created
    assert keyed.priority == 1
    assert tick.run_id is not None
    stored = await broker.get(tick.run_id)
    assert stored is not None
    assert stored.priority == 2
    claimed = await broker.claim("w1", ["say"], limit=3, lease_seconds=LEASE)
    assert [run.id for run in claimed] == [tick.run_id, keyed.id, plain.id]


@pytest.mark.parametrize(
    ("schedule", "due", "error", "match"),
    [
        ("", START, ValueError, "schedule must not be empty"),
        (None, START, TypeError, "schedule must be a str, got None"),
        ("s", "soon", TypeError, "due must be epoch seconds, got 'soon'"),
        ("s", float("nan"), ValueError, "due must be finite, got nan"),
    ],
)
async def test_bad_ticks_are_refused_at_the_call(
    broker: Broker, schedule: object, due: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await broker.submit_tick(schedule, due, "say", PAYLOAD)  # type: ignore[arg-type]


async def test_a_lease_has_one_holder_until_it_expires_or_is_released(
    broker: Broker, clock: FakeClock
) -> None:
    assert await broker.get_lease("leader") is None
    lease = await broker.acquire_lease("leader", "a", lease_seconds=10)
    assert lease == Lease("leader", "a", START + 10)
    assert await broker.acquire_lease("leader", "b", lease_seconds=10) is None
    clock.advance(5)
    # Renewing moves the expiry; the other holder still cannot take it.
    assert await broker.acquire_lease("leader", "a", lease_seconds=10) == Lease(
        "leader", "a", START + 15
    )
    clock.advance(9.9)
    assert await broker.acquire_lease("leader", "b", lease_seconds=10) is None
    clock.advance(0.1)
    # Expired: anyone may take it, and the old holder can no longer release it.
    assert await broker.acquire_lease("leader", "b", lease_seconds=10) == Lease(
        "leader", "b", START + 25
    )
    assert not await broker.release_lease("leader", "a")
    assert await broker.get_lease("leader") == Lease("leader", "b", START + 25)
    assert await broker.release_lease("leader", "b")
    assert await broker.get_lease("leader") is None
    assert await broker.acquire_lease("leader", "a", lease_seconds=10) is not None


@pytest.mark.parametrize(
    ("name", "holder", "seconds", "error", "match"),
    [
        ("", "a", 1.0, ValueError, "lease name must not be empty"),
        ("x", 3, 1.0, TypeError, "lease holder must be a str, got 3"),
        ("x", "a", 0, ValueError, "lease_seconds must be a finite number > 0, got 0"),
        ("x", "a", "1", TypeError, "lease_seconds must be a number, got '1'"),
    ],
)
async def test_bad_lease_calls_are_refused(
    broker: Broker,
    name: object,
    holder: object,
    seconds: object,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        await broker.acquire_lease(name, holder, lease_seconds=seconds)  # type: ignore[arg-type]


async def test_a_closed_broker_refuses_cluster_calls(broker: Broker) -> None:
    await broker.close()
    with pytest.raises(BrokerError, match="not open"):
        await store(broker, START)
    with pytest.raises(BrokerError, match="not open"):
        await broker.acquire_lease("leader", "a", lease_seconds=1)


async def test_a_broker_without_cluster_storage_says_so() -> None:
    class Bare(BaseBroker):
        url = "bare://"
        from_url = _open = _insert = _claim = _heartbeat = _complete = None  # type: ignore[assignment]
        _fail = _release = _cancel = _get = _counts = _purge = close = None  # type: ignore[assignment]
        _claim_run = None  # type: ignore[assignment]

    with pytest.raises(BrokerError, match="Bare does not support scheduled ticks"):
        await store(Bare(), START)
    with pytest.raises(BrokerError, match="Bare does not support leases"):
        await Bare().acquire_lease("leader", "a", lease_seconds=1)


async def test_processes_racing_on_one_database_store_each_tick_once(
    racers: list[Broker],
) -> None:
    # Separate connections, as separate processes have, all storing the same 20 ticks.
    results: dict[float, list[TickResult]] = {}

    async def store_all(each: Broker) -> None:
        for k in range(20):
            stored = await store(each, START + k)
            results.setdefault(START + k, []).append(stored.result)

    async with anyio.create_task_group() as group:
        for each in racers:
            group.start_soon(store_all, each)
    assert len(results) == 20
    assert all(
        sorted(r.value for r in got) == ["stored"] + ["taken"] * 3 for got in results.values()
    )
    assert (await racers[0].counts())[RunState.SCHEDULED] == 20


async def test_processes_racing_for_a_lease_get_one_holder(racers: list[Broker]) -> None:
    won: list[str] = []

    async def take(each: Broker, holder: str) -> None:
        if await each.acquire_lease("leader", holder, lease_seconds=60) is not None:
            won.append(holder)

    async with anyio.create_task_group() as group:
        for number, each in enumerate(racers):
            group.start_soon(take, each, f"holder-{number}")
    assert len(won) == 1
    lease = await racers[0].get_lease("leader")
    assert lease is not None
    assert lease.holder == won[0]


async def test_applications_in_two_schemas_of_one_database_keep_their_own(
    postgres_url: str,
) -> None:
    with postgres_schema(postgres_url) as first_url, postgres_schema(postgres_url) as second_url:
        first, second = broker_from_url(first_url), broker_from_url(second_url)
        try:
            for each in (first, second):
                await each.open()
                tick = await store(each, START)
                assert tick.result is TickResult.STORED
                assert await each.acquire_lease("leader", "a", lease_seconds=60) is not None
            run, _ = await first.submit_once("report", "say", PAYLOAD)
            other, created = await second.submit_once("report", "say", PAYLOAD)
            assert created
            assert other.id != run.id
            assert await second.get(run.id) is None
            assert [r.id for r in await second.list_runs()] == [other.id, tick.run_id]
        finally:
            await first.close()
            await second.close()


# --- what a purge deletes of the cluster's storage ------------------------------------------


async def stored_rows(broker: Broker, table: str) -> int:
    """How many rows the broker's storage holds in ``table`` ("ticks" or "keys")."""
    if isinstance(broker, MemoryBroker):
        if table == "ticks":
            return sum(len(ticks) for ticks in broker._ticks.values())
        return len(broker._keys)
    if isinstance(broker, SqliteBroker):
        rows: int = await broker._call(
            lambda conn: conn.execute(f"SELECT COUNT(*) FROM anyservice_{table}").fetchone()[0]
        )
        return rows
    assert isinstance(broker, PostgresBroker)
    ((count,),) = await broker._call(broker._execute(f"SELECT count(*) FROM {{{table}}}", {}))
    return int(count)


async def finish_due_runs(broker: Broker) -> None:
    for run in await broker.claim("w1", ["say"], limit=100, lease_seconds=LEASE):
        assert await broker.complete("w1", run.id, run.attempts, "null")


async def test_a_purge_deletes_the_ticks_of_the_runs_it_deletes_but_each_latest_tick(
    broker: Broker, clock: FakeClock
) -> None:
    for due in (START - 3, START - 2, START - 1):
        await store(broker, due)
    await store(broker, START - 1, schedule="hourly")
    await finish_due_runs(broker)
    assert await stored_rows(broker, "ticks") == 4
    clock.advance(100)

    assert await broker.purge(older_than=50) == 4

    # Each schedule's latest tick stays, for the next one to be planned from.
    assert await stored_rows(broker, "ticks") == 2
    counts = await broker.tick_counts("nightly")
    assert (counts.runs, counts.skipped, counts.latest) == (3, 0, START - 1)
    assert (await broker.tick_counts("hourly")).runs == 1
    assert (await store(broker, START + 100)).result is TickResult.STORED
    assert (await store(broker, START - 1)).result is TickResult.TAKEN
    assert (await broker.tick_counts("nightly")).runs == 4


async def test_a_purge_keeps_the_ticks_of_runs_it_keeps(broker: Broker, clock: FakeClock) -> None:
    first = await store(broker, START - 2)
    await store(broker, START - 1)
    await store(broker, START)
    (running,) = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE * 1000)
    assert running.id == first.run_id
    clock.advance(100)
    await finish_due_runs(broker)  # finished after the cutoff: kept

    assert await broker.purge(older_than=50) == 0

    assert await stored_rows(broker, "ticks") == 3
    # The tick of the run still RUNNING still says so: without overlap, the next is skipped.
    assert (await store(broker, START + 100, overlap=False)).result is TickResult.SKIPPED


async def test_a_purge_deletes_skipped_ticks_due_before_the_cutoff(
    broker: Broker, clock: FakeClock
) -> None:
    first = await store(broker, START - 3, overlap=False)
    (running,) = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE * 1000)
    assert running.id == first.run_id
    for due in (START - 2, START - 1, START + 200):
        assert (await store(broker, due, overlap=False)).result is TickResult.SKIPPED
    clock.advance(100)

    assert await broker.purge(older_than=50) == 0

    # The run's tick and the latest skipped tick are left.
    assert await stored_rows(broker, "ticks") == 2
    counts = await broker.tick_counts("nightly")
    assert (counts.runs, counts.skipped, counts.latest) == (1, 3, START + 200)


async def test_a_purge_deletes_the_keys_of_the_runs_it_deletes(
    broker: Broker, clock: FakeClock
) -> None:
    old, _ = await broker.submit_once("order-1", "say", PAYLOAD)
    kept, _ = await broker.submit_once("order-2", "say", PAYLOAD, scheduled_at=START + 1000)
    assert await broker.cancel(old.id)
    clock.advance(100)

    assert await broker.purge(older_than=50) == 1

    assert await stored_rows(broker, "keys") == 1
    again, created = await broker.submit_once("order-2", "say", PAYLOAD)
    assert (again.id, created) == (kept.id, False)
    fresh, created = await broker.submit_once("order-1", "say", PAYLOAD)
    assert created
    assert fresh.id != old.id


async def test_a_sqlite_file_with_ticks_from_before_their_counts_were_kept_counts_them(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "runs.db"
    first = SqliteBroker(path, clock=clock)
    async with first:
        for due in (START, START + 1):
            await store(first, due)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE anyservice_schedules")  # as a file made before they were
    second = SqliteBroker(path, clock=clock)
    async with second:
        counts = await second.tick_counts("nightly")
        assert (counts.runs, counts.skipped, counts.latest) == (2, 0, START + 1)
        assert (await store(second, START + 2)).result is TickResult.STORED
        assert (await second.tick_counts("nightly")).runs == 3
