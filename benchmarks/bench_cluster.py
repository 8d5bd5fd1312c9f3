"""The cluster on SQLite and PostgreSQL: how late ticks start, how fast a singleton fails over.

Tick lateness is the time from a tick's due time to its body's first line, with 1 and 4
worker processes serving the schedule (every worker races to store each tick; one wins).
The baseline, measured in the same run, is a raw anyio task sleeping until the same
wall-clock grid points: the lateness of the event loop's own timer, which no scheduler
can beat.

Fail-over is the time from ``kill -9`` of the singleton's holder to the first line of its
service on another replica. The floor, read in the same run, is the time the dead holder's
lease still had to run at the kill (read from the database): nobody may take over before
it expires.

Each figure is measured on a fresh SQLite file and on a fresh schema of a PostgreSQL server
started for the run (fsync on), when the server's binaries are installed. Processes are
this file run as a script: ``python bench_cluster.py --schedule URL BACKEND EVERY DIR`` or
``--singleton URL BACKEND LEASE DIR``.
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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
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
    compare,
    fmt_time,
    percentile,
    ratio,
    require,
)
from bench_postgres import MissingPostgres, find_binaries, postgres_schema, postgres_server
from bench_taskqueue import Database, _kill, _open_for_writing, sqlite_database

NAME = "cluster"
TITLE = "Cluster: scheduled-tick lateness and singleton fail-over, on SQLite and PostgreSQL"

#: Seconds between ticks of the benchmark's schedule.
EVERY = 0.25
#: The singleton's lease; renewed every third of it.
LEASE = 1.0
#: Time given to a process to start and import the library, on a slow machine.
STARTUP = 60.0


def ticks_for(config: Config) -> int:
    return 12 if config.quick else 40


@functools.cache
def _library() -> Any:
    import anyservice
    import anyservice.taskqueue

    return anyservice


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


# --- the processes -------------------------------------------------------------------------


def schedule_main(url: str, backend: str, every: float, directory: Path) -> int:
    taskqueue = _library().taskqueue
    queue = taskqueue.TaskQueue(url)

    @queue.task(schedule=every, overlap=True)
    async def tick() -> None:
        started = time.time()
        context = taskqueue.current_run()
        record = await queue.broker.get(context.run_id)
        _append(directory / "ticks.log", f"{record.scheduled_at!r} {started!r}\n")

    code: int = taskqueue.serve(tick, backend=backend, shutdown_timeout=1)
    return code


def singleton_main(url: str, backend: str, lease: float, directory: Path) -> int:
    anyservice = _library()

    class Holder(anyservice.LoopService):  # type: ignore[misc,name-defined]
        loop_seconds = 0.01
        shutdown_timeout = lease / 4

        async def run_once(self) -> None:
            _append(directory / "holders.log", f"{os.getpid()} {time.time()!r}\n")

    queue = anyservice.taskqueue.TaskQueue(url)
    singleton = anyservice.taskqueue.Singleton(
        Holder(name="holder"), queue, lease_seconds=lease, poll_interval=0.02
    )
    code: int = anyservice.run(singleton, backend=backend)
    return code


@asynccontextmanager
async def processes(
    mode: str, url: str, backend: str, count: int, argument: float, directory: Path
) -> AsyncIterator[list[anyio.abc.Process]]:
    """``count`` processes of ``mode``, started and ready on entry, killed on exit."""
    async with AsyncExitStack() as stack:
        started: list[tuple[anyio.abc.Process, Path]] = []
        for index in range(count):
            log = directory / f"{mode}-{index}.log"
            with _open_for_writing(log) as output:
                command = [
                    sys.executable,
                    __file__,
                    f"--{mode}",
                    url,
                    backend,
                    str(argument),
                    str(directory),
                ]
                process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
            stack.push_async_callback(_kill, process)
            started.append((process, log))
        with anyio.fail_after(STARTUP):
            for process, log in started:
                while "] started" not in await anyio.Path(log).read_text():
                    if process.returncode is not None:
                        raise RuntimeError(f"{mode} exited:\n{await anyio.Path(log).read_text()}")
                    await anyio.sleep(0.02)
        yield [process for process, _ in started]


# --- the samples ---------------------------------------------------------------------------


def lateness(config: Config, workers: int, database: Database) -> Callable[[], SampleFunction]:
    """p50/p99 of tick lateness with ``workers`` processes serving an every-250-ms schedule."""

    def build() -> SampleFunction:
        require(_library, config)
        ticks = ticks_for(config)

        async def sample() -> Metrics:
            with tempfile.TemporaryDirectory() as name, database() as url:
                directory = Path(name)
                log = directory / "ticks.log"
                backend = _current_backend()
                async with processes("schedule", url, backend, workers, EVERY, directory):
                    with anyio.fail_after(ticks * EVERY + STARTUP):
                        while len(_lines(log)) < ticks + 1:  # noqa: ASYNC110 - another process
                            await anyio.sleep(0.05)
                # The first tick may find the workers still settling: left out.
                delays = [float(start) - float(due) for due, start in _lines(log)[1 : ticks + 1]]
            return {"p50": percentile(delays, 50), "p99": percentile(delays, 99)}

        return sample

    return build


def timer_lateness(ticks: int) -> SampleFunction:
    """The baseline: a raw anyio task sleeping until each wall-clock grid point."""

    async def sample() -> Metrics:
        delays: list[float] = []
        due = (time.time() // EVERY + 1) * EVERY
        for _ in range(ticks):
            await anyio.sleep(max(due - time.time(), 0.0))
            delays.append(time.time() - due)
            due += EVERY
        return {"p50": percentile(delays, 50), "p99": percentile(delays, 99)}

    return sample


def failover(config: Config, database: Database) -> Callable[[], SampleFunction]:
    """kill -9 of a singleton's holder to the first line of the service on another replica."""

    def build() -> SampleFunction:
        anyservice = require(_library, config)

        async def sample() -> Metrics:
            with tempfile.TemporaryDirectory() as name, database() as url:
                directory = Path(name)
                log = directory / "holders.log"
                backend = _current_backend()
                async with processes("singleton", url, backend, 2, LEASE, directory) as procs:
                    with anyio.fail_after(STARTUP):
                        while not _lines(log):  # noqa: ASYNC110 - another process writes it
                            await anyio.sleep(0.01)
                    # Let the holder renew a few times, then kill it between two renewals.
                    await anyio.sleep(LEASE * 1.2)
                    holder = int(_lines(log)[-1][0])
                    (victim,) = [p for p in procs if p.pid == holder]
                    queue = anyservice.taskqueue.TaskQueue(url)
                    async with queue:
                        victim.send_signal(signal.SIGKILL)
                        killed = time.time()
                        lease = await queue.broker.get_lease("holder")
                    await victim.wait()
                    with anyio.fail_after(LEASE * 10):
                        while not any(int(pid) != holder for pid, _ in _lines(log)):  # noqa: ASYNC110
                            await anyio.sleep(0.005)
                took_over = min(float(at) for pid, at in _lines(log) if int(pid) != holder)
            return {"failover": took_over - killed, "floor": lease.expires_at - killed}

        return sample

    return build


