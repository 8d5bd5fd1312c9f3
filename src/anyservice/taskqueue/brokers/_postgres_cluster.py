"""The PostgreSQL broker's cluster storage: ticks, leases, run keys and cancel requests.

Five tables beside the runs, in the broker's schema, created on first use (``CREATE TABLE
IF NOT EXISTS``, under the advisory lock the broker's own tables are made under): a
database made by an older anyservice gains them without a new schema version, and one that
never uses schedules, singletons, keys or cancels never has them. Why each step is safe
with any number of processes:

* A tick is guarded by its primary key (schedule, due): ``INSERT ... ON CONFLICT DO
  NOTHING``, chained in the same statement to the insert of its run, which happens only if
  the tick row went in naming the run, and to the update of the schedule's counts. A
  second process storing the same tick waits for the first one's commit and stores
  nothing.
* A lease is one upsert whose ``DO UPDATE`` applies only for its holder or once the lease
  expired. ``ON CONFLICT`` locks the row, so two takers take turns and the second sees the
  first's lease.
* A key= submission holds a transaction-scoped advisory lock on the key: submitters of one
  key take turns, each reading the run under the key with the previous one's commit seen.
* A cancel of a RUNNING run locks the run's row, then stores the request and notifies
  (``k <id>``, on commit); the run's worker looks the request up as the notification
  arrives, and reads the requests of the runs it holds at every heartbeat too.

Times come from the broker's clock, as in the broker's other statements; each statement
that makes work or finishes a run sends its ``pg_notify`` in its own transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg import sql

from .._controls import RETRYABLE_STATES
from .._leases import Lease, TickCounts, TickResult
from .._records import RunRecord, RunState

if TYPE_CHECKING:
    import psycopg

__all__ = ["PURGE_CLUSTER", "PostgresClusterStorage", "cluster_tables"]

T = TypeVar("T")

_TABLES = (
    # run_id is NULL for a tick skipped because the schedule's previous run was RUNNING.
    """
    CREATE TABLE IF NOT EXISTS {ticks} (
        schedule text NOT NULL,
        due double precision NOT NULL,
        run_id text,
        PRIMARY KEY (schedule, due)
    )
    """,
    # overlap=False looks for a RUNNING run among a schedule's ticks: from the few RUNNING
    # runs to their ticks, not through every tick the schedule ever had.
    "CREATE INDEX IF NOT EXISTS anyservice_ticks_runs ON {ticks} (run_id)",
    # Each schedule's counts, kept by the statement that stores a tick: every worker reads
    # them before each tick, and counting the ticks would cost more as they pile up.
    """
    CREATE TABLE IF NOT EXISTS {schedules} (
        schedule text PRIMARY KEY,
        runs bigint NOT NULL,
        skipped bigint NOT NULL,
        latest double precision NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {leases} (
        name text PRIMARY KEY,
        holder text NOT NULL,
        expires_at double precision NOT NULL
    )
    """,
    # The run last submitted under each key= (its dedup lasts while it is unfinished).
    "CREATE TABLE IF NOT EXISTS {keys} (key text PRIMARY KEY, run_id text NOT NULL)",
    # A purge deletes the keys of the runs it deletes.
    "CREATE INDEX IF NOT EXISTS anyservice_keys_runs ON {keys} (run_id)",
    # RUNNING runs whose cancellation was asked for; their worker looks at each heartbeat.
    "CREATE TABLE IF NOT EXISTS {cancels} (run_id text PRIMARY KEY)",
)

_TICK = """
WITH busy AS (
    SELECT NOT %(overlap)s AND EXISTS (
        SELECT 1 FROM {ticks} t JOIN {runs} r ON r.id = t.run_id
        WHERE t.schedule = %(schedule)s AND r.state = 'RUNNING'
    ) AS busy
), tick AS (
    INSERT INTO {ticks} (schedule, due, run_id)
    SELECT %(schedule)s, %(due)s, CASE WHEN busy THEN NULL ELSE %(run_id)s::text END FROM busy
    ON CONFLICT DO NOTHING
    RETURNING run_id
), inserted AS (
    {insert} WHERE EXISTS (SELECT 1 FROM tick WHERE run_id IS NOT NULL)
    RETURNING 1
), counted AS (
    INSERT INTO {schedules} AS s (schedule, runs, skipped, latest)
    SELECT %(schedule)s, (run_id IS NOT NULL)::int, (run_id IS NULL)::int, %(due)s FROM tick
    ON CONFLICT (schedule) DO UPDATE SET runs = s.runs + excluded.runs,
        skipped = s.skipped + excluded.skipped, latest = greatest(s.latest, excluded.latest)
)
SELECT
    (SELECT count(*) FROM tick),
    (SELECT count(*) FROM inserted CROSS JOIN LATERAL pg_notify(%(channel)s, 'w') AS n)
"""

_ACQUIRE = """
INSERT INTO {leases} AS l (name, holder, expires_at) VALUES (%(name)s, %(holder)s, %(expires)s)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE l.holder = excluded.holder OR l.expires_at <= %(now)s
RETURNING l.holder, l.expires_at
"""

_REQUEUE = """
WITH requeued AS (
    UPDATE {runs} r SET state = 'SCHEDULED', attempts = 0, retries_left = %(retries)s,
        scheduled_at = %(now)s, started_at = NULL, finished_at = NULL, lease_owner = NULL,
        lease_expires_at = NULL, result = NULL
    WHERE r.id = %(id)s AND r.state = ANY(%(retryable)s)
    RETURNING {returning}
), forgotten AS (
    DELETE FROM {cancels} WHERE run_id IN (SELECT id FROM requeued)
)
SELECT requeued.* FROM requeued CROSS JOIN LATERAL pg_notify(%(channel)s, 'w') AS n
"""


_PLACEHOLDERS = ("ticks", "schedules", "leases", "keys", "cancels")
_NAMES = tuple(f"anyservice_{name}" for name in _PLACEHOLDERS)
_INDEXES = ("anyservice_ticks_runs", "anyservice_keys_runs")

#: What a purge deletes with the runs it deletes (the ``gone`` rows of its statement, and
#: its ``housekeeper`` lock): their ticks and keys, and skipped ticks due before the cutoff,
#: up to the batch size. Each schedule keeps its latest tick, which the next one is planned
#: from, and its counts (in {schedules}).
PURGE_CLUSTER = """
, ticks_gone AS (
    DELETE FROM {ticks} t USING gone WHERE t.run_id = gone.id
    AND t.due < (SELECT s.latest FROM {schedules} s WHERE s.schedule = t.schedule)
), skipped_gone AS (
    DELETE FROM {ticks} t WHERE t.ctid IN (
        SELECT k.ctid FROM {ticks} k WHERE k.run_id IS NULL AND k.due < %(before)s
        AND (SELECT held FROM housekeeper)
        AND k.due < (SELECT s.latest FROM {schedules} s WHERE s.schedule = k.schedule)
        LIMIT %(limit)s
    )
), keys_gone AS (
    DELETE FROM {keys} k USING gone WHERE k.run_id = gone.id
)
"""


def cluster_tables(schema: str) -> dict[str, sql.Composed]:
    """The cluster tables' names in ``schema``, by their placeholders in statements."""
    return {
        placeholder: sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        for placeholder, name in zip(_PLACEHOLDERS, _NAMES, strict=True)
    }


class PostgresClusterStorage:
    """Ticks, leases, keys and cancel requests for :class:`PostgresBroker`.

    See ``brokers/_cluster.py`` for what each method promises.
    """

    _cluster_ready = False

    if TYPE_CHECKING:
        # Given by PostgresBroker and the classes it is made of.
        _clock: Callable[[], float]
        _schema: str
        _channel: str
        #: Every column of a run, of the table aliased ``r``, and the reader of such rows.
        _run_columns: str
        #: The one insert of new runs, and its parameters.
        _insert_runs: str

        @staticmethod
        def _insert_parameters(runs: Sequence[RunRecord]) -> dict[str, list[Any]]: ...

        @staticmethod
        def _read_run(row: Sequence[Any]) -> RunRecord: ...

        def _compose(self, query: str) -> sql.Composed: ...

        def _execute(
            self, query: str, parameters: dict[str, Any]
        ) -> Callable[[psycopg.Connection[Any]], list[tuple[Any, ...]]]: ...

        async def _call(self, operation: Callable[[psycopg.Connection[Any]], T]) -> T: ...

        async def _update_held(
            self,
            owner: str,
            run_id: str,
            attempt: int,
            assignments: str,
            parameters: dict[str, Any],
        ) -> RunState | None: ...

    @property
    def _select_runs(self) -> str:
        return f"SELECT {self._run_columns} FROM {{runs}} r"

    async def _cluster_call(self, operation: Callable[[psycopg.Connection[Any]], T]) -> T:
        if not self._cluster_ready:
            await self._call(self._create_tables)
            self._cluster_ready = True
        return await self._call(operation)

    def _create_tables(self, conn: psycopg.Connection[Any]) -> None:
        # Made already: CREATE ... IF NOT EXISTS would still need the CREATE privilege, which
        # the workers' database user may only have had the first time.
        (found,) = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = ANY(%s)",
            (self._schema, [*_NAMES, *_INDEXES]),
        ).fetchone() or (0,)
        if found == len(_NAMES) + len(_INDEXES):
            return
        with conn.transaction():
            # Concurrent CREATE ... IF NOT EXISTS of one table can still collide: take turns.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"anyservice:{self._schema}",)
            )
            for statement in _TABLES:
                conn.execute(self._compose(statement))

    async def _cluster_made(self) -> bool:
        """Whether the cluster tables exist (they are made on first use of the cluster)."""
        if not self._cluster_ready:
            rows = await self._call(
                self._execute(
                    "SELECT to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))"
                    " IS NOT NULL",
                    {"schema": self._schema, "table": "anyservice_schedules"},
                )
            )
            if not rows[0][0]:
                return False
        return True

    async def _cluster_rows(self, query: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        return await self._cluster_call(self._execute(query, parameters))

    async def _insert_tick(
        self, schedule: str, due: float, run: RunRecord, overlap: bool
    ) -> TickResult:
        ((ticks, runs),) = await self._cluster_rows(
            _TICK.replace("{insert}", self._insert_runs),
            {
                **self._insert_parameters([run]),
                "schedule": schedule,
                "due": due,
                "run_id": run.id,
                "overlap": overlap,
                "channel": self._channel,
            },
        )
        if ticks == 0:
            return TickResult.TAKEN
        return TickResult.STORED if runs else TickResult.SKIPPED

    async def _tick_counts(self, schedule: str) -> TickCounts:
        rows = await self._cluster_rows(
            "SELECT runs, skipped, latest FROM {schedules} WHERE schedule = %(schedule)s",
            {"schedule": schedule},
        )
        if not rows:
            return TickCounts()
        ((runs, skipped, latest),) = rows
        return TickCounts(runs=runs, skipped=skipped, latest=latest)

    async def _acquire_lease(self, name: str, holder: str, lease_seconds: float) -> Lease | None:
        now = self._clock()
        rows = await self._cluster_rows(
            _ACQUIRE,
            {"name": name, "holder": holder, "now": now, "expires": now + lease_seconds},
        )
        return Lease(name, *rows[0]) if rows else None

    async def _release_lease(self, name: str, holder: str) -> bool:
        rows = await self._cluster_rows(
            "DELETE FROM {leases} WHERE name = %(name)s AND holder = %(holder)s RETURNING 1",
            {"name": name, "holder": holder},
        )
        return bool(rows)

    async def _get_lease(self, name: str) -> Lease | None:
        rows = await self._cluster_rows(
            "SELECT holder, expires_at FROM {leases} WHERE name = %(name)s", {"name": name}
        )
        return Lease(name, *rows[0]) if rows else None

    async def _insert_keyed(self, key: str, run: RunRecord) -> RunRecord:
        keyed_run = self._compose(
            f"{self._select_runs} JOIN {{keys}} k ON k.run_id = r.id WHERE k.key = %(key)s"
        )
        store = self._compose(
            f"WITH inserted AS ({self._insert_runs} RETURNING 1),"
            " keyed AS (INSERT INTO {keys} (key, run_id) VALUES (%(key)s, %(run_id)s)"
            " ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id)"
            " SELECT pg_notify(%(channel)s, 'w')"
        )
        parameters = {
            **self._insert_parameters([run]),
            "key": key,
            "run_id": run.id,
            "channel": self._channel,
        }

        def insert(conn: psycopg.Connection[Any]) -> RunRecord:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"anyservice:{self._schema}:key:{key}",),
                )
                row = conn.execute(keyed_run, {"key": key}).fetchone()
                existing = None if row is None else self._read_run(row)
                if existing is not None and not existing.finished:
                    return existing
                conn.execute(store, parameters)
                return run

        return await self._cluster_call(insert)

    async def _list_runs(
        self, state: RunState | None, task: str | None, since: float | None, limit: int
    ) -> list[RunRecord]:
        # Only the filters given, so each combination gets a plan of its own.
        filters = {"state": None if state is None else state.value, "task": task, "since": since}
        where = [
            "r.created_at >= %(since)s" if name == "since" else f"r.{name} = %({name})s"
            for name, value in filters.items()
            if value is not None
        ]
        rows = await self._cluster_rows(
            self._select_runs
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY r.created_at DESC, r.seq DESC LIMIT %(limit)s",
            {**filters, "limit": limit},
        )
        return [self._read_run(row) for row in rows]

    async def _requeue(self, run_id: str, retries: int) -> RunRecord | None:
        rows = await self._cluster_rows(
            _REQUEUE.replace("{returning}", self._run_columns),
            {
                "id": run_id,
                "retries": retries,
                "now": self._clock(),
                "retryable": sorted(state.value for state in RETRYABLE_STATES),
                "channel": self._channel,
            },
        )
        return self._read_run(rows[0]) if rows else None

    async def _request_cancel(self, run_id: str) -> RunState | None:
        lock = self._compose("SELECT state FROM {runs} WHERE id = %(id)s FOR UPDATE")
        cancel = self._compose(
            "WITH cancelled AS (UPDATE {runs} SET state = 'CANCELLED', finished_at = %(now)s"
            " WHERE id = %(id)s RETURNING id)"
            " SELECT pg_notify(%(channel)s, 'f ' || id) FROM cancelled"
        )
        # Its worker, wherever it is, hears of it at once (LISTEN), or at its heartbeat.
        ask = self._compose(
            "WITH asked AS (INSERT INTO {cancels} (run_id) VALUES (%(id)s) ON CONFLICT DO NOTHING)"
            " SELECT pg_notify(%(channel)s, 'k ' || %(id)s::text)"
        )
        parameters = {"id": run_id, "now": self._clock(), "channel": self._channel}

        def request(conn: psycopg.Connection[Any]) -> RunState | None:
            # The row stays locked to the commit: a claim or a finish waits, so the state
            # read is the one acted on.
            with conn.transaction():
                row = conn.execute(lock, parameters).fetchone()
                if row is None:
                    return None
                if row[0] == RunState.SCHEDULED.value:
                    conn.execute(cancel, parameters)
                    return RunState.CANCELLED
                if row[0] == RunState.RUNNING.value:
                    conn.execute(ask, parameters)
                    return RunState.RUNNING
                return None

        # The waiters for the run, here too, hear of its end through the LISTEN connection.
        return await self._cluster_call(request)

    async def _cancel_requests(self, owner: str, run_ids: list[str]) -> set[str]:
        rows = await self._cluster_rows(
            "SELECT r.id FROM {runs} r JOIN {cancels} c ON c.run_id = r.id"
            " WHERE r.lease_owner = %(owner)s AND r.id = ANY(%(ids)s)",
            {"owner": owner, "ids": run_ids},
        )
        return {run_id for (run_id,) in rows}

    async def _end_cancelled(self, owner: str, run_id: str, attempt: int) -> bool:
        # Fenced like every end of a run: only the claim that holds the run ends it.
        state = await self._update_held(
            owner,
            run_id,
            attempt,
            "state = 'CANCELLED', finished_at = %(now)s, lease_owner = NULL,"
            " lease_expires_at = NULL",
            {},
        )
        if state is None:
            return False
        await self._cluster_rows("DELETE FROM {cancels} WHERE run_id = %(id)s", {"id": run_id})
        return True
