"""Task runs on SQLite: submission and no-op runs per second, and how soon a run starts.

The baseline of every rate is a bare sqlite3 loop doing the same statements on the same
schema, in one thread, batched as well as they can be: what SQLite itself allows on this
machine. The latency baseline is a raw anyio memory object stream; the idle-CPU baseline
an idle event-loop process.

Worker processes are this file run as a script: ``python bench_taskqueue.py --worker URL
BACKEND LIMIT`` serves the benchmark's tasks with ``serve()``; ``--idle BACKEND`` is an
event loop that only sleeps.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from _harness import (
    Config,
    Metrics,
    SampleFunction,
    Side,
    Table,
    Unavailable,
    compare,
    fmt_count,
    fmt_ratio,
    fmt_time,
    now,
    percentile,
    ratio,
    require,
    verdict,
)

NAME = "taskqueue"
TITLE = "Task queue: no-op runs per second and submit-to-start latency, on SQLite"

THROUGHPUT_TARGET = 20_000.0  # no-op runs/s through one worker
SUBMIT_TARGET = 50_000.0  # runs/s submitted by delay_many()
LATENCY_TARGET = 1e-3  # p50 submit-to-start, worker in another process
LATENCY_P99_TARGET = 5e-3
SYNC_TARGET = 2.0  # time per sync run / time per async run
IDLE_CPU_TARGET = 1.0  # % of a core, a waiting worker process
#: How long the idle worker's CPU time is measured.
IDLE_SECONDS = 3.0
#: Process CPU times are read from Linux's /proc.
HAS_PROC = os.path.exists("/proc/self/stat")
#: Pause between two latency probes, so that each finds the worker idle.
PROBE_GAP = 0.002
#: Seconds from the start of the throughput runs' submission to their due time.
SUBMIT_MARGIN = 3.0
#: Time given to a process to start and import the library, on a slow machine.
STARTUP = 60.0
#: How often the throughput runs' end is looked for. Not part of the figure (see
#: _all_completed), and slow enough to cost an in-process worker nothing to speak of.
END_POLL = 0.02


def runs_for(config: Config) -> int:
    # At 20 000 runs/s, 1 000 runs were a 50 ms window, mostly the workers' start.
    return 5_000 if config.quick else 10_000


def probes_for(config: Config) -> int:
    return 100 if config.quick else 300


#: A fresh, empty broker for one sample: a context manager that gives its URL.
Database = Callable[[], AbstractContextManager[str]]


@contextmanager
def sqlite_database() -> Iterator[str]:
    """A fresh SQLite file in a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        yield f"sqlite:///{Path(directory) / 'runs.db'}"


# --- the anyservice side (imported lazily) -----------------------------------------------


@functools.cache
def _library() -> Any:
    import anyservice.taskqueue

    return anyservice.taskqueue


def define_tasks(url: str) -> tuple[Any, Any, Any, Any]:
    """The queue and the benchmark tasks, the same in the benchmark and its workers."""
    taskqueue = _library()
    queue = taskqueue.TaskQueue(url)

    @queue.task
    async def noop() -> None:
        return None

    @queue.task
    def sync_noop() -> None:
        return None

    @queue.task
    async def stamp() -> float:
        """When the run started, on the wall clock (comparable between processes)."""
        return time.time()

    return queue, noop, sync_noop, stamp


@asynccontextmanager
async def worker_processes(url: str, backend: str, limit: int, count: int) -> AsyncIterator[None]:
    """``count`` worker processes serving the benchmark tasks, ready on entry, killed on exit."""
    async with AsyncExitStack() as stack:
        logs: list[Path] = []
        processes: list[anyio.abc.Process] = []
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for index in range(count):
            log = directory / f"worker-{index}.log"
            logs.append(log)
            with _open_for_writing(log) as output:
                command = [sys.executable, __file__, "--worker", url, backend, str(limit)]
                process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
            stack.push_async_callback(_kill, process)
            processes.append(process)
        with anyio.fail_after(STARTUP):
            for process, log in zip(processes, logs, strict=True):
                while "] started" not in await anyio.Path(log).read_text():
                    if process.returncode is not None:
                        raise RuntimeError(f"worker exited:\n{await anyio.Path(log).read_text()}")
                    await anyio.sleep(0.02)
        yield


def _open_for_writing(path: Path) -> Any:
    return open(path, "wb")