def _current_backend() -> str:
    import sniffio

    return sniffio.current_async_library()


async def _nothing() -> Metrics:
    return {}


# --- the report ----------------------------------------------------------------------------


def lateness_cells(subject: Side, baseline: Side) -> list[str]:
    base50, base99 = baseline.median("p50"), baseline.median("p99")
    if subject.problem is not None:
        return [subject.problem, "—", fmt_time(base50), fmt_time(base99), "—"]
    p50, p99 = subject.median("p50"), subject.median("p99")
    assert p50 is not None
    assert base50 is not None
    return [
        fmt_time(p50),
        fmt_time(p99),
        fmt_time(base50),
        fmt_time(base99),
        f"{ratio(p50, base50, floor=1e-6):.1f}x",
    ]


def failover_cells(subject: Side) -> list[str]:
    if subject.problem is not None:
        return [subject.problem, "—", "—", "—"]
    took, floor = subject.median("failover"), subject.median("floor")
    assert took is not None
    assert floor is not None
    return [fmt_time(took), fmt_time(floor), fmt_time(took - floor), f"{took / LEASE:.2f}"]


@contextmanager
def databases() -> Iterator[list[tuple[str, Database | str]]]:
    """Each broker's name and its fresh databases (or why there are none), for the run."""
    try:
        binaries = find_binaries()
    except MissingPostgres as exc:
        yield [("SQLite", sqlite_database), ("PostgreSQL", f"skipped: {exc}")]
        return
    with postgres_server(binaries, durable=True) as server:
        schema = functools.partial(postgres_schema, server)
        yield [("SQLite", sqlite_database), ("PostgreSQL", schema)]


