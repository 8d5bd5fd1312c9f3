"""The embedded broker: task runs in one SQLite file (``sqlite:///anyservice.db``).

Several processes on one machine can share the file. The file is in WAL mode, so readers
never wait for writers, and every read-then-write (a claim, a heartbeat) runs in a
``BEGIN IMMEDIATE`` transaction, which takes the write lock first: two processes can
never claim the same run. A locked database is retried with bounded exponential backoff.

sqlite3 blocks, so every call runs in a worker thread (``anyio.to_thread``) on the
broker's one connection, guarded by a lock. Waiting for work is fast without a server to
push notifications: writes by brokers of the same file in this process wake waiters at
once, and other processes' commits are noticed by polling ``PRAGMA data_version`` (a
cheap read that changes whenever another connection commits) every few milliseconds.
"""

from __future__ import annotations

import math
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread

from ..._checks import Seconds, check_seconds
from .. import _records as records
from .._errors import BrokerBusyError, BrokerError
from .._records import (
    CORRUPT_RUN_ERROR_TYPE,
    FINISHED_STATES,
    PayloadError,
    RunError,
    RunRecord,
    RunState,
    abandoned_error,
    describe_stored,
)
from ._base import BaseBroker, Claimed
from ._notifier import ChangeNotifier
from ._sqlite_cluster import SqliteClusterStorage
from ._workers import WORKERS_EVERY, WORKERS_FORGOTTEN, host_identity, process_gone

__all__ = ["SCHEMA_VERSION", "SqliteBroker"]

T = TypeVar("T")

#: ``PRAGMA user_version`` of a database with the current schema.
SCHEMA_VERSION = 4

