"""The errors users of task runs see: a run that failed, a wait that timed out, a broker
that cannot be used.

They are public from :mod:`anyservice.taskqueue`, and say so in their ``__module__``, so
that a run error recorded in the database names ``anyservice.taskqueue.TaskTimeoutError``
rather than the private module it happens to be defined in.
"""

from __future__ import annotations

from ._records import RunError, RunState

__all__ = [
    "BrokerBusyError",
    "BrokerError",
    "StopTaskWorker",
    "TaskRunFailed",
    "TaskRunNotFound",
    "TaskRunTimeout",
    "TaskTimeoutError",
]


class BrokerError(Exception):
    """The broker's storage cannot be used: closed, unreachable, corrupt or too new."""


class BrokerBusyError(BrokerError):
    """The database stayed locked by other connections for longer than allowed."""


def _seconds(value: float) -> str:
    return f"{value:g} s"


class TaskRunFailed(Exception):
    """``await run.result()`` on a run that ended FAILED, CRASHED or CANCELLED.

    The task's own exception lived in the worker's process, maybe on another machine: what
    is left of it is its type name, message and formatted traceback, kept here and shown in
    the message.

    Attributes:
        run_id: The run's id.
        task: The task's name.
        state: ``RunState.FAILED``, ``CRASHED`` or ``CANCELLED``.
        attempts: How many times a worker claimed the run.
        error_type: The qualified type name of the task's exception (``"ValueError"``,
            ``"mypkg.Boom"``), or of the worker's verdict (``TaskTimeoutError``,
            ``RunAbandonedError``, ``PayloadError``, ...); ``None`` for a cancelled run.
        error_message: ``str()`` of that exception, or ``None``.
        traceback: The traceback formatted in the worker, or ``""``.
    """

    def __init__(
        self,
        *,
        run_id: str,
        task: str,
        state: RunState,
        attempts: int,
        error: RunError | None,
    ) -> None:
        self.run_id = run_id
        self.task = task
        self.state = state
        self.attempts = attempts
        self.error_type = error.type if error is not None else None
        self.error_message = error.message if error is not None else None
        self.traceback = error.traceback if error is not None else ""
        if state is RunState.CANCELLED:
            when = "before a worker ran it" if attempts == 0 else "while it was running"
            message = f"run {run_id} of task {task!r} was cancelled {when}"
        else:
            tries = "attempt" if attempts == 1 else "attempts"
            message = f"run {run_id} of task {task!r} {state.value} after {attempts} {tries}"
            if error is not None:
                message += f": {error.type}: {error.message}"
            if self.traceback:
                message += f"\n\nTraceback in the worker:\n{self.traceback.rstrip()}"
        super().__init__(message)


class TaskRunTimeout(TimeoutError):
    """``await run.wait(timeout)`` / ``run.result(timeout)``: the run did not finish in time.

    The run itself goes on; wait again, or ``await run.cancel()`` it if nobody claimed it.

    Attributes:
        run_id: The run's id.
        task: The task's name.
        timeout: The seconds waited.
        state: The run's state when the wait gave up.
        database: Where the run is stored (a SQLite file's absolute path): a run that
            never starts may be waiting in a database no worker serves.
    """

    def __init__(
        self, *, run_id: str, task: str, timeout: float, state: RunState, database: str = ""
    ) -> None:
        self.run_id = run_id
        self.task = task
        self.timeout = timeout
        self.state = state
        self.database = database
        where = f" in {database}" if database else ""
        super().__init__(
            f"run {run_id} of task {task!r}{where} did not finish within {_seconds(timeout)} "
            f"(it is {state.value}); the run goes on"
        )


class TaskTimeoutError(TimeoutError):
    """What a worker records when a run takes longer than its task's ``timeout``.

    Seen by result waiters as ``TaskRunFailed.error_type ==
    "anyservice.taskqueue.TaskTimeoutError"``. A timed-out run is retried if it has
    retries left.
    """


class TaskRunNotFound(LookupError):
    """There is no run with this id in the queue's database."""


class StopTaskWorker(Exception):
    """Raised by a task to stop the worker that runs it (Prefect's name).

    The worker stops gracefully (nothing new is claimed, the other runs in flight finish
    within its grace period) and hands this run back unfinished, so another worker (or
    this one, started again) runs it.
    """


for _error in (
    BrokerError,
    BrokerBusyError,
    TaskRunFailed,
    TaskRunTimeout,
    TaskTimeoutError,
    TaskRunNotFound,
    StopTaskWorker,
):
    _error.__module__ = "anyservice.taskqueue"
