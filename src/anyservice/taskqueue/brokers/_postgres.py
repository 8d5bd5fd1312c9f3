"""Task runs in PostgreSQL (``postgresql://user:pass@host:5432/db``), for workers on many hosts.

The driver is sync psycopg 3 with a ``psycopg_pool.ConnectionPool``: psycopg's async
connection and pool run on asyncio only, while a sync connection driven from anyio worker
threads runs the same code on asyncio and on trio. Statements run in a thread
(``anyio.to_thread``, under a capacity limiter the size of the pool) and are cancellable: a
cancelled call asks the server to cancel its query (``cancel_safe``) in a shielded scope,
then waits for the thread, so no connection goes back to the pool busy. The statements a
run's start waits on, the submit of one run and the claim of runs a notification named,
and the read of one run, go out instead on one more connection that the event loop
drives through libpq's non-blocking interface (``_postgres_direct``): a thread hand-off
costs more than they do. That connection is also the one that LISTENs (unless
``?listen=false``).

How runs move, and why it is safe with any number of workers:

* A claim is one statement: two index-driven branches (due SCHEDULED runs; RUNNING runs
  whose lease expired) locked with ``FOR UPDATE SKIP LOCKED``, merged, and updated to
  RUNNING with ``attempts + 1``. Expired leases are recovered by the claim itself, so no
  reaper and no leader is needed. The same statement ends CRASHED the runs abandoned on
  their last attempt, and reports when the next run falls due.
* Completing, failing, releasing and heartbeating match the run's id, its lease owner and
  (when this broker made the claim) the attempt it claimed: a worker whose lease passed to
  another changes nothing, even if it later claimed the same run again.
* A submit, release or retry sends ``pg_notify`` in its own transaction (delivered on
  commit); so does a run reaching a finished state, naming the run. A submit of one due
  run names it too (``w <id>``): a worker woken only by such notifications since its last
  full claim found nothing more due claims those runs by id, a primary-key lookup
  without the claim statement's planning, and makes the full claim again (right after,
  once a poll interval has passed since the last): it ends abandoned runs and takes over
  expired leases. A worker waiting between claims sends that claim by id as soon as the
  notification is read, and its next claim reads the answer (``_ClaimsAhead``). One
  LISTEN connection per broker, the direct one, is waited on with ``anyio.wait_readable``
  by whichever waiter is waiting at the moment; a statement that needs it makes that
  waiter let go, reads the notifications that arrive with its answer, and hands it back.
  Waiting always polls as well (notifications sent while the LISTEN connection was down
  are lost), and ``?listen=false`` polls only, for PgBouncer in transaction mode, which
  cannot carry LISTEN.
* A cancel of a RUNNING run notifies ``k <id>``; a worker's watch of cancels
  (``watch_cancels``) reads the LISTEN connection while no waiter does (a worker whose
  slots are all taken waits for none), and lets go as soon as one comes.

Times are epoch seconds from the broker's ``clock`` (``time.time``), as in every broker:
hosts sharing a database need clocks kept in step (NTP), to well within a lease.

The schema lives in tables named ``anyservice_*`` in the URL's ``schema`` (``public`` by
default), created on first use under an advisory lock and versioned by a row in
``anyservice_meta``: an older anyservice refuses a newer schema. The cluster's tables
(ticks, leases, keys, cancel requests) are ``_postgres_cluster.py``'s, made on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import anyio.to_thread

try:
    import psycopg
    import psycopg.errors
    import psycopg_pool
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the PostgreSQL broker needs psycopg and psycopg-pool ({exc}): "
        "pip install 'anyservice[postgres]'"
    ) from exc

from .._errors import BrokerError
from .._records import (
    ABANDONED_ERROR_TYPE,
    CORRUPT_RUN_ERROR_TYPE,
    FINISHED_STATES,
    PayloadError,
    RunError,
    RunRecord,
    RunState,
    abandoned_error,
    record_of,
)
from ._base import BaseBroker, Claimed
from ._notifier import ChangeNotifier
from ._options import hide_password
from ._postgres_cluster import PURGE_CLUSTER, PostgresClusterStorage, cluster_tables
from ._postgres_direct import DirectConnection
from ._workers import WORKERS_EVERY, WORKERS_FORGOTTEN, host_identity, process_gone

__all__ = ["SCHEMA_VERSION", "PostgresBroker"]

T = TypeVar("T")

#: The ``schema_version`` row of a database with the current tables.
SCHEMA_VERSION = 3

_DEFAULT_POLL_INTERVAL = 1.0
_POLL_ONLY_INTERVAL = 0.05
_FIRST_RECONNECT = 0.1
_MAX_RECONNECT = 5.0
#: Finished run ids per notification: 200 ids of 32 characters stay under NOTIFY's limit.
_FINISHED_PER_NOTIFY = 200
#: Runs named by notifications of work past which a claim no longer claims them by id.
_MOST_NAMED = 100
#: How often a watch of cancel requests looks whether the LISTEN connection is read by
#: anyone, when it does not read it itself (a waiter does): first after this, then twice
#: as long each time up to :data:`_WATCH_LOOK_MOST` (an idle worker's waiter reads it for
#: good). A cancel sent as the worker stops waiting for work (its slots are full) waits
#: at most that long for the watch to read it.
_WATCH_LOOK = 0.1
_WATCH_LOOK_MOST = 1.0

#: TCP keepalives of the LISTEN connection, where the URL sets none: a server gone without
#: a word (its host down, the network cut) is noticed within about 11 s, instead of the
#: kernel's default of over two hours, and the connection is made again.
_LISTEN_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}
#: Runs submitted here whose state this process knows without reading it, at most.
_MOST_FRESH = 1_000
#: Runs stored by one submission past which the table's statistics are refreshed at once.
_ANALYZE_AFTER = 1_000

# _MIGRATIONS[n] takes the tables from version n to n + 1; {s} is the schema.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE {s}.anyservice_runs (
            seq bigserial PRIMARY KEY,
            id text NOT NULL UNIQUE,
            task text NOT NULL,
            payload text NOT NULL,
            state text NOT NULL,
            attempts integer NOT NULL,
            max_attempts integer NOT NULL,
            retries_left integer NOT NULL,
            retry_delay double precision NOT NULL,
            timeout double precision,
            created_at double precision NOT NULL,
            scheduled_at double precision NOT NULL,
            started_at double precision,
            finished_at double precision,
            lease_owner text,
            lease_expires_at double precision,
            result text,
            error text
        )
        """,
        # One partial index per claim branch: a single OR over both made the planner scan
        # the whole table.
        "CREATE INDEX anyservice_runs_due ON {s}.anyservice_runs (scheduled_at, seq)"
        " WHERE state = 'SCHEDULED'",
        "CREATE INDEX anyservice_runs_leases ON {s}.anyservice_runs (lease_expires_at)"
        " WHERE state = 'RUNNING'",
        "CREATE INDEX anyservice_runs_finished ON {s}.anyservice_runs (finished_at)"
        " WHERE finished_at IS NOT NULL",
        # Who is working: what faster recovery from a dead worker reads.
        """
        CREATE TABLE {s}.anyservice_workers (
            owner text PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at double precision NOT NULL,
            heartbeat_at double precision NOT NULL
        )
        """,
    ),
    # Claims take due runs by priority (higher first), then due time, then submission.
    (
        "ALTER TABLE {s}.anyservice_runs ADD COLUMN priority integer NOT NULL DEFAULT 0",
        # Beside the due-time index, which finds when the next run falls due.
        "CREATE INDEX anyservice_runs_claim_order ON {s}.anyservice_runs"
        " (priority DESC, scheduled_at, seq) WHERE state = 'SCHEDULED'",
    ),
    # The submitter's trace context (W3C traceparent), for the runs' spans.
    ("ALTER TABLE {s}.anyservice_runs ADD COLUMN trace_context text",),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

# The record's fields in its order, after the submission sequence number.
_COLUMNS = ("seq", *(column.name for column in dataclasses.fields(RunRecord)))
_RETURNING = ", ".join(f"r.{name}" for name in _COLUMNS)
_SEQ, _PRIORITY, _SCHEDULED_AT, _STATE, _ERROR = (
    _COLUMNS.index(name) for name in ("seq", "priority", "scheduled_at", "state", "error")
)
_STATES = {state.value: state for state in RunState}


def _abandoned_template() -> str:
    """``abandoned_error``'s message as a ``format()`` template for the claim statement.

    The run is crashed by the claim statement itself, so its error is written in SQL;
    deriving the words from ``abandoned_error`` keeps the two brokers' messages one text.
    (``%L`` quotes the task name as Python's ``repr`` does for names without quotes.)
    """
    message = abandoned_error("RUN_ID", "TASK", 1_111_111_111, 2_222_222_222).message
    template = message.replace("%", "%%").replace("RUN_ID", "%1$s").replace("'TASK'", "%2$L")
    return template.replace("1111111111", "%3$s").replace("2222222222", "%4$s")


_ABANDONED_MESSAGE = _abandoned_template()

# The columns a new run is stored with, and their types: the one list every insert uses.
_NEW_RUN_COLUMNS = (
    ("id", "text"),
    ("task", "text"),
    ("payload", "text"),
    ("state", "text"),
    ("attempts", "integer"),
    ("max_attempts", "integer"),
    ("retries_left", "integer"),
    ("retry_delay", "double precision"),
    ("timeout", "double precision"),
    ("created_at", "double precision"),
    ("scheduled_at", "double precision"),
    ("priority", "integer"),
    ("trace_context", "text"),
)

#: Stores the runs given by :func:`insert_parameters` (an array per column); a statement
#: may add a ``WHERE`` to store them only if it holds.
INSERT_RUNS = (
    f"INSERT INTO {{runs}} ({', '.join(name for name, _ in _NEW_RUN_COLUMNS)})"
    " SELECT * FROM unnest("
    + ", ".join(f"%({name})s::{kind}[]" for name, kind in _NEW_RUN_COLUMNS)
    + ") AS new"
)


# One run, with scalar parameters; its notification's payload is given.
_INSERT_ONE = (
    "WITH inserted AS ("
    f"INSERT INTO {{runs}} ({', '.join(name for name, _ in _NEW_RUN_COLUMNS)}) VALUES ("
    + ", ".join(f"%({name})s::{kind}" for name, kind in _NEW_RUN_COLUMNS)
    + ") RETURNING 1) SELECT pg_notify(%(channel)s, %(notice)s::text) FROM inserted"
)


