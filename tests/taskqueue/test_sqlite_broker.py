"""What only the SQLite broker has to get right: one file shared by brokers and processes."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.abc import TaskStatus

from anyservice.taskqueue import TaskQueue, TaskWorker
from anyservice.taskqueue._errors import BrokerBusyError, BrokerError
from anyservice.taskqueue._records import (
    CORRUPT_RUN_ERROR_TYPE,
    PayloadError,
    RunRecord,
    RunState,
    new_run,
)
from anyservice.taskqueue._serialize import decode_arguments
from anyservice.taskqueue.brokers._base import AheadClaimer
from anyservice.taskqueue.brokers._notifier import ChangeNotifier
from anyservice.taskqueue.brokers._sqlite import SCHEMA_VERSION, SqliteBroker
from anyservice.taskqueue.brokers._sqlite_named import NamedWork
from anyservice.taskqueue.brokers._sqlite_rows import INSERT, insert_values
from anyservice.taskqueue.brokers._wake_channel import WakeChannel

PAYLOAD = '{"args":["hi"],"kwargs":{}}'
LEASE = 30.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
async def broker(path: Path) -> AsyncIterator[SqliteBroker]:
    async with SqliteBroker(path) as broker:
        yield broker


@contextlib.contextmanager
def raw_connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection, standing in for another process or a careless tool."""
    with contextlib.closing(
        sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    ) as conn:
        yield conn


def raw_update(path: Path, sql: str, *parameters: object) -> None:
    with raw_connection(path) as conn:
        conn.execute(sql, parameters)


def raw_column(path: Path, column: str, run_id: str) -> object:
    with raw_connection(path) as conn:
        (value,) = conn.execute(
            f"SELECT {column} FROM anyservice_runs WHERE id = ?", (run_id,)
        ).fetchone()
    return value


# --- the file --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_file_is_in_wal_mode_with_a_schema_version(broker: SqliteBroker, path: Path) -> None:
    with raw_connection(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'anyservice_runs'"
        ).fetchall() == [("anyservice_runs",)]


@pytest.mark.anyio
async def test_a_file_of_schema_version_4_gains_the_trace_context_column(path: Path) -> None:
    with raw_connection(path) as conn:
        create_schema(conn, 4)
        conn.execute(
            "INSERT INTO anyservice_runs (id, task, payload, state, attempts, max_attempts,"
            " retries_left, retry_delay, created_at, scheduled_at)"
            " VALUES ('old', 'say', '{\"args\":[],\"kwargs\":{}}', 'SCHEDULED', 0, 3, 0, 0, 1, 1)"
        )
        conn.commit()
    async with SqliteBroker(path) as broker:
        old = await broker.get("old")
        assert old is not None
        assert old.trace_context is None
        traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        run = await broker.submit("say", '{"args":[],"kwargs":{}}', trace_context=traced)
        assert await broker.get(run.id) == run
    with raw_connection(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def create_schema(conn: sqlite3.Connection, version: int) -> None:
    """The schema as anyservice made it at ``version``."""
    from anyservice.taskqueue.brokers._sqlite_rows import MIGRATIONS

    for step in MIGRATIONS[:version]:
        for statement in step:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")


def index_definitions(path: Path) -> dict[str, str]:
    with raw_connection(path) as conn:
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'anyservice_runs' AND sql IS NOT NULL"
        ).fetchall()
    return dict(rows)


