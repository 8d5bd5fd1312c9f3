"""The SQLite broker's schema, statements and row decoding: no I/O of their own.

SQLite does not enforce column types, and the file can be edited by anything, so a row is
checked column by column (:func:`read_row`): a row that does not make sense comes back as
a FAILED run whose error lists every problem, so one bad row cannot break a claim or a
status page.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .._records import (
    CORRUPT_RUN_ERROR_TYPE,
    PayloadError,
    RunError,
    RunRecord,
    RunState,
    describe_stored,
)

__all__ = [
    "COLUMNS",
    "INSERT",
    "MIGRATIONS",
    "RELEASE",
    "SCHEMA_VERSION",
    "SELECT",
    "chunks",
    "insert_values",
    "is_locked",
    "lease_in_place",
    "lease_rows",
    "marks",
    "read_row",
    "read_rows",
    "update_held",
]

#: ``PRAGMA user_version`` of a database with the current schema.
SCHEMA_VERSION = 6

# MIGRATIONS[n] takes a database from user_version n to n + 1. The table name is
# prefixed because the file may be shared with an application's own tables.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE anyservice_runs (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            max_attempts INTEGER NOT NULL,
            retries_left INTEGER NOT NULL,
            retry_delay REAL NOT NULL,
            timeout REAL,
            created_at REAL NOT NULL,
            scheduled_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            lease_owner TEXT,
            lease_expires_at REAL,
            result TEXT,
            error TEXT
        )
        """,
        "CREATE INDEX anyservice_runs_due ON anyservice_runs (state, scheduled_at)",
        "CREATE INDEX anyservice_runs_leases ON anyservice_runs (state, lease_expires_at)",
    ),
    # Purging old runs reads finished runs by age.
    (
        "CREATE INDEX anyservice_runs_finished ON anyservice_runs (finished_at)"
        " WHERE finished_at IS NOT NULL",
    ),
    # Who is working, so that a worker killed on this machine is noticed at once.
    (
        """
        CREATE TABLE anyservice_workers (
            owner TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )
        """,
    ),
    # Claims take due runs by priority (higher first), then due time, then submission.
    (
        "ALTER TABLE anyservice_runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX anyservice_runs_claim_order"
        " ON anyservice_runs (state, priority DESC, scheduled_at)",
    ),
    # The submitter's trace context (W3C traceparent), for the runs' spans.
    ("ALTER TABLE anyservice_runs ADD COLUMN trace_context TEXT",),
    # Partial indexes: each holds only the rows of the one state it serves (due runs,
    # leased runs). Every index led with the state, so each state change moved the row
    # in all three, and a run's claim and completion made thirteen index changes between
    # them; now five. Finished runs, most of the table, are only in the index by finish
    # time.
    (
        "DROP INDEX anyservice_runs_due",
        "DROP INDEX anyservice_runs_leases",
        "DROP INDEX anyservice_runs_claim_order",
        "CREATE INDEX anyservice_runs_due ON anyservice_runs (scheduled_at)"
        " WHERE state = 'SCHEDULED'",
        "CREATE INDEX anyservice_runs_leases ON anyservice_runs (lease_expires_at)"
        " WHERE state = 'RUNNING'",
        "CREATE INDEX anyservice_runs_claim_order"
        " ON anyservice_runs (priority DESC, scheduled_at) WHERE state = 'SCHEDULED'",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

COLUMNS = (
    "seq",
    "id",
    "task",
    "payload",
    "state",
    "attempts",
    "max_attempts",
    "retries_left",
    "retry_delay",
    "timeout",
    "created_at",
    "scheduled_at",
    "priority",
    "started_at",
    "finished_at",
    "lease_owner",
    "lease_expires_at",
    "result",
    "error",
    "trace_context",
)
SELECT = f"SELECT {', '.join(COLUMNS)} FROM anyservice_runs"

INSERT = (
    "INSERT INTO anyservice_runs (id, task, payload, state, attempts, max_attempts,"
    " retries_left, retry_delay, timeout, created_at, scheduled_at, priority,"
    " trace_context)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Old SQLite builds allow at most 999 parameters per statement.
_CHUNK = 500


def insert_values(run: RunRecord) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT` for a new run."""
    return (
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
        run.priority,
        run.trace_context,
    )


def is_locked(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says the database is locked by another connection (worth a retry)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # The low byte is the primary code; extended codes like SQLITE_BUSY_SNAPSHOT
        # (517) are busy too.
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def chunks(items: list[str]) -> Iterator[list[str]]:
    """``items`` in slices small enough for one statement's parameters."""
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def marks(count: int) -> str:
    """``count`` comma-separated ``?`` placeholders."""
    return ", ".join("?" * count)


class _Columns:
    """One row's values, read by type; every value that does not fit is a problem noted."""

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.values = dict(zip(COLUMNS, row, strict=True))
        self.problems: list[str] = []

    def text(self, name: str) -> str:
        value = self.values[name]
        if isinstance(value, str):
            return value
        self.problems.append(f"{name} {describe_stored(value)} is not text")
        return "" if value is None else str(value)

    def optional_text(self, name: str) -> str | None:
        return None if self.values[name] is None else self.text(name)

    def integer(self, name: str) -> int:
        value = self.values[name]
        if type(value) is int:
            return value
        self.problems.append(f"{name} {describe_stored(value)} is not an integer")
        return 0

    def real(self, name: str) -> float:
        value = self.values[name]
        if type(value) in (int, float) and not math.isnan(value):
            return float(value)
        self.problems.append(f"{name} {describe_stored(value)} is not a number")
        return 0.0

    def optional_real(self, name: str) -> float | None:
        return None if self.values[name] is None else self.real(name)

    def state(self) -> RunState:
        value = self.values["state"]
        try:
            return RunState(value)
        except ValueError:
            self.problems.append(
                f"state {describe_stored(value)} is not one of {', '.join(RunState)}"
            )
            return RunState.FAILED

    def error(self) -> RunError | None:
        text = self.optional_text("error")
        if text is None:
            return None
        try:
            return RunError.from_json(text)
        except PayloadError as exc:
            self.problems.append(str(exc))
            return None


def _record(columns: _Columns) -> RunRecord:
    return RunRecord(
        id=columns.text("id"),
        task=columns.text("task"),
        payload=columns.text("payload"),
        state=columns.state(),
        attempts=columns.integer("attempts"),
        max_attempts=columns.integer("max_attempts"),
        retries_left=columns.integer("retries_left"),
        retry_delay=columns.real("retry_delay"),
        timeout=columns.optional_real("timeout"),
        created_at=columns.real("created_at"),
        scheduled_at=columns.real("scheduled_at"),
        priority=columns.integer("priority"),
        started_at=columns.optional_real("started_at"),
        finished_at=columns.optional_real("finished_at"),
        lease_owner=columns.optional_text("lease_owner"),
        lease_expires_at=columns.optional_real("lease_expires_at"),
        result=columns.optional_text("result"),
        error=columns.error(),
        trace_context=columns.optional_text("trace_context"),
    )


_STATES = {state.value: state for state in RunState}


def _plain_row(row: tuple[Any, ...]) -> tuple[int, RunRecord] | None:
    """The row read at once if every value has its column's type and no error is stored
    (what the broker itself writes); ``None`` sends it through the checks of ``_Columns``.

    A claim reads every row it takes: checking each value through ``_Columns`` cost
    more than the claim's statements, so the checks here are expressions, not calls
    (``x == x`` is false for NaN only).
    """
    (seq, run_id, task, payload, state, attempts, max_attempts, retries_left, retry_delay,
     timeout, created_at, scheduled_at, priority, started_at, finished_at, lease_owner,
     lease_expires_at, result, error, trace_context) = row  # fmt: skip
    known = _STATES.get(state) if type(state) is str else None
    if (
        known is None
        or error is not None
        or type(seq) is not int
        or type(run_id) is not str
        or type(task) is not str
        or type(payload) is not str
        or type(attempts) is not int
        or type(max_attempts) is not int
        or type(retries_left) is not int
        or type(priority) is not int
        or not (type(retry_delay) is float and retry_delay == retry_delay)
        or not (type(created_at) is float and created_at == created_at)
        or not (type(scheduled_at) is float and scheduled_at == scheduled_at)
        or not (timeout is None or (type(timeout) is float and timeout == timeout))
        or not (started_at is None or (type(started_at) is float and started_at == started_at))
        or not (finished_at is None or (type(finished_at) is float and finished_at == finished_at))
        or not (
            lease_expires_at is None
            or (type(lease_expires_at) is float and lease_expires_at == lease_expires_at)
        )
        or not (lease_owner is None or type(lease_owner) is str)
        or not (result is None or type(result) is str)
        or not (trace_context is None or type(trace_context) is str)
        or (known is RunState.RUNNING and (lease_owner is None or lease_expires_at is None))
    ):
        return None
    # The record's fields set at once (see record_of), from a dict display: cheaper still
    # than zipping them with the names.
    record: RunRecord = object.__new__(RunRecord)
    object.__setattr__(record, "__dict__", {
        "id": run_id, "task": task, "payload": payload, "state": known, "attempts": attempts,
        "max_attempts": max_attempts, "retries_left": retries_left,
        "retry_delay": retry_delay, "timeout": timeout, "created_at": created_at,
        "scheduled_at": scheduled_at, "priority": priority, "started_at": started_at,
        "finished_at": finished_at, "lease_owner": lease_owner,
        "lease_expires_at": lease_expires_at, "result": result, "error": None,
        "trace_context": trace_context,
    })  # fmt: skip
    return seq, record


def lease_in_place(run: RunRecord, now: float, owner: str, expires: float) -> RunRecord:
    """``run`` as a claim leaves it: RUNNING under ``owner``'s lease, one attempt more.

    Changed in place, for a record that :func:`read_row` has just made for this claim
    and that nobody else holds yet: a second record per run claimed (even made field by
    field) cost more than the claim's UPDATE of the row's lease.
    """
    fields = run.__dict__
    fields["state"] = RunState.RUNNING
    fields["attempts"] = run.attempts + 1
    fields["started_at"] = now
    fields["lease_owner"] = owner
    fields["lease_expires_at"] = expires
    return run


#: The UPDATE of a claim's rows, by ``seq``; its IN list is filled in by :func:`lease_rows`.
_LEASE = (
    "UPDATE anyservice_runs SET state = 'RUNNING', attempts = attempts + 1,"
    " started_at = ?, lease_owner = ?, lease_expires_at = ? WHERE seq IN ({})"
)
_LEASES: dict[int, str] = {}
#: A power of two, with the three other parameters within old builds' 999.
_LEASE_CHUNK = 512


def lease_rows(conn: sqlite3.Connection, seqs: list[int], lease: tuple[float, str, float]) -> None:
    """Lease the rows ``seqs``, read in this transaction: ``lease`` is ``(now, owner,
    expiry)``, and each row's attempt goes up by one, as :func:`lease_in_place` has it.

    One UPDATE for up to 512 rows, where one per row cost a statement step and reset
    each. The IN list is padded to a power of two with the last ``seq`` again (which
    ``IN`` ignores), so a worker's claims share a few statements, each prepared once.
    """
    for start in range(0, len(seqs), _LEASE_CHUNK):
        part = seqs[start : start + _LEASE_CHUNK]
        size = 1 << (len(part) - 1).bit_length()
        sql = _LEASES.get(size)
        if sql is None:
            sql = _LEASES[size] = _LEASE.format(marks(size))
        conn.execute(sql, (*lease, *part, *[part[-1]] * (size - len(part))))


def read_rows(rows: list[tuple[Any, ...]]) -> list[tuple[int, RunRecord, bool]]:
    """:func:`read_row` of each row, the plain ones without its call (a claim reads many)."""
    read: list[tuple[int, RunRecord, bool]] = []
    for row in rows:
        plain = _plain_row(row)
        read.append(read_row(row) if plain is None else (plain[0], plain[1], False))
    return read


def read_row(row: tuple[Any, ...]) -> tuple[int, RunRecord, bool]:
    """Turn a row of :data:`SELECT` into ``(seq, record, corrupt)``, whatever it holds.

    A corrupt row comes back as a FAILED record, without a lease, whose error is a
    ``CorruptRunError`` listing every problem found.
    """
    plain = _plain_row(row)
    if plain is not None:
        return plain[0], plain[1], False
    columns = _Columns(row)
    seq = columns.values["seq"] if type(columns.values["seq"]) is int else -1
    record = _record(columns)
    if record.state is RunState.RUNNING and (
        record.lease_owner is None or record.lease_expires_at is None
    ):
        columns.problems.append("it is RUNNING without a lease owner and expiry")
    if not columns.problems:
        return seq, record, False
    corrupt = RunError(
        type=CORRUPT_RUN_ERROR_TYPE,
        message=f"run {record.id} is corrupt in the database: {'; '.join(columns.problems)}",
    )
    record = replace(
        record, state=RunState.FAILED, lease_owner=None, lease_expires_at=None, error=corrupt
    )
    return seq, record, True


#: A held run made claimable again, its attempt not counted (fenced by :func:`update_held`).
RELEASE = (
    "UPDATE anyservice_runs SET state = 'SCHEDULED', attempts = MAX(attempts - 1, 0),"
    " started_at = NULL, lease_owner = NULL, lease_expires_at = NULL"
)


def update_held(conn: sqlite3.Connection, sql: str, parameters: dict[str, Any]) -> bool:
    """Run one UPDATE fenced by ``WHERE`` the run is RUNNING under the claim
    ``(:owner, :attempt)``."""
    cursor = conn.execute(
        f"{sql} WHERE id = :id AND state = 'RUNNING' AND lease_owner = :owner"
        " AND attempts = :attempt",
        parameters,
    )
    return cursor.rowcount == 1
