"""The task queue demo: runs submitted to an embedded SQLite file, run by a worker, one retried.

    python examples/tasks_demo.py                    # on asyncio
    python examples/tasks_demo.py --backend trio     # the same code on trio

The database lives in a temporary directory, so the demo leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import anyio

from anyservice.taskqueue import TaskQueue, TaskRun, TaskRunFailed, TaskWorker, current_run


async def task_demo(runs: int = 10) -> None:
    """Submit ``runs`` greetings and one flaky payment to a worker; print each as it ends."""
    with tempfile.TemporaryDirectory(prefix="anyservice-demo-") as directory:
        queue = TaskQueue(f"sqlite:///{Path(directory) / 'runs.db'}")

        @queue.task
        async def greet(name: str, number: int) -> str:
            await anyio.sleep(0.05 * (number % 4))  # some work, of varying length
            return f"hello, {name}"

        @queue.task(retries=2, retry_delay=0.2)
        async def charge(order: int) -> str:
            run = current_run()
            assert run is not None
            if run.attempt == 1:
                raise ConnectionError("payment service unavailable")
            return f"order {order} charged"

        async with queue, TaskWorker(greet, charge, limit=4, name="demo-worker") as worker:
            submitted: list[TaskRun[str]] = [await charge.delay(1042)]
            submitted += [await greet.delay(f"user-{i}", i) for i in range(runs)]
            print(
                f"submitted {len(submitted)} runs to {queue.url} (worker limit {worker.limit})",
                flush=True,
            )
            done = 0

            async def report(run: TaskRun[str]) -> None:
                nonlocal done
                try:
                    outcome = repr(await run.result(timeout=30))
                except TaskRunFailed as failure:
                    outcome = f"failed: {failure.error_type}: {failure.error_message}"
                done += 1
                tries = "attempt" if run.attempts == 1 else "attempts"
                print(
                    f"  [{done:>2}/{len(submitted)}] {run.task:<6} {run.id[:8]} "
                    f"{run.state.value} after {run.attempts} {tries}: {outcome}",
                    flush=True,
                )

            async with anyio.create_task_group() as group:
                for run in submitted:
                    group.start_soon(report, run)
            counts = worker.status()["counts"]
            print(
                f"worker {worker.client_id[:8]}: {counts['completed']} completed, "
                f"{counts['retried']} retried, {counts['failed']} failed",
                flush=True,
            )


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--runs", type=int, default=10, help="how many greetings to submit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    anyio.run(task_demo, args.runs, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