@pytest.mark.anyio
async def test_a_file_of_schema_version_5_gets_the_partial_indexes_and_keeps_its_runs(
    path: Path, tmp_path: Path
) -> None:
    now = time.time()
    with raw_connection(path) as conn:
        create_schema(conn, 5)
        for run_id, state, lease_expires_at, finished_at in (
            ("due", "SCHEDULED", None, None),
            ("expired", "RUNNING", now - 60, None),
            ("leased", "RUNNING", now + 600, None),
            ("old", "COMPLETED", None, now - 7200),
        ):
            conn.execute(
                "INSERT INTO anyservice_runs (id, task, payload, state, attempts, max_attempts,"
                " retries_left, retry_delay, created_at, scheduled_at, started_at, finished_at,"
                " lease_owner, lease_expires_at)"
                " VALUES (?, 'say', ?, ?, ?, 3, 0, 0, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    PAYLOAD,
                    state,
                    0 if state == "SCHEDULED" else 1,
                    now - 100,
                    now - (100 if run_id == "expired" else 50),
                    None if state == "SCHEDULED" else now - 90,
                    finished_at,
                    "gone" if state == "RUNNING" else None,
                    lease_expires_at,
                ),
            )
    async with SqliteBroker(path) as broker:
        assert (await broker.counts())[RunState.RUNNING] == 2
        claimed = await broker.claim("w1", ["say"], limit=5, lease_seconds=LEASE)
        assert [(run.id, run.attempts) for run in claimed] == [("expired", 2), ("due", 1)]
        assert await broker.claim("w2", ["say"], limit=5, lease_seconds=LEASE) == []
        assert await broker.purge(3600) == 1
        assert await broker.get("old") is None
        counts = await broker.counts()
        assert (counts[RunState.RUNNING], counts[RunState.SCHEDULED]) == (3, 0)
    with raw_connection(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    # The same indexes as a file made with the current schema.
    async with SqliteBroker(tmp_path / "fresh.db"):
        pass
    migrated = index_definitions(path)
    assert migrated == index_definitions(tmp_path / "fresh.db")
    assert "WHERE state = 'SCHEDULED'" in migrated["anyservice_runs_claim_order"]
    assert "WHERE state = 'RUNNING'" in migrated["anyservice_runs_leases"]


@pytest.mark.anyio
async def test_file_with_a_newer_schema_is_refused(path: Path) -> None:
    raw_update(path, "PRAGMA user_version = 99")
    broker = SqliteBroker(path)
    with pytest.raises(BrokerError, match="schema version 99, newer than"):
        await broker.open()
    with pytest.raises(BrokerError, match="not open"):
        await broker.get("0" * 32)


@pytest.mark.anyio
async def test_a_file_of_schema_version_3_gains_the_priority_column(path: Path) -> None:
    async with SqliteBroker(path) as broker:
        old = await broker.submit("say", PAYLOAD)
    with raw_connection(path) as conn:
        # Back to version 3: no priority column nor its index, nor the later trace context.
        conn.execute("DROP INDEX anyservice_runs_claim_order")
        conn.execute("ALTER TABLE anyservice_runs DROP COLUMN priority")
        conn.execute("ALTER TABLE anyservice_runs DROP COLUMN trace_context")
        conn.execute("PRAGMA user_version = 3")
    async with SqliteBroker(path) as broker:
        urgent = await broker.submit("say", PAYLOAD, priority=1)
        assert await broker.get(old.id) == old
        claimed = await broker.claim("w1", ["say"], limit=2, lease_seconds=LEASE)
    assert [run.id for run in claimed] == [urgent.id, old.id]
    assert raw_column(path, "priority", old.id) == 0


@pytest.mark.anyio
async def test_a_directory_removed_before_open_is_a_broker_error_naming_the_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "gone").mkdir()
    broker = SqliteBroker(tmp_path / "gone" / "runs.db")
    (tmp_path / "gone").rmdir()
    with pytest.raises(BrokerError, match=re.escape(str(tmp_path / "gone" / "runs.db"))):
        await broker.open()


def test_a_file_in_a_missing_directory_is_refused_when_the_broker_is_made(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing" / "runs.db"
    with pytest.raises(ValueError, match=f"directory {re.escape(str(missing.parent))} does not"):
        SqliteBroker(missing)
    (tmp_path / "file").touch()
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'file'))} is not a dir"):
        SqliteBroker(tmp_path / "file" / "runs.db")


@pytest.mark.anyio
async def test_broker_errors_name_the_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    broker = SqliteBroker("runs.db")
    assert broker.location == str(tmp_path / "runs.db")
    with pytest.raises(BrokerError, match=f"SQLite database {re.escape(str(tmp_path))}/runs.db"):
        await broker.get("0" * 32)


@pytest.mark.anyio
async def test_the_database_and_its_wal_and_shm_files_are_private_to_the_user(
    path: Path,
) -> None:
    # With no umask at all, a file SQLite created by itself would be world-writable.
    old = os.umask(0)
    try:
        async with SqliteBroker(path) as broker:
            await broker.submit("say", PAYLOAD)
            modes = {
                suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
                for suffix in ("", "-wal", "-shm")
            }
    finally:
        os.umask(old)
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _replace(path: Path) -> None:
    other = path.with_name("other.db")
    async with SqliteBroker(other):
        pass
    _remove(path)
    other.replace(path)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_deleted_or_replaced_file_is_a_broker_error_naming_it(path: Path, how: str) -> None:
    async with SqliteBroker(path) as broker:
        await broker.submit("say", PAYLOAD)
        if how == "deleted":
            _remove(path)
        else:
            await _replace(path)
        said = f"SQLite database {re.escape(str(path))} was {how}"
        with pytest.raises(BrokerError, match=said):
            await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE)
        with pytest.raises(BrokerError, match=said):
            await broker.submit("say", PAYLOAD)
        # A waiting worker notices it too, through the poll for other processes' commits.
        with anyio.fail_after(10), pytest.raises(BrokerError, match=said):
            await broker.wait_for_work(timeout=5)


@pytest.mark.anyio
async def test_runs_survive_into_a_new_broker_on_the_same_file(path: Path) -> None:
    async with SqliteBroker(path) as first:
        run = await first.submit("say", PAYLOAD, retries=1, timeout=2.5)
    async with SqliteBroker(path) as second:
        assert await second.get(run.id) == run


def test_timeouts_and_intervals_must_be_positive(path: Path) -> None:
    with pytest.raises(ValueError, match="busy_timeout"):
        SqliteBroker(path, busy_timeout=0)
    with pytest.raises(ValueError, match="lock_timeout"):
        SqliteBroker(path, lock_timeout=-1)
    with pytest.raises(ValueError, match="poll_interval"):
        SqliteBroker(path, poll_interval=float("inf"))


