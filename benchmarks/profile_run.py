"""The life of one run on SQLite, step by step: what each broker call costs on its own.

Not part of ``run.py``: a profile for finding where the time goes, printed as a table
(medians of per-call times, µs). ``python benchmarks/profile_run.py [asyncio|trio]``.
Each step is timed over many calls, one at a time, on a fresh file:

- submit: ``broker.submit()`` of one run (INSERT, committed);
- claim: ``broker.claim(limit=1)`` of one due run (lease taken, committed);
- complete: ``broker.complete()`` of one claimed run (result committed);
- get: ``broker.get()`` (what ``result()`` reads once woken);
- round trip: ``await task.delay()`` then ``await run.result()`` through an in-process
  worker (submit, wake, claim, start, result, wake of the waiter).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

CALLS = 2_000


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


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    figures = anyio.run(profile, backend=backend)
    for name, micros in figures.items():
        print(f"{backend:8} {name:12} {micros:8.1f} µs")


if __name__ == "__main__":
    main()
