"""The life of one run: what each broker call costs, and what a worker does per run.

Not part of ``run.py``: a profile for finding where the time goes, printed as tables.
``python benchmarks/profile_run.py [asyncio|trio] [--drain] [--postgres] [--sync]
[--limit=N] [--prefetch=N]``.

Step by step (the default), each step timed over many calls, one at a time, on a fresh
SQLite file (medians of per-call times, µs):

- submit: ``broker.submit()`` of one run (INSERT, committed);
- claim: ``broker.claim(limit=1)`` of one due run (lease taken, committed);
- complete: ``broker.complete()`` of one claimed run (result committed);
- get: ``broker.get()`` (what ``result()`` reads once woken);
- round trip: ``await task.delay()`` then ``await run.result()`` through an in-process
  worker (submit, wake, claim, start, result, wake of the waiter).

``--drain``: one in-process worker (limit 100, or ``--limit=N``; its ``prefetch`` the
default, or ``--prefetch=N``) drains 4 000 no-op runs submitted up front, under
``cProfile`` (counts only: its timings are distorted), and the counts are given per run:
Python function calls in the event loop's thread, cancel scopes entered, events made,
event-loop passes, broker calls, round trips to the database (the SQLite connection's
operations, wherever they run, or PostgreSQL statements), the SQLite operations that went
to the connection's thread (a hop there and back each), commits, SQLite statements run in
the event loop's thread (``execute`` and ``executemany`` calls), the bytes the process
wrote (Linux's ``/proc/self/io`` ``wchar``: on SQLite the pages its commits append to the
WAL and its checkpoints copy into the file, fewer with fewer index pages touched), and the
CPU time of the whole process (every thread, the profiler's cost included).
``--postgres`` does the same on a PostgreSQL server of its own (Debian's
binaries, as the tests start it).
``--sync`` drains runs of a ``def`` no-op task (run in worker threads) instead, and counts
the hops to a worker thread (``anyio.to_thread.run_sync`` calls) as well.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from profile_service import _code_keys, _counts

CALLS = 2_000
DRAINED = 4_000
LIMIT = 100


async def profile() -> dict[str, float]:
    import anyservice.taskqueue as taskqueue

    times: dict[str, list[float]] = {}

    def timed(name: str, started: float) -> None:
        times.setdefault(name, []).append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'runs.db'}"
        queue = taskqueue.TaskQueue(url)

        @queue.task
        async def noop() -> None:
            return None

        async with queue:
            broker = queue.broker
            payload = noop.encode((), {})
            for _ in range(CALLS):
                started = time.perf_counter()
                record = await broker.submit("noop", payload)
                timed("submit", started)
                started = time.perf_counter()
                (claimed,) = await broker.claim("me", ["noop"], limit=1, lease_seconds=30)
                timed("claim", started)
                started = time.perf_counter()
                await broker.complete("me", claimed.id, claimed.attempts, "null")
                timed("complete", started)
                started = time.perf_counter()
                await broker.get(record.id)
                timed("get", started)
            async with taskqueue.TaskWorker(noop):
                for _ in range(CALLS // 4):
                    started = time.perf_counter()
                    run = await noop.delay()
                    await run.result(timeout=30)
                    timed("round trip", started)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def _round_trip_keys(url: str) -> dict[str, list[Callable[..., Any]]]:
    """What one database round trip calls, once, in the event loop's thread.

    Only that thread is profiled: a SQLite operation is made there for the connection's
    thread, a PostgreSQL statement is built there for a worker thread.
    """
    if url.startswith("postgresql"):
        from anyservice.taskqueue.brokers import _postgres

        # A statement on its own, or statements pipelined in one round trip.
        return {
            "database round trips": [
                _postgres._Connections._execute,
                _postgres._Connections._pipeline,
            ]
        }
    from anyservice.taskqueue.brokers import _sqlite_thread

    return {"database round trips": [_sqlite_thread._Operation.__init__]}


def _statements(profile: cProfile.Profile) -> int:
    """SQLite statements the profiled thread ran: its calls of ``execute``/``executemany``."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    names = ("<method 'execute' of 'sqlite3.", "<method 'executemany' of 'sqlite3.")
    return sum(value[1] for key, value in stats.items() if key[2].startswith(names))