# _MIGRATIONS[n] takes a database from user_version n to n + 1. The table name is
# prefixed because the file may be shared with an application's own tables.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
    # The submitter's trace context (W3C traceparent), for the runs' spans.
    ("ALTER TABLE anyservice_runs ADD COLUMN trace_context TEXT",),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_COLUMNS = (
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
    "started_at",
    "finished_at",
    "lease_owner",
    "lease_expires_at",
    "result",
    "error",
    "trace_context",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM anyservice_runs"

_FIRST_BACKOFF = 0.005
_MAX_BACKOFF = 0.5

# Brokers of one file in one process share a notifier, so a submit through one wakes
# the waiters of the others at once instead of at their next data_version poll.
_notifiers: weakref.WeakValueDictionary[str, ChangeNotifier] = weakref.WeakValueDictionary()
_notifiers_lock = threading.Lock()


def _notifier_for(path: str) -> ChangeNotifier:
    key = os.path.normcase(os.path.realpath(path))
    with _notifiers_lock:
        notifier = _notifiers.get(key)
        if notifier is None:
            notifier = _notifiers[key] = ChangeNotifier()
        return notifier


def _check_directory(path: str) -> None:
    """Refuse a database whose directory is missing, rather than fail at first use."""
    directory = os.path.dirname(path)
    if not os.path.exists(directory):
        raise ValueError(
            f"SQLite database {path}: its directory {directory} does not exist; create it "
            "or give another path"
        )
    if not os.path.isdir(directory):
        raise ValueError(f"SQLite database {path}: {directory} is not a directory")


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # The low byte is the primary code; extended codes like SQLITE_BUSY_SNAPSHOT
        # (517) are busy too.
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _read_row(row: tuple[Any, ...]) -> tuple[int, RunRecord, bool]:
    """Turn a row into ``(seq, record, corrupt)``, whatever the row holds.

    SQLite does not enforce column types, and the file can be edited by anything, so a
    row is checked column by column. A row that does not make sense is reported as a
    FAILED run whose error lists every problem, so one bad row cannot break a claim or
    a status page.
    """
    values = dict(zip(_COLUMNS, row, strict=True))
    problems: list[str] = []

    def text(name: str) -> str:
        value = values[name]
        if isinstance(value, str):
            return value
        problems.append(f"{name} {describe_stored(value)} is not text")
        return "" if value is None else str(value)

    def optional_text(name: str) -> str | None:
        return None if values[name] is None else text(name)

    def integer(name: str) -> int:
        value = values[name]
        if type(value) is int:
            return value
        problems.append(f"{name} {describe_stored(value)} is not an integer")
        return 0

    def real(name: str) -> float:
        value = values[name]
        if type(value) in (int, float) and not math.isnan(value):
            return float(value)
        problems.append(f"{name} {describe_stored(value)} is not a number")
        return 0.0

    def optional_real(name: str) -> float | None:
        return None if values[name] is None else real(name)

    seq = values["seq"] if type(values["seq"]) is int else -1
    run_id = text("id")
    try:
        state = RunState(values["state"])
    except ValueError:
        problems.append(
            f"state {describe_stored(values['state'])} is not one of {', '.join(RunState)}"
        )
        state = RunState.FAILED
    error: RunError | None = None
    error_text = optional_text("error")
    if error_text is not None:
        try:
            error = RunError.from_json(error_text)
        except PayloadError as exc:
            problems.append(str(exc))
    record = RunRecord(
        id=run_id,
        task=text("task"),
        payload=text("payload"),
        state=state,
        attempts=integer("attempts"),
        max_attempts=integer("max_attempts"),
        retries_left=integer("retries_left"),
        retry_delay=real("retry_delay"),
        timeout=optional_real("timeout"),
        created_at=real("created_at"),
        scheduled_at=real("scheduled_at"),
        started_at=optional_real("started_at"),
        finished_at=optional_real("finished_at"),
        lease_owner=optional_text("lease_owner"),
        lease_expires_at=optional_real("lease_expires_at"),
        result=optional_text("result"),
        error=error,
        trace_context=optional_text("trace_context"),
    )
    if state is RunState.RUNNING and (
        record.lease_owner is None or record.lease_expires_at is None
    ):
        problems.append("it is RUNNING without a lease owner and expiry")
    if not problems:
        return seq, record, False
    corrupt = RunError(
        type=CORRUPT_RUN_ERROR_TYPE,
        message=f"run {run_id} is corrupt in the database: {'; '.join(problems)}",
    )
    record = replace(
        record, state=RunState.FAILED, lease_owner=None, lease_expires_at=None, error=corrupt
    )
    return seq, record, True


class SqliteBroker(SqliteClusterStorage, BaseBroker):
    """Task runs in a SQLite file shared by the processes of one machine.

    The file can be edited by anything, so rows are read column by column: a row that
    makes no sense comes back from :meth:`get` as a FAILED run whose error is a
    ``CorruptRunError`` listing what is wrong, a due one is marked so by :meth:`claim`
    instead of being claimed, a row with an unknown state is never claimed and
    :meth:`counts` counts it as FAILED.

    Args:
        path: The database file; created (with its schema) on :meth:`open`. A relative
            path is relative to the current directory when the broker is made.
        clock: Wall-clock time in epoch seconds, shared by every process using the file;
            tests pass a fake one to move time.
        busy_timeout: Seconds SQLite itself waits for a lock before reporting it busy.
            Kept short because a waiting thread cannot be cancelled; longer waits happen
            in :attr:`lock_timeout`'s cancellable backoff.
        lock_timeout: Seconds to keep retrying a locked database before giving up with
            :class:`BrokerBusyError`.
        poll_interval: Seconds between checks for other processes' commits while
            waiting for work or for a run to finish.

    Raises:
        ValueError: A timeout or interval is not a positive number.
    """

    # For the cluster storage (ticks, leases, keys): how rows of runs are read.
    _select_runs = _SELECT
    _read_run = staticmethod(_read_row)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: Seconds = 0.1,
        lock_timeout: Seconds = 30.0,
        poll_interval: Seconds = 0.005,
    ) -> None:
        busy = check_seconds(busy_timeout, "busy_timeout")
        lock = check_seconds(lock_timeout, "lock_timeout")
        poll = check_seconds(poll_interval, "poll_interval")
        self._given_path = os.fspath(path)
        if self._given_path in ("", ":memory:") or self._given_path.startswith("file:"):
            raise ValueError(
                f"SQLite broker needs a file path, got {self._given_path!r} "
                "(use 'memory://' for an in-process broker)"
            )
        self._path = os.path.abspath(self._given_path)
        _check_directory(self._path)
        super().__init__(clock=clock, notifier=_notifier_for(self._path), poll_interval=poll)
        self._busy_timeout = busy
        self._lock_timeout = lock
        # One connection, used from worker threads one call at a time.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        #: (device, inode) of the file opened, to notice it deleted or replaced.
        self._identity: tuple[int, int] | None = None
        self._data_version = 0
        self._last_poll = -math.inf
        self._poll_every = poll
        #: How many times a locked database was retried; a health signal.
        self.lock_retries = 0
        # This process, as the workers table records it.
        self._host = host_identity()
        self._pid = os.getpid()
        self._started_at = time.time()
        self._workers_seen: dict[str, float] = {}  # owner -> monotonic time last recorded

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> Self:
        """``sqlite:///relative.db`` (three slashes) or ``sqlite:////absolute/path.db``."""
        rest = url.partition("://")[2]
        # sqlite:///path: the host part between "//" and the third "/" must be empty.
        if not rest.startswith("/") or len(rest) == 1:
            raise ValueError(
                f"SQLite broker URL {url!r} needs a file path: 'sqlite:///relative.db' or "
                "'sqlite:////absolute/path.db'"
            )
        path = rest[1:]
        if "?" in path:
            raise ValueError(f"SQLite broker URL {url!r}: query options are not supported")
        if path == ":memory:":
            raise ValueError(
                f"SQLite broker URL {url!r}: an in-memory SQLite database cannot be shared by "
                "workers; use 'memory://' for an in-process broker"
            )
        return cls(path, clock=clock)

    @property
    def url(self) -> str:
        """``sqlite:///`` followed by the path as given."""
        return f"sqlite:///{self._given_path}"

    @property
    def path(self) -> str:
        """The absolute path of the database file."""
        return self._path

    @property
    def location(self) -> str:
        """The absolute path of the database file."""
        return self._path

    def __repr__(self) -> str:
        return f"<SqliteBroker {self.url!r}>"

    # --- running statements ------------------------------------------------------------

    def _in_thread(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise BrokerError(
                    f"SQLite database {self._path} is not open; "
                    "use 'async with broker:' or 'await broker.open()'"
                )
            try:
                return operation(conn)
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.rollback()
                    except sqlite3.Error:
                        pass  # The original error says more; the connection is reset below.
                raise

    async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` on the connection in a worker thread, retrying while locked.

        Raises:
            BrokerBusyError: The database stayed locked for ``lock_timeout`` seconds.
            BrokerError: Any other SQLite error, or the broker is not open.
        """
        deadline = anyio.current_time() + self._lock_timeout
        delay = _FIRST_BACKOFF
        while True:
            try:
                return await anyio.to_thread.run_sync(self._in_thread, operation)
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise BrokerError(f"SQLite database {self._path}: {exc}") from exc
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise BrokerBusyError(
                        f"SQLite database {self._path!r} stayed locked for more than "
                        f"{self._lock_timeout:g} s (lock_timeout): {exc}"
                    ) from exc
                self.lock_retries += 1
                # Jitter keeps processes that collided from retrying in lockstep.
                await anyio.sleep(min(delay * random.uniform(0.5, 1.0), remaining))
                delay = min(delay * 2, _MAX_BACKOFF)
            except sqlite3.Error as exc:
                raise BrokerError(f"SQLite database {self._path}: {exc}") from exc

    # --- opening and closing -------------------------------------------------------------

    def _connect(self) -> None:
        with self._lock:
            if self._conn is None:
                # Task arguments and results are the user's own: create the file 0600, and
                # SQLite gives its WAL and shared-memory files the mode of the database's.
                # An existing file keeps its mode.
                os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
                self._conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout,
                    # Transactions are explicit (BEGIN IMMEDIATE), never implicit.
                    isolation_level=None,
                    check_same_thread=False,
                )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise BrokerError(
                f"could not put SQLite database {self._path!r} in WAL mode (it is in "
                f"{mode!r} mode); WAL needs a local file system"
            )
        # In WAL mode NORMAL never corrupts the file; a power cut (not a process crash)
        # may lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            self._migrate(conn)
        (self._data_version,) = conn.execute("PRAGMA data_version").fetchone()
        info = os.stat(self._path)
        self._identity = (info.st_dev, info.st_ino)

    def _check_file(self) -> None:
        """Raise :class:`BrokerError` if the open file was deleted or replaced.

        A connection keeps using the file it opened, unlinked or not, while processes
        that open the path afterwards get a new file: their runs and this broker's would
        never meet.
        """
        try:
            info = os.stat(self._path)
        except FileNotFoundError:
            raise BrokerError(
                f"SQLite database {self._path} was deleted while open: its runs are gone "
                "for every other process; restart with the file in place"
            ) from None
        except OSError as exc:
            raise BrokerError(
                f"SQLite database {self._path}: cannot check the file: {exc}"
            ) from exc
        if self._identity is not None and (info.st_dev, info.st_ino) != self._identity:
            raise BrokerError(
                f"SQLite database {self._path} was replaced by another file while open: "
                "new runs go to the new file, which this broker does not see; restart it"
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        # Read again under the write lock: another process may have just migrated.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise BrokerError(
                f"SQLite database {self._path!r} has task-run schema version {version}, "
                f"newer than this anyservice understands ({SCHEMA_VERSION}); upgrade anyservice"
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")

    async def _open(self) -> bool:
        # Connect, switch the file to WAL mode and create or migrate the schema; a file
        # that cannot be, or has a newer schema, is a BrokerError.
        if self._conn is not None:
            return False
        try:
            await anyio.to_thread.run_sync(self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise BrokerError(f"cannot open SQLite database {self._path!r}: {exc}") from exc
        try:
            await self._call(self._prepare)
        except BaseException:
            await self.close()
            raise
        return True

    def _disconnect(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                owners = list(self._workers_seen)
                self._workers_seen.clear()
                try:
                    # A clean stop leaves nothing to recover.
                    conn.executemany(
                        "DELETE FROM anyservice_workers WHERE owner = ?", [(o,) for o in owners]
                    )
                except sqlite3.Error:
                    pass  # locked or read-only: the rows are forgotten a day later instead
                conn.close()

    async def close(self) -> None:
        """Close the connection. Calling it again (or before :meth:`open`) does nothing."""
        if self._conn is None:
            return
        # Shielded: a worker closes its broker while being cancelled, and a connection
        # left open would keep the file's WAL from being checkpointed.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._disconnect)

    # --- the broker protocol -------------------------------------------------------------

    async def _insert(self, run: RunRecord) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            self._check_file()
            conn.execute(
                "INSERT INTO anyservice_runs (id, task, payload, state, attempts, max_attempts,"
                " retries_left, retry_delay, timeout, created_at, scheduled_at, trace_context)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    run.trace_context,
                ),
            )

        await self._call(insert)

    async def _claim(
        self, owner: str, tasks: list[str], limit: int, lease_seconds: float
    ) -> Claimed:
        # Rows with an unknown state are never claimed. A due row that is otherwise
        # unreadable is marked FAILED with a CorruptRunError instead of being claimed.
        names = tasks

        def claim(conn: sqlite3.Connection) -> Claimed:
            self._check_file()
            conn.execute("BEGIN IMMEDIATE")
            now = self._clock()
            self._keep_workers(conn, owner, now)
            finished = self._crash_abandoned(conn, now)
            claimed: list[RunRecord] = []
            next_due: float | None = None
            if names:
                rows = conn.execute(
                    f"{_SELECT} WHERE task IN ({_marks(len(names))}) AND ("
                    " (state = 'SCHEDULED' AND scheduled_at <= ?)"
                    " OR (state = 'RUNNING'"
                    "     AND (lease_expires_at IS NULL OR lease_expires_at <= ?)))"
                    " ORDER BY scheduled_at, seq LIMIT ?",
                    (*names, now, now, limit + 1),
                ).fetchall()
                expires = now + lease_seconds
                leftover = False
                for row in rows:
                    seq, run, corrupt = _read_row(row)
                    if corrupt:
                        self._mark_corrupt(conn, seq, run, now)
                        # Rows past the corrupt one may be due: claim again promptly.
                        finished = leftover = True
                    elif len(claimed) == limit:
                        leftover = True
                    else:
                        conn.execute(
                            "UPDATE anyservice_runs SET state = 'RUNNING', attempts = ?,"
                            " started_at = ?, lease_owner = ?, lease_expires_at = ?"
                            " WHERE seq = ?",
                            (run.attempts + 1, now, owner, expires, seq),
                        )
                        claimed.append(
                            replace(
                                run,
                                state=RunState.RUNNING,
                                attempts=run.attempts + 1,
                                started_at=now,
                                lease_owner=owner,
                                lease_expires_at=expires,
                            )
                        )
                next_due = now if leftover else self._next_due_time(conn, names, now)
            conn.execute("COMMIT")
            return Claimed(claimed, finished, next_due)

        return await self._call(claim)

    def _keep_workers(self, conn: sqlite3.Connection, owner: str, now: float) -> None:
        """Record ``owner`` as alive; end the leases of dead workers on this machine.

        A worker killed here (kill -9, the OOM killer) leaves its runs leased until the
        leases expire; its row names its process, which is gone, so its leases end now
        and this claim takes its runs over. At most every ``WORKERS_EVERY`` seconds.
        """
        seen = time.monotonic()
        if seen - self._workers_seen.get(owner, -math.inf) < WORKERS_EVERY:
            return
        self._workers_seen[owner] = seen
        conn.execute(
            "INSERT INTO anyservice_workers (owner, host, pid, started_at, heartbeat_at)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (owner, self._host, self._pid, self._started_at, now),
        )
        conn.execute(
            "DELETE FROM anyservice_workers WHERE heartbeat_at < ?", (now - WORKERS_FORGOTTEN,)
        )
        rows = conn.execute(
            "SELECT owner, pid, started_at FROM anyservice_workers WHERE host = ? AND pid != ?",
            (self._host, self._pid),
        ).fetchall()
        for dead, pid, started in rows:
            if process_gone(pid, started):
                conn.execute(
                    "UPDATE anyservice_runs SET lease_expires_at = ? WHERE state = 'RUNNING'"
                    " AND lease_owner = ? AND lease_expires_at > ?",
                    (now, dead, now),
                )
                conn.execute("DELETE FROM anyservice_workers WHERE owner = ?", (dead,))

    @staticmethod
    def _crash_abandoned(conn: sqlite3.Connection, now: float) -> bool:
        """Mark CRASHED the runs whose lease expired after their last allowed attempt."""
        rows = conn.execute(
            f"{_SELECT} WHERE state = 'RUNNING' AND lease_expires_at <= ?"
            " AND attempts >= max_attempts",
            (now,),
        ).fetchall()
        for row in rows:
            seq, run, corrupt = _read_row(row)
            if corrupt:
                SqliteBroker._mark_corrupt(conn, seq, run, now)
                continue
            error = abandoned_error(run.id, run.task, run.attempts, run.max_attempts)
            conn.execute(
                "UPDATE anyservice_runs SET state = 'CRASHED', finished_at = ?,"
                " lease_owner = NULL, lease_expires_at = NULL, error = ? WHERE seq = ?",
                (now, error.to_json(), seq),
            )
        return bool(rows)

    @staticmethod
    def _mark_corrupt(conn: sqlite3.Connection, seq: int, run: RunRecord, now: float) -> None:
        assert run.error is not None
        conn.execute(
            "UPDATE anyservice_runs SET state = 'FAILED', finished_at = ?,"
            " lease_owner = NULL, lease_expires_at = NULL, error = ? WHERE seq = ?",
            (now, run.error.to_json(), seq),
        )

    @staticmethod
    def _next_due_time(conn: sqlite3.Connection, names: list[str], now: float) -> float | None:
        """When the next run of these tasks becomes claimable, as far as we know now."""
        (scheduled,) = conn.execute(
            "SELECT MIN(scheduled_at) FROM anyservice_runs WHERE state = 'SCHEDULED'"
            f" AND scheduled_at > ? AND task IN ({_marks(len(names))})",
            (now, *names),
        ).fetchone()
        (expiring,) = conn.execute(
            "SELECT MIN(lease_expires_at) FROM anyservice_runs WHERE state = 'RUNNING'"
            f" AND lease_expires_at > ? AND task IN ({_marks(len(names))})",
            (now, *names),
        ).fetchone()
        times = [t for t in (scheduled, expiring) if isinstance(t, int | float)]
        return float(min(times)) if times else None

    async def _heartbeat(
        self, owner: str, leases: dict[str, int], lease_seconds: float
    ) -> set[str]:
        if not leases:
            return set()

        def renew(conn: sqlite3.Connection) -> set[str]:
            conn.execute("BEGIN IMMEDIATE")
            expires = self._clock() + lease_seconds
            held = {
                run_id
                for run_id, attempt in leases.items()
                if self._update_held(
                    conn,
                    "UPDATE anyservice_runs SET lease_expires_at = :expires",
                    {"id": run_id, "owner": owner, "attempt": attempt, "expires": expires},
                )
            }
            conn.execute("COMMIT")
            return held

        return await self._call(renew)

    @staticmethod
    def _update_held(conn: sqlite3.Connection, sql: str, parameters: dict[str, Any]) -> bool:
        """Run one UPDATE fenced by ``WHERE`` the run is RUNNING under the claim
        ``(:owner, :attempt)``.

        A single statement is atomic on its own, so no explicit transaction is needed.
        """
        cursor = conn.execute(
            f"{sql} WHERE id = :id AND state = 'RUNNING' AND lease_owner = :owner"
            " AND attempts = :attempt",
            parameters,
        )
        return cursor.rowcount == 1

    async def _complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        parameters = {"id": run_id, "owner": owner, "attempt": attempt, "result": result}
        return await self._call(
            lambda conn: self._update_held(
                conn,
                "UPDATE anyservice_runs SET state = 'COMPLETED', finished_at = :now,"
                " lease_owner = NULL, lease_expires_at = NULL, result = :result, error = NULL",
                {**parameters, "now": self._clock()},
            )
        )

    async def _fail(
        self, owner: str, run_id: str, attempt: int, error: RunError, retry: bool
    ) -> RunState | None:
        # Every expression in an UPDATE sees the row as it was, so the CASEs agree.
        retried = ":retry AND retries_left > 0"
        sql = (
            "UPDATE anyservice_runs SET"
            f" state = CASE WHEN {retried} THEN 'SCHEDULED' ELSE 'FAILED' END,"
            f" scheduled_at = CASE WHEN {retried} THEN :now + retry_delay ELSE scheduled_at END,"
            f" retries_left = CASE WHEN {retried} THEN retries_left - 1 ELSE retries_left END,"
            f" started_at = CASE WHEN {retried} THEN NULL ELSE started_at END,"
            f" finished_at = CASE WHEN {retried} THEN NULL ELSE :now END,"
            " lease_owner = NULL, lease_expires_at = NULL, error = :error"
        )
        parameters = {
            "id": run_id,
            "owner": owner,
            "attempt": attempt,
            "retry": retry,
            "error": error.to_json(),
        }

        def fail(conn: sqlite3.Connection) -> RunState | None:
            if not retry:
                # Certainly FAILED: one statement, atomic on its own.
                done = self._update_held(conn, sql, {**parameters, "now": self._clock()})
                return RunState.FAILED if done else None
            # One transaction, so the state read back is the one this UPDATE wrote.
            conn.execute("BEGIN IMMEDIATE")
            state: RunState | None = None
            if self._update_held(conn, sql, {**parameters, "now": self._clock()}):
                (stored,) = conn.execute(
                    "SELECT state FROM anyservice_runs WHERE id = ?", (run_id,)
                ).fetchone()
                state = RunState(stored)
            conn.execute("COMMIT")
            return state

        return await self._call(fail)

    async def _release(self, owner: str, run_id: str, attempt: int) -> bool:
        return await self._call(
            lambda conn: self._update_held(
                conn,
                "UPDATE anyservice_runs SET state = 'SCHEDULED', attempts = MAX(attempts - 1, 0),"
                " started_at = NULL, lease_owner = NULL, lease_expires_at = NULL",
                {"id": run_id, "owner": owner, "attempt": attempt},
            )
        )

    async def _claim_run(self, owner: str, run_id: str, lease_seconds: float) -> RunRecord | None:
        # A corrupt row is left as it is (get() shows it FAILED); only a claimable one is
        # taken, by the same rule as every claim.

        def claim_one(conn: sqlite3.Connection) -> RunRecord | None:
            self._check_file()
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(f"{_SELECT} WHERE id = ?", (run_id,)).fetchone()
            claimed: RunRecord | None = None
            if row is not None:
                seq, run, corrupt = _read_row(row)
                if not corrupt:
                    claimed = records.claim(run, owner, self._clock(), lease_seconds)
                if claimed is not None:
                    conn.execute(
                        "UPDATE anyservice_runs SET state = 'RUNNING', attempts = ?,"
                        " started_at = ?, lease_owner = ?, lease_expires_at = ? WHERE seq = ?",
                        (
                            claimed.attempts,
                            claimed.started_at,
                            owner,
                            claimed.lease_expires_at,
                            seq,
                        ),
                    )
            conn.execute("COMMIT")
            return claimed

        return await self._call(claim_one)

    async def _cancel(self, run_id: str) -> bool:

        def cancel(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE anyservice_runs SET state = 'CANCELLED', finished_at = ?"
                " WHERE id = ? AND state = 'SCHEDULED'",
                (self._clock(), run_id),
            )
            return cursor.rowcount == 1

        return await self._call(cancel)

    async def _get(self, run_id: str) -> RunRecord | None:
        # A row the broker cannot make sense of comes back as a FAILED run whose error is
        # a CorruptRunError listing what is wrong (the row itself is left as it is).

        def get(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (run_id,)).fetchone()
            return None if row is None else _read_row(row)[1]

        return await self._call(get)

    async def _purge(self, before: float, limit: int) -> int:
        finished = ", ".join(f"'{state.value}'" for state in sorted(FINISHED_STATES))

        def purge(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM anyservice_runs WHERE seq IN (SELECT seq FROM anyservice_runs"
                f" WHERE finished_at < ? AND state IN ({finished}) LIMIT ?)",
                (before, limit),
            )
            return cursor.rowcount

        return await self._call(purge)

    async def _counts(self) -> dict[RunState, int]:
        # Rows with an unknown state count as FAILED.

        def count(conn: sqlite3.Connection) -> dict[RunState, int]:
            counts = dict.fromkeys(RunState, 0)
            for state, number in conn.execute(
                "SELECT state, COUNT(*) FROM anyservice_runs GROUP BY state"
            ):
                try:
                    counts[RunState(state)] += number
                except ValueError:
                    counts[RunState.FAILED] += number
            return counts

        return await self._call(count)

    # --- waiting -------------------------------------------------------------------------

    def _data_version_changed(self, conn: sqlite3.Connection) -> bool:
        # Several waiters share one poll per interval; the first to look reports it.
        now = time.monotonic()
        if now - self._last_poll < self._poll_every / 2:
            return False
        self._last_poll = now
        self._check_file()
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        changed: bool = version != self._data_version
        self._data_version = version
        return changed

    async def _poll(self) -> bool:
        return await self._call(self._data_version_changed)
