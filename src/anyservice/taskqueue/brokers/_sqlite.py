"""The embedded broker: task runs in one SQLite file (``sqlite:///anyservice.db``).

Several processes on one machine can share the file. The file is in WAL mode, so readers
never wait for writers, and every write runs in a ``BEGIN IMMEDIATE`` transaction, which
takes the write lock first: two processes can never claim the same run. A locked database
is retried with bounded exponential backoff.

sqlite3 blocks, so the statements run in one long-lived thread per connection
(``_sqlite_thread.py``), which commits whatever calls queued up meanwhile in one
transaction: concurrent submits, results and claims share their commits. Waiting for work
needs no server to push notifications: writes by brokers of the same file in this process
wake waiters at once, brokers in other processes are poked through a datagram socket each
beside the file (``_wake_channel.py``), and ``PRAGMA data_version`` (a cheap read that
changes whenever another connection commits) is polled as the fallback.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import anyio.to_thread

from ..._checks import Seconds, check_seconds
from .. import _records as records
from .._errors import BrokerError
from .._records import FINISHED_STATES, RunError, RunRecord, RunState, abandoned_error
from ._base import BaseBroker, Claimed
from ._notifier import ChangeNotifier
from ._sqlite_cluster import SqliteClusterStorage, forget_purged
from ._sqlite_named import LOOK_EVERY, NamedWork, claim_named, poked
from ._sqlite_rows import (
    INSERT,
    MIGRATIONS,
    RELEASE,
    SCHEMA_VERSION,
    SELECT,
    insert_values,
    lease_in_place,
    lease_rows,
    marks,
    read_row,
    read_rows,
    update_held,
)
from ._sqlite_thread import ConnectionThread
from ._wake_channel import CANCEL, CHANGE, WORK, WakeChannel
from ._workers import WORKERS_EVERY, WORKERS_FORGOTTEN, host_identity, process_gone

__all__ = ["SCHEMA_VERSION", "SqliteBroker"]

T = TypeVar("T")

#: How often waiters poll ``data_version`` when other processes poke them: only a
#: fallback for commits nobody signalled.
SIGNALLED_POLL_INTERVAL = 0.25

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


# --- the claim's statements (in the claim's transaction) ----------------------------------


def _mark_corrupt(conn: sqlite3.Connection, seq: int, run: RunRecord, now: float) -> None:
    assert run.error is not None
    conn.execute(
        "UPDATE anyservice_runs SET state = 'FAILED', finished_at = ?,"
        " lease_owner = NULL, lease_expires_at = NULL, error = ? WHERE seq = ?",
        (now, run.error.to_json(), seq),
    )


def _leases_expired(conn: sqlite3.Connection, now: float) -> bool:
    """Whether any RUNNING run's lease has expired (or it has none): rarely so, and only
    then does a claim look for abandoned runs and read the runs it may take over."""
    return (
        conn.execute(
            "SELECT 1 FROM anyservice_runs WHERE state = 'RUNNING'"
            " AND (lease_expires_at IS NULL OR lease_expires_at <= ?) LIMIT 1",
            (now,),
        ).fetchone()
        is not None
    )


def _crash_abandoned(conn: sqlite3.Connection, now: float) -> bool:
    """Mark CRASHED the runs whose lease expired after their last allowed attempt."""
    rows = conn.execute(
        f"{SELECT} WHERE state = 'RUNNING' AND lease_expires_at <= ? AND attempts >= max_attempts",
        (now,),
    ).fetchall()
    for row in rows:
        seq, run, corrupt = read_row(row)
        if corrupt:
            _mark_corrupt(conn, seq, run, now)
            continue
        error = abandoned_error(run.id, run.task, run.attempts, run.max_attempts)
        conn.execute(
            "UPDATE anyservice_runs SET state = 'CRASHED', finished_at = ?,"
            " lease_owner = NULL, lease_expires_at = NULL, error = ? WHERE seq = ?",
            (now, error.to_json(), seq),
        )
    return bool(rows)


def _next_due_time(conn: sqlite3.Connection, names: list[str], now: float) -> float | None:
    """When the next run of these tasks becomes claimable, as far as we know now."""
    # One statement for both (a lone claim, the latency path, pays for each).
    tasks = f"task IN ({marks(len(names))})"
    scheduled, expiring = conn.execute(
        "SELECT (SELECT MIN(scheduled_at) FROM anyservice_runs WHERE state = 'SCHEDULED'"
        f" AND scheduled_at > ? AND {tasks}),"
        " (SELECT MIN(lease_expires_at) FROM anyservice_runs WHERE state = 'RUNNING'"
        f" AND lease_expires_at > ? AND {tasks})",
        (now, *names, now, *names),
    ).fetchone()
    times = [t for t in (scheduled, expiring) if isinstance(t, int | float)]
    return float(min(times)) if times else None


_CLAIM_ORDER = "ORDER BY priority DESC, scheduled_at, seq"


def _due_rows(
    conn: sqlite3.Connection, names: list[str], now: float, count: int, expired: bool
) -> list[tuple[Any, ...]]:
    """The first ``count`` claimable rows of these tasks, in claim order.

    Two branches, each walking an index in claim order and stopping at ``count``: due
    SCHEDULED runs, and RUNNING runs whose lease expired. One ``OR`` over both made
    SQLite read and sort every due row instead. The ``+`` keeps ``scheduled_at`` off the
    index choice: on the due-time index SQLite would read and sort every due run (tens
    of milliseconds behind a backlog of thousands), where the claim-order index yields
    them in order and stops at ``count``. The second branch is read only if a lease has
    ``expired`` (see :func:`_leases_expired`), which is rare: the ``UNION ALL`` sorts the
    rows of both branches in temporary b-trees, which took three times as long as the
    first branch alone.
    """
    tasks = f"task IN ({marks(len(names))})"
    scheduled = (
        f"{SELECT} WHERE state = 'SCHEDULED' AND +scheduled_at <= ?"
        f" AND {tasks} {_CLAIM_ORDER} LIMIT ?"
    )
    if not expired:
        return conn.execute(scheduled, (now, *names, count)).fetchall()
    return conn.execute(
        f"SELECT * FROM ({scheduled}) UNION ALL SELECT * FROM ({SELECT} WHERE state = 'RUNNING'"
        f" AND (lease_expires_at IS NULL OR lease_expires_at <= ?) AND {tasks}"
        f" {_CLAIM_ORDER} LIMIT ?) {_CLAIM_ORDER} LIMIT ?",
        (now, *names, count, now, *names, count, count),
    ).fetchall()


def _free_slots(
    conn: sqlite3.Connection, concurrency: dict[str, int], now: float
) -> dict[str, int]:
    """Each limited task's free slots: its limit less its runs RUNNING under a live lease.

    Read in the claim's transaction, which holds the write lock: no other claim can
    take a slot between this count and the claim's UPDATE.
    """
    if not concurrency:
        return {}
    running = dict(
        conn.execute(
            "SELECT task, COUNT(*) FROM anyservice_runs WHERE state = 'RUNNING'"
            f" AND lease_expires_at > ? AND task IN ({marks(len(concurrency))}) GROUP BY task",
            (now, *concurrency),
        ).fetchall()
    )
    return {task: max(limit - running.get(task, 0), 0) for task, limit in concurrency.items()}


def _candidates(
    conn: sqlite3.Connection,
    names: list[str],
    limit: int,
    times: tuple[float, bool],
    free: dict[str, int],
) -> list[tuple[int, RunRecord, bool]]:
    """The due rows a claim chooses from, read (``read_row``) and in claim order.

    The tasks without a concurrency limit share one read of ``limit + 1`` rows; each
    limited task has a read of its own, of one row more than it may take (so that a task
    held back at its limit shows): a full task's backlog never crowds the others out.
    ``times`` is ``(now, whether a lease has expired)``.
    """
    now, expired = times
    unlimited = [name for name in names if name not in free]
    rows = _due_rows(conn, unlimited, now, limit + 1, expired) if unlimited else []
    for task, slots in free.items():
        rows += _due_rows(conn, [task], now, min(slots, limit) + 1, expired)
    read = read_rows(rows)
    if len(free) + bool(unlimited) > 1:
        # Each read is in claim order already; only several need merging.
        read.sort(key=lambda item: records.claim_order(item[1], item[0]))
    return read


@dataclass
class _Due:
    """What a claim did with the due rows (see :func:`_claim_due`)."""

    claimed: list[RunRecord]
    corrupt: bool
    left_over: bool
    held_back: bool


def _claim_due(
    conn: sqlite3.Connection,
    names: list[str],
    owner: str,
    limit: int,
    times: tuple[float, float, bool],
    concurrency: dict[str, int],
) -> _Due:
    """Lease up to ``limit`` due runs, within the tasks' ``concurrency`` limits.

    ``times`` is ``(now, lease expiry, whether a lease has expired)``. Rows with an
    unknown state are never claimed; a due row that is otherwise unreadable is marked
    FAILED instead of being claimed.
    """
    now, expires, expired = times
    free = _free_slots(conn, concurrency, now)
    sequence: dict[str, int] = {}
    readable: list[RunRecord] = []
    corrupt_seen = False
    for seq, run, corrupt in _candidates(conn, names, limit, (now, expired), free):
        if corrupt:
            _mark_corrupt(conn, seq, run, now)
            corrupt_seen = True
        else:
            sequence[run.id] = seq
            readable.append(run)
    picked = records.pick_claims(readable, limit, free)
    claimed = [lease_in_place(run, now, owner, expires) for run in picked.runs]
    lease_rows(conn, [sequence[run.id] for run in claimed], (now, owner, expires))
    # Rows past a corrupt one may be due: claim again promptly.
    return _Due(claimed, corrupt_seen, picked.left_over or corrupt_seen, picked.held_back)


def _claiming(
    broker: SqliteBroker,
    owner: str,
    names: list[str],
    limit: int,
    lease_seconds: float,
    concurrency: dict[str, int],
) -> Callable[[sqlite3.Connection], Claimed]:
    """The operation of ``broker``'s claim, alone or after a batch's results."""
    named = broker._named.take(names, limit, broker._next_due, broker._clock())
    unlimited = [name for name in names if name not in concurrency]

    def claim(conn: sqlite3.Connection) -> Claimed:
        broker._db.check_file()
        now = broker._clock()
        runs, whole = claim_named(conn, named, unlimited, owner, (now, lease_seconds))
        if named and whole:
            return Claimed(runs, False, broker._next_due, False)
        _keep_workers(conn, owner, now, broker._this, broker._workers_seen)
        expired = _leases_expired(conn, now)
        finished = expired and _crash_abandoned(conn, now)
        if not names:
            if finished:
                broker._db.signal(CHANGE)
            return Claimed([], finished, None)
        times = (now, now + lease_seconds, expired)
        due = _claim_due(conn, names, owner, limit - len(runs), times, concurrency)
        broker._named.looked(names, now, not (due.left_over or due.held_back))
        next_due = now if due.left_over else _next_due_time(conn, names, now)
        if finished or due.corrupt:
            broker._db.signal(CHANGE)
        claimed = runs + due.claimed
        return Claimed(claimed, finished or due.corrupt, next_due, due.held_back)

    return claim


def _claim_one(
    conn: sqlite3.Connection,
    run_id: str,
    owner: str,
    times: tuple[float, float],
    concurrency: dict[str, int],
) -> RunRecord | None:
    """Lease this one run if it is claimable, by the same rules as every claim.

    ``times`` is ``(now, lease seconds)``. A corrupt row is left as it is (get() shows it
    FAILED).
    """
    now, lease_seconds = times
    row = conn.execute(f"{SELECT} WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    seq, run, corrupt = read_row(row)
    limit = concurrency.get(run.task)
    if limit is not None and not _free_slots(conn, {run.task: limit}, now)[run.task]:
        return None
    claimed = None if corrupt else records.claim(run, owner, now, lease_seconds)
    if claimed is not None:
        lease_rows(conn, [seq], (now, owner, now + lease_seconds))
    return claimed


_COMPLETE = (
    "UPDATE anyservice_runs SET state = 'COMPLETED', finished_at = :now,"
    " lease_owner = NULL, lease_expires_at = NULL, result = :result, error = NULL"
)
#: Most runs submitted or completed by a call that may run in the caller's thread (see
#: ConnectionThread.call): about a millisecond of statements, less than the two thread
#: hops a worker's batch of results would wait for. A claim may, whatever its limit.
_INLINE_ROWS = 100

#: ``_COMPLETE`` fenced, with positional parameters ``(now, result, id, owner, attempt)``:
#: a batch binds tuples, cheaper than a dict per run.
_COMPLETE_HELD = (
    "UPDATE anyservice_runs SET state = 'COMPLETED', finished_at = ?,"
    " lease_owner = NULL, lease_expires_at = NULL, result = ?, error = NULL"
    " WHERE id = ? AND state = 'RUNNING' AND lease_owner = ? AND attempts = ?"
)
# Every expression in an UPDATE sees the row as it was, so the CASEs agree.
_RETRIED = ":retry AND retries_left > 0"
_FAIL = (
    "UPDATE anyservice_runs SET"
    f" state = CASE WHEN {_RETRIED} THEN 'SCHEDULED' ELSE 'FAILED' END,"
    f" scheduled_at = CASE WHEN {_RETRIED} THEN :now + COALESCE(:delay, retry_delay)"
    " ELSE scheduled_at END,"
    f" retries_left = CASE WHEN {_RETRIED} THEN retries_left - 1 ELSE retries_left END,"
    f" started_at = CASE WHEN {_RETRIED} THEN NULL ELSE started_at END,"
    f" finished_at = CASE WHEN {_RETRIED} THEN NULL ELSE :now END,"
    " lease_owner = NULL, lease_expires_at = NULL, error = :error"
)


def _complete_held(
    conn: sqlite3.Connection, owner: str, results: dict[str, tuple[int, str]], now: float
) -> set[str]:
    """Complete the runs of ``results`` that ``owner``'s claims still hold; their ids.

    One statement for the batch, whose row count says whether every claim held, as it
    almost always does; if not, the batch is undone and done run by run to learn which.
    """
    rows = [(now, result, run_id, owner, attempt) for run_id, (attempt, result) in results.items()]
    conn.execute("SAVEPOINT complete_many")
    if conn.executemany(_COMPLETE_HELD, rows).rowcount == len(rows):
        conn.execute("RELEASE complete_many")
        return set(results)
    conn.execute("ROLLBACK TO complete_many")
    conn.execute("RELEASE complete_many")
    return {run_id for run_id, row in zip(results, rows, strict=True) if _complete_row(conn, row)}


def _complete_row(conn: sqlite3.Connection, row: tuple[Any, ...]) -> bool:
    return conn.execute(_COMPLETE_HELD, row).rowcount == 1


def _keep_workers(
    conn: sqlite3.Connection,
    owner: str,
    now: float,
    this: tuple[str, int, float],
    seen: dict[str, float],
) -> None:
    """Record ``owner`` as alive; end the leases of dead workers on this machine.

    A worker killed here (kill -9, the OOM killer) leaves its runs leased until the
    leases expire; its row names its process, which is gone, so its leases end now and
    this claim takes its runs over. ``this`` is this process's (host, pid, start time);
    ``seen`` maps owners to the monotonic time they were last recorded, so each is
    recorded at most every ``WORKERS_EVERY`` seconds.
    """
    moment = time.monotonic()
    if moment - seen.get(owner, -math.inf) < WORKERS_EVERY:
        return
    seen[owner] = moment
    host, pid, started_at = this
    conn.execute(
        "INSERT INTO anyservice_workers (owner, host, pid, started_at, heartbeat_at)"
        " VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        (owner, host, pid, started_at, now),
    )
    conn.execute(
        "DELETE FROM anyservice_workers WHERE heartbeat_at < ?", (now - WORKERS_FORGOTTEN,)
    )
    rows = conn.execute(
        "SELECT owner, pid, started_at FROM anyservice_workers WHERE host = ? AND pid != ?",
        (host, pid),
    ).fetchall()
    for dead, dead_pid, dead_started in rows:
        if process_gone(dead_pid, dead_started):
            conn.execute(
                "UPDATE anyservice_runs SET lease_expires_at = ? WHERE state = 'RUNNING'"
                " AND lease_owner = ? AND lease_expires_at > ?",
                (now, dead, now),
            )
            conn.execute("DELETE FROM anyservice_workers WHERE owner = ?", (dead,))


_FINISHED = ", ".join(f"'{state.value}'" for state in sorted(FINISHED_STATES))


def _purge(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Delete up to ``limit`` runs finished before ``before``, and their ticks and keys;
    how many runs went."""
    doomed = conn.execute(
        f"SELECT seq, id FROM anyservice_runs WHERE finished_at < ? AND state IN ({_FINISHED})"
        " LIMIT ?",
        (before, limit),
    ).fetchall()
    forget_purged(conn, [run_id for _, run_id in doomed], before, limit)
    conn.executemany("DELETE FROM anyservice_runs WHERE seq = ?", ((seq,) for seq, _ in doomed))
    return len(doomed)


