"""Task runs on PostgreSQL: runs per second, submit-to-start across processes, recovery.

A PostgreSQL server is started for the benchmark from Debian's binaries (``initdb`` and
``pg_ctl``, as the tests do), on loopback, with the default durability: ``fsync`` and
``synchronous_commit`` on, so every commit waits for the WAL to reach the disk. Each sample
gets a fresh schema. Without the binaries the benchmark says so in one line and measures
nothing.

* Throughput: no-op runs through 1 and 4 worker processes (``serve(limit=100)``), beside a
  raw baseline in the same run: the broker's own claim statement and fenced completion,
  issued by bare psycopg loops (1 or 4 connections, one thread each), with no event loop,
  worker or serialisation around them. The ratio is the price of the library.
* Submit-to-start latency: ``delay()`` here, the task's first line in another process,
  woken by LISTEN/NOTIFY, beside an anyio memory stream (the event loop's own floor).
* Recovery after kill -9: two worker processes with the default 30 s lease, the one
  running a run is killed, and the figure is the time until the run completes on the
  other; on PostgreSQL and on SQLite.

Worker processes for the recovery are this file run as a script:
``python bench_postgres.py --worker URL BACKEND DIRECTORY``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from _harness import (
    Config,
    Metrics,
    SampleFunction,
    Side,
    Table,
    compare,
    fmt_count,
    fmt_time,
    median,
    now,
    require,
    run_once,
    verdict,
)
from bench_taskqueue import (
    STARTUP,
    Database,
    _all_completed,
    _kill,
    _library,
    _open_for_writing,
    anyio_backend,
    define_tasks,
    latency,
    pipeline_latency,
    sqlite_database,
    throughput_cells,
    worker_processes,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests._postgres import (  # noqa: E402 - the test helper lives beside the benchmarks
    MissingPostgres,
    find_binaries,
    postgres_schema,
    postgres_server,
)

NAME = "postgres"
TITLE = "PostgreSQL broker: runs per second, cross-process latency, recovery after kill -9"

THROUGHPUT_TARGET = 5_000.0  # runs/s through 4 worker processes
P50_TARGET, P99_TARGET = 2e-3, 10e-3
RECOVERY_TARGET = 3.0
LIMIT = 100
LEASE = 30.0
#: libpq's ``options``: the sessions of one row of the latency table commit without
#: waiting for the WAL flush, to show the notification path apart from the fsyncs.
NO_SYNC = "-c%20synchronous_commit%3Doff"


def runs_for(config: Config) -> int:
    return 1_000 if config.quick else 2_000


# --- throughput through worker processes ------------------------------------------------

#: Seconds from making the submitted runs due to their due time: room for every worker to
#: hear of it and sleep until then.
DUE_MARGIN = 1.0
#: A due time no worker reaches while the runs are being submitted.
FAR_AWAY = 3600.0


def _make_due(url: str, at: float) -> None:
    """Move every SCHEDULED run's due time to ``at``, telling the workers (one statement)."""
    import psycopg
    from psycopg import sql

    from anyservice.taskqueue.brokers import _postgres as pg

    options = pg.parse_url(url)
    table = sql.SQL("{}.anyservice_runs").format(sql.Identifier(options.schema))
    with psycopg.connect(options.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "WITH moved AS (UPDATE {} SET scheduled_at = %s WHERE state = 'SCHEDULED'"
                " RETURNING 1) SELECT pg_notify(%s, 'w') WHERE EXISTS (SELECT 1 FROM moved)"
            ).format(table),
            (at, f"anyservice:{options.schema}"),
        )


def throughput(
    config: Config, processes: int, database: Database, runs: int
) -> Callable[[], SampleFunction]:
    """No-op runs per second through ``processes`` ``serve()`` processes.

    The runs are submitted (one ``submit_many``) due an hour later, so that however long
    the submission takes on a loaded machine nothing starts before all are stored; then
    one statement makes them all due at ``t0`` a moment later and wakes the workers. The
    figure is runs / (time the last one was recorded COMPLETED - t0).
    """

    def build() -> SampleFunction:
        taskqueue = require(_library, config)

        async def sample() -> Metrics:
            with database() as url:
                queue, noop, _, _ = define_tasks(url)
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(queue)
                    await stack.enter_async_context(
                        worker_processes(url, anyio_backend(), LIMIT, processes)
                    )
                    await queue.broker.submit_many(
                        noop.name, [noop.encode((), {})] * runs, scheduled_at=time.time() + FAR_AWAY
                    )
                    due = time.time() + DUE_MARGIN
                    await anyio.to_thread.run_sync(_make_due, url, due)
                    await anyio.sleep(max(due - time.time(), 0))
                    finished = await _all_completed(queue, runs, taskqueue.RunState.COMPLETED)
            return {"runs/s": runs / (finished - due)}

        return sample

    return build


