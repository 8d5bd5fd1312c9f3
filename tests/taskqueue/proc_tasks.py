"""Tasks for the worker-process tests, and the worker process itself.

The test process and the worker processes both call :func:`build` with the same database
URL and directory, so they agree on the task names; only the workers execute the tasks.

    python -m tests.taskqueue.proc_tasks --url sqlite:////tmp/x/runs.db --dir /tmp/x \\
        --backend trio --lease 1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from anyservice.taskqueue import Task, TaskQueue, current_run, serve


def build(url: str, directory: Path) -> tuple[TaskQueue, dict[str, Task[Any, Any]]]:
    """The queue and its tasks, writing what they do under ``directory``."""
    queue = TaskQueue(url)

    def this_run() -> tuple[str, int]:
        context = current_run()
        assert context is not None, "only worker processes run these tasks"
        return context.run_id, context.attempt

    @queue.task
    def record(number: int) -> int:
        """Append the run's id to this process's file: who ran what, how often."""
        run_id, _ = this_run()
        with open(directory / f"{os.getpid()}.runs", "a", encoding="utf-8") as runs:
            runs.write(f"{run_id}\n")
        return number

    @queue.task
    async def hang_first() -> int:
        """Hang on the first attempt (after saying which process has it), return after."""
        run_id, attempt = this_run()
        if attempt == 1:
            await anyio.Path(directory / f"{run_id}.hanging").write_text(str(os.getpid()))
            await anyio.sleep_forever()
        return attempt

    @queue.task
    async def slow(seconds: float) -> str:
        """Say that it started, then take ``seconds``."""
        run_id, _ = this_run()
        await anyio.Path(directory / f"{run_id}.started").write_text(str(os.getpid()))
        await anyio.sleep(seconds)
        return "done"

    @queue.task(concurrency=2)
    async def limited(seconds: float) -> None:
        """Take ``seconds``, then write when it ran: ``<start> <end> <pid>``."""
        run_id, _ = this_run()
        began = time.time()
        await anyio.sleep(seconds)
        span = f"{began!r} {time.time()!r} {os.getpid()}"
        await anyio.Path(directory / f"{run_id}.span").write_text(span)

    return queue, {"record": record, "hang_first": hang_first, "slow": slow, "limited": limited}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--prefetch", type=int, default=None)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format=f"{os.getpid()} %(levelname)s %(message)s"
    )
    _, tasks = build(args.url, args.dir)
    code: int = serve(
        *tasks.values(),
        limit=args.limit,
        prefetch=args.prefetch,
        backend=args.backend,
        lease_seconds=args.lease,
        shutdown_timeout=args.shutdown_timeout,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