def _count_states(conn: sqlite3.Connection) -> dict[RunState, int]:
    """Runs by state; rows with an unknown state count as FAILED."""
    counts = dict.fromkeys(RunState, 0)
    for state, number in conn.execute("SELECT state, COUNT(*) FROM anyservice_runs GROUP BY state"):
        try:
            counts[RunState(state)] += number
        except ValueError:
            counts[RunState.FAILED] += number
    return counts


def _poke_for(signals: set[bytes]) -> bytes:
    """What to poke other processes with after a commit that asked for ``signals``: a
    lone work signal may name its run (a submit of one due run); several, or none, name
    nothing."""
    if len(signals) == 1:
        (kind,) = signals  # the usual case, a lone call's
        return kind
    work = [signal for signal in signals if signal.startswith(WORK)]
    return work[0] if len(work) == 1 else WORK if work else CHANGE


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
            Kept short: longer waits happen in :attr:`lock_timeout`'s backoff, during
            which a waiting caller can still be cancelled.
        lock_timeout: Seconds to keep retrying a locked database before giving up with
            :class:`BrokerBusyError`.
        poll_interval: Seconds between checks for other processes' commits while
            waiting for work or for a run to finish, when they cannot poke this broker
            (no Unix datagram sockets); with them, a slow fallback poll is kept.

    Raises:
        ValueError: A timeout or interval is not a positive number.
    """

    # For the cluster storage (ticks, leases, keys): how rows of runs are read.
    _select_runs = SELECT
    _read_run = staticmethod(read_row)

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
        self._unsignalled_poll = poll
        self._db = ConnectionThread(
            self._path,
            url=self.url,
            busy_timeout=busy,
            lock_timeout=lock,
            on_commit=self._committed,
        )
        self._channel: WakeChannel | None = None
        self._named = NamedWork(self._notifier, LOOK_EVERY)
        self._data_version = 0
        self._last_poll = -math.inf
        # This process, as the workers table records it.
        self._this = (host_identity(), os.getpid(), time.time())
        # owner -> monotonic time last recorded; touched only in the connection's thread.
        self._workers_seen: dict[str, float] = {}

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

    @property
    def lock_retries(self) -> int:
        """How many times a locked database was retried; a health signal."""
        return self._db.lock_retries

    @property
    def commits(self) -> int:
        """How many write transactions this broker committed; concurrent calls share them."""
        return self._db.commits

    def __repr__(self) -> str:
        return f"<SqliteBroker {self.url!r}>"

    # --- opening and closing -------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise BrokerError(
                f"could not put SQLite database {self._path!r} in WAL mode (it is in "
                f"{mode!r} mode); WAL needs a local file system"
            )
        # In WAL mode NORMAL never corrupts the file, and a process killed at any point
        # loses nothing it committed; only a power cut may lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            self._migrate(conn)
        (self._data_version,) = conn.execute("PRAGMA data_version").fetchone()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        # Read again under the write lock: another process may have just migrated.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise BrokerError(
                f"SQLite database {self._path!r} has task-run schema version {version}, "
                f"newer than this anyservice understands ({SCHEMA_VERSION}); upgrade anyservice"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")

    async def _open(self) -> bool:
        # Connect, switch the file to WAL mode and create or migrate the schema; a file
        # that cannot be, or has a newer schema, is a BrokerError.
        if self._db.is_open:
            return False
        await self._db.open(self._prepare)
        channel = WakeChannel(self._path, self._poked, self._notifier.cancel_asked)
        if await anyio.to_thread.run_sync(channel.open):
            channel.listen()
            self._channel = channel
            self._poll_interval = max(self._unsignalled_poll, SIGNALLED_POLL_INTERVAL)
        return True

    async def close(self) -> None:
        """Close the connection. Calling it again (or before :meth:`open`) does nothing."""
        # Shielded: a worker closes its broker while being cancelled, and a connection
        # left open would keep the file's WAL from being checkpointed.
        with anyio.CancelScope(shield=True):
            if self._db.is_open and self._workers_seen:
                try:
                    await self._db.call(self._forget_workers)
                except BrokerError:
                    pass  # locked or read-only: the rows are forgotten a day later instead
            await self._db.close()
            channel, self._channel = self._channel, None
            self._poll_interval = self._unsignalled_poll
            if channel is not None:
                # In this loop first: a watch by the loop that opened it ends there.
                channel.stop_listening()
                await anyio.to_thread.run_sync(channel.close)

    async def _check_open(self) -> None:
        if not self._db.is_open:
            raise BrokerError(
                f"SQLite database {self._path} is not open; "
                "use 'async with broker:' or 'await broker.open()'"
            )

    def _forget_workers(self, conn: sqlite3.Connection) -> None:
        # A clean stop leaves nothing to recover.
        owners = list(self._workers_seen)
        self._workers_seen.clear()
        conn.executemany("DELETE FROM anyservice_workers WHERE owner = ?", [(o,) for o in owners])

    async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        # The cluster storage's statements: writes that may make work due.
        return await self._db.call(operation, signal=WORK)

    # --- signals between processes ---------------------------------------------------------

    def _committed(self, signals: set[bytes]) -> None:
        # After the commit: other processes may look now.
        channel = self._channel
        if channel is not None:
            channel.poke(_poke_for(signals))

    def _poked(self, work: bool, run_ids: list[str] | None) -> None:
        # In the event loop watching the channel (or its thread): another process
        # committed a change.
        poked(self, work, run_ids)

    def _announce_cancel(self, run_id: str) -> None:
        # Committed: this process's brokers of the file, then the others, hear of it.
        super()._announce_cancel(run_id)
        channel = self._channel
        if channel is not None:
            channel.poke(CANCEL + run_id.encode())

    # --- the broker protocol -------------------------------------------------------------

    async def _insert(self, run: RunRecord) -> None:
        await self._insert_many([run])

    async def _insert_many(self, runs: Sequence[RunRecord]) -> None:
        values = [insert_values(run) for run in runs]

        def insert(conn: sqlite3.Connection) -> None:
            self._db.check_file()
            conn.executemany(INSERT, values)

        # One run due now is named, for a worker to claim it by id.
        lone = len(runs) == 1 and runs[0].scheduled_at <= self._clock()
        signal = WORK + runs[0].id.encode() if lone else WORK
        await self._db.call(insert, signal=signal, inline=len(values) <= _INLINE_ROWS)

    async def _claim(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> Claimed:
        # Runs leased are nobody else's business: other processes hear of a claim only
        # if it ended runs on the way (crashed or corrupt ones).
        claim = _claiming(self, owner, tasks, limit, lease_seconds, concurrency)
        return await self._db.call(claim, inline=True)

    async def _heartbeat(
        self, owner: str, leases: dict[str, int], lease_seconds: float
    ) -> set[str]:
        if not leases:
            return set()

        def renew(conn: sqlite3.Connection) -> set[str]:
            expires = self._clock() + lease_seconds
            return {
                run_id
                for run_id, attempt in leases.items()
                if update_held(
                    conn,
                    "UPDATE anyservice_runs SET lease_expires_at = :expires",
                    {"id": run_id, "owner": owner, "attempt": attempt, "expires": expires},
                )
            }

        return await self._db.call(renew)

    async def _complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        parameters = {"id": run_id, "owner": owner, "attempt": attempt, "result": result}
        return await self._db.call(
            lambda conn: update_held(conn, _COMPLETE, {**parameters, "now": self._clock()}),
            signal=CHANGE,
            inline=True,
        )

    async def _complete_many(self, owner: str, results: dict[str, tuple[int, str]]) -> set[str]:
        # One operation: one savepoint and one wake-up for the whole batch.
        return await self._db.call(
            lambda conn: _complete_held(conn, owner, results, self._clock()),
            signal=CHANGE,
            inline=len(results) <= _INLINE_ROWS,
        )

    async def _complete_and_claim(
        self,
        owner: str,
        results: dict[str, tuple[int, str]],
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> tuple[set[str], Claimed]:
        # One operation, so one transaction and one commit: a worker's finished batch and
        # its next claim, the claim seeing the completions (freed concurrency slots). A
        # process killed before the commit loses both, and nobody was told of either.
        claim = _claiming(self, owner, tasks, limit, lease_seconds, concurrency)

        def complete_and_claim(conn: sqlite3.Connection) -> tuple[set[str], Claimed]:
            done = _complete_held(conn, owner, results, self._clock()) if results else set()
            if done:
                self._db.signal(CHANGE)  # for the waiters of the results, elsewhere
            return done, claim(conn)

        return await self._db.call(complete_and_claim, inline=len(results) <= _INLINE_ROWS)

    async def _fail(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        error: RunError,
        retry: bool,
        retry_delay: float | None,
    ) -> RunState | None:
        parameters = {
            "id": run_id,
            "owner": owner,
            "attempt": attempt,
            "retry": retry,
            "delay": retry_delay,
            "error": error.to_json(),
        }

        def fail(conn: sqlite3.Connection) -> RunState | None:
            if not update_held(conn, _FAIL, {**parameters, "now": self._clock()}):
                return None
            if not retry:
                return RunState.FAILED
            # In the same transaction, so the state read back is the one this UPDATE wrote.
            (stored,) = conn.execute(
                "SELECT state FROM anyservice_runs WHERE id = ?", (run_id,)
            ).fetchone()
            return RunState(stored)

        return await self._db.call(fail, signal=WORK if retry else CHANGE)

    async def _release(self, owner: str, run_id: str, attempt: int) -> bool:
        parameters = {"id": run_id, "owner": owner, "attempt": attempt}
        return await self._db.call(lambda conn: update_held(conn, RELEASE, parameters), signal=WORK)

    async def _claim_run(
        self, owner: str, run_id: str, lease_seconds: float, concurrency: dict[str, int]
    ) -> RunRecord | None:
        def claim_one(conn: sqlite3.Connection) -> RunRecord | None:
            self._db.check_file()
            times = (self._clock(), lease_seconds)
            return _claim_one(conn, run_id, owner, times, concurrency)

        return await self._db.call(claim_one, signal=CHANGE)

    async def _cancel(self, run_id: str) -> bool:
        def cancel(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE anyservice_runs SET state = 'CANCELLED', finished_at = ?"
                " WHERE id = ? AND state = 'SCHEDULED'",
                (self._clock(), run_id),
            )
            return cursor.rowcount == 1

        return await self._db.call(cancel, signal=CHANGE)

    async def _get(self, run_id: str) -> RunRecord | None:
        # A row the broker cannot make sense of comes back as a FAILED run whose error is
        # a CorruptRunError listing what is wrong (the row itself is left as it is).

        def get(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(f"{SELECT} WHERE id = ?", (run_id,)).fetchone()
            return None if row is None else read_row(row)[1]

        return await self._db.call(get, write=False, inline=True)

    async def _purge(self, before: float, limit: int) -> int:
        return await self._db.call(lambda conn: _purge(conn, before, limit), signal=CHANGE)

    async def _counts(self) -> dict[RunState, int]:
        return await self._db.call(_count_states, write=False)

    # --- waiting -------------------------------------------------------------------------

    def _data_version_changed(self, conn: sqlite3.Connection) -> bool:
        # Several waiters share one poll per interval; the first to look reports it.
        now = time.monotonic()
        if now - self._last_poll < self._poll_interval_now() / 2:
            return False
        self._last_poll = now
        self._db.check_file()
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        changed: bool = version != self._data_version
        self._data_version = version
        return changed

    def _poll_interval_now(self) -> float:
        return self._unsignalled_poll if self._poll_interval is None else self._poll_interval

    async def _poll(self) -> bool:
        # A read of a counter: cheaper than the thread hop it would take.
        return await self._db.call(self._data_version_changed, write=False, inline=True)
