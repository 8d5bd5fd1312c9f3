"""The SQLite broker's cluster storage: ticks and leases in tables of their own.

The tables are created on first use (``CREATE TABLE IF NOT EXISTS``), so a database made
by an older anyservice gains them without a schema migration, and one that never uses
schedules or singletons never has them. Each method is one call on the broker's
connection thread, inside a ``BEGIN IMMEDIATE`` transaction: the tick and its run are
stored together or not at all, and two processes can never both take a lease.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .._controls import RETRYABLE_STATES
from .._leases import Lease, TickCounts, TickResult, acquire_lease
from .._records import RunRecord, RunState
from ._sqlite_rows import INSERT, chunks, insert_values, marks

__all__ = ["SqliteClusterStorage", "forget_purged"]

T = TypeVar("T")

_TABLES = (
    # run_id is NULL for a tick skipped because the schedule's previous run was RUNNING.
    """
    CREATE TABLE IF NOT EXISTS anyservice_ticks (
        schedule TEXT NOT NULL,
        due REAL NOT NULL,
        run_id TEXT,
        PRIMARY KEY (schedule, due)
    )
    """,
    "CREATE INDEX IF NOT EXISTS anyservice_ticks_runs ON anyservice_ticks (run_id)",
    # Each schedule's counts, kept by the step that stores a tick: a purge deletes old
    # ticks, and the counts stay those of every tick the schedule ever had.
    """
    CREATE TABLE IF NOT EXISTS anyservice_schedules (
        schedule TEXT PRIMARY KEY,
        runs INTEGER NOT NULL,
        skipped INTEGER NOT NULL,
        latest REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS anyservice_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    )
    """,
    # The run last submitted under each key= (its dedup lasts while it is unfinished).
    "CREATE TABLE IF NOT EXISTS anyservice_keys (key TEXT PRIMARY KEY, run_id TEXT NOT NULL)",
    # A purge deletes the keys of the runs it deletes.
    "CREATE INDEX IF NOT EXISTS anyservice_keys_runs ON anyservice_keys (run_id)",
    # RUNNING runs whose cancellation was asked for; their worker looks at each heartbeat.
    "CREATE TABLE IF NOT EXISTS anyservice_cancels (run_id TEXT PRIMARY KEY)",
)

_RETRYABLE = ", ".join(f"'{state.value}'" for state in sorted(RETRYABLE_STATES))


def _create_tables(conn: sqlite3.Connection) -> None:
    counted = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'anyservice_schedules'"
    ).fetchone()
    for statement in _TABLES:
        conn.execute(statement)
    if not counted:
        # A file whose ticks were stored before their counts were kept apart: count them.
        conn.execute(
            "INSERT OR IGNORE INTO anyservice_schedules (schedule, runs, skipped, latest)"
            " SELECT schedule, COUNT(run_id), COUNT(*) - COUNT(run_id), MAX(due)"
            " FROM anyservice_ticks GROUP BY schedule"
        )


def forget_purged(conn: sqlite3.Connection, run_ids: list[str], before: float, limit: int) -> None:
    """Delete what pointed at the runs a purge deletes: their ticks and their keys.

    Each schedule keeps its latest tick, which the next one is planned from, and its
    counts. Skipped ticks (no run) due before ``before`` go too, up to ``limit``.
    Nothing to do in a file whose cluster tables were never made.
    """
    if (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'anyservice_schedules'"
        ).fetchone()
        is None
    ):
        return
    not_latest = (
        " AND due < (SELECT s.latest FROM anyservice_schedules s"
        " WHERE s.schedule = anyservice_ticks.schedule)"
    )
    conn.executemany(
        f"DELETE FROM anyservice_ticks WHERE run_id = ?{not_latest}", ((id_,) for id_ in run_ids)
    )
    conn.executemany("DELETE FROM anyservice_keys WHERE run_id = ?", ((id_,) for id_ in run_ids))
    conn.execute(
        "DELETE FROM anyservice_ticks WHERE rowid IN (SELECT rowid FROM anyservice_ticks"
        f" WHERE run_id IS NULL AND due < ?{not_latest} LIMIT ?)",
        (before, limit),
    )


class SqliteClusterStorage:
    """Ticks and leases for :class:`SqliteBroker` (see ``brokers/_cluster.py``)."""

    _cluster_tables = False

    if TYPE_CHECKING:
        # Given by SqliteBroker, whose own definitions come first in its MRO.
        _clock: Callable[[], float]
        #: ``SELECT <every column> FROM anyservice_runs``, and the reader of its rows.
        _select_runs: str

        @staticmethod
        def _read_run(row: tuple[Any, ...]) -> tuple[int, RunRecord, bool]: ...

        async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T: ...

    def _get_in(self, conn: sqlite3.Connection, run_id: str) -> RunRecord | None:
        row = conn.execute(f"{self._select_runs} WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else self._read_run(row)[1]

    async def _cluster_call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if not self._cluster_tables:
            await self._call(_create_tables)
            self._cluster_tables = True
        return await self._call(operation)

    async def _insert_tick(
        self, schedule: str, due: float, run: RunRecord, overlap: bool
    ) -> TickResult:
        def insert(conn: sqlite3.Connection) -> TickResult:
            busy = (
                not overlap
                and conn.execute(
                    "SELECT 1 FROM anyservice_ticks JOIN anyservice_runs ON id = run_id"
                    " WHERE schedule = ? AND state = 'RUNNING' LIMIT 1",
                    (schedule,),
                ).fetchone()
            )
            cursor = conn.execute(
                "INSERT OR IGNORE INTO anyservice_ticks (schedule, due, run_id) VALUES (?, ?, ?)",
                (schedule, due, None if busy else run.id),
            )
            if cursor.rowcount != 1:
                return TickResult.TAKEN
            conn.execute(
                "INSERT INTO anyservice_schedules AS s (schedule, runs, skipped, latest)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (schedule) DO UPDATE SET"
                " runs = s.runs + excluded.runs, skipped = s.skipped + excluded.skipped,"
                " latest = MAX(s.latest, excluded.latest)",
                (schedule, 0 if busy else 1, 1 if busy else 0, due),
            )
            if busy:
                return TickResult.SKIPPED
            conn.execute(INSERT, insert_values(run))
            return TickResult.STORED

        return await self._cluster_call(insert)

    async def _tick_counts(self, schedule: str) -> TickCounts:
        def count(conn: sqlite3.Connection) -> TickCounts:
            row = conn.execute(
                "SELECT runs, skipped, latest FROM anyservice_schedules WHERE schedule = ?",
                (schedule,),
            ).fetchone()
            if row is None:
                return TickCounts()
            runs, skipped, latest = row
            return TickCounts(runs=runs, skipped=skipped, latest=float(latest))

        return await self._cluster_call(count)

    async def _acquire_lease(self, name: str, holder: str, lease_seconds: float) -> Lease | None:
        def acquire(conn: sqlite3.Connection) -> Lease | None:
            now = self._clock()
            lease = acquire_lease(_read_lease(conn, name), name, holder, now, lease_seconds)
            if lease is not None:
                conn.execute(
                    "INSERT INTO anyservice_leases (name, holder, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                    " expires_at = excluded.expires_at",
                    (name, lease.holder, lease.expires_at),
                )
            return lease

        return await self._cluster_call(acquire)

    async def _release_lease(self, name: str, holder: str) -> bool:
        def release(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "DELETE FROM anyservice_leases WHERE name = ? AND holder = ?", (name, holder)
            )
            return cursor.rowcount == 1

        return await self._cluster_call(release)

    async def _get_lease(self, name: str) -> Lease | None:
        return await self._cluster_call(lambda conn: _read_lease(conn, name))

    async def _insert_keyed(self, key: str, run: RunRecord) -> RunRecord:
        def insert(conn: sqlite3.Connection) -> RunRecord:
            row = conn.execute(
                "SELECT run_id FROM anyservice_keys WHERE key = ?", (key,)
            ).fetchone()
            existing = None if row is None else self._get_in(conn, row[0])
            if existing is not None and not existing.finished:
                return existing
            conn.execute(INSERT, insert_values(run))
            conn.execute(
                "INSERT OR REPLACE INTO anyservice_keys (key, run_id) VALUES (?, ?)", (key, run.id)
            )
            return run

        return await self._cluster_call(insert)

    async def _list_runs(
        self, state: RunState | None, task: str | None, since: float | None, limit: int
    ) -> list[RunRecord]:
        # The state is written out (a RunState's value, never the caller's text): the
        # indexes of due and of leased runs hold the rows of their state alone, and
        # SQLite uses such an index only for a query that names that state.
        where: list[str] = [] if state is None else [f"state = '{RunState(state).value}'"]
        parameters: list[object] = []
        for clause, value in (("task = ?", task), ("created_at >= ?", since)):
            if value is not None:
                where.append(clause)
                parameters.append(value)
        sql = self._select_runs + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created_at DESC, seq DESC LIMIT ?"

        def select(conn: sqlite3.Connection) -> list[RunRecord]:
            return [self._read_run(row)[1] for row in conn.execute(sql, (*parameters, limit))]

        return await self._cluster_call(select)

    async def _requeue(self, run_id: str, retries: int) -> RunRecord | None:
        def requeue(conn: sqlite3.Connection) -> RunRecord | None:
            cursor = conn.execute(
                "UPDATE anyservice_runs SET state = 'SCHEDULED', attempts = 0, retries_left = ?,"
                " scheduled_at = ?, started_at = NULL, finished_at = NULL, lease_owner = NULL,"
                f" lease_expires_at = NULL, result = NULL WHERE id = ? AND state IN ({_RETRYABLE})",
                (retries, self._clock(), run_id),
            )
            run = None
            if cursor.rowcount == 1:
                conn.execute("DELETE FROM anyservice_cancels WHERE run_id = ?", (run_id,))
                run = self._get_in(conn, run_id)
            return run

        return await self._cluster_call(requeue)

    async def _request_cancel(self, run_id: str) -> RunState | None:
        def cancel(conn: sqlite3.Connection) -> RunState | None:
            state: RunState | None = None
            if (
                conn.execute(
                    "UPDATE anyservice_runs SET state = 'CANCELLED', finished_at = ?"
                    " WHERE id = ? AND state = 'SCHEDULED'",
                    (self._clock(), run_id),
                ).rowcount
                == 1
            ):
                state = RunState.CANCELLED
            elif conn.execute(
                "SELECT 1 FROM anyservice_runs WHERE id = ? AND state = 'RUNNING'", (run_id,)
            ).fetchone():
                conn.execute(
                    "INSERT OR IGNORE INTO anyservice_cancels (run_id) VALUES (?)", (run_id,)
                )
                state = RunState.RUNNING
            return state

        return await self._cluster_call(cancel)

    async def _cancel_requests(self, owner: str, run_ids: list[str]) -> set[str]:
        def requested(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for chunk in chunks(run_ids):
                found.update(
                    run_id
                    for (run_id,) in conn.execute(
                        "SELECT id FROM anyservice_runs JOIN anyservice_cancels ON run_id = id"
                        f" WHERE lease_owner = ? AND id IN ({marks(len(chunk))})",
                        (owner, *chunk),
                    )
                )
            return found

        return await self._cluster_call(requested)

    async def _end_cancelled(self, owner: str, run_id: str, attempt: int) -> bool:
        def end(conn: sqlite3.Connection) -> bool:
            done = (
                conn.execute(
                    "UPDATE anyservice_runs SET state = 'CANCELLED', finished_at = ?,"
                    " lease_owner = NULL, lease_expires_at = NULL"
                    " WHERE id = ? AND state = 'RUNNING' AND lease_owner = ? AND attempts = ?",
                    (self._clock(), run_id, owner, attempt),
                ).rowcount
                == 1
            )
            if done:
                conn.execute("DELETE FROM anyservice_cancels WHERE run_id = ?", (run_id,))
            return done

        return await self._cluster_call(end)


def _read_lease(conn: sqlite3.Connection, name: str) -> Lease | None:
    row = conn.execute(
        "SELECT holder, expires_at FROM anyservice_leases WHERE name = ?", (name,)
    ).fetchone()
    if row is None:
        return None
    holder, expires_at = row
    if not isinstance(holder, str) or type(expires_at) not in (int, float):
        # An edited row: treat the lease as lapsed, so it can be taken again.
        return Lease(name=name, holder=str(holder), expires_at=float("-inf"))
    return Lease(name=name, holder=holder, expires_at=float(expires_at))