@pytest.mark.parametrize("option", ["busy_timeout", "lock_timeout", "poll_interval"])
def test_a_boolean_is_not_a_timeout(path: Path, option: str) -> None:
    with pytest.raises(TypeError, match=f"^{option} must be a number of seconds"):
        SqliteBroker(path, **{option: True})  # type: ignore[arg-type]


def test_sqlite_timeouts_may_be_timedeltas_or_numeric_strings(path: Path) -> None:
    broker = SqliteBroker(path, busy_timeout=datetime.timedelta(milliseconds=50), lock_timeout="2")
    assert (broker._db._busy_timeout, broker._db._lock_timeout) == (0.05, 2.0)


def test_in_memory_database_is_rejected() -> None:
    with pytest.raises(ValueError, match="memory://"):
        SqliteBroker(":memory:")


# --- concurrent claims -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("runs", "limit"), [(5, 3), (700, 700)])
async def test_a_claim_leases_exactly_the_runs_it_returns(
    broker: SqliteBroker, path: Path, runs: int, limit: int
) -> None:
    # 3 and 700: neither a power of two nor, for 700, within one statement's rows.
    await broker.submit_many("say", [PAYLOAD] * runs)
    claimed = await broker.claim("w1", ["say"], limit=limit, lease_seconds=LEASE)
    assert len(claimed) == limit
    with raw_connection(path) as conn:
        leased = conn.execute(
            "SELECT id, attempts, lease_owner, lease_expires_at FROM anyservice_runs"
            " WHERE state = 'RUNNING'"
        ).fetchall()
    assert sorted(leased) == sorted((run.id, 1, "w1", run.lease_expires_at) for run in claimed)
    assert (await broker.counts())[RunState.SCHEDULED] == runs - limit


@pytest.mark.anyio
async def test_racing_brokers_on_one_file_claim_each_run_exactly_once(path: Path) -> None:
    brokers = [SqliteBroker(path) for _ in range(4)]
    claims: dict[str, list[str]] = {}

    async def claim_until_none_left(owner: str, broker: SqliteBroker) -> None:
        mine = claims.setdefault(owner, [])
        while runs := await broker.claim(owner, ["say"], limit=5, lease_seconds=LEASE):
            for run in runs:
                mine.append(run.id)
                assert await broker.complete(owner, run.id, run.attempts, "null")

    async with contextlib.AsyncExitStack() as stack:
        for broker in brokers:
            await stack.enter_async_context(broker)
        submitted = [(await brokers[0].submit("say", PAYLOAD)).id for _ in range(200)]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for number, broker in enumerate(brokers):
                    tg.start_soon(claim_until_none_left, f"w{number}", broker)
        counts = await brokers[0].counts()

    claimed = [run_id for ids in claims.values() for run_id in ids]
    assert sorted(claimed) == sorted(submitted)
    assert counts[RunState.COMPLETED] == 200


@pytest.mark.anyio
async def test_complete_and_claim_is_one_transaction_that_a_failing_claim_undoes(
    broker: SqliteBroker, path: Path
) -> None:
    first, second = await broker.submit_many("say", [PAYLOAD, PAYLOAD])
    (claimed,) = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE)
    before = broker.commits
    done, (next_run,) = await broker.complete_and_claim(
        "w1", {claimed.id: (claimed.attempts, '"hi"')}, ["say"], limit=5, lease_seconds=LEASE
    )
    assert (done, broker.commits - before) == ({claimed.id}, 1)
    assert {claimed.id, next_run.id} == {first.id, second.id}
    assert raw_column(path, "state", claimed.id) == "COMPLETED"
    # A claim that fails (here a trigger refuses it) undoes the results stored before it.
    await broker.submit("say", PAYLOAD)
    with raw_connection(path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF lease_owner ON anyservice_runs"
            " WHEN NEW.state = 'RUNNING' BEGIN SELECT RAISE(ABORT, 'no claims'); END"
        )
    with pytest.raises(BrokerError, match="no claims"):
        await broker.complete_and_claim(
            "w1", {next_run.id: (next_run.attempts, '"hi"')}, ["say"], limit=5,
            lease_seconds=LEASE,
        )  # fmt: skip
    assert raw_column(path, "state", next_run.id) == "RUNNING"
    assert raw_column(path, "result", next_run.id) is None


def _rows_in_the_database_file(path: Path) -> int:
    """The runs in the database file itself, not counting what is still only in its WAL."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
        try:
            (count,) = conn.execute("SELECT COUNT(*) FROM anyservice_runs").fetchone()
        except sqlite3.DatabaseError:
            # Not even the table is there yet, or the file changed under this read (which
            # assumes it does not): the caller looks again.
            return 0
        return int(count)


@pytest.mark.anyio
async def test_commits_reach_the_database_file_from_a_thread_of_their_own(
    broker: SqliteBroker, path: Path
) -> None:
    # No commit of the broker copies its WAL into the file (SQLite's checkpoint, done
    # by the commit that crosses 1 000 pages): a thread of the broker's does it soon
    # after commits, however few.
    assert (
        await broker._db.call(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0], write=False
        )
        == 0
    )
    await broker.submit_many("say", [PAYLOAD] * 50)
    deadline = time.monotonic() + 30
    while _rows_in_the_database_file(path) < 50:
        assert time.monotonic() < deadline, "the commits never reached the database file"
        await anyio.sleep(0.01)
    assert (await broker.counts())[RunState.SCHEDULED] == 50


CLAIMING_PROCESS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import anyio

    from anyservice.taskqueue.brokers._sqlite import SqliteBroker

    async def main(path: str, owner: str) -> None:
        Path(f"{path}.ready.{owner}").touch()
        while not Path(f"{path}.go").exists():
            time.sleep(0.001)
        done = []
        async with SqliteBroker(path) as broker:
            # Every run was submitted before "go": an empty claim means none are left.
            while runs := await broker.claim(owner, ["say"], limit=5, lease_seconds=30):
                for run in runs:
                    assert await broker.complete(owner, run.id, run.attempts, f'"{owner}"')
                    done.append(run.id)
        print("\\n".join(done))

    anyio.run(main, *sys.argv[1:])
    """
)