_NEW_RUN_NAMES = tuple(name for name, _ in _NEW_RUN_COLUMNS)


def _new_run_parameters(run: RunRecord) -> dict[str, Any]:
    """The parameters of :data:`_INSERT_ONE` for a new ``run``, but its notification's.

    Read from the record's fields at once: every submit's statement waits on it.
    """
    fields = run.__dict__
    parameters = {name: fields[name] for name in _NEW_RUN_NAMES}
    parameters["state"] = run.state.value
    return parameters


def insert_parameters(runs: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """The parameters of :data:`INSERT_RUNS` for new ``runs``."""
    return {
        name: [
            value.value if isinstance(value, RunState) else value
            for value in (getattr(run, name) for run in runs)
        ]
        for name, _ in _NEW_RUN_COLUMNS
    }


_CLAIM = """
WITH crashed AS (
    UPDATE {runs} r SET state = 'CRASHED', finished_at = %(now)s,
        lease_owner = NULL, lease_expires_at = NULL,
        error = json_build_object(
            'type', %(abandoned)s::text,
            'message', format(%(message)s::text, r.id, r.task, r.attempts, r.max_attempts),
            'traceback', ''
        )::text
    WHERE r.seq IN (
        SELECT seq FROM {runs} WHERE state = 'RUNNING' AND lease_expires_at <= %(now)s
            AND attempts >= max_attempts
        FOR UPDATE SKIP LOCKED
    )
    RETURNING r.id
), fresh AS (
    SELECT seq, priority, scheduled_at FROM {runs}
    WHERE state = 'SCHEDULED' AND scheduled_at <= %(now)s AND task = ANY(%(unlimited)s)
    ORDER BY priority DESC, scheduled_at, seq LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), expired AS (
    SELECT seq, priority, scheduled_at FROM {runs}
    WHERE state = 'RUNNING' AND lease_expires_at <= %(now)s AND task = ANY(%(unlimited)s)
        AND attempts < max_attempts
    ORDER BY priority DESC, scheduled_at, seq LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), slots AS (
    -- Each limited task's free slots: its limit less its runs RUNNING under a live lease.
    SELECT l.task, greatest(l.cap - (SELECT count(*) FROM {runs} r WHERE r.state = 'RUNNING'
        AND r.task = l.task AND r.lease_expires_at > %(now)s), 0) AS free
    FROM unnest(%(limited)s::text[], %(caps)s::integer[]) AS l(task, cap)
), limited_fresh AS (
    -- Per limited task, one row more than it may take, so a task held back shows.
    SELECT d.* FROM slots CROSS JOIN LATERAL (
        SELECT seq, priority, scheduled_at, task FROM {runs}
        WHERE state = 'SCHEDULED' AND scheduled_at <= %(now)s AND task = slots.task
        ORDER BY priority DESC, scheduled_at, seq LIMIT least(slots.free, %(limit)s) + 1
        FOR UPDATE SKIP LOCKED
    ) AS d
), limited_expired AS (
    SELECT d.* FROM slots CROSS JOIN LATERAL (
        SELECT seq, priority, scheduled_at, task FROM {runs}
        WHERE state = 'RUNNING' AND lease_expires_at <= %(now)s AND task = slots.task
            AND attempts < max_attempts
        ORDER BY priority DESC, scheduled_at, seq LIMIT least(slots.free, %(limit)s) + 1
        FOR UPDATE SKIP LOCKED
    ) AS d
), ranked AS (
    SELECT due.seq, due.priority, due.scheduled_at, slots.free, row_number() OVER (
        PARTITION BY due.task ORDER BY due.priority DESC, due.scheduled_at, due.seq) AS n
    FROM (SELECT * FROM limited_fresh UNION ALL SELECT * FROM limited_expired) AS due
    JOIN slots ON slots.task = due.task
), picked AS (
    SELECT seq FROM (
        SELECT * FROM fresh UNION ALL SELECT * FROM expired
        UNION ALL SELECT seq, priority, scheduled_at FROM ranked WHERE n <= free
    ) AS due
    ORDER BY priority DESC, scheduled_at, seq LIMIT %(limit)s
), claimed AS (
    UPDATE {runs} r SET state = 'RUNNING', attempts = r.attempts + 1, started_at = %(now)s,
        lease_owner = %(owner)s, lease_expires_at = %(expires)s
    FROM picked WHERE r.seq = picked.seq
    RETURNING {returning}
), later AS (
    SELECT
        (SELECT min(scheduled_at) FROM {runs} WHERE state = 'SCHEDULED'
            AND scheduled_at > %(now)s AND task = ANY(%(tasks)s)) AS scheduled,
        (SELECT min(lease_expires_at) FROM {runs} WHERE state = 'RUNNING'
            AND lease_expires_at > %(now)s AND task = ANY(%(tasks)s)) AS expiring,
        (SELECT array_agg(c.id) FROM crashed c
            CROSS JOIN LATERAL pg_notify(%(channel)s, 'f ' || c.id) AS n) AS crashed,
        EXISTS (SELECT 1 FROM ranked WHERE n > free) AS held_back
)
SELECT later.scheduled, later.expiring, later.crashed, later.held_back, claimed.*
FROM later LEFT JOIN claimed ON true
"""

# The claim of runs a notification named (``_Claims._claim_named``): due SCHEDULED runs of
# tasks without a concurrency limit, found by id; committed without waiting for the WAL
# flush, as every claim (see _ASYNC_COMMIT: the setting is made in the statement, which is
# its own transaction).
_CLAIM_NAMED = f"""
WITH picked AS (
    SELECT seq FROM {{runs}}
    WHERE id = ANY(%(ids)s::text[]) AND state = 'SCHEDULED' AND scheduled_at <= %(now)s::float8
        AND task = ANY(%(tasks)s::text[])
    FOR UPDATE SKIP LOCKED
)
UPDATE {{runs}} r SET state = 'RUNNING', attempts = r.attempts + 1, started_at = %(now)s::float8,
    lease_owner = %(owner)s::text, lease_expires_at = %(expires)s::float8
FROM picked, (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
WHERE r.seq = picked.seq
RETURNING {_RETURNING}
"""

# Claims of a task with a concurrency limit take turns: each holds its tasks' locks from
# before its claim statement begins until it commits. The lock is taken by a statement
# of its own because under READ COMMITTED a statement sees the rows committed before it
# began: taken inside the claim, it would count the slots as they were before the last
# claimer's commit. In key order, so two claimers never wait on each other in a circle.
_LOCK_LIMITED = "SELECT pg_advisory_xact_lock(key) FROM unnest(%(keys)s::bigint[]) AS key"

# A claim commits without waiting for its WAL to reach the disk (the rest of its
# transaction only: ``true`` makes the setting local to it). Losing a claim to a server
# crash loses nothing: the run is claimable again, the contract is at-least-once anyway,
# and the lost claim's owner is fenced off by the owner it no longer holds the run under.
# Anything durable committed after it (a completion) flushes it too. Saved: one WAL flush
# on the way from a submit to the run's start.
_ASYNC_COMMIT = "SELECT set_config('synchronous_commit', 'off', true)"


# Completions in one statement, each fenced by its own claim; the waiters in other
# processes learn of the finished runs from one notification per chunk of ids (a payload
# must stay under 8 000 bytes), sent with the commit.
_COMPLETE_MANY = f"""
WITH done AS (
    UPDATE {{runs}} r SET state = 'COMPLETED', finished_at = %(now)s,
        lease_owner = NULL, lease_expires_at = NULL, result = c.result, error = NULL
    FROM unnest(%(ids)s::text[], %(attempts)s::integer[], %(results)s::text[])
        AS c(id, attempt, result)
    WHERE r.id = c.id AND r.attempts = c.attempt AND r.state = 'RUNNING'
        AND r.lease_owner = %(owner)s
    RETURNING r.id
), chunks AS (
    SELECT string_agg(id, ' ') AS ids
    FROM (SELECT id, (row_number() OVER () - 1) / {_FINISHED_PER_NOTIFY} AS chunk FROM done) n
    GROUP BY chunk
)
SELECT ids, pg_notify(%(channel)s, 'f ' || ids) FROM chunks
"""


def _completion_columns(results: dict[str, tuple[int, str]]) -> dict[str, list[Any]]:
    """``{run_id: (attempt, result)}`` as the columns ``_COMPLETE_MANY`` unnests."""
    return {
        "ids": list(results),
        "attempts": [attempt for attempt, _ in results.values()],
        "results": [result for _, result in results.values()],
    }


def _named_records(rows: list[tuple[Any, ...]]) -> list[RunRecord]:
    """The runs a claim of named runs returned, in claim order."""
    ordered = sorted(rows, key=lambda row: (-row[_PRIORITY], row[_SCHEDULED_AT], row[_SEQ]))
    return [_record(row) for row in ordered]


def _record(row: Iterable[Any]) -> RunRecord:
    """A run from a row of :data:`_COLUMNS`; a row that makes no sense reads as FAILED.

    PostgreSQL enforces the column types, so what can be wrong is a state this version
    does not know or an error that is not the JSON this library writes.
    """
    row = tuple(row)
    state = _STATES.get(row[_STATE])
    if state is not None and row[_ERROR] is None:
        # The common case, made without the dataclass's per-field checks (claims).
        return record_of((*row[1:_STATE], state, *row[_STATE + 1 :]))
    values = dict(zip(_COLUMNS, row, strict=True))
    problems: list[str] = []
    try:
        state = RunState(values["state"])
    except ValueError:
        problems.append(f"state {values['state']!r} is not one of {', '.join(RunState)}")
        state = RunState.FAILED
    error: RunError | None = None
    if values["error"] is not None:
        try:
            error = RunError.from_json(values["error"])
        except PayloadError as exc:
            problems.append(str(exc))
    if problems:
        error = RunError(
            type=CORRUPT_RUN_ERROR_TYPE,
            message=f"run {values['id']} is corrupt in the database: {'; '.join(problems)}",
        )
        values.update(state=RunState.FAILED, lease_owner=None, lease_expires_at=None)
    del values["seq"]
    values.update(state=state, error=error)
    return RunRecord(**values)


def _option_seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"PostgreSQL broker URL option {name}={text!r} must be seconds > 0")
    return value


