"""Which run the current code is executing, for tasks that want to know (Prefect's run context)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._records import RunRecord

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
#: its record and the worker's id, of which :func:`current_run` makes the context.
_current: ContextVar[RunContext | tuple[RunRecord, str] | None] = ContextVar(
    "anyservice_task_run", default=None
)


def current_run() -> RunContext | None:
    """The run being executed by the calling task (also in a sync task's thread).

    ``None`` when the task function was called directly (``say("hi")``), not by a worker.
    """
    current = _current.get()
    if current is None or isinstance(current, RunContext):
        return current
    record, worker = current
    return RunContext(record.id, record.task, record.attempts, record.retries_left, worker)


def running(context: RunContext) -> None:
    """Mark the current (worker-side) task as executing ``context``'s run."""
    _current.set(context)


#: ``running()`` of the context of ``(record, worker_id)``, as a worker marks each run it
#: executes: the context is made only if the task asks for it.
run_as = _current.set