def test_two_processes_complete_each_run_exactly_once(path: Path) -> None:
    async def submit_runs() -> list[str]:
        async with SqliteBroker(path) as broker:
            return [(await broker.submit("say", PAYLOAD)).id for _ in range(500)]

    submitted = anyio.run(submit_runs)
    owners = ["p1", "p2"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMING_PROCESS, str(path), owner],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for owner in owners
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(Path(f"{path}.ready.{owner}").exists() for owner in owners):
            assert time.monotonic() < deadline, "claiming processes did not start"
            time.sleep(0.01)
        Path(f"{path}.go").touch()
        outputs = {
            owner: process.communicate(timeout=60)
            for owner, process in zip(owners, processes, strict=True)
        }
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()

    completed_by: dict[str, str] = {}
    for owner, process in zip(owners, processes, strict=True):
        stdout, stderr = outputs[owner]
        assert process.returncode == 0, stderr
        for run_id in stdout.split():
            assert run_id not in completed_by, (
                f"{run_id} completed by {owner} and {completed_by[run_id]}"
            )
            completed_by[run_id] = owner
    assert sorted(completed_by) == sorted(submitted)

    async def check_runs() -> None:
        async with SqliteBroker(path) as broker:
            for run_id, owner in completed_by.items():
                run = await broker.get(run_id)
                assert run is not None
                assert (run.state, run.attempts) == (RunState.COMPLETED, 1)
                assert run.result is not None
                assert json.loads(run.result) == owner

    anyio.run(check_runs)


# --- locks -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def write_lock_held(path: Path, release: threading.Event) -> AsyncIterator[None]:
    """Hold the file's write lock from another connection until ``release`` is set."""
    locked = threading.Event()

    def hold() -> None:
        with raw_connection(path) as conn:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(30)
            conn.execute("COMMIT")

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, hold)
        await anyio.to_thread.run_sync(locked.wait)
        try:
            yield
        finally:
            release.set()


@pytest.mark.anyio
async def test_locked_database_is_retried_until_the_lock_is_released(path: Path) -> None:
    release = threading.Event()
    async with SqliteBroker(path, busy_timeout=0.02) as broker:

        async def release_after_a_retry() -> None:
            # lock_retries is a plain counter: there is no event to wait on.
            while broker.lock_retries == 0:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            release.set()

        async with write_lock_held(path, release), anyio.create_task_group() as tg:
            tg.start_soon(release_after_a_retry)
            with anyio.fail_after(20):
                run = await broker.submit("say", PAYLOAD)

        assert broker.lock_retries >= 1
        assert await broker.get(run.id) == run


@pytest.mark.anyio
async def test_database_locked_for_longer_than_lock_timeout_is_a_busy_error(
    path: Path,
) -> None:
    async with SqliteBroker(path, busy_timeout=0.02, lock_timeout=0.1) as broker:
        async with write_lock_held(path, threading.Event()):
            with pytest.raises(BrokerBusyError, match="stayed locked"):
                await broker.submit("say", PAYLOAD)
        assert (await broker.counts())[RunState.SCHEDULED] == 0


# --- corrupt rows ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_undecodable_payload_is_claimed_raw_without_blocking_other_runs(
    broker: SqliteBroker, path: Path
) -> None:
    runs = [(await broker.submit("say", PAYLOAD)).id for _ in range(3)]
    raw_update(path, "UPDATE anyservice_runs SET payload = 'not json{' WHERE id = ?", runs[1])

    claimed = await broker.claim("w1", ["say"], limit=10, lease_seconds=LEASE)

    assert [run.id for run in claimed] == runs
    assert claimed[1].payload == "not json{"
    with pytest.raises(PayloadError, match="not valid JSON"):
        decode_arguments(claimed[1].payload)