# --- the raw baseline: the broker's statements from bare psycopg loops ---------------------


def _raw_loop(url: str, owner: str, runs: int) -> None:
    """Claim up to ``LIMIT`` runs, then complete them and claim the next in one transaction
    (the worker's statements), until ``runs`` are COMPLETED."""
    import psycopg
    from psycopg import sql

    from anyservice.taskqueue.brokers import _postgres as pg

    options = pg.parse_url(url)
    table = sql.SQL("{}.anyservice_runs").format(sql.Identifier(options.schema))
    claim = sql.SQL(pg._CLAIM.replace("{returning}", pg._RETURNING)).format(runs=table)
    complete = sql.SQL(pg._COMPLETE_MANY).format(runs=table)
    left = sql.SQL("SELECT count(*) FROM {} WHERE state <> 'COMPLETED'").format(table)
    channel = f"anyservice:{options.schema}"
    with psycopg.connect(options.conninfo, autocommit=True) as conn:
        held: list[tuple[str, int]] = []
        while True:
            at = time.time()
            with conn.pipeline():
                if held:
                    conn.execute(
                        complete,
                        {
                            "ids": [run_id for run_id, _ in held],
                            "attempts": [attempt for _, attempt in held],
                            "results": ["null"] * len(held),
                            "now": at,
                            "owner": owner,
                            "channel": channel,
                        },
                        prepare=True,
                    )
                else:
                    conn.execute(pg._ASYNC_COMMIT, prepare=True)
                claimed = conn.execute(
                    claim,
                    {
                        "now": at,
                        "expires": at + LEASE,
                        "owner": owner,
                        "tasks": ["noop"],
                        "unlimited": ["noop"],
                        "limited": [],
                        "caps": [],
                        "limit": LIMIT,
                        "channel": channel,
                        "abandoned": "RunAbandonedError",
                        "message": pg._ABANDONED_MESSAGE,
                    },
                    prepare=True,
                )
            held = [(row[5], row[9]) for row in claimed.fetchall() if row[4] is not None]
            if not held:
                (remaining,) = conn.execute(left).fetchone() or (0,)
                if not remaining:
                    return


def raw_claims(database: Database, runs: int, connections: int) -> SampleFunction:
    """``runs`` runs claimed and completed by ``connections`` bare psycopg loops."""

    async def sample() -> Metrics:
        from anyservice.taskqueue.brokers._postgres import PostgresBroker

        with database() as url:
            async with PostgresBroker(url) as broker:  # makes the tables
                await broker.submit_many("noop", ['{"args":[],"kwargs":{}}'] * runs)
            started = now()
            async with anyio.create_task_group() as group:
                for index in range(connections):
                    loop = functools.partial(_raw_loop, url, f"raw-{index}", runs)
                    group.start_soon(anyio.to_thread.run_sync, loop)
            return {"runs/s": runs / (now() - started)}

    return sample


# --- recovery after kill -9 -----------------------------------------------------------------


def define_recovery_tasks(url: str, directory: Path) -> tuple[Any, Any]:
    import anyservice.taskqueue as taskqueue

    queue = taskqueue.TaskQueue(url)

    @queue.task
    async def hang_first() -> int:
        """Say which process has the run, and hang on the first attempt."""
        context = taskqueue.current_run()
        assert context is not None
        if context.attempt == 1:
            await anyio.Path(directory / f"{context.run_id}.pid").write_text(str(os.getpid()))
            await anyio.sleep_forever()
        return context.attempt

    return queue, hang_first


async def _start_worker(url: str, directory: Path, index: int) -> anyio.abc.Process:
    log = directory / f"worker-{index}.log"
    command = [sys.executable, __file__, "--worker", url, _backend(), str(directory)]
    with _open_for_writing(log) as output:
        process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
    with anyio.fail_after(STARTUP):
        while "] started" not in await anyio.Path(log).read_text():
            if process.returncode is not None:
                raise RuntimeError(f"worker exited:\n{await anyio.Path(log).read_text()}")
            await anyio.sleep(0.02)
    return process


