"""What one ``delay_many()`` costs per run: Python calls in the event loop, and CPU time.

Not part of ``run.py``: a profile, printed as lines. ``python benchmarks/profile_submit.py
[asyncio|trio] [RUNS]``: one ``delay_many()`` of ``RUNS`` (5 000) no-argument runs on a
fresh SQLite file, as the ``taskqueue`` benchmark's submission row makes it, seven times:
the median of the runs stored per CPU second of the whole process (every thread, from
``time.process_time()``) and per wall second, then the Python function calls per run of
one more call under ``cProfile`` (a count, which the machine's load does not move).
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROUNDS = 7


async def submit(runs: int, profiled: bool) -> tuple[float, float, int]:
    """CPU and wall seconds of one ``delay_many()`` of ``runs``, and its function calls."""
    import anyservice.taskqueue as taskqueue

    with tempfile.TemporaryDirectory() as directory:
        queue = taskqueue.TaskQueue(f"sqlite:///{Path(directory) / 'runs.db'}")

        @queue.task
        async def noop() -> None:
            return None

        async with queue:
            profile = cProfile.Profile() if profiled else None
            wall, cpu = time.perf_counter(), time.process_time()
            if profile is not None:
                profile.enable()
            await noop.delay_many([()] * runs)
            if profile is not None:
                profile.disable()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    calls = 0 if profile is None else pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    return cpu, wall, calls


async def main(runs: int) -> None:
    cpu, wall = [], []
    for _ in range(ROUNDS):
        spent, elapsed, _ = await submit(runs, profiled=False)
        cpu.append(spent)
        wall.append(elapsed)
    _, _, calls = await submit(runs, profiled=True)
    print(f"{sys.argv[1] if len(sys.argv) > 1 else 'asyncio'}, delay_many() of {runs} runs:")
    print(f"  runs per CPU second (median)   {runs / statistics.median(cpu):12,.0f}")
    print(f"  runs per wall second (median)  {runs / statistics.median(wall):12,.0f}")
    print(f"  function calls                 {calls / runs:12.2f}")


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5_000
    anyio.run(main, count, backend=backend)
