"""What only the PostgreSQL broker does: its URL, schema versions, LISTEN/NOTIFY, lost
connections, cancelled statements and the housekeeping lock, on a real server.

The promises every broker keeps are in ``test_broker_conformance.py``, which runs on
PostgreSQL too.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import psycopg
import pytest
from psycopg import sql

from anyservice import ServiceState
from anyservice.taskqueue import BrokerError, RunRecord, RunState, TaskQueue, TaskWorker
from anyservice.taskqueue.brokers import broker_from_url
from anyservice.taskqueue.brokers._postgres import SCHEMA_VERSION, PostgresBroker
from tests._postgres import postgres_schema

pytestmark = pytest.mark.anyio

PAYLOAD = '{"args":[],"kwargs":{}}'
#: Long enough that a wait ending sooner was woken by a notification, not a poll.
NO_POLLING = "3600"
PROMPTLY = 10.0
#: What a server restart does to every client connection but the test's own.
TERMINATE_OTHERS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
)


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    with postgres_schema(postgres_url, poll_interval=NO_POLLING) as url:
        yield url


@pytest.fixture
async def broker(url: str) -> AsyncIterator[PostgresBroker]:
    async with PostgresBroker(url) as broker:
        yield broker


def schema_of(url: str) -> str:
    return url.split("schema=")[1].split("&")[0]


def server_of(url: str) -> str:
    return url.split("?")[0]


async def admin(url: str, query: sql.Composable | str, *args: object) -> list[tuple[object, ...]]:
    """Run one statement on a connection of the test's own, as another program would."""

    def run() -> list[tuple[object, ...]]:
        with psycopg.connect(server_of(url), autocommit=True) as conn:
            cursor = conn.execute(query, args or None)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    return await anyio.to_thread.run_sync(run)


# --- the URL -----------------------------------------------------------------------------


def test_both_schemes_make_a_postgres_broker_with_the_password_masked() -> None:
    for scheme in ("postgresql", "postgres"):
        broker = broker_from_url(f"{scheme}://app:s3cret@db.example:5433/runs?schema=jobs")
        assert isinstance(broker, PostgresBroker)
        assert broker.url == f"{scheme}://app:***@db.example:5433/runs?schema=jobs"
        assert "s3cret" not in repr(broker)
        assert broker.schema == "jobs"
        assert broker.listens


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("schema=", "schema"),
        ("listen=maybe", "listen"),
        ("pool_size=0", "pool_size"),
        ("pool_size=many", "pool_size"),
        ("poll_interval=-1", "poll_interval"),
        ("pool_timeout=nan", "pool_timeout"),
    ],
)
def test_bad_url_options_are_refused_by_name(query: str, option: str) -> None:
    with pytest.raises(ValueError, match=f"option {option}="):
        PostgresBroker(f"postgresql://app@localhost/runs?{query}")


def test_listen_false_polls_only() -> None:
    assert not PostgresBroker("postgresql://app@localhost/runs?listen=false").listens


async def test_an_unreachable_server_is_a_broker_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        broker = PostgresBroker(f"postgresql://app@127.0.0.1:{port}/x?pool_timeout=0.5")
        with pytest.raises(BrokerError, match=r"could not connect within 0\.5 s"):
            await broker.open()