@dataclass
class _UrlOptions:
    conninfo: str
    schema: str = "public"
    listen: bool = True
    pool_size: int = 4
    poll_interval: float | None = None
    pool_timeout: float = 5.0


def parse_url(url: str) -> _UrlOptions:
    """Split a ``postgresql://`` URL into libpq's part and this broker's options.

    The broker's options (``schema``, ``listen``, ``pool_size``, ``poll_interval``,
    ``pool_timeout``) are taken out of the query; every other query option (``sslmode``,
    ``connect_timeout``, ``application_name``...) goes to libpq as it is.

    Raises:
        ValueError: A broker option has a bad value (the message names it).
    """
    parts = urlsplit(url)
    options = _UrlOptions(conninfo="")
    libpq: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "schema":
            if not value:
                raise ValueError("PostgreSQL broker URL option schema= must not be empty")
            options.schema = value
        elif name == "listen":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(
                    f"PostgreSQL broker URL option listen={value!r} must be true or false"
                )
            options.listen = value.lower() in ("true", "1", "yes", "on")
        elif name == "pool_size":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(
                    f"PostgreSQL broker URL option pool_size={value!r} must be an integer >= 1"
                )
            options.pool_size = int(value)
        elif name == "poll_interval":
            options.poll_interval = _option_seconds(name, value)
        elif name == "pool_timeout":
            options.pool_timeout = _option_seconds(name, value)
        else:
            libpq.append((name, value))
    scheme = "postgresql" if parts.scheme.lower() == "postgres" else parts.scheme.lower()
    # libpq decodes %20, not "+", as a space (as in ``options=-c%20statement_timeout=5s``).
    query = urlencode(libpq, quote_via=quote)
    options.conninfo = urlunsplit(parts._replace(scheme=scheme, query=query))
    return options


@dataclass(eq=False)
class _Call:
    """A statement in flight in a worker thread, so a cancellation can reach its query."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: psycopg.Connection[Any] | None = None
    finished: bool = False
    cancel_sent: bool = False

    def cancel(self) -> None:
        # Under the lock the connection cannot go back to the pool (and on to another
        # statement) while the cancel request is on its way.
        with self.lock:
            if self.conn is not None and not self.finished:
                self.cancel_sent = True
                self.conn.cancel_safe()


@dataclass(frozen=True)
class _Claimer:
    """The arguments of this broker's last claim, and the thread it was made in."""

    owner: str
    tasks: list[str]
    limit: int
    lease_seconds: float
    concurrency: dict[str, int]
    thread: int

    def same(self, owner: str, tasks: list[str], lease: float, limits: dict[str, int]) -> bool:
        """Whether a claim with these arguments may take runs claimed with these."""
        return (self.owner, self.tasks, self.lease_seconds, self.concurrency) == (
            owner,
            tasks,
            lease,
            limits,
        )


@dataclass(eq=False)
class _Ahead:
    """A claim of named runs sent as their notification was read, its answer not yet read."""

    direct: DirectConnection
    named: list[str]
    claimer: _Claimer
    #: Whether a full claim was due when it was sent; the work generation then.
    look: bool
    work: int


@dataclass(eq=False)
class _Waiter:
    """One task waiting for work (``run_id`` ``None``) or for a run to finish."""

    run_id: str | None
    #: A waiter for work also woken by any run's finish (it may free a concurrency slot).
    any_finish: bool = False
    event: anyio.Event = field(default_factory=anyio.Event)
    #: An anyio event can only be set from its own event loop's thread.
    thread: int = field(default_factory=threading.get_ident)
    #: Set with the event when what it waits for may have happened; an event set without
    #: it asks the waiter to take over reading the LISTEN connection.
    woken: bool = False

    def wake(self) -> None:
        self.woken = True
        self.event.set()

    def rearm(self) -> None:
        self.woken = False
        if self.event.is_set():
            self.event = anyio.Event()