def _bytes_written() -> int | None:
    """Bytes this process has passed to ``write()`` and its kin so far (Linux only)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("wchar"))


def _count_thread_calls(broker: Any, counted: dict[str, int]) -> None:
    """Count the operations ``broker``'s SQLite connection thread runs (each a hop there and
    back for its caller), into ``counted``; nothing for other brokers."""
    connection = getattr(broker, "_db", None)
    run = getattr(connection, "_run", None)
    if run is None:
        return

    def counting(batch: list[Any], _run: Any = run) -> None:
        hops = counted.get("connection-thread calls", 0)
        counted["connection-thread calls"] = hops + len(batch)
        _run(batch)

    connection._run = counting


def _count_calls(broker: Any, counted: dict[str, int]) -> None:
    """Count the calls of ``broker``'s claim and recording methods into ``counted``."""
    calls = ("claim", "heartbeat", "complete", "complete_many", "complete_and_claim", "fail")
    for name in (*calls, "release"):
        method = getattr(broker, name, None)
        if method is None:
            continue

        async def call(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            counted["broker calls"] = counted.get("broker calls", 0) + 1
            return await _method(*args, **kwargs)

        setattr(broker, name, call)


def _count_hops(counted: dict[str, int]) -> None:
    """Count the hops to a worker thread (``anyio.to_thread.run_sync`` calls) into ``counted``."""
    import anyio.to_thread

    run_sync = anyio.to_thread.run_sync

    async def counting(*args: Any, **kwargs: Any) -> Any:
        counted["thread hops"] = counted.get("thread hops", 0) + 1
        return await run_sync(*args, **kwargs)

    anyio.to_thread.run_sync = counting  # type: ignore[assignment]


async def drain(
    url: str, backend: str, sync: bool = False, limit: int = LIMIT, prefetch: int | None = None
) -> dict[str, float]:
    """Per-run counts of one worker draining ``DRAINED`` no-op runs from ``url``."""
    import anyservice.taskqueue as taskqueue

    queue = taskqueue.TaskQueue(url)

    @queue.task(name="noop")
    async def async_noop() -> None:
        return None

    @queue.task(name="sync_noop")
    def sync_noop() -> None:
        return None

    noop = sync_noop if sync else async_noop

    async with queue:
        await queue.broker.submit_many(noop.name, [noop.encode((), {})] * DRAINED)
        commits_before = getattr(queue.broker, "commits", None)
        counted: dict[str, int] = {}
        _count_calls(queue.broker, counted)
        _count_thread_calls(queue.broker, counted)
        _count_hops(counted)
        ahead = {} if prefetch is None else {"prefetch": prefetch}  # older trees have none
        worker = taskqueue.TaskWorker(noop, limit=limit, **ahead)
        profile = cProfile.Profile()
        started = time.perf_counter()
        cpu = time.process_time()
        written = _bytes_written()
        profile.enable()
        async with worker:
            # Polled: a waiter of its own would add broker reads to what is counted.
            while worker.counts["completed"] < DRAINED:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        profile.disable()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        after = _bytes_written()
        found = _counts(profile, backend, DRAINED, {**_code_keys(backend), **_round_trip_keys(url)})
        found["broker calls"] = counted.get("broker calls", 0) / DRAINED
        if "_db" in vars(queue.broker):
            hops = counted.get("connection-thread calls", 0)
            found["connection-thread calls"] = hops / DRAINED
        found["thread hops"] = counted.get("thread hops", 0) / DRAINED
        if commits_before is not None:
            found["commits"] = (queue.broker.commits - commits_before) / DRAINED
            found["SQLite statements"] = _statements(profile) / DRAINED
        if written is not None and after is not None:
            found["bytes written"] = (after - written) / DRAINED
        found["runs/s under the profiler"] = DRAINED / seconds
        # Every thread of the process (the connection's too), profiler included.
        found["CPU µs under the profiler"] = cpu / DRAINED * 1e6
    return found


@contextmanager
def _sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        yield f"sqlite:///{Path(directory) / 'runs.db'}"


@contextmanager
def _postgres_url() -> Iterator[str]:
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests._postgres import postgres_schema, postgres_server

    with postgres_server(durable=True) as server, postgres_schema(server) as url:
        yield url


def main() -> None:
    backend = next((arg for arg in sys.argv[1:] if not arg.startswith("--")), "asyncio")
    limits = [int(arg.partition("=")[2]) for arg in sys.argv if arg.startswith("--limit=")]
    limit = limits[-1] if limits else LIMIT
    ahead = [int(arg.partition("=")[2]) for arg in sys.argv if arg.startswith("--prefetch=")]
    prefetch = ahead[-1] if ahead else None
    if "--drain" in sys.argv or "--postgres" in sys.argv:
        where = _postgres_url if "--postgres" in sys.argv else _sqlite_url
        with where() as url:
            sync = "--sync" in sys.argv
            figures = anyio.run(drain, url, backend, sync, limit, prefetch, backend=backend)
        kind = "sync" if "--sync" in sys.argv else "async"
        runs = f"{DRAINED} {kind} no-op runs"
        ahead = "default" if prefetch is None else prefetch
        print(f"{backend}, one worker (limit {limit}, prefetch {ahead}) draining {runs}, per run:")
        for label, value in figures.items():
            print(f"  {label:28} {value:10.2f}")
        return
    for name, micros in anyio.run(profile, backend=backend).items():
        print(f"{backend:8} {name:12} {micros:8.1f} µs")


if __name__ == "__main__":
    main()
