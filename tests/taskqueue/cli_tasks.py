"""Tasks for the command-line tests: ``anyservice serve tests.taskqueue.cli_tasks:shout``.

The queue is in memory here; the tests point the command at a SQLite file with ``--queue``.
"""

from __future__ import annotations

from anyservice.taskqueue import TaskQueue

queue = TaskQueue("memory://")


@queue.task
async def shout(message: str) -> str:
    return message.upper()


@queue.task
async def fail() -> None:
    raise ValueError("on purpose")


not_a_task = 42
