"""Where a ``serve()`` process spends its CPU while it drains no-op runs, thread by thread.

Not part of ``run.py``: a profile for finding which side bounds the throughput rows.
``python benchmarks/profile_serve.py [asyncio|trio] [--limit=N] [--prefetch=N]
[--runs=N] [--inprocess]``.

One ``serve()`` process (``bench_taskqueue.py``'s worker, with ``--prefetch`` passed on)
waits on a fresh SQLite file; this process submits the runs (one ``submit_many``), all due
at one moment t0 a little later, and waits for the last to be completed, as the
benchmark's "1 process" rows do. Printed: runs per second (from t0 to the last
``finished_at``), and the worker process's CPU time per run from ``/proc``, its event
loop's thread apart from its other threads (the SQLite connection's thread and the
checkpointer), over the drain alone. ``--inprocess`` runs a ``TaskWorker`` in this
process instead (its CPU then includes the submitter's waits, which are small).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import bench_taskqueue

RUNS = 10_000
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: Time given to the submission before t0.
MARGIN = 1.5


def thread_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of process ``pid``."""
    seconds: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


async def _wait_for(log: Path, process: anyio.abc.Process) -> None:
    with anyio.fail_after(bench_taskqueue.STARTUP):
        while "] started" not in (text := await anyio.Path(log).read_text()):
            if process.returncode is not None:
                raise RuntimeError(f"worker exited:\n{text}")
            await anyio.sleep(0.02)


async def drain(
    backend: str, limit: int, prefetch: int | None, runs: int, inprocess: bool
) -> dict[str, float]:
    taskqueue = bench_taskqueue._library()
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'runs.db'}"
        queue, noop, _, _ = bench_taskqueue.define_tasks(url)
        async with queue:
            process: anyio.abc.Process | None = None
            worker: Any = None
            if inprocess:
                pid = os.getpid()
                ahead = {} if prefetch is None else {"prefetch": prefetch}
                worker = taskqueue.TaskWorker(noop, limit=limit, **ahead)
                await worker.__aenter__()
            else:
                log = Path(directory) / "worker.log"
                command = [sys.executable, bench_taskqueue.__file__, "--worker", url, backend]
                command += [str(limit)] + ([] if prefetch is None else [str(prefetch)])
                with bench_taskqueue._open_for_writing(log) as output:
                    process = await anyio.open_process(
                        command, stdout=output, stderr=subprocess.STDOUT
                    )
                pid = process.pid
                await _wait_for(log, process)
            try:
                due = time.time() + MARGIN
                submitted = await queue.broker.submit_many(
                    noop.name, [noop.encode((), {})] * runs, scheduled_at=due
                )
                await anyio.sleep(max(due - time.time() - 0.05, 0))
                before = thread_cpu(pid)
                finished = await bench_taskqueue._all_completed(
                    queue, runs, taskqueue.RunState.COMPLETED, last=submitted[-1].id
                )
                after = thread_cpu(pid)
            finally:
                if worker is not None:
                    await worker.__aexit__(None, None, None)
                if process is not None:
                    await bench_taskqueue._kill(process)
    loop = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items() if tid != pid)
    return {
        "runs/s": runs / (finished - due),
        "wall µs per run": 1e6 * (finished - due) / runs,
        "CPU µs per run, event loop's thread": 1e6 * loop / runs,
        "CPU µs per run, other threads": 1e6 * others / runs,
    }


def main() -> None:
    backend = next((arg for arg in sys.argv[1:] if not arg.startswith("--")), "asyncio")

    def option(name: str) -> int | None:
        values = [int(arg.partition("=")[2]) for arg in sys.argv if arg.startswith(f"--{name}=")]
        return values[-1] if values else None

    limit, prefetch, runs = option("limit") or 10, option("prefetch"), option("runs") or RUNS
    inprocess = "--inprocess" in sys.argv
    figures = anyio.run(drain, backend, limit, prefetch, runs, inprocess, backend=backend)
    where = "an in-process worker" if inprocess else "one serve() process"
    ahead = "default" if prefetch is None else prefetch
    print(f"{backend}, {where} (limit {limit}, prefetch {ahead}) draining {runs} no-op runs:")
    for label, value in figures.items():
        print(f"  {label:38} {value:10.1f}")
    with open("/proc/loadavg", encoding="ascii") as load:
        print(f"  load average {load.read().split()[0]}")


if __name__ == "__main__":
    main()
