"""Batched submission, shared commits and wake-ups across processes, on SQLite.

``delay_many()`` / ``map()`` store a batch all or nothing; concurrent calls through one
broker share its transactions (the connection thread's group commit), and a write that
fails in a shared transaction is rolled back alone; a broker in another process wakes a
waiter through the file's datagram sockets, without waiting for the fallback poll.
"""

from __future__ import annotations

import functools
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import anyio
import pytest

from anyservice.taskqueue import BrokerError, RunState, SqliteBroker, TaskQueue
from anyservice.taskqueue.brokers._sqlite_thread import ConnectionThread

pytestmark = pytest.mark.anyio

PAYLOAD = '{"args":[],"kwargs":{}}'
#: Bound on a wake-up or a process start on a slow, shared machine (not a speed claim).
PROMPTLY = 30.0


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:
        yield queue


# --- delay_many() and map() ---------------------------------------------------------------


async def test_delay_many_stores_one_run_per_call_in_order(queue: TaskQueue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    runs = await add.delay_many([(1, 2), (3, 4), (5, 6)])

    assert [run.state for run in runs] == [RunState.SCHEDULED] * 3
    stored = [await queue.broker.get(run.id) for run in runs]
    assert [record.payload for record in stored if record is not None] == [
        '{"args":[1,2],"kwargs":{}}',
        '{"args":[3,4],"kwargs":{}}',
        '{"args":[5,6],"kwargs":{}}',
    ]


async def test_map_zips_its_iterables_and_gives_keywords_to_every_run(queue: TaskQueue) -> None:
    @queue.task
    async def add(a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    runs = await add.map([1, 2], (10, 20), scale=3)

    payloads = [(await queue.broker.get(run.id)) for run in runs]
    assert [p.payload for p in payloads if p is not None] == [
        '{"args":[1,10],"kwargs":{"scale":3}}',
        '{"args":[2,20],"kwargs":{"scale":3}}',
    ]


async def test_a_non_json_argument_rejects_the_whole_batch_naming_its_index(
    queue: TaskQueue,
) -> None:
    @queue.task
    async def say(message: object) -> None:
        return None

    with pytest.raises(TypeError, match=r"call 2 of the batch: .*not JSON-serialisable: datetime"):
        await say.delay_many([("a",), ("b",), (datetime.now(),), ("d",)])
    with pytest.raises(TypeError, match=r"call 1 of the batch"):
        await say.map(["a", {1j}])
    assert sum((await queue.counts()).values()) == 0


async def test_bad_batches_are_refused_at_the_call(queue: TaskQueue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match="call 1 must be a tuple"):
        await add.delay_many([(1, 2), [3, 4]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of argument tuples"):
        await add.delay_many("12")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"call 0 of the batch: task 'add': missing"):
        await add.delay_many([(1,)])
    with pytest.raises(ValueError, match=r"different lengths \(2, 3\)"):
        await add.map([1, 2], [1, 2, 3])
    with pytest.raises(TypeError, match="map\\(\\) argument 0 must be an iterable"):
        await add.map(5)  # type: ignore[arg-type]
    assert sum((await queue.counts()).values()) == 0


async def test_an_empty_batch_stores_nothing(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None:
        return None

    assert await say.delay_many([]) == []
    assert await say.map() == []
    assert sum((await queue.counts()).values()) == 0


async def test_a_batch_that_fails_in_storage_stores_none_of_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SqliteBroker(path) as broker:
        await broker.submit("say", PAYLOAD)
        # The fourth row of the batch breaks a constraint of the table (task NOT NULL),
        # after three rows were inserted in the same statement.
        with sqlite3.connect(path) as conn:
            conn.execute(
                "CREATE TRIGGER refuse_fourth BEFORE INSERT ON anyservice_runs"
                " WHEN (SELECT COUNT(*) FROM anyservice_runs) >= 4"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        with pytest.raises(BrokerError, match="refused"):
            await broker.submit_many("say", [PAYLOAD] * 5)
        assert sum((await broker.counts()).values()) == 1


async def test_broker_submit_many_names_the_payload_that_is_not_text(tmp_path: Path) -> None:
    async with SqliteBroker(tmp_path / "runs.db") as broker:
        with pytest.raises(TypeError, match=r"payloads\[1\] must be a string"):
            await broker.submit_many("say", [PAYLOAD, b"{}"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="retries"):
            await broker.submit_many("say", [PAYLOAD], retries=-1)
        assert sum((await broker.counts()).values()) == 0


# --- shared transactions ------------------------------------------------------------------


async def test_concurrent_delays_share_transactions(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None:
        return None

    broker = queue.broker
    assert isinstance(broker, SqliteBroker)
    before = broker.commits
    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(say.delay)

    assert (await queue.counts())[RunState.SCHEDULED] == 200
    # One commit per call would be 200; calls queued during a commit share the next one.
    assert broker.commits - before < 200


async def test_a_failing_write_in_a_shared_transaction_is_rolled_back_alone(
    tmp_path: Path,
) -> None:
    thread = ConnectionThread(
        str(tmp_path / "plain.db"), url="sqlite:///plain.db", busy_timeout=0.1, lock_timeout=5
    )

    def create(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE t (n INTEGER UNIQUE)")
        conn.execute("INSERT INTO t (n) VALUES (0)")

    await thread.open(create)
    try:

        def insert(number: int) -> Callable[[sqlite3.Connection], None]:
            def write(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO t (n) VALUES (?)", (number,))
                if number == 3:
                    conn.execute("INSERT INTO t (n) VALUES (0)")  # a duplicate: this call fails

            return write

        outcomes: dict[int, str] = {}

        async def call(number: int) -> None:
            try:
                await thread.call(insert(number))
                outcomes[number] = "ok"
            except BrokerError as exc:
                outcomes[number] = str(exc)

        async with anyio.create_task_group() as tg:
            for number in range(1, 6):
                tg.start_soon(call, number)

        rows = await thread.call(
            lambda conn: [n for (n,) in conn.execute("SELECT n FROM t ORDER BY n")], write=False
        )
    finally:
        await thread.close()
    assert rows == [0, 1, 2, 4, 5]  # 3's own row went with its failed duplicate
    assert "UNIQUE constraint failed" in outcomes.pop(3)
    assert set(outcomes.values()) == {"ok"}


async def test_operations_that_return_a_cursor_hand_back_none(tmp_path: Path) -> None:
    # A cursor finalised in the caller's thread while the connection's thread runs the
    # next batch is SQLite API misuse: it must never leave the connection's thread.
    thread = ConnectionThread(
        str(tmp_path / "plain.db"), url="sqlite:///plain.db", busy_timeout=0.1, lock_timeout=5
    )
    await thread.open(lambda conn: None)
    values: list[object] = []
    try:
        await thread.call(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))

        async def insert(number: int) -> None:
            values.append(
                await thread.call(lambda conn: conn.execute("INSERT INTO t VALUES (?)", (number,)))
            )

        async with anyio.create_task_group() as tg:
            for number in range(300):
                tg.start_soon(insert, number)
        (count,) = await thread.call(
            lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone(), write=False
        )
    finally:
        await thread.close()
    assert values == [None] * 300
    assert count == 300


async def test_a_closed_connection_thread_refuses_calls(tmp_path: Path) -> None:
    async with SqliteBroker(tmp_path / "runs.db") as broker:
        pass
    with pytest.raises(BrokerError, match="is not open"):
        await broker.submit("say", PAYLOAD)


# --- wake-ups across processes -------------------------------------------------------------


SUBMIT_FROM_ANOTHER_PROCESS = """
import sys, anyio
from anyservice.taskqueue import SqliteBroker
async def main():
    async with SqliteBroker(sys.argv[1]) as broker:
        await broker.submit("say", '{"args":[],"kwargs":{}}')
anyio.run(main)
"""


async def _commit_after_five_ticks(holder: sqlite3.Connection, gaps: list[float]) -> None:
    """End ``holder``'s transaction after five short sleeps, noting how long each took (an
    event loop blocked in SQLite's own wait for the lock would stretch them)."""
    last = anyio.current_time()
    for _ in range(5):
        await anyio.sleep(0.01)
        gaps.append(anyio.current_time() - last)
        last = anyio.current_time()
    holder.execute("COMMIT")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix datagram sockets")
async def test_a_short_call_that_meets_a_locked_file_waits_in_the_thread(tmp_path: Path) -> None:
    # A lone claim runs in the caller's thread when the connection's is idle; one that
    # meets another process's write lock must wait in the connection's thread instead,
    # leaving the event loop free (here: to end the other transaction).
    path = tmp_path / "runs.db"
    async with SqliteBroker(path, busy_timeout=10) as broker:
        run = await broker.submit("say", PAYLOAD)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        gaps: list[float] = []
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_commit_after_five_ticks, holder, gaps)
                with anyio.fail_after(PROMPTLY):
                    claimed = await broker.claim("w", ["say"], limit=1, lease_seconds=30)
        finally:
            holder.close()
    assert [record.id for record in claimed] == [run.id]
    # Blocked in SQLite's own wait, the loop would have stalled for busy_timeout (10 s).
    assert len(gaps) == 5
    assert max(gaps) < 5


async def _open_plain(tmp_path: Path) -> ConnectionThread:
    thread = ConnectionThread(
        str(tmp_path / "plain.db"), url="sqlite:///plain.db", busy_timeout=0.1, lock_timeout=30
    )

    def create(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")

    await thread.open(create)
    return thread


def _insert_noting_thread(number: int, threads: list[int]) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        threads.append(threading.get_ident())
        conn.execute("INSERT INTO t VALUES (?)", (number,))

    return write


async def test_short_calls_of_one_pass_share_one_commit_in_the_event_loops_thread(
    tmp_path: Path,
) -> None:
    # The first short call of a pass runs at once; the others of that pass run together
    # at the next one, in one transaction, without a hop to the connection's thread.
    thread = await _open_plain(tmp_path)
    threads: list[int] = []
    try:
        before = thread.commits
        async with anyio.create_task_group() as tg:
            for number in range(5):
                tg.start_soon(
                    functools.partial(
                        thread.call, _insert_noting_thread(number, threads), inline=True
                    )
                )
        commits = thread.commits - before
        rows = await thread.call(
            lambda conn: sorted(n for (n,) in conn.execute("SELECT n FROM t")), write=False
        )
    finally:
        await thread.close()
    assert rows == [0, 1, 2, 3, 4]
    assert set(threads) == {threading.get_ident()}
    assert commits == 2


async def test_short_calls_kept_for_a_pass_that_meet_a_locked_file_wait_in_the_thread(
    tmp_path: Path,
) -> None:
    thread = await _open_plain(tmp_path)
    holder = sqlite3.connect(tmp_path / "plain.db", isolation_level=None)
    threads: list[int] = []
    gaps: list[float] = []
    try:
        holder.execute("BEGIN IMMEDIATE")
        with anyio.fail_after(PROMPTLY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_commit_after_five_ticks, holder, gaps)
                for number in range(4):
                    tg.start_soon(
                        functools.partial(
                            thread.call, _insert_noting_thread(number, threads), inline=True
                        )
                    )
        rows = await thread.call(lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone())
    finally:
        holder.close()
        await thread.close()
    assert rows == (4,)
    # Each found the file locked (its BEGIN failed before its statements ran) and was
    # stored by the connection's thread, while the event loop went on (the sleeps).
    assert len(set(threads)) == 1
    assert threading.get_ident() not in threads
    assert len(gaps) == 5
    assert max(gaps) < 5


async def test_a_submit_in_another_process_wakes_a_waiting_broker_without_polling(
    tmp_path: Path,
) -> None:
    # No thread sits in recv() to hand each wake-up over to the loop: the loop that
    # opened the broker watches its socket, and closing the broker ends the watch.
    def listening_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("anyservice wake")]

    path = tmp_path / "runs.db"
    # The fallback poll comes an hour later: only the other process's poke can wake it.
    async with SqliteBroker(path, poll_interval=3600) as broker:
        assert listening_threads() == []
        await broker.claim("w", ["say"], limit=1, lease_seconds=30)
        woke = anyio.Event()

        async def wait() -> None:
            await broker.wait_for_work(3600)
            woke.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            process = await anyio.run_process(
                [sys.executable, "-c", SUBMIT_FROM_ANOTHER_PROCESS, str(path)],
                stderr=subprocess.STDOUT,
            )
            assert process.returncode == 0, process.stdout
            with anyio.fail_after(PROMPTLY):
                await woke.wait()
        assert len(await broker.claim("w", ["say"], limit=1, lease_seconds=30)) == 1
    assert listening_threads() == []
    assert os.listdir(f"{path}-wake") == []


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix datagram sockets")
async def test_a_socket_left_by_a_killed_process_is_removed_by_the_next_poke(
    tmp_path: Path,
) -> None:
    path = tmp_path / "runs.db"
    async with SqliteBroker(path) as broker:
        directory = Path(f"{path}-wake")
        stale = directory / "999999-dead.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            # A long temporary path does not fit a socket address: go through /proc.
            long_path = len(os.fsencode(stale)) > 100
            dead.bind(f"/proc/self/fd/{directory_fd}/{stale.name}" if long_path else str(stale))
        finally:
            os.close(directory_fd)
            dead.close()  # bound and closed, as a killed process leaves it
        assert stale.exists()
        own = set(os.listdir(directory)) - {stale.name}

        await broker.submit("say", PAYLOAD)

        assert not stale.exists()
        assert set(os.listdir(directory)) == own
    assert os.listdir(directory) == []  # closing removes this broker's socket too
