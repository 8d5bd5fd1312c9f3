"""Which run the current code is executing, for tasks that want to know (Prefect's run context)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

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


#: The run the current code executes: its context, or (as a worker sets it once per run)
#: ``[record, worker id, None]``, of which :func:`current_run` makes the context on the
#: first call and keeps it in the list's last place for the calls after.
_current: ContextVar[RunContext | list[Any] | None] = ContextVar(
    "anyservice_task_run", default=None
)


def current_run() -> RunContext | None:
    """The run being executed by the calling task (also in a sync task's thread).

    ``None`` when the task function was called directly (``say("hi")``), not by a worker.
    Within one attempt of a run, every call returns the same object (in the tasks the
    body starts and in its thread too).
    """
    current = _current.get()
    if current is None or isinstance(current, RunContext):
        return current
    record, worker, context = current
    if context is None:
        context = current[2] = RunContext(
            record.id, record.task, record.attempts, record.retries_left, worker
        )
    return context  # type: ignore[no-any-return]


def running(context: RunContext) -> None:
    """Mark the current (worker-side) task as executing ``context``'s run."""
    _current.set(context)


#: ``running()`` of the context of ``[record, worker_id, None]``, as a worker marks each
#: run it executes: the context is made only if the task asks for it.
run_as = _current.set