async def test_libpq_options_in_the_url_reach_the_server(postgres_url: str) -> None:
    with postgres_schema(postgres_url, options="-c%20statement_timeout%3D4321") as url:
        async with PostgresBroker(url) as broker:

            def setting(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
                return conn.execute("SHOW statement_timeout").fetchall()

            assert await broker._call(setting) == [("4321ms",)]


# --- the schema --------------------------------------------------------------------------


async def test_workers_starting_together_on_an_empty_database_make_one_schema(url: str) -> None:
    brokers = [PostgresBroker(url) for _ in range(4)]
    try:
        async with anyio.create_task_group() as tg:
            for broker in brokers:
                tg.start_soon(broker.open)
        run = await brokers[0].submit("say", PAYLOAD)
        assert await brokers[3].get(run.id) == run
    finally:
        for broker in brokers:
            await broker.close()
    rows = await admin(url, f"SELECT value FROM {schema_of(url)}.anyservice_meta")
    assert rows == [(str(SCHEMA_VERSION),)]


async def test_tables_of_the_first_version_gain_the_trace_context_column(url: str) -> None:
    # The tables as the first version made them, with a run stored.
    from anyservice.taskqueue.brokers._postgres import _MIGRATIONS

    schema = sql.Identifier(schema_of(url))
    await admin(url, sql.SQL("CREATE SCHEMA {}").format(schema))
    await admin(
        url,
        sql.SQL(
            "CREATE TABLE {}.anyservice_meta (key text PRIMARY KEY, value text NOT NULL)"
        ).format(schema),
    )
    for statement in _MIGRATIONS[0]:
        await admin(url, sql.SQL(statement).format(s=schema))
    await admin(
        url, sql.SQL("INSERT INTO {}.anyservice_meta VALUES ('schema_version', '1')").format(schema)
    )
    await admin(
        url,
        sql.SQL(
            "INSERT INTO {}.anyservice_runs (id, task, payload, state, attempts, max_attempts,"
            " retries_left, retry_delay, created_at, scheduled_at)"
            " VALUES ('old', 'say', %s, 'SCHEDULED', 0, 3, 0, 0, 1, 1)"
        ).format(schema),
        PAYLOAD,
    )
    async with PostgresBroker(url) as broker:
        old = await broker.get("old")
        assert old is not None
        assert old.trace_context is None
        traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        run = await broker.submit("say", PAYLOAD, trace_context=traced)
        assert (await broker.get(run.id)) == run
        assert run.trace_context == traced
    rows = await admin(url, sql.SQL("SELECT value FROM {}.anyservice_meta").format(schema))
    assert rows == [(str(SCHEMA_VERSION),)]


async def test_a_newer_schema_is_refused(url: str) -> None:
    async with PostgresBroker(url):
        pass
    meta = sql.SQL("{}.anyservice_meta").format(sql.Identifier(schema_of(url)))
    await admin(url, sql.SQL("UPDATE {} SET value = '99'").format(meta))
    with pytest.raises(BrokerError, match="version 99, newer than this anyservice"):
        await PostgresBroker(url).open()


async def test_tables_of_the_first_version_gain_the_priority_column(url: str) -> None:
    async with PostgresBroker(url) as broker:
        old = await broker.submit("say", PAYLOAD)
    schema = sql.Identifier(schema_of(url))
    # Back to the first version's tables: no priority column nor its index, nor the later
    # trace context.
    await admin(url, sql.SQL("DROP INDEX {}.anyservice_runs_claim_order").format(schema))
    await admin(url, sql.SQL("ALTER TABLE {}.anyservice_runs DROP COLUMN priority").format(schema))
    await admin(
        url, sql.SQL("ALTER TABLE {}.anyservice_runs DROP COLUMN trace_context").format(schema)
    )
    await admin(url, sql.SQL("UPDATE {}.anyservice_meta SET value = '1'").format(schema))
    async with PostgresBroker(url) as broker:
        urgent = await broker.submit("say", PAYLOAD, priority=1)
        assert await broker.get(old.id) == old
        claimed = await broker.claim("w1", ["say"], limit=2, lease_seconds=30)
    assert [run.id for run in claimed] == [urgent.id, old.id]
    rows = await admin(url, sql.SQL("SELECT value FROM {}.anyservice_meta").format(schema))
    assert rows == [(str(SCHEMA_VERSION),)]


# --- wake-ups ----------------------------------------------------------------------------


async def test_a_submit_in_another_process_wakes_a_waiting_worker(url: str) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        assert await worker.claim("w1", ["say"], limit=1, lease_seconds=30) == []
        woke = anyio.Event()

        async def wait() -> None:
            await worker.wait_for_work(timeout=3600)
            woke.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.1)
            assert not woke.is_set()
            await submitter.submit("say", PAYLOAD)
            with anyio.fail_after(PROMPTLY):
                await woke.wait()