def run(config: Config) -> list[Table]:
    ticks = ticks_for(config)
    repeats = config.repeats(full=3, quick=1)
    late = Table(
        f"Scheduled-tick lateness: due time to the body's first line ({ticks} ticks "
        f"every {EVERY * 1e3:g} ms)",
        ["backend", "broker", "workers", "p50", "p99", "baseline p50", "baseline p99", "ratio p50"],
    )
    over = Table(
        f"Singleton fail-over after kill -9 of the holder (lease {LEASE:g} s)",
        [
            "backend",
            "broker",
            "fail-over",
            "lease left at kill",
            "beyond the lease",
            "fail-over / lease",
        ],
    )
    with databases() as brokers:
        for backend in config.backends:
            for broker, database in brokers:
                if isinstance(database, str):
                    for workers in (1, 4):
                        late.add_row(backend, broker, workers, database, *["—"] * 4)
                    over.add_row(backend, broker, database, *["—"] * 3)
                    continue
                for workers in (1, 4):
                    subject, baseline = compare(
                        backend,
                        lateness(config, workers, database),
                        timer_lateness(ticks),
                        repeats=repeats,
                        timeout=STARTUP + ticks * EVERY * 2,
                    )
                    late.add_row(backend, broker, workers, *lateness_cells(subject, baseline))
                subject, _ = compare(
                    backend,
                    failover(config, database),
                    _nothing,
                    repeats=repeats,
                    timeout=STARTUP + 20 * LEASE,
                )
                over.add_row(backend, broker, *failover_cells(subject))
    late.notes += [
        f"Medians of {repeats} runs after one discarded warm-up pair, each in a fresh "
        "`anyio.run`, anyservice and baseline alternating.",
        "anyservice: 1 or 4 `serve()` processes of this backend on one fresh SQLite file, or "
        "one fresh schema of a PostgreSQL server on this machine (fsync on), serving a task "
        f"scheduled every {EVERY * 1e3:g} ms (`overlap=True`); each worker sleeps until a "
        "tick is due, then all race to store it (one INSERT OR IGNORE, or INSERT ... ON "
        "CONFLICT DO NOTHING, wins) and the winner's run is claimed by whichever worker "
        "sees it first (other processes' commits are noticed by polling SQLite's "
        "`data_version`, or through PostgreSQL's LISTEN/NOTIFY). The body notes "
        "`time.time()` at its first line; lateness is that minus the tick's due time.",
        "Baseline: a raw anyio task sleeping until the same wall-clock grid points, "
        "lateness measured at wake-up: the event loop's own timer.",
    ]
    over.notes += [
        f"Medians of {repeats} runs after one discarded warm-up run, each in a fresh `anyio.run`.",
        f"Two replica processes run `Singleton(LoopService, lease_seconds={LEASE:g}, "
        "poll_interval=0.02)`; the service notes `time.time()` every 10 ms. The holder is "
        "killed with SIGKILL; fail-over is the time to the other replica's first note.",
        "'lease left at kill': the dead holder's lease expiry (read from the database) "
        "minus the kill: the floor, since nobody may take over before then. 'beyond the "
        "lease' is what the follower adds (its poll, starting the service).",
    ]
    return [late, over]


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] in ("--schedule", "--singleton"):
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        main = schedule_main if sys.argv[1] == "--schedule" else singleton_main
        sys.exit(main(sys.argv[2], sys.argv[3], float(sys.argv[4]), Path(sys.argv[5])))
    sys.exit("usage: bench_cluster.py --schedule|--singleton URL BACKEND ARG DIR")