async def _kill(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        process.kill()
    with anyio.move_on_after(10, shield=True):
        await process.wait()
    await process.aclose()


def throughput(
    config: Config,
    processes: int,
    limit: int,
    database: Database = sqlite_database,
    *,
    runs: int | None = None,
    sync: bool = False,
) -> Callable[[], SampleFunction]:
    """No-op runs per second through one in-process worker, or ``processes`` processes.

    The runs are submitted first (one ``submit_many``), all due at one moment ``t0`` a
    little later, while the workers wait; the figure is runs / (the latest ``finished_at``
    of the runs, stamped by the broker in the transaction that completed it - t0).
    """

    def build() -> SampleFunction:
        taskqueue = require(_library, config)
        count = runs_for(config) if runs is None else runs

        async def sample() -> Metrics:
            with database() as url:
                queue, noop, sync_noop, _ = define_tasks(url)
                task = sync_noop if sync else noop
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(queue)
                    if processes:
                        await stack.enter_async_context(
                            worker_processes(url, anyio_backend(), limit, processes)
                        )
                    else:
                        await stack.enter_async_context(taskqueue.TaskWorker(task, limit=limit))
                    # Room for the submission on a loaded machine: it must end before t0.
                    due = time.time() + SUBMIT_MARGIN
                    submitted = await queue.broker.submit_many(
                        task.name, [task.encode((), {})] * count, scheduled_at=due
                    )
                    if time.time() >= due:
                        raise RuntimeError("submitting took longer than planned; runs started")
                    await anyio.sleep(due - time.time())
                    finished = await _all_completed(
                        queue, count, taskqueue.RunState.COMPLETED, last=submitted[-1].id
                    )
            return {"runs/s": count / (finished - due)}

        return sample

    return build


def submission(config: Config, concurrent: bool) -> Callable[[], SampleFunction]:
    """Runs submitted per second: one ``delay_many()``, or concurrent ``delay()`` calls."""

    def build() -> SampleFunction:
        require(_library, config)
        runs = runs_for(config)

        async def sample() -> Metrics:
            with tempfile.TemporaryDirectory() as directory:
                queue, noop, _, _ = define_tasks(f"sqlite:///{Path(directory) / 'runs.db'}")
                async with queue:
                    started = now()
                    if concurrent:
                        async with anyio.create_task_group() as group:
                            for _ in range(runs):
                                group.start_soon(noop.delay)
                    else:
                        await noop.delay_many([()] * runs)
                    elapsed = now() - started
            return {"runs/s": runs / elapsed}

        return sample

    return build


async def _all_completed(queue: Any, runs: int, completed: Any, last: str | None = None) -> float:
    """The wall-clock time the last of the queue's ``runs`` runs was completed.

    That is the latest ``finished_at`` of the runs, which the broker stamps in the
    transaction that completes each, so how often the end is looked for (every
    ``END_POLL``) is not part of the figure. The looking costs the worker next to
    nothing: a read of the run ``last`` (submitted last, so claimed last) until it is
    finished, then of the counts until every run is COMPLETED; the counts read the whole
    table, which polled every few milliseconds in the worker's event loop had slowed it.
    """
    with anyio.fail_after(120):
        while last is not None:
            run = await queue.broker.get(last)
            if run is not None and run.finished:
                break
            await anyio.sleep(END_POLL)
        while (await queue.counts())[completed] < runs:  # noqa: ASYNC110 - rows, no event
            await anyio.sleep(END_POLL)
    records = await queue.broker.list_runs(state=completed, limit=runs)
    return float(max(record.finished_at for record in records))


def anyio_backend() -> str:
    import sniffio

    return sniffio.current_async_library()


def latency(
    config: Config, in_process: bool, database: Database = sqlite_database
) -> Callable[[], SampleFunction]:
    """Submit-to-start latency: ``await stamp.delay()`` to the task's first line, one at a time.

    The task returns ``time.time()`` as it starts; the latency is that minus the time just
    before ``delay()``. Wall-clock times, so the worker may be another process.
    """

    def build() -> SampleFunction:
        taskqueue = require(_library, config)
        probes = probes_for(config)

        async def sample() -> Metrics:
            with database() as url:
                queue, _, _, stamp = define_tasks(url)
                delays: list[float] = []
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(queue)
                    if in_process:
                        await stack.enter_async_context(taskqueue.TaskWorker(stamp))
                    else:
                        await stack.enter_async_context(
                            worker_processes(url, anyio_backend(), 10, 1)
                        )
                    for _ in range(probes):
                        submitted = time.time()
                        run = await stamp.delay()
                        started = await run.result(timeout=30)
                        delays.append(started - submitted)
                        await anyio.sleep(PROBE_GAP)
            return {"p50": percentile(delays, 50), "p99": percentile(delays, 99)}

        return sample

    return build


# --- idle CPU ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def _idle_cpu_of(command: list[str]) -> float:
    """% of a core the process uses over ``IDLE_SECONDS``, once it has settled."""
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "process.log"
        with _open_for_writing(log) as output:
            process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            with anyio.fail_after(STARTUP):
                while "] started" not in await anyio.Path(log).read_text():
                    if process.returncode is not None:
                        raise RuntimeError(f"exited:\n{await anyio.Path(log).read_text()}")
                    await anyio.sleep(0.02)
            await anyio.sleep(1.0)  # let start-up work (imports, first claims) finish
            before = _cpu_seconds(process.pid)
            await anyio.sleep(IDLE_SECONDS)
            used = _cpu_seconds(process.pid) - before
        finally:
            await _kill(process)
    return 100 * used / IDLE_SECONDS


def idle_cpu(config: Config) -> Callable[[], SampleFunction]:
    """CPU of one ``serve()`` process waiting for work on an empty SQLite file."""

    def build() -> SampleFunction:
        require(_library, config)
        if not HAS_PROC:
            raise Unavailable("needs Linux /proc")

        async def sample() -> Metrics:
            with tempfile.TemporaryDirectory() as directory:
                url = f"sqlite:///{Path(directory) / 'runs.db'}"
                command = [sys.executable, __file__, "--worker", url, anyio_backend(), "10"]
                return {"cpu%": await _idle_cpu_of(command)}

        return sample

    return build


async def idle_event_loop_cpu() -> Metrics:
    """Baseline: a process of the same backend that only sleeps in its event loop."""
    if not HAS_PROC:
        return {"cpu%": math.nan}
    return {"cpu%": await _idle_cpu_of([sys.executable, __file__, "--idle", anyio_backend()])}


def idle_main(backend: str) -> int:
    async def sleep() -> None:
        print("] started", flush=True)
        await anyio.sleep_forever()

    anyio.run(sleep, backend=backend)
    return 0


# --- the baselines: bare sqlite3 and raw anyio -----------------------------------------------

_SCHEMA = (
    "CREATE TABLE runs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, task TEXT NOT NULL,"
    " payload TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,"
    " max_attempts INTEGER NOT NULL, retries_left INTEGER NOT NULL, retry_delay REAL NOT NULL,"
    " timeout REAL, created_at REAL NOT NULL, scheduled_at REAL NOT NULL, started_at REAL,"
    " finished_at REAL, lease_owner TEXT, lease_expires_at REAL, result TEXT, error TEXT)",
    "CREATE INDEX runs_due ON runs (state, scheduled_at)",
    "CREATE INDEX runs_leases ON runs (state, lease_expires_at)",
)
_INSERT = (
    "INSERT INTO runs (id, task, payload, state, attempts, max_attempts, retries_left,"
    " retry_delay, timeout, created_at, scheduled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _bare_database(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for statement in _SCHEMA:
        conn.execute(statement)
    return conn


def _bare_insert(conn: sqlite3.Connection, runs: int) -> None:
    stamp = time.time()
    payload = '{"args":[],"kwargs":{}}'
    rows = [
        (uuid.uuid4().hex, "noop", payload, "SCHEDULED", 0, 5, 0, 0.0, None, stamp, stamp)
        for _ in range(runs)
    ]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(_INSERT, rows)
    conn.execute("COMMIT")


def _bare_claim_complete(conn: sqlite3.Connection, runs: int, limit: int) -> None:
    """Claim ``limit`` due runs in one transaction, complete them in another, until done."""
    done = 0
    while done < runs:
        stamp = time.time()
        conn.execute("BEGIN IMMEDIATE")
        claimed = conn.execute(
            "SELECT seq, id, attempts FROM runs WHERE state = 'SCHEDULED' AND scheduled_at <= ?"
            " ORDER BY scheduled_at, seq LIMIT ?",
            (stamp, limit),
        ).fetchall()
        conn.executemany(
            "UPDATE runs SET state = 'RUNNING', attempts = ?, started_at = ?, lease_owner = ?,"
            " lease_expires_at = ? WHERE seq = ?",
            [(attempts + 1, stamp, "me", stamp + 30, seq) for seq, _, attempts in claimed],
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE runs SET state = 'COMPLETED', finished_at = ?, lease_owner = NULL,"
            " lease_expires_at = NULL, result = 'null'"
            " WHERE id = ? AND state = 'RUNNING' AND lease_owner = ?",
            [(stamp, run_id, "me") for _, run_id, _ in claimed],
        )
        conn.execute("COMMIT")
        done += len(claimed)


def _bare_rate(
    runs: int,
    prepare: Callable[[sqlite3.Connection], None],
    timed: Callable[[sqlite3.Connection], None],
) -> Metrics:
    """Runs per second of ``timed`` on a fresh file, after ``prepare`` (not timed)."""
    with tempfile.TemporaryDirectory() as directory:
        conn = _bare_database(Path(directory) / "runs.db")
        try:
            prepare(conn)
            started = now()
            timed(conn)
            elapsed = now() - started
        finally:
            conn.close()
    return {"runs/s": runs / elapsed}


def bare_throughput(runs: int, limit: int) -> SampleFunction:
    """The claim and complete statements in a plain sqlite3 loop, ``limit`` runs a batch."""

    async def sample() -> Metrics:
        return _bare_rate(
            runs,
            functools.partial(_bare_insert, runs=runs),
            functools.partial(_bare_claim_complete, runs=runs, limit=limit),
        )

    return sample


def bare_submission(runs: int) -> SampleFunction:
    """The same INSERTs in a plain sqlite3 ``executemany``, one transaction."""

    async def sample() -> Metrics:
        return _bare_rate(runs, lambda conn: None, functools.partial(_bare_insert, runs=runs))

    return sample


def pipeline_latency(probes: int) -> SampleFunction:
    """Send a timestamp into a memory object stream; the consumer notes when it got it."""

    async def sample() -> Metrics:
        send, receive = anyio.create_memory_object_stream[float]()
        delays: list[float] = []
        got = anyio.Event()

        async def consume() -> None:
            nonlocal got
            async for sent in receive:
                delays.append(now() - sent)
                got.set()

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            for _ in range(probes):
                got = anyio.Event()
                await send.send(now())
                await got.wait()
                await anyio.sleep(PROBE_GAP)
            send.close()
        receive.close()
        return {"p50": percentile(delays, 50), "p99": percentile(delays, 99)}

    return sample


# --- the report ----------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{fmt_count(round(value))} runs/s"


def throughput_cells(subject: Side, baseline: Side, target: float | None) -> list[str]:
    base = baseline.median("runs/s")
    target_cell = f">= {fmt_count(round(target))} runs/s" if target is not None else "—"
    if subject.problem is not None:
        return [subject.problem, _rate(base), "—", target_cell, "—"]
    value = subject.median("runs/s")
    assert value is not None
    assert base is not None
    met = value >= target if target is not None else None
    # Time per run, anyservice / baseline, as in the other tables (lower is better).
    return [_rate(value), _rate(base), fmt_ratio(ratio(base, value)), target_cell, verdict(met)]


def latency_cells(subject: Side, baseline: Side, targets: bool) -> list[str]:
    base50, base99 = baseline.median("p50"), baseline.median("p99")
    target_cell = (
        f"p50 <= {fmt_time(LATENCY_TARGET)}, p99 <= {fmt_time(LATENCY_P99_TARGET)}"
        if targets
        else "—"
    )
    if subject.problem is not None:
        return [subject.problem, "—", fmt_time(base50), fmt_time(base99), target_cell, "—"]
    p50, p99 = subject.median("p50"), subject.median("p99")
    assert p50 is not None
    assert p99 is not None
    met = p50 <= LATENCY_TARGET and p99 <= LATENCY_P99_TARGET if targets else None
    return [
        fmt_time(p50),
        fmt_time(p99),
        fmt_time(base50),
        fmt_time(base99),
        target_cell,
        verdict(met),
    ]


def _cpu(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f} %"


def idle_cells(subject: Side, baseline: Side) -> list[str]:
    base = baseline.median("cpu%")
    target_cell = f"<= {IDLE_CPU_TARGET:g} %"
    if subject.problem is not None:
        return [subject.problem, _cpu(base), target_cell, "—"]
    value = subject.median("cpu%")
    assert value is not None
    return [_cpu(value), _cpu(base), target_cell, verdict(value <= IDLE_CPU_TARGET)]


def sync_cells(sync: Side, asynchronous: Side) -> list[str]:
    target_cell = f"<= {SYNC_TARGET:g}x"
    base = asynchronous.median("runs/s")
    if sync.problem is not None or asynchronous.problem is not None or base is None:
        return [sync.problem or asynchronous.problem or "—", "—", "—", target_cell, "—"]
    value = sync.median("runs/s")
    assert value is not None
    per_run = ratio(base, value)
    return [_rate(value), _rate(base), fmt_ratio(per_run), target_cell, verdict(per_run <= 2)]


def run(config: Config) -> list[Table]:
    runs, probes = runs_for(config), probes_for(config)
    repeats = config.repeats(full=5, quick=2)
    submits = Table(
        f"Runs submitted per second on SQLite ({fmt_count(runs)} runs) vs bare sqlite3 INSERTs",
        ["backend", "how", "anyservice", "baseline", "ratio", "target", "met?"],
    )
    rates = Table(
        f"No-op runs per second on SQLite ({fmt_count(runs)} runs) vs a bare sqlite3 loop",
        ["backend", "worker", "limit", "anyservice", "baseline", "ratio", "target", "met?"],
    )
    syncs = Table(
        "A sync task (worker thread) vs an async one: runs per second, one worker, limit 100",
        ["backend", "sync task", "async task", "ratio", "target", "met?"],
    )
    latencies = Table(
        "Submit-to-start latency on SQLite: `await task.delay()` to the task's first line",
        ["backend", "worker", "p50", "p99", "baseline p50", "baseline p99", "target", "met?"],
    )
    idles = Table(
        f"CPU of an idle worker process over {IDLE_SECONDS:g} s, vs an idle event loop",
        ["backend", "anyservice", "baseline", "target", "met?"],
    )
    setups = [
        ("in-process", 0, 10),
        ("in-process", 0, 100),
        ("1 process", 1, 10),
        ("1 process", 1, 100),
        ("2 processes", 2, 100),
    ]
    for backend in config.backends:
        for label, concurrent in (("delay_many()", False), ("concurrent delay()", True)):
            subject, baseline = compare(
                backend, submission(config, concurrent), bare_submission(runs), repeats=repeats
            )
            target = None if concurrent else SUBMIT_TARGET
            submits.add_row(backend, label, *throughput_cells(subject, baseline, target))
        for label, processes, limit in setups:
            subject, baseline = compare(
                backend,
                throughput(config, processes, limit),
                bare_throughput(runs, limit),
                repeats=repeats,
            )
            target = THROUGHPUT_TARGET if processes < 2 else None
            rates.add_row(backend, label, limit, *throughput_cells(subject, baseline, target))
        try:
            asynchronous_sample = throughput(config, 0, 100)()
        except Unavailable as exc:
            syncs.add_row(backend, f"skipped: {exc}", "—", "—", f"<= {SYNC_TARGET:g}x", "—")
        else:
            sync, asynchronous = compare(
                backend, throughput(config, 0, 100, sync=True), asynchronous_sample, repeats=repeats
            )
            syncs.add_row(backend, *sync_cells(sync, asynchronous))
        for label, in_process in (("in-process", True), ("another process", False)):
            subject, baseline = compare(
                backend, latency(config, in_process), pipeline_latency(probes), repeats=repeats
            )
            latencies.add_row(backend, label, *latency_cells(subject, baseline, not in_process))
        subject, baseline = compare(
            backend, idle_cpu(config), idle_event_loop_cpu, repeats=max(repeats // 2, 1)
        )
        idles.add_row(backend, *idle_cells(subject, baseline))

    submits.notes += [
        f"Medians of {repeats} runs after one discarded warm-up pair, each in a fresh "
        "`anyio.run`, anyservice and baseline alternating.",
        f"`delay_many()`: one call storing {fmt_count(runs)} runs of a no-argument task "
        "(arguments encoded and checked, one transaction). `concurrent delay()`: as many "
        "tasks each awaiting one `delay()`; the broker's connection thread commits whatever "
        "was queued during the previous commit in one transaction.",
        "Baseline: the same rows INSERTed by a plain sqlite3 `executemany` in one "
        "transaction, same schema, WAL, synchronous=NORMAL.",
        f"Target: >= {fmt_count(round(SUBMIT_TARGET))} runs/s with `delay_many()`. The ratio "
        "is the time per run, anyservice / baseline.",
    ]
    rates.notes += [
        f"anyservice: {fmt_count(runs)} runs of an `async def noop()` task are submitted "
        "(one `submit_many`) to a fresh SQLite file while the worker(s) wait, all due at one "
        "moment t0; the figure is runs / (the latest `finished_at` of the runs - t0), the "
        "time the broker stamped in the transaction that completed the last run, so the "
        f"end, looked for every {END_POLL * 1e3:g} ms by the benchmark (a read of the last "
        "run submitted, then of the counts), is not part of it. Each run is claimed under "
        "a lease (up to `limit` a claim), run, and its result committed before anyone is "
        "told (commits shared between runs).",
        "'in-process': a `TaskWorker` in the benchmark's event loop; '1 process', "
        "'2 processes': `serve(..., limit=N)` processes of this backend on the same file "
        "(two contend for SQLite's one write lock).",
        "Baseline: a plain sqlite3 loop in one thread doing the same claim statements "
        "(`BEGIN IMMEDIATE`, SELECT of `limit` due rows, UPDATE to RUNNING, COMMIT) and "
        "complete statements (one transaction per batch) on a three-index schema, timed "
        f"from its first claim to its last commit over the same {fmt_count(runs)} runs: "
        "SQLite's own ceiling here, with no event loop, no leases renewed and no task run.",
        f"Target: >= {fmt_count(round(THROUGHPUT_TARGET))} runs/s through one worker.",
    ]
    syncs.notes += [
        "The same throughput run with a `def sync_noop()` task (run in a worker thread) and "
        "with the async no-op task, in-process worker, limit 100; the ratio is time per sync "
        f"run / time per async run. Target <= {SYNC_TARGET:g}x.",
    ]
    latencies.notes += [
        f"{probes} probes per run, one at a time, {PROBE_GAP * 1e3:g} ms apart, so each "
        "finds the worker idle; the task returns `time.time()` as it starts, and the latency "
        "is that minus the time just before `delay()`. Percentiles per run, then medians of "
        f"{repeats} runs.",
        "in-process: the worker (limit 10) shares the submitter's event loop and file and is "
        "woken at once; another process: one `serve()` process, poked after each commit "
        "through its datagram socket beside the database file (polling is the fallback).",
        "Baseline: a timestamp sent into an anyio memory object stream, latency measured "
        "when the consumer task receives it.",
        f"Target (another process): p50 <= {fmt_time(LATENCY_TARGET)}, "
        f"p99 <= {fmt_time(LATENCY_P99_TARGET)}.",
    ]
    idles.notes += [
        f"User + system CPU time (from /proc) of a `serve()` process waiting on an empty "
        f"file, over {IDLE_SECONDS:g} s once started and settled, as % of one core. Baseline: "
        "a process of the same backend sleeping in `anyio.sleep_forever()`.",
        f"Target: <= {IDLE_CPU_TARGET:g} %.",
    ]
    return [submits, rates, syncs, latencies, idles]


# --- a worker process ------------------------------------------------------------------------


def worker_main(url: str, backend: str, limit: int, prefetch: int | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    _, noop, sync_noop, stamp = define_tasks(url)
    serve = _library().serve
    if prefetch is None:  # the default, also where serve() has no such option
        code: int = serve(noop, sync_noop, stamp, limit=limit, backend=backend)
    else:
        code = serve(noop, sync_noop, stamp, limit=limit, backend=backend, prefetch=prefetch)
    return code


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--worker":
        prefetch = int(sys.argv[5]) if len(sys.argv) == 6 else None
        sys.exit(worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), prefetch))
    if len(sys.argv) == 3 and sys.argv[1] == "--idle":
        sys.exit(idle_main(sys.argv[2]))
    sys.exit(
        "usage: bench_taskqueue.py --worker URL BACKEND LIMIT [PREFETCH]"
        " (run.py runs the benchmark)"
    )