async def test_a_result_awaited_in_another_process_arrives_on_notification(url: str) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as waiter:
        run = await worker.submit("say", PAYLOAD)
        done: list[RunState] = []

        async def wait() -> None:
            record = await waiter.wait_until_finished(run.id, timeout=3600)
            assert record is not None
            done.append(record.state)

        # Bounded: a lost wake-up must fail the test, not hang the suite.
        with anyio.fail_after(PROMPTLY + 1):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await worker.claim("w1", ["say"], limit=1, lease_seconds=30)
                await anyio.sleep(0.1)
                assert not done
                started = time.monotonic()
                assert await worker.complete("w1", run.id, 1, '"ok"')
        assert done == [RunState.COMPLETED]
        assert time.monotonic() - started < PROMPTLY


class ListensLate(PostgresBroker):
    """A real broker that runs ``before_listening`` (once) just before it next LISTENs.

    It puts a change from another process right before this broker's LISTEN takes
    effect: the change's notification reaches nobody, so only a look at the database
    after LISTEN can see it.
    """

    before_listening: Callable[[], Coroutine[Any, Any, object]] | None = None

    def _connect_listener(self) -> psycopg.Connection[Any]:
        step, self.before_listening = self.before_listening, None
        if step is not None:
            anyio.from_thread.run(step)
        return super()._connect_listener()


async def test_a_run_finished_as_the_waiter_starts_listening_is_seen(url: str) -> None:
    async with PostgresBroker(url) as worker, ListensLate(url) as waiter:
        run = await worker.submit("say", PAYLOAD)
        assert await worker.claim("w1", ["say"], limit=1, lease_seconds=30)
        waiter.before_listening = lambda: worker.complete("w1", run.id, 1, '"ok"')
        # Polling is off (the fixture's URL): the wait must look after LISTEN.
        with anyio.fail_after(PROMPTLY):
            record = await waiter.wait_until_finished(run.id, timeout=3600)
        assert record is not None
        assert record.state is RunState.COMPLETED
        assert waiter.before_listening is None  # it did finish right before LISTEN


async def test_work_submitted_as_the_worker_starts_listening_is_claimed(url: str) -> None:
    async with ListensLate(url) as worker, PostgresBroker(url) as submitter:
        worker.before_listening = lambda: submitter.submit("say", PAYLOAD)
        with anyio.fail_after(PROMPTLY):
            claimed = await worker.claim("w1", ["say"], limit=1, lease_seconds=30)
            while not claimed:
                await worker.wait_for_work(timeout=3600)
                claimed = await worker.claim("w1", ["say"], limit=1, lease_seconds=30)
        assert worker.before_listening is None


async def test_a_run_finished_while_the_listen_connection_was_down_is_seen(url: str) -> None:
    async with PostgresBroker(url) as worker, ListensLate(url) as waiter:
        run = await worker.submit("say", PAYLOAD)
        assert await waiter.claim("w1", ["say"], limit=1, lease_seconds=30)  # LISTENs first
        assert waiter._listener is not None
        # The LISTEN connection is lost; the run finishes just before it is made again.
        await admin(url, "SELECT pg_terminate_backend(%s)", waiter._listener.info.backend_pid)
        waiter.before_listening = lambda: worker.complete("w1", run.id, 1, '"ok"')
        with anyio.fail_after(PROMPTLY):
            record = await waiter.wait_until_finished(run.id, timeout=3600)
        assert record is not None
        assert record.state is RunState.COMPLETED
        assert (waiter.before_listening, waiter.listen_connects) == (None, 2)


class CountsReads(PostgresBroker):
    """A real broker that counts its reads of one run (``get``)."""

    reads = 0

    async def _get(self, run_id: str) -> Any:
        self.reads += 1
        return await super()._get(run_id)