@pytest.mark.anyio
async def test_row_with_an_unknown_state_is_never_claimed_and_reads_as_failed(
    broker: SqliteBroker, path: Path
) -> None:
    bogus, good = [(await broker.submit("say", PAYLOAD)).id for _ in range(2)]
    raw_update(path, "UPDATE anyservice_runs SET state = 'BOGUS' WHERE id = ?", bogus)

    claimed = await broker.claim("w1", ["say"], limit=10, lease_seconds=LEASE)

    assert [run.id for run in claimed] == [good]
    run = await broker.get(bogus)
    assert run is not None
    assert run.state is RunState.FAILED
    assert run.error is not None
    assert run.error.type == CORRUPT_RUN_ERROR_TYPE
    assert f"run {bogus} is corrupt" in run.error.message
    assert "state 'BOGUS' is not one of SCHEDULED" in run.error.message
    assert (await broker.counts())[RunState.FAILED] == 1
    assert raw_column(path, "state", bogus) == "BOGUS"  # left for a person to inspect


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("attempts", "many", "attempts 'many' is not an integer"),
        ("payload", b"\x00", "payload b'\\x00' is not text"),
        ("error", "{oops", "stored run error is not valid JSON"),
        ("retry_delay", "soon", "retry_delay 'soon' is not a number"),
    ],
)
async def test_due_row_with_a_corrupt_column_is_failed_and_the_rest_are_claimed(
    broker: SqliteBroker, path: Path, column: str, value: object, problem: str
) -> None:
    corrupt, good = [(await broker.submit("say", PAYLOAD)).id for _ in range(2)]
    raw_update(path, f"UPDATE anyservice_runs SET {column} = ? WHERE id = ?", value, corrupt)

    claimed = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE)

    assert [run.id for run in claimed] == [good]
    assert raw_column(path, "state", corrupt) == "FAILED"
    run = await broker.get(corrupt)
    assert run is not None
    assert run.state is RunState.FAILED
    assert run.error is not None
    assert run.error.type == CORRUPT_RUN_ERROR_TYPE
    assert problem in run.error.message


@pytest.mark.anyio
async def test_running_row_without_a_lease_is_failed_instead_of_stuck(
    broker: SqliteBroker, path: Path
) -> None:
    run = await broker.submit("say", PAYLOAD)
    raw_update(path, "UPDATE anyservice_runs SET state = 'RUNNING' WHERE id = ?", run.id)
    assert await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE) == []
    failed = await broker.get(run.id)
    assert failed is not None
    assert failed.state is RunState.FAILED
    assert failed.error is not None
    assert "RUNNING without a lease" in failed.error.message


# --- waking across brokers and processes -----------------------------------------------


@pytest.mark.anyio
async def test_submit_through_another_broker_of_the_file_wakes_wait_for_work(
    broker: SqliteBroker, path: Path
) -> None:
    woke = anyio.Event()

    async def wait_for_work() -> None:
        await broker.wait_for_work(timeout=5)
        woke.set()

    async with SqliteBroker(path) as other:
        assert await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE) == []
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_work)
            await anyio.sleep(0.05)
            assert not woke.is_set()
            await other.submit("say", PAYLOAD)
            with anyio.fail_after(4):
                await woke.wait()


@pytest.mark.anyio
async def test_commit_by_another_connection_wakes_wait_for_work(
    broker: SqliteBroker, path: Path
) -> None:
    run = await broker.submit("say", PAYLOAD, scheduled_at=time.time() + 3600)
    woke = anyio.Event()

    async def wait_for_work() -> None:
        await broker.wait_for_work(timeout=5)
        woke.set()

    assert await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE) == []
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_work)
        await anyio.sleep(0.05)
        assert not woke.is_set()
        # Another process making the run due now, as a release or retry would.
        raw_update(path, "UPDATE anyservice_runs SET scheduled_at = 0 WHERE id = ?", run.id)
        with anyio.fail_after(4):
            await woke.wait()
    claimed = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE)
    assert [r.id for r in claimed] == [run.id]


@pytest.mark.anyio
async def test_wait_until_finished_sees_a_run_finished_by_another_process(
    broker: SqliteBroker, path: Path
) -> None:
    run = await broker.submit("say", PAYLOAD)

    async def finish_elsewhere() -> None:
        await anyio.sleep(0.05)
        raw_update(
            path,
            "UPDATE anyservice_runs SET state = 'COMPLETED', result = '1' WHERE id = ?",
            run.id,
        )

    with anyio.fail_after(4):
        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_elsewhere)
            finished = await broker.wait_until_finished(run.id, timeout=5)
    assert finished is not None
    assert (finished.state, finished.result) == (RunState.COMPLETED, "1")


# --- claims of the runs pokes named ------------------------------------------------------


def foreign_submit(path: Path, task: str = "say", *, scheduled_at: float | None = None) -> str:
    """Store a run as another process's broker would (its commit wakes nobody here)."""
    run_id = uuid.uuid4().hex
    run = new_run(
        run_id,
        task,
        PAYLOAD,
        retries=0,
        retry_delay=0.0,
        timeout=None,
        max_attempts=3,
        scheduled_at=scheduled_at,
        now=time.time(),
    )
    with raw_connection(path) as conn:
        conn.execute(INSERT, insert_values(run))
    return run_id


@contextlib.contextmanager
def foreign_channel(path: Path) -> Iterator[WakeChannel]:
    """Another process's wake channel on the file: what it pokes reaches the broker's."""
    channel = WakeChannel(os.path.abspath(path), lambda work, named: None, lambda run_ids: None)
    assert channel.open()
    try:
        yield channel
    finally:
        channel.close()


