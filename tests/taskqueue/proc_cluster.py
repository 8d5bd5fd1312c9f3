"""Processes for the cluster tests: a worker serving a schedule, or a singleton replica.

    python -m tests.taskqueue.proc_cluster schedule --url sqlite:////tmp/x/runs.db \\
        --dir /tmp/x --backend trio
    python -m tests.taskqueue.proc_cluster singleton --url ... --dir ... --lease 3

A scheduled run appends ``<tick> <run id> <pid>`` to ``ticks.log``; the singleton's
service appends ``<pid> <time>`` to ``holders.log`` every 20 ms. Lines are short single
``write`` calls on a file opened for appending, so lines of several processes never mix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyservice
from anyservice import LoopService
from anyservice.taskqueue import Singleton, Task, TaskQueue, current_run, serve


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def build_schedule(url: str, directory: Path, every: float) -> tuple[TaskQueue, Task[Any, Any]]:
    """The queue with a task scheduled every ``every`` seconds."""
    queue = TaskQueue(url)

    @queue.task(schedule=every)
    async def tick() -> None:
        context = current_run()
        assert context is not None
        record = await queue.broker.get(context.run_id)
        assert record is not None
        _append(
            directory / "ticks.log", f"{record.scheduled_at!r} {context.run_id} {os.getpid()}\n"
        )

    return queue, tick


class Holder(LoopService):
    """Says, every 20 ms, that this process runs it."""

    loop_seconds = 0.02
    shutdown_timeout = 0.5

    def __init__(self, directory: Path) -> None:
        super().__init__(name="holder")
        self.path = directory / "holders.log"

    async def run_once(self) -> None:
        _append(self.path, f"{os.getpid()} {time.time()!r}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("schedule", "singleton"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--poll", type=float, default=0.1)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format=f"{os.getpid()} %(levelname)s %(message)s"
    )
    if args.mode == "schedule":
        _, tick = build_schedule(args.url, args.dir, args.every)
        code: int = serve(tick, backend=args.backend, lease_seconds=args.lease, shutdown_timeout=5)
        return code
    queue = TaskQueue(args.url)
    singleton = Singleton(
        Holder(args.dir), queue, name="holder", lease_seconds=args.lease, poll_interval=args.poll
    )
    return anyservice.run(singleton, backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