async def test_a_run_submitted_while_listening_is_read_once_it_finished(url: str) -> None:
    async with CountsReads(url) as submitter, PostgresBroker(url) as worker:
        earlier = await submitter.submit("say", PAYLOAD)
        # Not listening when it was stored: the wait reads it first (and LISTENs).
        record = await submitter.wait_until_finished(earlier.id, timeout=0.05)
        assert record is not None
        assert submitter.reads >= 1
        assert submitter.listen_connects == 1
        run = await submitter.submit("say", PAYLOAD)
        reads = submitter.reads
        finished: dict[str, RunState] = {}
        with anyio.fail_after(PROMPTLY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(note_finish, submitter, run.id, finished)
                await anyio.sleep(0.1)
                # Stored while listening: its finish is sure to be notified, so no read yet.
                assert submitter.reads == reads
                claimed = await worker.claim("w1", ["say"], limit=2, lease_seconds=30)
                assert {r.id for r in claimed} == {earlier.id, run.id}
                assert await worker.complete("w1", run.id, 1, '"ok"')
        assert finished == {run.id: RunState.COMPLETED}
        assert submitter.reads == reads + 1


class CountsPooled(PostgresBroker):
    """A real broker that counts its statements on pooled connections (in a thread)."""

    pooled = 0

    async def _call(self, operation: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        self.pooled += 1
        return await super()._call(operation)


async def test_statements_take_the_listen_connection_from_a_waiter_reading_it(url: str) -> None:
    async with CountsPooled(url) as broker, PostgresBroker(url) as worker:
        run = await broker.submit("say", PAYLOAD)
        finished: list[RunRecord | None] = []

        async def wait() -> None:
            finished.append(await broker.wait_until_finished(run.id, timeout=3600))

        with anyio.fail_after(PROMPTLY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                # Polled with a deadline: the waiter reads the LISTEN connection.
                while broker._direct is None or not broker._direct.reading:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                pooled = broker.pooled
                for _ in range(20):
                    await broker.submit("say", PAYLOAD)
                    record = await broker.get(run.id)
                    assert record is not None
                    assert record.state is RunState.SCHEDULED
                assert broker.pooled == pooled  # each on the LISTEN connection
                assert broker.listen_connects == 1
                # The waiter reads it again, and hears of the finish.
                assert await worker.claim_run("w1", run.id, lease_seconds=30) is not None
                assert await worker.complete("w1", run.id, 1, '"ok"')
        assert [record.state if record else None for record in finished] == [RunState.COMPLETED]


async def test_a_run_submitted_while_listening_is_read_after_the_connection_is_lost(
    url: str,
) -> None:
    async with CountsReads(url) as submitter, PostgresBroker(url) as worker:
        assert await submitter.claim("w0", ["other"], limit=1, lease_seconds=30) == []
        assert submitter._listener is not None
        run = await submitter.submit("say", PAYLOAD)
        # Lost after the submit, with the finish: its notification reaches nobody.
        await admin(url, "SELECT pg_terminate_backend(%s)", submitter._listener.info.backend_pid)
        assert await worker.claim("w1", ["say"], limit=1, lease_seconds=30)
        assert await worker.complete("w1", run.id, 1, '"ok"')
        # Polling is off (the fixture's URL): the lost connection makes the wait read.
        with anyio.fail_after(PROMPTLY):
            record = await submitter.wait_until_finished(run.id, timeout=3600)
        assert record is not None
        assert record.state is RunState.COMPLETED
        assert submitter.reads == 1  # only once the lost connection said it must


def keepalives_of(conn: psycopg.Connection[Any]) -> tuple[int, int, int, int]:
    """The TCP keepalive settings of ``conn``'s socket: on, idle, interval, count."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        )


async def test_the_listen_connection_sends_keepalives_unless_the_url_sets_them(
    postgres_url: str,
) -> None:
    # A server gone without a word is noticed from the socket, not only by the polls.
    for options, expected in (({}, (1, 5, 2, 3)), ({"keepalives_idle": "30"}, (1, 30, 2, 3))):
        with postgres_schema(postgres_url, **options) as url:
            async with PostgresBroker(url) as broker:
                assert await broker.claim("w1", ["say"], limit=1, lease_seconds=30) == []
                assert broker._listener is not None
                assert keepalives_of(broker._listener) == expected


async def note_finish(broker: PostgresBroker, run_id: str, finished: dict[str, RunState]) -> None:
    """Wait for the run to finish through ``broker``; note its final state in ``finished``."""
    record = await broker.wait_until_finished(run_id, timeout=3600)
    assert record is not None
    finished[run_id] = record.state


async def test_results_completed_together_wake_their_waiters_in_another_process(
    url: str,
) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as waiter:
        runs = await worker.submit_many("say", [PAYLOAD] * 3)
        finished: dict[str, RunState] = {}
        # Polling is off (the fixture's URL): only the notification can wake them.
        with anyio.fail_after(PROMPTLY):
            async with anyio.create_task_group() as tg:
                for run in runs[:2]:
                    tg.start_soon(note_finish, waiter, run.id, finished)
                await worker.claim("w1", ["say"], limit=3, lease_seconds=30)
                await anyio.sleep(0.1)
                assert not finished
                done = await worker.complete_many("w1", {run.id: (1, '"ok"') for run in runs})
        assert done == {run.id for run in runs}
        assert finished == {run.id: RunState.COMPLETED for run in runs[:2]}


async def test_many_waiters_for_different_runs_each_get_their_own(url: str) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as waiter:
        runs = [await worker.submit("say", PAYLOAD) for _ in range(5)]
        finished: dict[str, RunState] = {}

        with anyio.fail_after(PROMPTLY):
            async with anyio.create_task_group() as tg:
                for run in runs:
                    tg.start_soon(note_finish, waiter, run.id, finished)
                await worker.claim("w1", ["say"], limit=5, lease_seconds=30)
                for run in runs:
                    await anyio.sleep(0.02)
                    assert await worker.complete("w1", run.id, 1, "null")
        assert finished == {run.id: RunState.COMPLETED for run in runs}


async def test_without_listen_waits_poll(postgres_url: str) -> None:
    with postgres_schema(postgres_url, listen="false", poll_interval="0.05") as url:
        async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
            assert await worker.claim("w1", ["say"], limit=1, lease_seconds=30) == []
            run = await submitter.submit("say", PAYLOAD)
            with anyio.fail_after(PROMPTLY):
                while not await worker.claim("w1", ["say"], limit=1, lease_seconds=30):
                    await worker.wait_for_work(timeout=3600)
            assert worker.listen_connects == 0
            with anyio.fail_after(PROMPTLY):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(submitter.wait_until_finished, run.id, 3600)
                    await anyio.sleep(0.1)
                    await worker.complete("w1", run.id, 1, "null")


# --- the way from a submit to a start: named runs, the direct connection --------------------


def notifications(url: str, count: int, ready: anyio.Event) -> list[str]:
    """The payloads of the next ``count`` notifications of the broker (run in a thread)."""
    channel = sql.Identifier(f"anyservice:{schema_of(url)}")
    with psycopg.connect(server_of(url), autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(channel))
        anyio.from_thread.run_sync(ready.set)
        return [n.payload for n in conn.notifies(timeout=PROMPTLY, stop_after=count)]


async def test_a_submit_of_a_due_run_names_it_in_its_notification(
    url: str, broker: PostgresBroker
) -> None:
    got: list[str] = []
    ready = anyio.Event()

    async def listen() -> None:
        got.extend(await anyio.to_thread.run_sync(notifications, url, 2, ready))

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen)
        await ready.wait()
        due = await broker.submit("say", PAYLOAD)
        await broker.submit("say", PAYLOAD, scheduled_at=time.time() + 3600)
    # A run not due yet is work without a name: the claim that follows looks at every run.
    assert got == [f"w {due.id}", "w"]


@asynccontextmanager
async def holding(url: str, query: sql.Composed, *args: object) -> AsyncIterator[None]:
    """Hold the locks ``query`` takes, in a transaction of another connection, for the block."""

    def hold(locked: anyio.Event, release: anyio.Event) -> None:
        with psycopg.connect(server_of(url)) as conn:
            conn.execute(query, args or None)
            anyio.from_thread.run_sync(locked.set)
            anyio.from_thread.run(release.wait)

    locked, release = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, hold, locked, release)
        await locked.wait()
        try:
            yield
        finally:
            release.set()


async def claim_after_wake(worker: PostgresBroker, submit: Callable[[], Any]) -> list[str]:
    """Wait for work on ``worker`` while ``submit()`` runs elsewhere, then claim."""
    assert await worker.claim("w1", ["say"], limit=10, lease_seconds=30) == []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.wait_for_work, 3600)
        await anyio.sleep(0.05)
        await submit()
    runs = await worker.claim("w1", ["say"], limit=10, lease_seconds=30)
    return sorted(run.id for run in runs)


async def test_a_run_named_by_its_notification_is_claimed(url: str) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        submitted: list[str] = []

        async def submit() -> None:
            submitted.append((await submitter.submit("say", PAYLOAD)).id)

        with anyio.fail_after(PROMPTLY):
            assert await claim_after_wake(worker, submit) == submitted
        (run,) = [await worker.get(run_id) for run_id in submitted]
        assert run is not None
        assert (run.state, run.attempts, run.lease_owner) == (RunState.RUNNING, 1, "w1")


async def claimed_ahead(worker: PostgresBroker, submitter: PostgresBroker) -> str:
    """A run submitted while ``worker`` waits for work between claims by ``w1``, and found
    RUNNING under ``w1`` before the worker claims again: claimed as its notification was
    read. (A first round prepares the claim of named runs; its run is completed.)"""

    async def submit() -> None:
        await submitter.submit("say", PAYLOAD)

    (first,) = await claim_after_wake(worker, submit)
    assert await worker.complete("w1", first, 1, "null")
    assert await worker.claim("w1", ["say"], limit=10, lease_seconds=30) == []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.wait_for_work, 3600)
        await anyio.sleep(0.05)
        run = await submitter.submit("say", PAYLOAD)
    # Polled with a deadline (the caller's): another process's claim sets no event here.
    while (record := await submitter.get(run.id)) is None or record.state is RunState.SCHEDULED:  # noqa: ASYNC110
        await anyio.sleep(0.01)
    assert (record.state, record.lease_owner, record.attempts) == (RunState.RUNNING, "w1", 1)
    return run.id


async def test_a_named_run_is_claimed_as_the_waiting_worker_reads_its_notification(
    url: str,
) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        with anyio.fail_after(PROMPTLY):
            run_id = await claimed_ahead(worker, submitter)
            # The wait ends at once while the runs claimed ahead are not taken.
            await worker.wait_for_work(3600)
            runs = await worker.claim("w1", ["say"], limit=10, lease_seconds=30)
        assert [(run.id, run.attempts) for run in runs] == [(run_id, 1)]


async def test_runs_claimed_ahead_are_taken_by_a_claim_with_results(url: str) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        other = await submitter.submit("other", PAYLOAD)
        with anyio.fail_after(PROMPTLY):
            assert await worker.claim_run("w1", other.id, lease_seconds=30) is not None
            run_id = await claimed_ahead(worker, submitter)
            done, runs = await worker.complete_and_claim(
                "w1", {other.id: (1, "null")}, ["say"], limit=10, lease_seconds=30
            )
        assert done == {other.id}
        assert [(run.id, run.attempts) for run in runs] == [(run_id, 1)]


async def test_runs_claimed_ahead_are_handed_back_to_a_claim_with_other_arguments(
    url: str,
) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        with anyio.fail_after(PROMPTLY):
            run_id = await claimed_ahead(worker, submitter)
            runs = await worker.claim("w2", ["say"], limit=10, lease_seconds=30)
        assert [(run.id, run.lease_owner, run.attempts) for run in runs] == [(run_id, "w2", 1)]


async def test_runs_claimed_ahead_are_handed_back_as_the_broker_closes(url: str) -> None:
    async with PostgresBroker(url) as submitter:
        with anyio.fail_after(PROMPTLY):
            async with PostgresBroker(url) as worker:
                run_id = await claimed_ahead(worker, submitter)
            runs = await submitter.claim("w3", ["say"], limit=10, lease_seconds=30)
        assert [(run.id, run.lease_owner, run.attempts) for run in runs] == [(run_id, "w3", 1)]


class StopsAsWorkArrives(PostgresBroker):
    """A real broker whose first wait for work begun once ``worker`` is set stops that
    worker as it returns: between the wait and the claim that would take what came."""

    worker: TaskWorker | None = None
    #: Set as a wait for work begins (the test makes it).
    waiting: anyio.Event
    #: The runs claimed ahead for the next claim as that wait returned, before the stop.
    ahead: list[str] | None = None

    async def wait_for_work(self, timeout: float) -> None:
        worker, self.worker = self.worker, None
        self.waiting.set()
        await super().wait_for_work(timeout)
        if worker is not None:
            self.ahead = [] if self._ahead is None else self._ahead.named
            await worker.stop()


async def test_runs_claimed_ahead_are_released_when_the_worker_stops_before_claiming(
    url: str,
) -> None:
    broker = StopsAsWorkArrives(url)
    queue = TaskQueue(broker=broker)

    @queue.task
    async def noop() -> None:
        pass

    async with queue, PostgresBroker(url) as submitter:
        worker = TaskWorker(noop)
        with anyio.fail_after(PROMPTLY):
            broker.waiting = anyio.Event()
            async with worker:
                # A first run, submitted as the worker waits, is claimed by id: that
                # prepares the claim of named runs on the worker's side.
                await broker.waiting.wait()
                first = await submitter.submit(noop.name, PAYLOAD)
                finished = await submitter.wait_until_finished(first.id, timeout=PROMPTLY)
                assert finished is not None
                assert finished.state is RunState.COMPLETED
                broker.waiting = anyio.Event()
                broker.worker = worker
                await broker.waiting.wait()
                run = await submitter.submit(noop.name, PAYLOAD)
                await worker.wait_for(ServiceState.STOPPED, ServiceState.CRASHED)
        # The run was claimed for the worker as its notification was read...
        assert broker.ahead == [run.id]
        # ...and is claimable again at once, the broker still open.
        record = await submitter.get(run.id)
        assert record is not None
        assert (record.state, record.lease_owner, record.attempts) == (
            RunState.SCHEDULED,
            None,
            0,
        )


async def test_work_without_names_makes_the_next_claim_look_at_every_run(url: str) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        submitted: list[str] = []

        async def submit() -> None:
            # Stored together, announced without names; then one named.
            submitted.extend(run.id for run in await submitter.submit_many("say", [PAYLOAD] * 2))
            submitted.append((await submitter.submit("say", PAYLOAD)).id)

        with anyio.fail_after(PROMPTLY):
            assert await claim_after_wake(worker, submit) == sorted(submitted)


async def test_a_named_run_of_another_task_is_not_claimed(
    url: str,
) -> None:
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        submitted: list[str] = []

        async def submit() -> None:
            await submitter.submit("other", PAYLOAD)  # named, not the worker's task
            submitted.append((await submitter.submit("say", PAYLOAD)).id)

        with anyio.fail_after(PROMPTLY):
            assert await claim_after_wake(worker, submit) == submitted


async def test_a_stream_of_named_runs_does_not_put_off_taking_over_an_expired_lease(
    postgres_url: str,
) -> None:
    with postgres_schema(postgres_url, poll_interval="0.1") as url:
        async with PostgresBroker(url) as worker, PostgresBroker(url) as other:
            assert await worker.claim("w1", ["say"], limit=10, lease_seconds=30) == []
            # Leased after the worker's last full look: its lease is news to the worker.
            lapsed = await other.submit("say", PAYLOAD)
            (taken,) = await other.claim("w0", ["say"], limit=1, lease_seconds=0.3)
            assert taken.id == lapsed.id
            claimed: set[str] = set()
            with anyio.fail_after(PROMPTLY):
                while lapsed.id not in claimed:
                    # Submitted here, so named before every claim (and the worker never
                    # waits, so it reads no notification of the other's).
                    await worker.submit("say", PAYLOAD)
                    runs = await worker.claim("w1", ["say"], limit=10, lease_seconds=30)
                    claimed.update(run.id for run in runs)
                    await anyio.sleep(0.02)
            run = await worker.get(lapsed.id)
            assert run is not None
            assert (run.lease_owner, run.attempts) == ("w1", 2)


async def test_task_names_with_quotes_and_braces_are_claimed_by_name(url: str) -> None:
    odd = "say \"hi\", {to} \\ 'you'"
    async with PostgresBroker(url) as worker, PostgresBroker(url) as submitter:
        assert await worker.claim("w1", [odd], limit=10, lease_seconds=30) == []
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.wait_for_work, 3600)
            await anyio.sleep(0.05)
            run = await submitter.submit(odd, PAYLOAD)
        (claimed,) = await worker.claim("w1", [odd], limit=10, lease_seconds=30)
        assert (claimed.id, claimed.task) == (run.id, odd)


async def test_a_cancelled_submit_blocked_on_a_lock_stores_nothing(
    url: str, broker: PostgresBroker
) -> None:
    await broker.submit("say", PAYLOAD)  # the direct connection is made and used
    runs = sql.SQL("{}.anyservice_runs").format(sql.Identifier(schema_of(url)))
    async with holding(url, sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(runs)):
        started = time.monotonic()
        with anyio.move_on_after(0.2) as scope:
            await broker.submit("say", PAYLOAD)  # waits for the table lock
        assert scope.cancelled_caught
        assert time.monotonic() - started < 5
    assert await admin(url, sql.SQL("SELECT count(*) FROM {}").format(runs)) == [(1,)]
    # And the broker goes on, on a new connection.
    run = await broker.submit("say", PAYLOAD)
    assert await broker.get(run.id) == run


async def test_a_submit_after_lost_connections_is_a_broker_error_then_works(
    url: str, broker: PostgresBroker
) -> None:
    await broker.submit("say", PAYLOAD)
    await admin(url, TERMINATE_OTHERS)
    with anyio.fail_after(PROMPTLY):
        while True:
            try:
                run = await broker.submit("say", PAYLOAD)
                break
            except BrokerError:
                await anyio.sleep(0.05)
        while True:  # the pooled connections were lost too
            try:
                assert await broker.get(run.id) == run
                break
            except BrokerError:
                await anyio.sleep(0.05)


# --- trouble -----------------------------------------------------------------------------


async def test_cancelling_a_blocked_statement_returns_at_once_and_leaves_the_pool_usable(
    url: str, broker: PostgresBroker
) -> None:
    run = await broker.submit("say", PAYLOAD)
    runs = sql.SQL("{}.anyservice_runs").format(sql.Identifier(schema_of(url)))
    async with holding(
        url, sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(runs), run.id
    ):
        started = time.monotonic()
        with anyio.move_on_after(0.2) as scope:
            await broker.cancel(run.id)  # waits for the row lock
        assert scope.cancelled_caught
        assert time.monotonic() - started < 5
    for _ in range(broker._pool_size + 1):  # every pooled connection still works
        assert (await broker.get(run.id)) == run
    assert await broker.cancel(run.id)


async def test_lost_connections_are_a_broker_error_then_replaced(
    url: str, broker: PostgresBroker
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await admin(url, TERMINATE_OTHERS)
    with anyio.fail_after(PROMPTLY):
        while True:
            try:
                assert await broker.get(run.id) == run
                break
            except BrokerError:
                await anyio.sleep(0.05)


async def test_a_worker_rides_out_lost_connections(url: str) -> None:
    queue = TaskQueue(url)

    @queue.task
    async def echo(value: int) -> int:
        return value

    async with queue, TaskWorker(echo):
        assert await (await echo.delay(1)).result(timeout=PROMPTLY) == 1
        await admin(url, TERMINATE_OTHERS)
        run = None
        with anyio.fail_after(PROMPTLY):
            while run is None:
                try:
                    run = await echo.delay(2)
                except BrokerError:
                    await anyio.sleep(0.05)
        assert await run.result(timeout=PROMPTLY) == 2


async def test_only_the_holder_of_the_housekeeping_lock_purges(url: str) -> None:
    now = [1_700_000_000.0]
    broker = PostgresBroker(url, clock=lambda: now[0])
    await broker.open()
    run = await broker.submit("say", PAYLOAD)
    assert await broker.cancel(run.id)
    now[0] += 1
    lock = f"anyservice:{schema_of(url)}:housekeeping"

    def hold_the_lock(locked: anyio.Event, release: anyio.Event) -> None:
        with psycopg.connect(server_of(url), autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [lock])
            anyio.from_thread.run_sync(locked.set)
            anyio.from_thread.run(release.wait)
            # Explicitly: a closed connection's locks go only once its server process ends.
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [lock])

    locked, release = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, hold_the_lock, locked, release)
        await locked.wait()
        try:
            assert await broker.purge(older_than=0) == 0
        finally:
            release.set()
    assert await broker.purge(older_than=0) == 1
    await broker.close()
