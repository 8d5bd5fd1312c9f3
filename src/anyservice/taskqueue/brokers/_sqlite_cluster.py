"""The SQLite broker's cluster storage: ticks and leases in tables of their own.

The tables are created on first use (``CREATE TABLE IF NOT EXISTS``), so a database made
by an older anyservice gains them without a schema migration, and one that never uses
schedules or singletons never has them. Each method is one ``BEGIN IMMEDIATE``
transaction: the tick and its run are stored together or not at all, and two processes
can never both take a lease.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .._leases import Lease, TickCounts, TickResult, acquire_lease
from .._records import RunRecord

__all__ = ["SqliteClusterStorage"]

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
    """
    CREATE TABLE IF NOT EXISTS anyservice_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    )
    """,
)

_INSERT_RUN = (
    "INSERT INTO anyservice_runs (id, task, payload, state, attempts, max_attempts,"
    " retries_left, retry_delay, timeout, created_at, scheduled_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _create_tables(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    for statement in _TABLES:
        conn.execute(statement)
    conn.execute("COMMIT")


class SqliteClusterStorage:
    """Ticks and leases for :class:`SqliteBroker` (see ``brokers/_cluster.py``)."""

    _cluster_tables = False

    if TYPE_CHECKING:
        # Given by SqliteBroker, whose own definitions come first in its MRO.
        _clock: Callable[[], float]

        async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T: ...

    async def _cluster_call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if not self._cluster_tables:
            await self._call(_create_tables)
            self._cluster_tables = True
        return await self._call(operation)

    async def _insert_tick(
        self, schedule: str, due: float, run: RunRecord, overlap: bool
    ) -> TickResult:
        def insert(conn: sqlite3.Connection) -> TickResult:
            conn.execute("BEGIN IMMEDIATE")
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
                result = TickResult.TAKEN
            elif busy:
                result = TickResult.SKIPPED
            else:
                conn.execute(
                    _INSERT_RUN,
                    (
                        run.id,
                        run.task,
                        run.payload,
                        run.state.value,
                        run.attempts,
                        run.max_attempts,
                        run.retries_left,
                        run.retry_delay,
                        run.timeout,
                        run.created_at,
                        run.scheduled_at,
                    ),
                )
                result = TickResult.STORED
            conn.execute("COMMIT")
            return result

        return await self._cluster_call(insert)

    async def _tick_counts(self, schedule: str) -> TickCounts:
        def count(conn: sqlite3.Connection) -> TickCounts:
            total, runs, latest = conn.execute(
                "SELECT COUNT(*), COUNT(run_id), MAX(due) FROM anyservice_ticks WHERE schedule = ?",
                (schedule,),
            ).fetchone()
            return TickCounts(
                runs=runs, skipped=total - runs, latest=None if latest is None else float(latest)
            )

        return await self._cluster_call(count)

    async def _acquire_lease(self, name: str, holder: str, lease_seconds: float) -> Lease | None:
        def acquire(conn: sqlite3.Connection) -> Lease | None:
            conn.execute("BEGIN IMMEDIATE")
            now = self._clock()
            lease = acquire_lease(_read_lease(conn, name), name, holder, now, lease_seconds)
            if lease is not None:
                conn.execute(
                    "INSERT INTO anyservice_leases (name, holder, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                    " expires_at = excluded.expires_at",
                    (name, lease.holder, lease.expires_at),
                )
            conn.execute("COMMIT")
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