async def claim_ids(
    broker: SqliteBroker, limit: int = 1, tasks: tuple[str, ...] = ("say",)
) -> list[str]:
    return [r.id for r in await broker.claim("w1", tasks, limit=limit, lease_seconds=LEASE)]


async def poke_and_wait(broker: SqliteBroker, channel: WakeChannel, kind: bytes) -> None:
    """Poke the broker as another process's commit would; return once it heard of work."""
    seen = broker._notifier.generation(work=True)
    channel.poke(kind)
    with anyio.fail_after(4):
        while broker._notifier.generation(work=True) == seen:  # noqa: ASYNC110
            await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_a_run_named_by_a_poke_is_claimed_once_and_fenced(
    broker: SqliteBroker, path: Path
) -> None:
    assert await claim_ids(broker) == []
    with foreign_channel(path) as channel:
        run_id = foreign_submit(path)
        await poke_and_wait(broker, channel, b"w" + run_id.encode())
        (claimed,) = await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE)
        assert (claimed.id, claimed.state, claimed.attempts) == (run_id, RunState.RUNNING, 1)
        assert claimed.lease_owner == "w1"
        # The same poke again (a duplicate, a late one) claims nothing twice.
        await poke_and_wait(broker, channel, b"w" + run_id.encode())
        assert await claim_ids(broker) == []
    assert await broker.complete("w1", run_id, 1, "1")
    stored = await broker.get(run_id)
    assert stored is not None
    assert (stored.state, stored.attempts) == (RunState.COMPLETED, 1)


@pytest.mark.anyio
async def test_a_named_run_never_goes_before_an_older_due_run_left_over(
    broker: SqliteBroker, path: Path
) -> None:
    older = [foreign_submit(path), foreign_submit(path)]
    # The claim takes one and leaves the other due.
    assert await claim_ids(broker) == older[:1]
    with foreign_channel(path) as channel:
        named = foreign_submit(path)
        await poke_and_wait(broker, channel, b"w" + named.encode())
        assert await claim_ids(broker) == older[1:]
        assert await claim_ids(broker) == [named]


@pytest.mark.anyio
async def test_a_named_run_never_goes_before_a_scheduled_run_come_due(
    path: Path,
) -> None:
    now = [time.time()]
    async with SqliteBroker(path, clock=lambda: now[0]) as broker:
        scheduled = foreign_submit(path, scheduled_at=now[0] + 0.05)
        assert await claim_ids(broker) == []
        now[0] += 0.1
        with foreign_channel(path) as channel:
            named = foreign_submit(path, scheduled_at=now[0])
            await poke_and_wait(broker, channel, b"w" + named.encode())
            assert await claim_ids(broker) == [scheduled]
            assert await claim_ids(broker) == [named]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [b"w", b"w\xff\xfe", b"zz", b"w" + b"0" * 300, b"wno-such-run"])
async def test_a_poke_that_names_no_run_or_makes_no_sense_claims_every_due_run(
    broker: SqliteBroker, path: Path, kind: bytes
) -> None:
    assert await claim_ids(broker) == []
    with foreign_channel(path) as channel:
        runs = [foreign_submit(path), foreign_submit(path)]
        await poke_and_wait(broker, channel, kind)
        assert sorted(await claim_ids(broker, limit=5)) == sorted(runs)


@pytest.mark.anyio
async def test_a_cancel_poke_tells_the_watchers_of_its_run_and_is_no_work(
    broker: SqliteBroker, path: Path
) -> None:
    heard: list[list[str]] = []
    told = anyio.Event()

    def asked(run_ids: list[str]) -> None:
        heard.append(run_ids)
        told.set()

    work = broker._notifier.generation(work=True)
    async with anyio.create_task_group() as group:
        group.start_soon(broker.watch_cancels, asked)
        await anyio.sleep(0.01)
        with foreign_channel(path) as channel:
            # Pokes that name no run, or make no sense, tell of nothing.
            for kind in (b"k", b"k\xff\xfe", b"k" + b"0" * 300, b"kno-such-run"):
                channel.poke(kind)
            channel.poke(b"k" + b"ab12" * 8)
            with anyio.fail_after(4):
                await told.wait()
        group.cancel_scope.cancel()
    assert heard == [["ab12" * 8]]
    assert broker._notifier.generation(work=True) == work


@pytest.mark.anyio
async def test_a_run_named_beside_one_of_a_task_not_served_is_claimed_alone(
    broker: SqliteBroker, path: Path
) -> None:
    assert await claim_ids(broker) == []
    with foreign_channel(path) as channel:
        other = foreign_submit(path, "other")
        await poke_and_wait(broker, channel, b"w" + other.encode())
        assert await claim_ids(broker) == []
        mine = foreign_submit(path)
        await poke_and_wait(broker, channel, b"w" + mine.encode())
        assert await claim_ids(broker) == [mine]
    stored = await broker.get(other)
    assert stored is not None
    assert stored.state is RunState.SCHEDULED