def _backend() -> str:
    import sniffio

    return sniffio.current_async_library()


def recovery(config: Config, database: Database) -> Callable[[], SampleFunction]:
    """Seconds from SIGKILL of the worker running a run to that run COMPLETED elsewhere."""

    def build() -> SampleFunction:
        require(lambda: __import__("anyservice.taskqueue"), config)

        async def sample() -> Metrics:
            with database() as url, tempfile.TemporaryDirectory() as scratch:
                directory = Path(scratch)
                queue, hang_first = define_recovery_tasks(url, directory)
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(queue)
                    workers = [await _start_worker(url, directory, i) for i in range(2)]
                    for process in workers:
                        stack.push_async_callback(_kill, process)
                    run = await hang_first.delay()
                    marker = anyio.Path(directory / f"{run.id}.pid")
                    with anyio.fail_after(STARTUP):
                        while not (await marker.exists() and await marker.read_text()):  # noqa: ASYNC110 - another process writes it
                            await anyio.sleep(0.01)
                    pid = int(await marker.read_text())
                    (victim,) = [process for process in workers if process.pid == pid]
                    killed = time.time()
                    victim.send_signal(signal.SIGKILL)
                    await victim.wait()
                    assert await run.result(timeout=LEASE * 3) == 2
                    return {"recovery": time.time() - killed}

        return sample

    return build


# --- the report ----------------------------------------------------------------------------


def _latency_cells(subject: Side, baseline: Side) -> list[str]:
    base50, base99 = baseline.median("p50"), baseline.median("p99")
    target = f"p50 <= {fmt_time(P50_TARGET)}, p99 <= {fmt_time(P99_TARGET)}"
    if subject.problem is not None:
        return [subject.problem, "—", fmt_time(base50), fmt_time(base99), target, "—"]
    p50, p99 = subject.median("p50"), subject.median("p99")
    assert p50 is not None
    assert p99 is not None
    met = p50 <= P50_TARGET and p99 <= P99_TARGET
    return [fmt_time(p50), fmt_time(p99), fmt_time(base50), fmt_time(base99), target, verdict(met)]