class _Wakeups(ChangeNotifier):
    """A notifier that also wakes this broker's own waiters, each for what it waits for.

    Work wakes the waiters for work; a run's finish wakes only the waiters for that run,
    so a thousand tasks awaiting a thousand results do not all read their run at every
    finish. Notifications from other processes arrive through :meth:`work_arrived` and
    :meth:`run_finished`. Used from the broker's one event loop only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._work_waiters: set[_Waiter] = set()
        self._run_waiters: dict[str, set[_Waiter]] = {}
        # The runs that work arrived as since the last claim, when each piece of it named
        # its run (a submit of one due run); ``_unnamed`` once any did not.
        self._named: set[str] = set()
        self._unnamed = False
        # The run a submit in a thread (by its id) just stored, for the notify that follows.
        self._submitted: tuple[int, str] | None = None
        # Runs this broker stored while its LISTEN connection was up, and not seen to
        # finish since: run id -> that connection's number (``listen_connects``).
        self._fresh: dict[str, int] = {}

    @property
    def work(self) -> int:
        return self.generation(work=True)

    def notify(self, *, work: bool) -> None:
        if work:
            submitted, thread = self._submitted, threading.get_ident()
            if submitted is not None and submitted[0] == thread:
                self._submitted = None
                self._note_work([submitted[1]])
            else:
                self._note_work(None)
        self._wake(work=work)

    def _wake(self, *, work: bool) -> None:
        super().notify(work=work)
        for waiter in self._here(self._work_waiters):
            if work or waiter.any_finish:
                waiter.wake()

    def submitted(self, run_id: str) -> None:
        """The next work to arrive from this thread is this run's submit (``notify``
        follows at once)."""
        self._submitted = (threading.get_ident(), run_id)

    def work_arrived(self, run_ids: list[str] | None = None) -> None:
        """Work arrived from a notification: these due runs, or (``None``) unnamed work."""
        self._note_work(run_ids)
        self._wake(work=True)

    def _note_work(self, run_ids: list[str] | None) -> None:
        if run_ids is None or len(self._named) >= _MOST_NAMED:
            self._unnamed = True
            self._named.clear()
        elif not self._unnamed:
            self._named.update(run_ids)

    def named_so_far(self) -> list[str]:
        """What :meth:`take_named` would return, left in place."""
        return [] if self._unnamed else list(self._named)

    def waiting_for_work(self) -> bool:
        """Whether a task of this thread waits for work (a claim loop between claims)."""
        return bool(self._here(self._work_waiters))

    def take_named(self) -> list[str]:
        """The runs the work since the last call named, if all of it named its runs (else
        none); a claim calls it as it begins, for the next claim to see what came since."""
        named = [] if self._unnamed else sorted(self._named)
        self._named = set()
        self._unnamed = False
        return named

    def stored(self, run_id: str, connection: int) -> None:
        """This broker stored ``run_id`` (SCHEDULED) while LISTEN connection number
        ``connection`` was up: its finish will come as a notification on that connection."""
        fresh = self._fresh
        fresh[run_id] = connection
        if len(fresh) > _MOST_FRESH:
            del fresh[next(iter(fresh))]  # the oldest: its waiter, if any, reads it first

    def unfinished(self, run_id: str, connection: int) -> bool:
        """Whether ``run_id`` is known unfinished without a read: this broker stored it
        while LISTEN connection number ``connection`` (the current one) was up, and no
        finish of it arrived since."""
        return self._fresh.pop(run_id, None) == connection

    def run_finished(self, run_id: str) -> None:
        self._fresh.pop(run_id, None)
        for waiter in self._here(self._run_waiters.get(run_id, ())):
            waiter.wake()
        for waiter in self._here(self._work_waiters):
            if waiter.any_finish:
                waiter.wake()

    def everyone(self) -> None:
        """Wake every waiter: anything may have changed."""
        self._fresh.clear()
        self.notify(work=True)
        for waiter in self._here(self._all()):
            waiter.wake()

    def hand_over(self, leaving: _Waiter | None) -> None:
        """Ask one other waiter (if any) to read the LISTEN connection from now on.

        Called whenever a waiter stops reading or stops waiting while nobody reads: the
        waiter asked either reads next or, leaving too, asks another in turn.
        """
        for waiter in self._here(self._all()):
            if waiter is not leaving and not waiter.woken:
                waiter.event.set()
                return

    @staticmethod
    def _here(waiters: Iterable[_Waiter]) -> list[_Waiter]:
        """The waiters whose event loop runs in this thread.

        A broker used from a sync caller's short-lived loop (``delay_sync``) cannot set
        the events of another loop's waiters: they see the change at their next poll.
        """
        thread = threading.get_ident()
        return [waiter for waiter in waiters if waiter.thread == thread]

    def _all(self) -> list[_Waiter]:
        waiters = list(self._work_waiters)
        for group in self._run_waiters.values():
            waiters.extend(group)
        return waiters

    def anyone_waiting(self) -> bool:
        """Whether a waiter of this thread waits (woken ones are on their way out)."""
        return any(not waiter.woken for waiter in self._here(self._all()))

    def add(self, waiter: _Waiter) -> None:
        if waiter.run_id is None:
            self._work_waiters.add(waiter)
        else:
            self._run_waiters.setdefault(waiter.run_id, set()).add(waiter)

    def discard(self, waiter: _Waiter) -> None:
        if waiter.run_id is None:
            self._work_waiters.discard(waiter)
            return
        group = self._run_waiters.get(waiter.run_id)
        if group is not None:
            group.discard(waiter)
            if not group:
                del self._run_waiters[waiter.run_id]


class _Connections:
    """The connection side of :class:`PostgresBroker`: the pool, statements, the schema."""

    _shown_url: str
    _conninfo: str
    _schema: str
    _pool_size: int
    _pool_timeout: float
    _listen: bool
    _runs: sql.Composed
    _workers: sql.Composed
    #: Every table's name in the schema, by the placeholder statements use for it.
    _tables: dict[str, sql.Composed]
    _pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None
    _limiter: anyio.CapacityLimiter
    _listener: psycopg.Connection[Any] | None
    _reconnect_at: float
    _wakeups: _Wakeups
    _direct: DirectConnection | None
    _direct_at: float
    _composed: dict[str, str]

    if TYPE_CHECKING:  # written by the other classes of PostgresBroker; for the type checker

        async def _forget_workers(self) -> None: ...

        async def _drop_ahead(self) -> None: ...

        async def _ensure_listener(self) -> psycopg.Connection[Any] | None: ...

    # --- running statements ------------------------------------------------------------

    def _error(self, exc: BaseException) -> BrokerError:
        return BrokerError(f"PostgreSQL broker {self._shown_url!r}: {exc}")

    def _in_thread(
        self,
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]],
        call: _Call,
        operation: Callable[[psycopg.Connection[Any]], T],
    ) -> T:
        with pool.connection(timeout=self._pool_timeout) as conn:
            with call.lock:
                call.conn = conn
            try:
                return operation(conn)
            finally:
                with call.lock:
                    call.finished = True
                    call.conn = None

    async def _call(self, operation: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``operation`` on a pooled connection in a worker thread, cancellably.

        Raises:
            BrokerError: The broker is not open, no connection could be had within
                ``pool_timeout``, or the statement failed.
        """
        pool = self._pool
        if pool is None:
            raise self._not_open()
        call = _Call()

        async def cancel_when_cancelled() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                if not call.finished:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(call.cancel)

        outcome: list[T] = []
        failure: list[Exception] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_cancelled)
            try:
                outcome.append(
                    await anyio.to_thread.run_sync(
                        self._in_thread, pool, call, operation, limiter=self._limiter
                    )
                )
            except Exception as exc:
                # Raised here, it would leave the task group wrapped in a group.
                failure.append(exc)
            finally:
                call.finished = True
                tg.cancel_scope.cancel()
        if outcome:
            return outcome[0]
        try:
            raise failure[0]
        except psycopg.errors.QueryCanceled:
            if not call.cancel_sent:
                raise
            # We cancelled it because our caller is cancelled: let that cancellation out.
            await anyio.lowlevel.checkpoint()
            raise
        except psycopg_pool.PoolTimeout as exc:
            raise BrokerError(
                f"PostgreSQL broker {self._shown_url!r}: no connection within "
                f"{self._pool_timeout:g} s (pool_timeout): {exc}"
            ) from exc
        except psycopg.OperationalError as exc:
            # The server restarted or the network failed: the pool replaces the broken
            # connections it still holds, and the caller retries.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(pool.check)
            raise self._error(exc) from exc
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _compose(self, query: str) -> sql.Composed:
        """``query`` with its table placeholders (``{runs}``, ``{ticks}``...) filled in."""
        return sql.SQL(query).format(**self._tables)

    def _execute(
        self, query: str, parameters: dict[str, Any]
    ) -> Callable[[psycopg.Connection[Any]], list[tuple[Any, ...]]]:
        statement = self._compose(query)

        def execute(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            cursor = conn.execute(statement, parameters, prepare=True)
            return cursor.fetchall() if cursor.description else []

        return execute

    def _pipeline(
        self, steps: Sequence[tuple[str, dict[str, Any]]], *, durable: bool = True
    ) -> Callable[[psycopg.Connection[Any]], list[list[tuple[Any, ...]]]]:
        """Run ``steps`` (statements and their parameters) in one transaction and one round
        trip; the rows of each.

        In pipeline mode the statements sent before one sync are one implicit transaction:
        committed together at the sync, or rolled back together if one fails (psycopg's
        ``transaction()`` would cost a round trip for its BEGIN and one for its COMMIT).
        Each statement begins after the one before it ended, so it sees what that one did
        and what others committed meanwhile. ``durable=False`` commits without waiting for
        the WAL flush (see :data:`_ASYNC_COMMIT`).
        """
        statements = [(self._compose(query), parameters) for query, parameters in steps]

        def execute(conn: psycopg.Connection[Any]) -> list[list[tuple[Any, ...]]]:
            with conn.pipeline():
                if not durable:
                    conn.execute(_ASYNC_COMMIT, prepare=True)
                cursors = [
                    conn.execute(statement, parameters, prepare=True)
                    for statement, parameters in statements
                ]
            return [cursor.fetchall() if cursor.description else [] for cursor in cursors]

        return execute

    async def _quick(
        self, query: str, parameters: dict[str, Any], *, reads: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run one statement on the event loop's own connection (see ``_postgres_direct``),
        or on a pooled one in a thread while that connection is busy or down.

        For the statements a run's start waits on, with parameters of the few types the
        direct connection sends (strings, numbers, arrays of strings). Cancellable: a
        statement cancelled in flight discards the connection. A statement that only
        ``reads`` goes again on a pooled connection if the direct one was lost under it
        (as the LISTEN connection, it is the one a lost connection is noticed on).

        Raises:
            BrokerError: As :meth:`_call`.
        """
        direct = await self._direct_connection()
        if direct is None or not await direct.take():
            if direct is not None and direct.broken:
                self._drop_direct(direct)  # found lost: made again at the next use
            return await self._call(self._execute(query, parameters))
        text = self._direct_text(query)
        try:
            return await direct.execute(text, parameters)
        except psycopg.Error as exc:
            if not (reads and direct.broken):
                raise self._error(exc) from exc
        finally:
            self._release_direct(direct)
        return await self._call(self._execute(query, parameters))

    def _direct_text(self, query: str) -> str:
        """``query`` as the direct connection sends it (its tables filled in)."""
        text = self._composed.get(query)
        if text is None:
            text = self._composed[query] = self._compose(query).as_string(None)
        return text

    def _release_direct(self, direct: DirectConnection) -> None:
        """Hand back the direct connection held for a statement that ended."""
        if direct.broken or self._direct is not direct:  # failed, or the broker closed
            self._drop_direct(direct)
        direct.release()

    async def _direct_connection(self) -> DirectConnection | None:
        """The direct connection, made first if it is down (then at most every
        ``_MAX_RECONNECT`` seconds); ``None`` while it cannot be had."""
        if self._direct is not None or self._pool is None:
            return self._direct
        if self._listen:
            # The LISTEN connection is the direct one (see _Waits).
            await self._ensure_listener()
            return self._direct
        if time.monotonic() < self._direct_at:
            return None
        self._direct_at = time.monotonic() + _MAX_RECONNECT
        try:
            direct = await DirectConnection.connect(self._conninfo, self._pool_timeout)
        except psycopg.Error:
            return None
        return self._keep_direct(direct)

    def _keep_direct(self, direct: DirectConnection) -> DirectConnection | None:
        """Keep the connection just made, unless the broker closed (or made another)
        while it was being made."""
        if self._pool is None or self._direct is not None:
            direct.close()
            return self._direct
        self._direct = direct
        return direct

    def _drop_direct(self, direct: DirectConnection) -> None:
        if self._direct is direct:
            self._direct = None
            self._direct_at = 0.0  # made again at the next use
            if self._listener is direct.conn:
                # Its LISTEN goes with it: made again by the next reader (which wakes
                # every waiter to look again) or the next statement.
                self._listener = None
        direct.close()

    # --- opening and closing -------------------------------------------------------------

    async def _open(self) -> bool:
        """Connect, and create the tables (or check their version).

        Raises:
            BrokerError: The server cannot be reached, or its tables are newer than this
                anyservice understands.
        """
        if self._pool is not None:
            return False
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="anyservice",
        )

        def start() -> None:
            pool.open(wait=True, timeout=self._pool_timeout)
            try:
                with pool.connection(timeout=self._pool_timeout) as conn:
                    self._prepare(conn)
            except BaseException:
                pool.close()
                raise

        try:
            await anyio.to_thread.run_sync(start)
        except psycopg_pool.PoolTimeout as exc:
            raise BrokerError(
                f"PostgreSQL broker {self._shown_url!r}: could not connect within "
                f"{self._pool_timeout:g} s (pool_timeout): {exc}"
            ) from exc
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        self._pool = pool
        self._reconnect_at = 0.0
        self._direct_at = 0.0
        return True

    async def _check_open(self) -> None:
        if self._pool is None:
            raise self._not_open()

    def _not_open(self) -> BrokerError:
        return BrokerError(
            f"PostgreSQL broker {self._shown_url!r} is not open; "
            "use 'async with broker:' or 'await broker.open()'"
        )

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        schema = sql.Identifier(self._schema)
        meta = sql.SQL("{}.anyservice_meta").format(schema)
        version_query = sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(meta)

        def stored_version() -> int | None:
            # A query of the catalog, not to_regclass(): its cache may not yet show a
            # table another worker has just committed.
            exists = conn.execute(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = 'anyservice_meta'",
                (self._schema,),
            ).fetchone()
            if exists is None:
                return None
            row = conn.execute(version_query).fetchone()
            return None if row is None else int(row[0])

        if stored_version() == SCHEMA_VERSION:
            return
        with conn.transaction():
            # Workers starting at once on an empty database take turns here.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"anyservice:{self._schema}",)
            )
            version = stored_version()
            if version is not None and version > SCHEMA_VERSION:
                raise BrokerError(
                    f"PostgreSQL schema {self._schema!r} has task-run tables of version "
                    f"{version}, newer than this anyservice understands ({SCHEMA_VERSION}); "
                    "upgrade anyservice"
                )
            if version is None:
                found = conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema,)
                ).fetchone()
                if found is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
                conn.execute(
                    sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, value text NOT NULL)").format(
                        meta
                    )
                )
                version = 0
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(sql.SQL(statement).format(s=schema))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                ).format(meta),
                (str(SCHEMA_VERSION),),
            )

    async def close(self) -> None:
        """Close the connections. Calling it again (or before :meth:`open`) does nothing."""
        if self._pool is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._pool_timeout):
                await self._drop_ahead()
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._pool_timeout):
                try:
                    await self._forget_workers()
                except BrokerError:
                    pass  # the rows are forgotten a day later instead
        pool, self._pool = self._pool, None
        self._listener = None  # the direct connection's, when listening
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.discard()  # a waiter for notifications holding it hands it back now
        with anyio.CancelScope(shield=True):
            if pool is not None:
                await anyio.to_thread.run_sync(pool.close)
        # Waiters reading the closed listener must notice.
        self._wakeups.everyone()


class _Waits:
    """The waiting side of :class:`PostgresBroker`: LISTEN/NOTIFY and polling."""

    _conninfo: str
    _channel: str
    _listen: bool
    _poll_every: float
    _pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None
    _wakeups: _Wakeups
    _work_seen_by_claim: int
    _next_due: float | None
    _held_back: bool
    _changes_seen_by_claim: int
    _clock: Callable[[], float]
    _listener: psycopg.Connection[Any] | None
    _listening: bool
    _reconnect_at: float
    _reconnect_delay: float
    _connecting: tuple[int, anyio.Event] | None
    _direct: DirectConnection | None
    _ahead: _Ahead | None
    _pool_timeout: float
    _watch_reading: bool
    listen_connects: int

    if TYPE_CHECKING:  # written by the other classes of PostgresBroker; for the type checker

        async def _check_open(self) -> None: ...

        async def _drop_ahead(self) -> None: ...

        def _claim_ahead(self) -> None: ...

        async def get(self, run_id: str) -> RunRecord | None: ...

        def _release_direct(self, direct: DirectConnection) -> None: ...

    # --- waiting -------------------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> None:
        await self._check_open()
        if self._ahead is not None:  # runs claimed ahead wait for the next claim
            await anyio.lowlevel.checkpoint()
            return
        if self._next_due is not None:
            timeout = min(timeout, max(self._next_due - self._clock(), 0.0))
        # Past a poll interval the caller claims again: that claim is the poll.
        timeout = min(timeout, self._poll_every)
        # Runs held back by a concurrency limit wait for a slot: any run's finish.
        if self._held_back and self._changes_seen_by_claim != self._wakeups.generation(work=False):
            await anyio.lowlevel.checkpoint()
            return
        waiter = _Waiter(None, any_finish=self._held_back)
        self._wakeups.add(waiter)
        try:
            await self._wait_woken(waiter, timeout, self._work_seen_by_claim)
        except BaseException:
            # Cancelled (a stopping worker): no claim will take runs claimed ahead.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._pool_timeout):
                await self._drop_ahead()
            raise
        finally:
            self._stop_waiting(waiter)

    async def wait_until_finished(self, run_id: str, timeout: float) -> RunRecord | None:
        deadline = anyio.current_time() + timeout
        if timeout > 0:
            await self._listen_before_looking()
        # Registered before each read of the run, so a finish in between is not missed.
        waiter = _Waiter(run_id)
        self._wakeups.add(waiter)
        # A run this broker just stored, its finish sure to be notified here, is not read
        # first: that read would take the CPU from the run's way to a worker.
        unread = timeout > 0 and self._wakeups.unfinished(run_id, self.listen_connects)
        try:
            while True:
                waiter.rearm()
                remaining = deadline - anyio.current_time()
                if unread:
                    unread = False
                else:
                    run = await self.get(run_id)
                    remaining = deadline - anyio.current_time()
                    if run is None or run.finished or remaining <= 0:
                        return run
                # Past a poll interval the run is read again: that read is the poll.
                await self._wait_woken(waiter, min(remaining, self._poll_every), None)
        finally:
            self._stop_waiting(waiter)

    async def _listen_before_looking(self) -> None:
        """Make the first LISTEN connection now, before a waiter's first look.

        Only what is sent after LISTEN takes effect is delivered: listening first, a
        change after the look always wakes the waiter. (A connection made later, by a
        waiter that reads it, wakes everyone to look again, at the cost of a return that
        may be spurious.) Only the first: a lost connection is made again by the waiters.
        """
        if not self._listen or self.listen_connects or self._listening or self._pool is None:
            return
        self._listening = True
        try:
            await self._ensure_listener()
        finally:
            self._listening = False
            # Waiters that came meanwhile wait for a reader: one of them reads now.
            self._wakeups.hand_over(None)

    def _stop_waiting(self, waiter: _Waiter) -> None:
        self._wakeups.discard(waiter)
        if not self._listening:
            self._wakeups.hand_over(waiter)

    async def _wait_woken(self, waiter: _Waiter, timeout: float, work_seen: int | None) -> None:
        """Wait until ``waiter`` is woken (or work arrived since ``work_seen``), or timeout.

        While no other waiter does, this one reads the LISTEN connection itself and wakes
        the others; leaving, it hands the reading over to one of them.
        """
        await anyio.lowlevel.checkpoint()
        deadline = anyio.current_time() + timeout
        reading = False
        if self._watch_reading and self._direct is not None:
            # A watch of cancels reads only while nobody else waits: it hands over.
            self._direct.stop_reading()
        try:
            while not waiter.woken and (work_seen is None or work_seen == self._wakeups.work):
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return
                if self._listen and self._pool is not None and not self._listening:
                    reading = True
                    await self._read_notifications(remaining)
                else:
                    with anyio.move_on_after(remaining):
                        await waiter.event.wait()
                    if not waiter.woken:
                        waiter.rearm()  # asked to take over the reading: loop to do so
        finally:
            if reading:
                self._wakeups.hand_over(waiter)

    async def _read_notifications(self, timeout: float) -> None:
        """Read one batch of notifications, waiting at most ``timeout`` seconds for it."""
        self._listening = True
        try:
            connects = self.listen_connects
            listener = await self._ensure_listener()
            if listener is None:
                # Down: wait out the reconnect delay (the caller's polls go on meanwhile).
                await anyio.sleep(min(timeout, max(self._reconnect_at - time.monotonic(), 0)))
                return
            if self.listen_connects != connects:
                # Just (re)connected: what was sent before LISTEN took effect is lost, so
                # this waiter, woken with everyone, must look again before it waits; the
                # run it read before the connection was up may have finished since.
                return
            direct = self._direct
            if direct is None or direct.conn is not listener:
                return  # dropped meanwhile: made again at the next turn
            if direct.broken:
                self._drop_listener()
                self._wakeups.everyone()
                return
            if not direct.acquire_to_read():
                # A statement holds it (or is about to), and reads what arrives meanwhile.
                await direct.until_free(timeout)
                return
            try:
                payloads = await direct.wait_notified(timeout)
            except psycopg.Error:
                self._drop_listener()
                self._wakeups.everyone()
                return
            finally:
                self._release_direct(direct)
            self._notified(payloads)
            self._claim_ahead()
        finally:
            self._listening = False

    async def _watch_cancels(self) -> None:
        """Read the LISTEN connection for cancel requests (and everything else it
        carries) while no waiter of this thread waits, which would read it.

        Not a waiter: nobody hands the reading over to it, which would wake it on the
        way of every run's start (a waiter leaves as work arrives); it looks now and
        then instead (:data:`_WATCH_LOOK`) whether anyone reads, and a cancel request
        sent meanwhile waits in the connection for that look.
        """
        if not self._listen:
            await anyio.sleep_forever()  # poll-only: the heartbeats find the requests
        look = _WATCH_LOOK
        while True:
            if self._pool is None or self._listening or self._wakeups.anyone_waiting():
                await anyio.sleep(look)
                look = min(look * 2, _WATCH_LOOK_MOST)
                continue
            look = _WATCH_LOOK
            self._watch_reading = True
            try:
                await self._read_notifications(self._poll_every)
            finally:
                self._watch_reading = False
                self._wakeups.hand_over(None)
            # A read that returns at once (a connection just dropped) must not spin.
            await anyio.lowlevel.checkpoint()

    def _notified(self, payloads: list[str]) -> None:
        """Wake the waiters that notifications with these ``payloads`` concern."""
        for payload in payloads:
            if payload == "w":
                self._wakeups.work_arrived()
            elif payload.startswith("w "):
                # A submit of due runs, named.
                self._wakeups.work_arrived(payload[2:].split(" "))
            elif payload.startswith("f "):
                # One id, or the ids of a batch of completions, space-separated.
                for run_id in payload[2:].split(" "):
                    self._wakeups.run_finished(run_id)
            elif payload.startswith("k "):
                # A cancel of RUNNING runs was stored: their workers look it up.
                self._wakeups.cancel_asked(payload[2:].split(" "))

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        direct = self._direct
        if direct is not None and direct.conn is listener:
            self._direct = None
            direct.discard()
        elif listener is not None:
            listener.close()
        self._reconnect_at = time.monotonic() + self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, _MAX_RECONNECT)

    def _connect_listener(self) -> psycopg.Connection[Any]:
        """A new connection that LISTENs on the channel (blocking: run in a thread)."""
        given = conninfo_to_dict(self._conninfo)
        keepalives = {key: value for key, value in _LISTEN_KEEPALIVES.items() if key not in given}
        conninfo = make_conninfo(self._conninfo, **keepalives)
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    async def _ensure_listener(self) -> psycopg.Connection[Any] | None:
        """The LISTEN connection, made first if it is down (and not waiting out a
        reconnect delay); ``None`` while it cannot be had.

        It is also the direct connection (``_postgres_direct``): the statements a run's
        start waits on go out on it. A commit that notifies wakes every listening server
        process, and the two connections were two processes to wake per process, on the
        way from a submit to the run's start; on one, a submitter's own notification
        comes with its statement's answer, and a worker's claim goes to the server
        process that has just sent it the notification.
        """
        if self._listener is not None and not self._listener.closed:
            return self._listener
        connecting = self._connecting
        if connecting is not None:  # another task of this broker is making it
            if connecting[0] == threading.get_ident():
                await connecting[1].wait()
                return self._listener
            return None
        if time.monotonic() < self._reconnect_at:
            return None
        self._connecting = (threading.get_ident(), anyio.Event())
        try:
            with anyio.CancelScope(shield=True):
                listener = await anyio.to_thread.run_sync(self._connect_listener)
        except psycopg.Error:
            self._drop_listener()
            return None
        finally:
            made, self._connecting = self._connecting, None
            made[1].set()
        if self._pool is None:  # closed meanwhile
            listener.close()
            return None
        self._listener = listener
        self._direct = DirectConnection(listener, self._notified)
        self._reconnect_delay = _FIRST_RECONNECT
        self.listen_connects += 1
        # Notifications sent while nobody listened are lost: everyone looks again.
        self._wakeups.everyone()
        return listener


class _ListensBeforeClaiming(BaseBroker):
    """A claim (alone or with results) is the look that a wait for work follows: LISTEN
    first (see ``_Waits``)."""

    if TYPE_CHECKING:  # written by _Waits; declared for the type checker only

        async def _listen_before_looking(self) -> None: ...

    async def claim(
        self,
        owner: str,
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> list[RunRecord]:
        # Before the base's claim notes the work generation, so the wake-up that making
        # the connection sends everyone does not end this claimer's next wait at once.
        await self._listen_before_looking()
        return await super().claim(
            owner, tasks, limit=limit, lease_seconds=lease_seconds, concurrency=concurrency
        )

    async def complete_and_claim(
        self,
        owner: str,
        results: Mapping[str, tuple[int, str]],
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> tuple[set[str], list[RunRecord]]:
        # A claim too: LISTEN before it looks, as claim() does.
        await self._listen_before_looking()
        return await super().complete_and_claim(
            owner,
            results,
            tasks,
            limit=limit,
            lease_seconds=lease_seconds,
            concurrency=concurrency,
        )


class _WorkerRecords(_Connections):
    """Who is working, for :class:`PostgresBroker`: faster recovery from a dead worker."""

    _clock: Callable[[], float]
    _host: str
    _pid: int
    _started_at: float
    _workers_seen: dict[str, float]

    async def _keep_workers(self, owner: str) -> None:
        """Record ``owner`` as alive and free the runs of dead workers on this host.

        A worker killed on this host (kill -9, the OOM killer) leaves its runs leased
        until the leases expire. Its row names its process, which is gone: its leases are
        ended now, so the claim that follows takes its runs over at once. Done at most
        every ``WORKERS_EVERY`` seconds per owner, from claims (an idle worker claims
        about once a second).
        """
        for query, parameters in self._workers_step(owner):
            await self._end_dead_leases(await self._call(self._execute(query, parameters)))

    def _workers_step(self, owner: str) -> list[tuple[str, dict[str, Any]]]:
        """The statement recording ``owner`` as alive and reading the other workers of
        this host, if it is due (every ``WORKERS_EVERY`` s); a claim may send it in its
        own round trip, and give its rows to :meth:`_end_dead_leases`."""
        seen = time.monotonic()
        if seen - self._workers_seen.get(owner, -math.inf) < WORKERS_EVERY:
            return []
        self._workers_seen[owner] = seen
        now = self._clock()
        return [
            (
                "WITH seen AS (INSERT INTO {workers} (owner, host, pid, started_at, heartbeat_at)"
                " VALUES (%(owner)s, %(host)s, %(pid)s, %(started)s, %(now)s)"
                " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at),"
                " forgotten AS (DELETE FROM {workers} WHERE heartbeat_at < %(forget)s)"
                " SELECT owner, pid, started_at FROM {workers}"
                " WHERE host = %(host)s AND pid <> %(pid)s",
                {
                    "owner": owner,
                    "host": self._host,
                    "pid": self._pid,
                    "started": self._started_at,
                    "now": now,
                    "forget": now - WORKERS_FORGOTTEN,
                },
            )
        ]

    async def _end_dead_leases(self, rows: list[tuple[Any, ...]]) -> bool:
        """End the leases of the workers among ``rows`` (of :meth:`_workers_step`) whose
        process is gone; whether there were any."""
        dead = [dead for dead, pid, started in rows if process_gone(pid, started)]
        if not dead:
            return False
        now = self._clock()
        await self._call(
            self._execute(
                "WITH gone AS (DELETE FROM {workers} WHERE owner = ANY(%(dead)s))"
                " UPDATE {runs} SET lease_expires_at = %(now)s"
                " WHERE state = 'RUNNING' AND lease_owner = ANY(%(dead)s)"
                " AND lease_expires_at > %(now)s",
                {"dead": dead, "now": now},
            )
        )
        return True

    async def _forget_workers(self) -> None:
        """Delete this process's worker rows (a clean stop leaves nothing to recover)."""
        if self._workers_seen:
            owners = list(self._workers_seen)
            self._workers_seen.clear()
            await self._call(
                self._execute(
                    "DELETE FROM {workers} WHERE owner = ANY(%(owners)s)", {"owners": owners}
                )
            )


class _Claims(_WorkerRecords):
    """Claiming, for :class:`PostgresBroker`: the claim statement's steps and its answer."""

    _claimer: _Claimer | None
    _channel: str
    _poll_every: float
    _next_due: float | None
    _held_back: bool
    #: When the last claim that looked at every run began (monotonic, and broker clock).
    _looked_at: float
    _looked_clock: float
    #: Whether that claim took fewer runs than it could (so it left none due behind).
    _looked_clear: bool
    #: The shortest lease this broker's claims took since then, and the tasks it claimed.
    _leased_for: float
    _looked_tasks: frozenset[str]

    if TYPE_CHECKING:  # written by _ClaimsAhead; declared for the type checker only

        async def _take_ahead(
            self,
            owner: str,
            tasks: list[str],
            limit: int,
            lease_seconds: float,
            concurrency: dict[str, int],
        ) -> tuple[_Ahead, list[RunRecord]] | None: ...

    async def _claim(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> Claimed:
        self._claimer = _Claimer(
            owner, tasks, limit, lease_seconds, concurrency, threading.get_ident()
        )
        taken = await self._take_ahead(owner, tasks, limit, lease_seconds, concurrency)
        if taken is not None:
            ahead, runs = taken
            self._wakeups.take_named()  # what came since: a full claim looks at it
            every = len(runs) == len(ahead.named) and ahead.work == self._wakeups.work
            return await self._named_claimed(
                runs, every, ahead.look, owner, tasks, limit, lease_seconds, concurrency
            )
        named = self._wakeups.take_named()
        if named and self._claim_by_id(len(named), tasks, limit, lease_seconds):
            # Past a poll interval since the last full look, another worker's lease may
            # have expired (and this worker is due to record itself alive): the named runs
            # first, then at once a full claim (``next_due`` now, which the next claim
            # cannot put off: see below), off the runs' way.
            look = self._look_due()
            runs = await self._claim_named(owner, named, tasks, lease_seconds, concurrency)
            return await self._named_claimed(
                runs, len(runs) == len(named), look, owner, tasks, limit, lease_seconds, concurrency
            )
        return await self._claim_all(owner, tasks, limit, lease_seconds, concurrency)

    async def _named_claimed(
        self,
        runs: list[RunRecord],
        every: bool,
        look: bool,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> Claimed:
        """The claim that claimed named ``runs`` by id: ``every`` named run (and nothing
        else came), or else with a full claim of the rest; ``look``: a full claim was due."""
        if every:
            # Nothing else became claimable here since the last full look: what it said of
            # the next due time and of held-back runs still holds.
            next_due = self._clock() if look else self._next_due
            return Claimed(runs=runs, finished=False, next_due=next_due, held_back=self._held_back)
        # Some were claimed elsewhere (or are not this worker's): look at everything.
        claimed = await self._claim_all(owner, tasks, limit - len(runs), lease_seconds, concurrency)
        claimed.runs[:0] = runs
        return claimed

    def _claim_by_id(self, named: int, tasks: list[str], limit: int, lease_seconds: float) -> bool:
        """Whether the runs notifications named are all there is to claim now.

        They are when the last full claim found nothing more due among these tasks (it
        looked at them all and took fewer runs than it could; no next due time passed
        since; no run held back by a concurrency limit), every piece of work since named
        its runs, and no lease this broker took since can have expired yet (on the wall
        clock and on the broker's). Another worker's lease may have expired since: a full
        claim follows the claim by id once a poll interval passed since the last (it ends
        abandoned runs, takes over expired leases and records this worker alive).
        """
        if named > limit or self._held_back or not self._looked_clear:
            return False
        if not self._looked_tasks.issuperset(tasks):
            return False
        now = self._clock()
        if self._next_due is not None and self._next_due <= now:
            return False
        within = min(lease_seconds, self._leased_for)
        return time.monotonic() - self._looked_at < within and now - self._looked_clock < within

    def _look_due(self) -> bool:
        """Whether a poll interval passed since the last full claim began."""
        return (
            time.monotonic() - self._looked_at >= self._poll_every
            or self._clock() - self._looked_clock >= self._poll_every
        )

    async def _claim_named(
        self,
        owner: str,
        run_ids: list[str],
        tasks: list[str],
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> list[RunRecord]:
        """Claim these runs, those of them still due and SCHEDULED (a primary-key lookup,
        and no planning to speak of: the statement a run's start waits on)."""
        parameters = self._named_parameters(owner, run_ids, tasks, lease_seconds, concurrency)
        rows = await self._quick(_CLAIM_NAMED, parameters)
        self._leased_for = min(self._leased_for, lease_seconds)
        return _named_records(rows)

    def _named_parameters(
        self,
        owner: str,
        run_ids: list[str],
        tasks: list[str],
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> dict[str, Any]:
        now = self._clock()
        return {
            "ids": run_ids,
            "tasks": [task for task in tasks if task not in concurrency],
            "now": now,
            "owner": owner,
            "expires": now + lease_seconds,
        }

    async def _claim_all(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> Claimed:
        looked = time.monotonic()
        watch = self._workers_step(owner)
        now, steps = self._claim_steps(owner, tasks, limit, lease_seconds, concurrency)
        rows = await self._call(self._pipeline([*watch, *steps], durable=False))
        claimed = await self._claimed_watching(rows, watch, now, limit, looked)
        self._leased_for, self._looked_tasks = lease_seconds, frozenset(tasks)
        return claimed

    async def _complete_and_claim(
        self,
        owner: str,
        results: dict[str, tuple[int, str]],
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> tuple[set[str], Claimed]:
        # One transaction, one round trip, one WAL flush (durable: it holds results).
        self._claimer = _Claimer(
            owner, tasks, limit, lease_seconds, concurrency, threading.get_ident()
        )
        taken = await self._take_ahead(owner, tasks, limit, lease_seconds, concurrency)
        early = [] if taken is None else taken[1]
        self._wakeups.take_named()  # this claim looks at every run
        looked = time.monotonic()
        completion = [(_COMPLETE_MANY, self._completion_parameters(owner, results))]
        if not results:
            completion = []
        watch = self._workers_step(owner)
        now, steps = self._claim_steps(owner, tasks, limit - len(early), lease_seconds, concurrency)
        rows = await self._call(self._pipeline([*completion, *watch, *steps]))
        done = self._completed(rows[0]) if results else set()
        claimed = await self._claimed_watching(
            rows[len(completion) :], watch, now, limit - len(early), looked
        )
        claimed.runs[:0] = early
        self._leased_for, self._looked_tasks = lease_seconds, frozenset(tasks)
        return done, claimed

    async def _claimed_watching(
        self,
        rows: list[list[tuple[Any, ...]]],
        watch: list[tuple[str, dict[str, Any]]],
        now: float,
        limit: int,
        looked: float,
    ) -> Claimed:
        """The claim of ``rows`` (each statement's, the workers step's first if sent);
        when that step found dead workers, their leases are ended and the claim says runs
        are claimable now, so the caller claims them at once.

        Notes the claim, begun at ``looked`` (monotonic) and ``now``, as the last full
        look, and whether it left due runs behind (it took as many as it could)."""
        claimed = self._claimed(rows[-1], now, limit)
        self._looked_at, self._looked_clock = looked, now
        self._looked_clear = len(claimed.runs) < limit
        if watch and await self._end_dead_leases(rows[0]):
            claimed.next_due = now
        return claimed

    def _claim_steps(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> tuple[float, list[tuple[str, dict[str, Any]]]]:
        """The statements of a claim (its clock reading, and the statements): the claim
        statement, after the locks of its limited tasks if any (see :data:`_LOCK_LIMITED`)."""
        # One statement, whatever the limit: runs locked by another claim in progress are
        # skipped, not waited for.
        now = self._clock()
        limited = sorted(concurrency)
        claim = (
            _CLAIM.replace("{returning}", _RETURNING),
            {
                "now": now,
                "expires": now + lease_seconds,
                "owner": owner,
                "tasks": tasks,
                "unlimited": [task for task in tasks if task not in concurrency],
                "limited": limited,
                "caps": [concurrency[task] for task in limited],
                "limit": limit,
                "channel": self._channel,
                "abandoned": ABANDONED_ERROR_TYPE,
                "message": _ABANDONED_MESSAGE,
            },
        )
        return now, [*self._limit_locks(limited), claim]

    def _claimed(self, rows: list[tuple[Any, ...]], now: float, limit: int) -> Claimed:
        """What the claim statement's ``rows`` say, for the base class."""
        scheduled, expiring, crashed, held_back = rows[0][:4]
        # In claim order: higher priority, then due time, then submission (the sequence).
        claimed = sorted(
            (row[4:] for row in rows if row[4] is not None),
            key=lambda row: (-row[_PRIORITY], row[_SCHEDULED_AT], row[_SEQ]),
        )
        runs = [_record(row) for row in claimed]
        for run_id in crashed or ():
            self._wakeups.run_finished(run_id)
        if len(runs) == limit and limit > 0:
            next_due: float | None = now
        else:
            times = [t for t in (scheduled, expiring) if t is not None]
            next_due = min(times) if times else None
        return Claimed(
            runs=runs, finished=bool(crashed), next_due=next_due, held_back=bool(held_back)
        )

    def _limit_locks(self, limited: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """The statement that makes a claim of the ``limited`` tasks wait its turn with
        every other claim of theirs (see :data:`_LOCK_LIMITED`); none if none is limited."""
        if not limited:
            return []
        return [(_LOCK_LIMITED, {"keys": self._limit_keys(limited)})]

    def _limit_keys(self, tasks: list[str]) -> list[int]:
        """The advisory lock keys of these tasks' concurrency limits, in locking order."""
        keys = {
            int.from_bytes(
                hashlib.blake2b(
                    f"anyservice:{self._schema}:concurrency:{task}".encode(), digest_size=8
                ).digest(),
                "big",
                signed=True,
            )
            for task in tasks
        }
        return sorted(keys)

    async def _claim_run(
        self, owner: str, run_id: str, lease_seconds: float, concurrency: dict[str, int]
    ) -> RunRecord | None:
        await self._keep_workers(owner)
        # The rules of every claim (records.claimable, the task's free slots), in the
        # statement that claims.
        now = self._clock()
        limited = sorted(concurrency)
        claim = (
            "UPDATE {runs} r SET state = 'RUNNING', attempts = r.attempts + 1,"
            " started_at = %(now)s, lease_owner = %(owner)s, lease_expires_at = %(expires)s"
            " WHERE r.id = %(id)s AND ((r.state = 'SCHEDULED' AND r.scheduled_at <= %(now)s)"
            " OR (r.state = 'RUNNING' AND r.lease_expires_at <= %(now)s"
            " AND r.attempts < r.max_attempts))"
            " AND NOT EXISTS (SELECT 1"
            " FROM unnest(%(limited)s::text[], %(caps)s::integer[]) AS l(task, cap)"
            " WHERE l.task = r.task AND l.cap <= (SELECT count(*) FROM {runs} x"
            " WHERE x.state = 'RUNNING' AND x.task = l.task AND x.lease_expires_at > %(now)s))"
            f" RETURNING {_RETURNING}",
            {
                "id": run_id,
                "owner": owner,
                "now": now,
                "expires": now + lease_seconds,
                "limited": limited,
                "caps": [concurrency[task] for task in limited],
            },
        )
        steps = [*self._limit_locks(limited), claim]
        rows = (await self._call(self._pipeline(steps, durable=False)))[-1]
        self._leased_for = min(self._leased_for, lease_seconds)
        return _record(rows[0]) if rows else None

    def _completion_parameters(
        self, owner: str, results: dict[str, tuple[int, str]]
    ) -> dict[str, Any]:
        return {
            **_completion_columns(results),
            "now": self._clock(),
            "owner": owner,
            "channel": self._channel,
        }

    def _completed(self, rows: list[tuple[Any, ...]]) -> set[str]:
        """The ids :data:`_COMPLETE_MANY` completed, its ``rows`` say; their waiters woken."""
        done = {run_id for (ids, _) in rows for run_id in ids.split(" ")}
        for run_id in done:
            self._wakeups.run_finished(run_id)
        return done


class _ClaimsAhead(_Claims):
    """Claims sent as the notification naming their runs is read, for :class:`PostgresBroker`.

    A worker between claims waits for work; woken by a notification that names runs (a
    submit of one due run), it would return through its wait and its claim loop before
    its claim went out: a few tenths of a millisecond of Python on the way from a submit
    to the run's start. Instead, the task that read the notification sends at once the
    claim the worker's next claim would make (by id, with the arguments of its last
    claim), on the direct connection, and that next claim reads its answer; the Python
    on the way back runs while the server claims. A claim with other arguments (or the
    broker's close) hands the runs back.
    """

    _ahead: _Ahead | None

    def _claim_ahead(self) -> None:
        """Send the claim of the runs notifications named, if the next claim would make it.

        Only for the last claimer, in its thread, while a task of it waits for work (a
        claim loop between claims), when a claim by id is what the next claim would make
        and the direct connection is free, its statement prepared already.
        """
        claimer, direct = self._claimer, self._direct
        if claimer is None or direct is None or self._ahead is not None:
            return
        if claimer.thread != threading.get_ident() or not self._wakeups.waiting_for_work():
            return
        named = self._wakeups.named_so_far()
        tasks, lease = claimer.tasks, claimer.lease_seconds
        if not named or not self._claim_by_id(len(named), tasks, claimer.limit, lease):
            return
        text = self._composed.get(_CLAIM_NAMED)
        if text is None or not direct.prepared(text) or not direct.acquire():
            return
        named = self._wakeups.take_named()
        look = self._look_due()
        try:
            direct.send(
                text,
                self._named_parameters(claimer.owner, named, tasks, lease, claimer.concurrency),
            )
        except psycopg.Error:
            self._release_direct(direct)
            self._wakeups.work_arrived()  # unnamed now: the next claim looks at every run
            return
        self._leased_for = min(self._leased_for, lease)
        self._ahead = _Ahead(direct, named, claimer, look, self._wakeups.work)

    async def _take_ahead(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> tuple[_Ahead, list[RunRecord]] | None:
        """The claim sent ahead and the runs it claimed, if one was and a claim with these
        arguments may take them; else ``None`` (runs it claimed are handed back).

        Raises:
            BrokerError: Its answer could not be read (the runs wait out their leases).
        """
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        runs = await self._answer_of(ahead)
        if len(runs) <= limit and ahead.claimer.same(owner, tasks, lease_seconds, concurrency):
            return ahead, runs
        await self._hand_back(ahead.claimer.owner, runs)
        return None

    async def _answer_of(self, ahead: _Ahead) -> list[RunRecord]:
        direct = ahead.direct
        try:
            return _named_records(await direct.receive())
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        finally:
            self._release_direct(direct)

    async def _hand_back(self, owner: str, runs: list[RunRecord]) -> None:
        """Release runs claimed ahead that no claim takes (claimable again at once)."""
        for run in runs:
            try:
                await self._release(owner, run.id, run.attempts)
            except BrokerError:
                pass  # it waits out its lease instead

    async def release_claimed_ahead(self, owner: str) -> None:
        if self._ahead is None or self._ahead.claimer.owner != owner:
            await anyio.lowlevel.checkpoint()
            return
        await self._drop_ahead()

    async def _drop_ahead(self) -> None:
        """Hand back what a claim sent ahead claimed (the broker closes, the wait for
        work that read its notification is cancelled, or its claimer claims no more)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            await self._hand_back(ahead.claimer.owner, await self._answer_of(ahead))
        except BrokerError:
            pass  # its runs wait out their leases

    if TYPE_CHECKING:  # written by PostgresBroker; declared for the type checker only

        async def _release(self, owner: str, run_id: str, attempt: int) -> bool: ...


class PostgresBroker(PostgresClusterStorage, _Waits, _ClaimsAhead, _ListensBeforeClaiming):
    """Task runs in a PostgreSQL database shared by workers on any number of hosts.

    Args:
        url: ``postgresql://user:password@host:5432/dbname`` (or ``postgres://``), with
            optional query options: ``schema`` (where the ``anyservice_*`` tables live;
            default ``public``), ``listen=false`` (poll only: for PgBouncer in transaction
            mode), ``pool_size`` (connections, default 4), ``poll_interval`` (seconds
            between polls while waiting; default 1 with LISTEN, 0.05 without) and
            ``pool_timeout`` (seconds to wait for a connection, default 5). Other query
            options go to libpq.
        clock: Wall-clock time in epoch seconds; tests pass a fake one to move time.

    Raises:
        ValueError: A URL option has a bad value.
    """

    # What the cluster storage reads and stores runs with.
    _run_columns = _RETURNING
    _insert_runs = INSERT_RUNS
    _read_run = staticmethod(_record)
    _insert_parameters = staticmethod(insert_parameters)

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a string, got {url!r}")
        options = parse_url(url)
        self._wakeups = _Wakeups()
        # The waits are this broker's own (LISTEN, and per-run wake-ups), not the base's.
        super().__init__(clock=clock, notifier=self._wakeups, poll_interval=None)
        self._url = url
        self._shown_url = hide_password(url)
        self._conninfo = options.conninfo
        self._schema = options.schema
        self._listen = options.listen
        self._pool_size = options.pool_size
        self._pool_timeout = options.pool_timeout
        self._poll_every = options.poll_interval or (
            _DEFAULT_POLL_INTERVAL if self._listen else _POLL_ONLY_INTERVAL
        )
        self._channel = f"anyservice:{self._schema}"
        self._runs = sql.SQL("{}.anyservice_runs").format(sql.Identifier(self._schema))
        self._workers = sql.SQL("{}.anyservice_workers").format(sql.Identifier(self._schema))
        self._tables = {"runs": self._runs, "workers": self._workers}
        self._tables.update(cluster_tables(self._schema))
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self._limiter = anyio.CapacityLimiter(self._pool_size)
        # This process, as the workers table records it.
        self._host = host_identity()
        self._pid = os.getpid()
        self._started_at = time.time()
        self._workers_seen: dict[str, float] = {}  # owner -> monotonic time last recorded
        self._listener: psycopg.Connection[Any] | None = None
        self._listening = False  # a waiter is reading the listener right now
        self._watch_reading = False  # ... and it is a watch of cancels
        self._reconnect_at = 0.0
        self._reconnect_delay = _FIRST_RECONNECT
        self._direct: DirectConnection | None = None
        self._connecting: tuple[int, anyio.Event] | None = None  # thread, made
        self._direct_at = 0.0  # monotonic time before which it is not made again
        self._looked_at = self._looked_clock = -math.inf
        self._looked_clear = False
        self._leased_for = math.inf
        self._looked_tasks: frozenset[str] = frozenset()
        self._composed: dict[str, str] = {}  # statement -> its text, tables filled in
        self._claimer: _Claimer | None = None
        self._ahead: _Ahead | None = None
        #: How many times the LISTEN connection was (re)made; a health signal.
        self.listen_connects = 0

    @property
    def url(self) -> str:
        """The URL this broker was made from, its password masked."""
        return hide_password(self._url)

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the ``anyservice_*`` tables."""
        return self._schema

    @property
    def listens(self) -> bool:
        """Whether waits are woken by LISTEN/NOTIFY (``False``: ``?listen=false``)."""
        return self._listen

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> Self:
        """``postgresql://user:password@host:port/db?schema=...`` (see the class)."""
        return cls(url, clock=clock)

    def __repr__(self) -> str:
        return f"<PostgresBroker {self.url!r}>"

    # --- storage -----------------------------------------------------------------------

    async def _insert(self, run: RunRecord) -> None:
        # The statement a run's start waits on first: on the direct connection, and its
        # notification names the run when it is due, for the claim by id (see _Claims).
        due = run.scheduled_at <= self._clock()
        # Listening since before the run is stored, this process hears of its finish.
        listener = self._listener if self._listen else None
        connection = self.listen_connects
        parameters = _new_run_parameters(run)
        parameters["channel"] = self._channel
        parameters["notice"] = f"w {run.id}" if due else "w"
        await self._quick(_INSERT_ONE, parameters)
        if due:
            self._wakeups.submitted(run.id)
        if listener is not None and listener is self._listener and not listener.closed:
            self._wakeups.stored(run.id, connection)

    async def _insert_many(self, runs: Sequence[RunRecord]) -> None:
        # One statement, so the rows are stored all or none and the notification goes
        # out with their commit.
        await self._call(
            self._execute(
                f"WITH inserted AS ({INSERT_RUNS} RETURNING 1)"
                " SELECT pg_notify(%(channel)s, 'w') WHERE EXISTS (SELECT 1 FROM inserted)",
                {**insert_parameters(runs), "channel": self._channel},
            )
        )
        if len(runs) >= _ANALYZE_AFTER:
            await self._refresh_statistics()

    async def _refresh_statistics(self) -> None:
        """Refresh the planner's statistics of the runs table after a large submission.

        Autovacuum refreshes them only after a minute or so, and a claim planned on
        statistics from before the burst reads every due run and sorts them all (58 ms for
        each claim at 10 000 due runs) instead of walking the claim-order index to the
        first ``limit`` (0.1 ms). The runs are stored already: a failure here only leaves
        that to autovacuum.
        """
        try:
            await self._call(self._execute("ANALYZE {runs}", {}))
        except BrokerError:
            pass

    async def _heartbeat(
        self, owner: str, leases: dict[str, int], lease_seconds: float
    ) -> set[str]:
        if not leases:
            return set()
        ids, attempts = list(leases), list(leases.values())
        rows = await self._call(
            self._execute(
                "UPDATE {runs} r SET lease_expires_at = %(expires)s"
                " FROM unnest(%(ids)s::text[], %(attempts)s::integer[]) AS held(id, attempt)"
                " WHERE r.id = held.id AND r.attempts = held.attempt"
                " AND r.state = 'RUNNING' AND r.lease_owner = %(owner)s"
                " RETURNING r.id",
                {
                    "expires": self._clock() + lease_seconds,
                    "owner": owner,
                    "ids": ids,
                    "attempts": attempts,
                },
            )
        )
        return {run_id for (run_id,) in rows}

    async def _update_held(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        assignments: str,
        parameters: dict[str, Any],
    ) -> RunState | None:
        """Update a run only while ``owner``'s claim number ``attempt`` holds its lease.

        The statement also notifies the other processes, on commit: of work if the run
        is SCHEDULED again, of the run's finish if it finished.

        Returns:
            The run's new state, or ``None`` when ``owner`` did not hold it.
        """
        rows = await self._call(
            self._execute(
                f"WITH held AS (UPDATE {{runs}} SET {assignments}"
                " WHERE id = %(id)s AND state = 'RUNNING' AND lease_owner = %(owner)s"
                " AND attempts = %(attempt)s"
                " RETURNING id, state)"
                " SELECT state, pg_notify(%(channel)s,"
                " CASE WHEN state = 'SCHEDULED' THEN 'w' ELSE 'f ' || id END) FROM held",
                {
                    **parameters,
                    "id": run_id,
                    "owner": owner,
                    "attempt": attempt,
                    "now": self._clock(),
                    "channel": self._channel,
                },
            )
        )
        if not rows:
            return None
        state = RunState(rows[0][0])
        if state.finished:
            self._wakeups.run_finished(run_id)
        return state

    async def _complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        state = await self._update_held(
            owner,
            run_id,
            attempt,
            "state = 'COMPLETED', finished_at = %(now)s, lease_owner = NULL,"
            " lease_expires_at = NULL, result = %(result)s, error = NULL",
            {"result": result},
        )
        return state is not None

    async def _complete_many(self, owner: str, results: dict[str, tuple[int, str]]) -> set[str]:
        parameters = self._completion_parameters(owner, results)
        return self._completed(await self._call(self._execute(_COMPLETE_MANY, parameters)))

    async def _fail(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        error: RunError,
        retry: bool,
        retry_delay: float | None,
    ) -> RunState | None:
        # Every expression in an UPDATE sees the row as it was, so the CASEs agree.
        retried = "(%(retry)s AND retries_left > 0)"
        return await self._update_held(
            owner,
            run_id,
            attempt,
            f"state = CASE WHEN {retried} THEN 'SCHEDULED' ELSE 'FAILED' END,"
            f" scheduled_at = CASE WHEN {retried}"
            " THEN %(now)s + coalesce(%(delay)s::double precision, retry_delay)"
            " ELSE scheduled_at END,"
            f" retries_left = CASE WHEN {retried} THEN retries_left - 1 ELSE retries_left END,"
            f" started_at = CASE WHEN {retried} THEN NULL ELSE started_at END,"
            f" finished_at = CASE WHEN {retried} THEN NULL ELSE %(now)s END,"
            " lease_owner = NULL, lease_expires_at = NULL, error = %(error)s",
            {"retry": retry, "delay": retry_delay, "error": error.to_json()},
        )

    async def _release(self, owner: str, run_id: str, attempt: int) -> bool:
        state = await self._update_held(
            owner,
            run_id,
            attempt,
            "state = 'SCHEDULED', attempts = greatest(attempts - 1, 0), started_at = NULL,"
            " lease_owner = NULL, lease_expires_at = NULL",
            {},
        )
        return state is not None

    async def _cancel(self, run_id: str) -> bool:
        rows = await self._call(
            self._execute(
                "WITH cancelled AS (UPDATE {runs} SET state = 'CANCELLED', finished_at = %(now)s"
                " WHERE id = %(id)s AND state = 'SCHEDULED' RETURNING id)"
                " SELECT pg_notify(%(channel)s, 'f ' || id) FROM cancelled",
                {"now": self._clock(), "id": run_id, "channel": self._channel},
            )
        )
        if rows:
            self._wakeups.run_finished(run_id)
        return bool(rows)

    async def _get(self, run_id: str) -> RunRecord | None:
        # What ``run.result()`` reads first, while the run is on its way to a worker: not
        # through a thread, whose hand-offs would take the CPU from that way meanwhile.
        rows = await self._quick(
            f"SELECT {', '.join(_COLUMNS)} FROM {{runs}} WHERE id = %(id)s::text",
            {"id": run_id},
            reads=True,
        )
        return _record(rows[0]) if rows else None

    async def _purge(self, before: float, limit: int) -> int:
        # Housekeeping is one process's job at a time: the one that gets the advisory lock
        # (held for this statement's transaction) deletes; the others delete nothing.
        # With the runs go their ticks and keys, where the cluster's tables were made.
        cluster = PURGE_CLUSTER if await self._cluster_made() else ""
        rows = await self._call(
            self._execute(
                "WITH housekeeper AS"
                " (SELECT pg_try_advisory_xact_lock(hashtext(%(lock)s)) AS held),"
                " doomed AS (SELECT seq FROM {runs} WHERE finished_at < %(before)s"
                " AND state = ANY(%(finished)s) AND (SELECT held FROM housekeeper)"
                " ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED),"
                " gone AS (DELETE FROM {runs} r USING doomed WHERE r.seq = doomed.seq"
                f" RETURNING r.id){cluster}"
                " SELECT count(*) FROM gone",
                {
                    "lock": f"anyservice:{self._schema}:housekeeping",
                    "before": before,
                    "finished": sorted(state.value for state in FINISHED_STATES),
                    "limit": limit,
                },
            )
        )
        deleted: int = rows[0][0]
        return deleted

    async def _counts(self) -> dict[RunState, int]:
        # Rows with an unknown state count as FAILED, as they read.
        rows = await self._call(
            self._execute("SELECT state, count(*) FROM {runs} GROUP BY state", {})
        )
        counts = dict.fromkeys(RunState, 0)
        for state, number in rows:
            try:
                counts[RunState(state)] += number
            except ValueError:
                counts[RunState.FAILED] += number
        return counts