@pytest.mark.anyio
async def test_an_older_run_whose_poke_was_lost_is_claimed_by_the_next_look(
    broker: SqliteBroker, path: Path
) -> None:
    assert await claim_ids(broker) == []
    with foreign_channel(path) as channel:
        lost = foreign_submit(path)  # its poke never came
        named = foreign_submit(path)
        await poke_and_wait(broker, channel, b"w" + named.encode())
        claimed = await claim_ids(broker, limit=5)
        # Claimed by id, the named run may come alone: the poll of the file (every
        # quarter of a second) sees the other commit, and the next claim looks at all.
        with anyio.fail_after(4):
            while len(claimed) < 2:
                await broker.wait_for_work(timeout=5)
                claimed += await claim_ids(broker, limit=5)
        assert sorted(claimed) == sorted([lost, named])


@pytest.mark.anyio
async def test_a_named_run_of_a_task_at_its_concurrency_limit_is_not_claimed(
    broker: SqliteBroker, path: Path
) -> None:
    limits = {"say": 1}
    first = foreign_submit(path)
    claimed = await broker.claim("w1", ["say"], limit=5, lease_seconds=LEASE, concurrency=limits)
    assert [r.id for r in claimed] == [first]
    with foreign_channel(path) as channel:
        named = foreign_submit(path)
        await poke_and_wait(broker, channel, b"w" + named.encode())
        claimed = await broker.claim(
            "w1", ["say"], limit=5, lease_seconds=LEASE, concurrency=limits
        )
        assert claimed == []
    assert await broker.complete("w1", first, 1, "1")
    claimed = await broker.claim("w1", ["say"], limit=5, lease_seconds=LEASE, concurrency=limits)
    assert [r.id for r in claimed] == [named]


# --- runs claimed ahead for a waiting claim loop --------------------------------------------


class CountedTakes(NamedWork):
    """Claims by id for a minute after a full claim, not a quarter of a second (a loaded
    machine may take longer between two steps of a test), counting the claims that ask
    (every claim through the broker asks once; a claim made ahead does not)."""

    def __init__(self, notifier: ChangeNotifier) -> None:
        super().__init__(notifier, 60.0)
        self.takes = 0

    def take(self, tasks: list[str], limit: int, next_due: float | None, now: float) -> list[str]:
        self.takes += 1
        return super().take(tasks, limit, next_due, now)


def patient(broker: SqliteBroker) -> CountedTakes:
    named = CountedTakes(broker._notifier)
    broker._named = named
    return named


@pytest.fixture
async def looked(broker: SqliteBroker) -> SqliteBroker:
    """``broker`` once a full claim found nothing due (and claiming by id for a minute)."""
    patient(broker)
    assert await claim_ids(broker) == []
    return broker