def run(config: Config) -> list[Table]:
    try:
        binaries = find_binaries()
    except MissingPostgres as exc:
        print(f"postgres: skipped, no PostgreSQL server to start: {exc}", flush=True)
        return []
    runs = runs_for(config)
    repeats = config.repeats(full=5, quick=2)
    load_before = os.getloadavg()[0]
    rates = Table(
        f"No-op runs per second on PostgreSQL ({fmt_count(runs)} runs, fsync on) vs the "
        "broker's statements from bare psycopg loops",
        ["backend", "workers", "anyservice", "raw psycopg", "ratio", "target", "met?"],
    )
    latencies = Table(
        "Submit-to-start latency on PostgreSQL, worker in another process (LISTEN/NOTIFY)",
        [
            "backend",
            "synchronous_commit",
            "p50",
            "p99",
            "baseline p50",
            "baseline p99",
            "target",
            "met?",
        ],
    )
    recoveries = Table(
        "Recovery after kill -9: SIGKILL of the worker running a run, to that run completed "
        "by the other worker (default 30 s lease)",
        ["backend", "PostgreSQL", "SQLite", "target", "met?"],
    )
    with postgres_server(binaries, durable=True) as server:
        database: Database = functools.partial(postgres_schema, server)
        for backend in config.backends:
            for processes, target in ((1, None), (4, THROUGHPUT_TARGET)):
                subject, baseline = compare(
                    backend,
                    throughput(config, processes, database, runs),
                    raw_claims(database, runs, processes),
                    repeats=repeats,
                    timeout=300,
                )
                cells = throughput_cells(subject, baseline, target)
                label = "1 process" if processes == 1 else f"{processes} processes"
                rates.add_row(backend, label, *cells)
            for durability, options in (("on", {}), ("off", {"options": NO_SYNC})):
                subject, baseline = compare(
                    backend,
                    latency(config, False, functools.partial(postgres_schema, server, **options)),
                    pipeline_latency(100 if config.quick else 300),
                    repeats=repeats,
                )
                latencies.add_row(backend, durability, *_latency_cells(subject, baseline))
            pg = [
                run_once(backend, recovery(config, database)(), timeout=300)["recovery"]
                for _ in range(1 if config.quick else 3)
            ]
            sqlite_db: Callable[[], AbstractContextManager[str]] = sqlite_database
            lite = run_once(backend, recovery(config, sqlite_db)(), timeout=300)["recovery"]
            best = median(pg)
            recoveries.add_row(
                backend,
                fmt_time(best),
                fmt_time(lite),
                f"<= {fmt_time(RECOVERY_TARGET)}",
                verdict(max(best, lite) <= RECOVERY_TARGET),
            )
    rates.notes += [
        f"Load average (1 minute) at the start and at the end of the run: {load_before:.1f} "
        f"and {os.getloadavg()[0]:.1f}, on {os.cpu_count()} cores shared with other jobs.",
        f"Medians of {repeats} runs after one discarded warm-up pair, anyservice and "
        "baseline alternating, each sample on a fresh schema of one server started for the "
        "benchmark (PostgreSQL on loopback, `fsync=on`, `synchronous_commit=on`: the "
        "defaults, every commit waits for the WAL on disk).",
        f"anyservice: {fmt_count(runs)} runs of an `async def noop()` submitted (one "
        f"`submit_many`, due an hour later) while the `serve(limit={LIMIT})` worker processes "
        "wait, then made due at one moment t0 a second later by one UPDATE that notifies the "
        "workers; the figure is runs / (time every run is COMPLETED - t0), polled every 5 ms.",
        f"raw psycopg: the same runs, claimed with the broker's own claim statement (up to "
        f"{LIMIT} at once), then each batch completed with the broker's fenced "
        "`UPDATE ... FROM unnest(...)` and the next batch claimed in the same pipelined "
        "transaction (`broker.complete_and_claim`), by as many bare sync psycopg loops "
        "as there are worker processes, one connection and thread each: the statements' "
        "own cost, without event loop, worker, threads hops or JSON.",
        f"Target: >= {fmt_count(round(THROUGHPUT_TARGET))} runs/s with 4 worker processes.",
        "A worker's runners hand finished runs to a batch, stored by one `complete_many` "
        "statement (one commit, one WAL flush, one NOTIFY per 200 finished ids) while the "
        "next claim goes out; a claim is one pipelined round trip that commits without "
        "waiting for the WAL flush (a lost claim only makes its runs claimable again).",
    ]
    latencies.notes += [
        "One `serve()` process; `await stamp.delay()` here, the task returns `time.time()` "
        "as it starts. The worker is woken by the submit's NOTIFY on its LISTEN connection, "
        "which names the run: the worker claims it by id (a full claim goes out at least "
        "once a second as well), that claim sent by the task that read the notification, "
        "its answer read by the worker's next claim. The submit and that claim go out on "
        "each process's connection driven by its event loop (libpq's non-blocking "
        "interface), not through a worker thread; `run.result()` reads the run once its "
        "finish is notified; `profile_postgres_latency.py` traces the steps.",
        "synchronous_commit on (the default): the submit's commit waits for a WAL flush "
        "before the worker is notified (`pg_test_fsync` on this disk: fdatasync about "
        "0.3 ms); the claim's does not (the broker commits claims asynchronously, "
        "for that transaction only). off: every session of the benchmark's broker and "
        "worker set to `synchronous_commit=off` through the URL "
        "(`?options=-c synchronous_commit=off`), so the submit does not wait either.",
        "Baseline: a timestamp through an anyio memory object stream (one event loop).",
    ]
    recoveries.notes += [
        "Both brokers record their workers (host, pid, start time): the surviving worker "
        "sees, at its next claim (about once a second while idle), that the process named "
        "in the dead worker's row is gone, and ends its leases at once; without that, the "
        "run would wait out its 30 s lease.",
        f"PostgreSQL figure: median of {1 if config.quick else 3} samples; SQLite: one.",
    ]
    return [rates, latencies, recoveries]


# --- a worker process ------------------------------------------------------------------------


def worker_main(url: str, backend: str, directory: str) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    import anyservice.taskqueue as taskqueue

    _, hang_first = define_recovery_tasks(url, Path(directory))
    code: int = taskqueue.serve(hang_first, backend=backend)
    return code


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit("usage: bench_postgres.py --worker URL BACKEND DIRECTORY (run.py runs it)")
