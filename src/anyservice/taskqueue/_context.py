"""Which run the current code is executing, for tasks that want to know (Prefect's run context)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["RunContext", "current_run", "run_as", "running"]


@dataclass(frozen=True)
class RunContext:
    """The run a worker is executing.

    Attributes:
        run_id: The run's id, as ``TaskRun.id`` gives it to the submitter.
        task: The task's name.
        attempt: Which claim of the run this is, from 1: a retry or a run taken over
            from a worker that died counts one more.
        retries_left: Failures that may still be retried after this attempt.
        worker: The ``client_id`` of the worker running it.
    """

    run_id: str
    task: str
    attempt: int
    retries_left: int
    worker: str


_current: ContextVar[RunContext | None] = ContextVar("anyservice_task_run", default=None)


def current_run() -> RunContext | None:
    """The run being executed by the calling task (also in a sync task's thread).

    ``None`` when the task function was called directly (``say("hi")``), not by a worker.
    """
    return _current.get()


def running(context: RunContext) -> None:
    """Mark the current (worker-side) task as executing ``context``'s run."""
    _current.set(context)


def run_as(run_id: str, task: str, attempt: int, retries_left: int, worker: str) -> None:
    """``running(RunContext(...))`` of these fields, as a worker does once per run: made
    at once, since the frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``."""
    context: RunContext = object.__new__(RunContext)
    object.__setattr__(context, "__dict__", {
        "run_id": run_id, "task": task, "attempt": attempt, "retries_left": retries_left,
        "worker": worker,
    })  # fmt: skip
    _current.set(context)