class Loop:
    """A claim loop's part in claiming ahead: the runs started for it, and its wait."""

    def __init__(self, slots: int = 5) -> None:
        self.slots = slots
        self.started: list[RunRecord] = []
        self.arrived = anyio.Event()
        self.woken = anyio.Event()

    def claimer(self) -> AheadClaimer:
        return AheadClaimer("w1", ["say"], LEASE, {}, lambda: self.slots, self.start)

    def start(self, runs: list[RunRecord]) -> None:
        self.started.extend(runs)
        self.arrived.set()

    async def wait(self, broker: SqliteBroker, *, task_status: TaskStatus[None]) -> None:
        with broker.claiming_ahead(self.claimer()):
            task_status.started()
            await broker.wait_for_work(timeout=30)
        self.woken.set()

    async def woken_by(self, broker: SqliteBroker, channel: WakeChannel, kind: bytes) -> None:
        """Wait for work while ``channel`` pokes ``kind``; return once the wait ended."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.wait, broker)
            channel.poke(kind)
            with anyio.fail_after(4):
                await self.woken.wait()


@pytest.mark.anyio
async def test_a_run_named_by_a_poke_is_claimed_and_started_for_the_waiting_loop(
    looked: SqliteBroker, path: Path
) -> None:
    broker = looked
    loop = Loop()
    with foreign_channel(path) as channel:
        async with anyio.create_task_group() as tg:
            await tg.start(loop.wait, broker)
            run_id = foreign_submit(path)
            channel.poke(b"w" + run_id.encode())
            with anyio.fail_after(4):
                await loop.arrived.wait()
            ((started),) = loop.started
            assert (started.id, started.state, started.attempts) == (run_id, RunState.RUNNING, 1)
            assert started.lease_owner == "w1"
            # Work that is not claimed ahead still ends the wait.
            channel.poke(b"w")
            with anyio.fail_after(4):
                await loop.woken.wait()
    # Leased once, to the claimer: nothing left to claim, and the lease is the claimer's.
    assert await claim_ids(broker, limit=5) == []
    assert await broker.complete("w1", run_id, 1, "1")


@pytest.mark.anyio
async def test_a_run_named_while_the_loop_has_no_free_slot_is_left_to_its_claim(
    looked: SqliteBroker, path: Path
) -> None:
    broker = looked
    loop = Loop(slots=0)
    with foreign_channel(path) as channel:
        run_id = foreign_submit(path)
        await loop.woken_by(broker, channel, b"w" + run_id.encode())
    assert loop.started == []
    assert await claim_ids(broker) == [run_id]


@pytest.mark.anyio
async def test_a_poke_naming_a_run_the_loop_may_not_take_wakes_it_for_a_full_claim(
    looked: SqliteBroker, path: Path
) -> None:
    broker = looked
    loop = Loop()
    with foreign_channel(path) as channel:
        lost = foreign_submit(path)  # its poke never came
        other = foreign_submit(path, "other")
        await loop.woken_by(broker, channel, b"w" + other.encode())
    assert loop.started == []
    # The claim after it looks at every due run.
    assert await claim_ids(broker, limit=5) == [lost]
    stored = await broker.get(other)
    assert stored is not None
    assert stored.state is RunState.SCHEDULED


class FailingLoop(Loop):
    """A claim loop whose start of runs claimed ahead raises, as a bug there would."""

    def start(self, runs: list[RunRecord]) -> None:
        self.started.extend(runs)
        raise RuntimeError("the runners are gone")


class UncountableLoop(Loop):
    """A claim loop whose count of free slots raises, in the middle of the claim ahead."""

    def claimer(self) -> AheadClaimer:
        return dataclasses.replace(super().claimer(), free_slots=self.broken)

    @staticmethod
    def broken() -> int:
        raise RuntimeError("no slots to count")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("make_loop", "started", "logged"),
    [
        (FailingLoop, True, "starting runs claimed ahead failed; handing them back"),
        (UncountableLoop, False, "claiming runs ['{}'] as their poke arrived failed"),
    ],
    ids=["start", "claim"],
)
async def test_a_claim_ahead_that_raises_is_logged_and_its_run_left_to_the_loop(
    looked: SqliteBroker,
    path: Path,
    caplog: pytest.LogCaptureFixture,
    make_loop: type[Loop],
    started: bool,
    logged: str,
) -> None:
    broker = looked
    loop = make_loop()
    with foreign_channel(path) as channel, caplog.at_level(logging.ERROR, logger="anyservice"):
        run_id = foreign_submit(path)
        # The event loop goes on (on trio the reader is a system task), the wait ends.
        await loop.woken_by(broker, channel, b"w" + run_id.encode())
    assert [run.id for run in loop.started] == ([run_id] if started else [])
    assert logged.format(run_id) in caplog.text
    assert "RuntimeError: " in caplog.text
    # Claimable again at once, its attempt not counted; a lease given ahead is void.
    stored = await broker.get(run_id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.lease_owner) == (RunState.SCHEDULED, 0, None)
    assert not await broker.complete("w1", run_id, 1, "1")
    claimed = await broker.claim("w2", ["say"], limit=5, lease_seconds=LEASE)
    assert [(run.id, run.attempts) for run in claimed] == [(run_id, 1)]


PROMPTLY = 10.0


@pytest.mark.anyio
async def test_a_worker_starts_a_run_claimed_ahead_for_it_before_any_claim_of_its_own(
    path: Path,
) -> None:
    broker = SqliteBroker(path, poll_interval=30.0)
    named = patient(broker)
    queue = TaskQueue(broker=broker)
    claims_before_body: list[int] = []

    @queue.task
    async def say(message: str) -> str:
        claims_before_body.append(named.takes)
        return message

    async with queue, TaskWorker(say, limit=2):
        # A run through the worker first, so that a runner is idle and a full claim recent.
        assert await (await say.delay("first")).result(timeout=PROMPTLY) == "first"
        with foreign_channel(path) as channel:
            claims = named.takes
            run_id = foreign_submit(path)
            channel.poke(b"w" + run_id.encode())
            run = await queue.get_run(run_id)
            assert await run.result(timeout=PROMPTLY) == "hi"
        stored = await broker.get(run_id)
    assert claims_before_body[-1] == claims
    assert stored is not None
    assert (stored.state, stored.attempts) == (RunState.COMPLETED, 1)


@pytest.mark.anyio
async def test_a_worker_whose_start_of_a_run_claimed_ahead_raises_runs_it_after_all(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = SqliteBroker(path, poll_interval=30.0)
    patient(broker)
    queue = TaskQueue(broker=broker)

    @queue.task
    async def say(message: str) -> str:
        return message

    worker = TaskWorker(say, limit=2)
    start = worker._start
    failing: list[str] = []
    calls: list[list[str]] = []

    def fails_once(claimed: list[RunRecord], put: Any = None) -> Any:
        ids = [run.id for run in claimed]
        if failing and failing[0] in ids:
            calls.append(ids)
            if len(calls) == 1:
                raise RuntimeError("no runner to be had")
        return start(claimed, put)

    worker._start = fails_once  # type: ignore[method-assign]
    async with queue, worker:
        assert await (await say.delay("first")).result(timeout=PROMPTLY) == "first"
        with foreign_channel(path) as channel, caplog.at_level(logging.ERROR, "anyservice"):
            run_id = foreign_submit(path)
            failing.append(run_id)
            channel.poke(b"w" + run_id.encode())
            run = await queue.get_run(run_id)
            # Handed back, and claimed again by the worker's own claim loop.
            assert await run.result(timeout=PROMPTLY) == "hi"
        stored = await broker.get(run_id)
    assert calls == [[run_id], [run_id]]
    assert "RuntimeError: no runner to be had" in caplog.text
    assert stored is not None
    assert (stored.state, stored.attempts) == (RunState.COMPLETED, 1)
