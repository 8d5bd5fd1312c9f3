"""One claimed run inside a worker: running its task, and what the attempt came to.

A run in flight goes through three phases, each a flag of :class:`RunInFlight`:

- *executing*: the task runs inside the run's cancel scope, which the lease keeper
  cancels if the claim no longer holds the run (``lost``) or a user asked for the run to
  be cancelled (``cancelled``: the run then ends CANCELLED);
- *settling*: the outcome is being recorded; the lease keeper goes on renewing the lease,
  and the record is retried for as long as the lease lasts (``lease_until``);
- *settled*: recorded, refused, given up on or handed back: nothing is left to do.

Every call the worker makes about a run is fenced by the claim's ``(id, attempt, owner)``,
so an attempt that outlived its lease (the run was claimed again, by another worker or by
this one) changes nothing.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._tracing import otel
from ._context import RunContext, running
from ._errors import StopTaskWorker, TaskTimeoutError
from ._queue import Task
from ._records import PayloadError, RunError, RunRecord
from ._serialize import decode_arguments, encode_result

__all__ = ["Outcome", "RunInFlight", "RunnerHooks", "Runners", "attempt", "verdict"]


@dataclass(eq=False)
class Outcome:
    """What an attempt came to: a JSON result, or an error (maybe worth a retry)."""

    result: str | None = None
    error: RunError | None = None
    exception: BaseException | None = None
    retry: bool = False
    #: Seconds until the retry is due, drawn when the attempt failed (``None``: the run's).
    retry_delay: float | None = None
    #: A user asked for the run to be cancelled and its body was stopped.
    cancelled: bool = False

    @classmethod
    def failure(cls, exc: BaseException, *, retry: bool, traceback: bool = True) -> Outcome:
        """The task (or the worker's verdict on it) raised ``exc``.

        The recorded traceback starts at the task's own code: the worker's and the event
        loop's frames above it say nothing to whoever reads it.
        """
        error = RunError.from_exception(_from_task_code(exc))
        if not traceback:
            error = RunError(type=error.type, message=error.message)
        return cls(error=error, exception=exc, retry=retry)


def _internal_prefixes() -> tuple[str, ...]:
    """Where the frames between the worker and a task's code come from."""
    prefixes = [__file__, os.path.join(os.path.dirname(__file__), "_worker.py")]
    for name in ("anyio", "asyncio", "trio", "outcome"):
        module = sys.modules.get(name)
        if module is not None and module.__file__ is not None:
            prefixes.append(os.path.dirname(module.__file__) + os.sep)
    return tuple(prefixes)


def _from_task_code(exc: BaseException) -> BaseException:
    """``exc`` with the worker's and the event loop's leading frames dropped (if any remain)."""
    prefixes = _internal_prefixes()
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(prefixes):
        tb = tb.tb_next
    return exc if tb is None else exc.with_traceback(tb)


class RunInFlight:
    """One claimed run while this worker holds it."""

    __slots__ = (
        "began",
        "cancelled",
        "done",
        "lease_until",
        "lost",
        "record",
        "scope",
        "settled",
        "settling",
        "started",
        "stop_worker",
        "task",
    )

    def __init__(
        self,
        record: RunRecord,
        task: Task[Any, Any],
        lease_seconds: float,
        *,
        began: float | None = None,
        started: float | None = None,
    ) -> None:
        self.record = record
        self.task = task
        #: While its body runs: the scope to cancel to stop it (its runner's).
        self.scope: anyio.CancelScope | None = None
        self.started = time.time() if started is None else started
        #: The backend clock at the claim, for the run's duration.
        self.began = anyio.current_time() if began is None else began
        #: When the lease runs out as far as this worker knows (on the event loop's
        #: clock): claimed now, moved on by every renewal the broker confirmed.
        self.lease_until = self.began + lease_seconds
        #: The outcome is being recorded.
        self.settling = False
        #: The outcome is recorded (or given up on): nothing to hand back.
        self.settled = False
        #: The claim no longer holds the run (it was claimed again): record nothing.
        self.lost = False
        #: A user asked for the run to be cancelled: it ends CANCELLED.
        self.cancelled = False
        #: The task raised StopTaskWorker: hand the run back and stop the worker.
        self.stop_worker = False
        #: Set once the worker is done with the run (recorded, handed back or lost), for
        #: whoever waits for that; made only for them (see :meth:`finished`).
        self.done: anyio.Event | None = None

    def finished(self) -> anyio.Event:
        """An event set once the worker is done with the run; ask before it can be."""
        if self.done is None:
            self.done = anyio.Event()
        return self.done

    def stop_body(self) -> None:
        """Stop the task's body if it is running; one not started yet never starts."""
        if self.scope is not None:
            self.scope.cancel()

    @property
    def attempt(self) -> int:
        """The claim's attempt number: the fencing token of every call about this run."""
        return self.record.attempts

    def describe(self) -> str:
        return f"run {self.record.id} of {self.task.name!r} (attempt {self.record.attempts})"


class RunnerHooks:
    """What the worker does with a run before and after its runner executes it.

    Attributes:
        in_flight: The worker's ``in_flight()``: held while a runner has runs to execute.
        finished: Takes a run just executed and its outcome, at once, without waiting;
            ``False`` if the runner must ``await settle(entry, outcome)`` itself.
        settle: Records an outcome ``finished`` did not take, then forgets the run.
        abandon: Hands back a run whose runner was cancelled from outside, then forgets it.
        worker_id, threads: For :func:`attempt`.
    """

    __slots__ = ("abandon", "finished", "in_flight", "settle", "threads", "worker_id")

    def __init__(
        self,
        *,
        in_flight: Callable[[], AbstractContextManager[None]],
        finished: Callable[[RunInFlight, Outcome | None], bool],
        settle: Callable[[RunInFlight, Outcome | None], Awaitable[None]],
        abandon: Callable[[RunInFlight], Awaitable[None]],
        worker_id: str,
    ) -> None:
        self.in_flight = in_flight
        self.finished = finished
        self.settle = settle
        self.abandon = abandon
        self.worker_id = worker_id
        self.threads: anyio.CapacityLimiter | None = None


class Runners:
    """A pool of long-lived runner tasks that run claimed runs one after another.

    A runner does not wait for its run's outcome to be recorded: it hands the outcome to
    the worker (see :class:`RunnerHooks`) and takes the next queued run, so runs that
    never wait for anything (a no-op) run one after another in one task, without a
    task switch. A runner that takes a run wakes (or starts) one more runner if more are
    queued, so runs that do wait run side by side, up to the worker's ``limit``.

    One cancel scope per runner, entered once and kept across its runs, stops a run's
    body when its lease is lost or a user cancels it (:meth:`RunInFlight.stop_body`);
    the runner then enters a new one. A stop cancels the idle runners, so runs still
    queued then are handed back by the worker (see :meth:`taken`).
    """

    def __init__(self, spawn: Callable[..., object], hooks: RunnerHooks) -> None:
        self._spawn = spawn
        self._hooks = hooks
        #: Claimed runs waiting for a runner, and the runners waiting for a run.
        self._queued: deque[RunInFlight] = deque()
        self._idle: list[anyio.Event] = []
        self._count = 0
        #: A runner was woken (or started) for the queued runs and has not run yet.
        self._calling = False

    def reset(self, threads: anyio.CapacityLimiter) -> None:
        """Forget the runners of an earlier start (their tasks ended with it)."""
        self._queued.clear()
        self._idle = []
        self._count = 0
        self._calling = False
        self._hooks.threads = threads

    def put(self, entry: RunInFlight) -> None:
        """Queue a run for the next idle runner, or for a new one."""
        self._queued.append(entry)
        if not self._calling:
            self._call_runner()

    def _call_runner(self) -> None:
        """Wake an idle runner for the queued runs, or start one."""
        self._calling = True
        if self._idle:
            self._idle.pop().set()
        else:
            self._count += 1
            self._spawn(self._runner, name=f"runner {self._count}")

    async def taken(self, stopping: Callable[[], bool]) -> list[RunInFlight]:
        """Wait until runners took every queued run; the runs left if a stop came first."""
        while self._queued:
            if stopping():
                left = list(self._queued)
                self._queued.clear()
                return left
            await anyio.lowlevel.checkpoint()
        return []

    async def _runner(self) -> None:
        try:
            while True:
                self._calling = False
                if self._queued:
                    with self._hooks.in_flight():
                        while self._queued:
                            await self._run_queued()
                wake = anyio.Event()
                self._idle.append(wake)
                try:
                    await wake.wait()
                finally:
                    if not wake.is_set():
                        self._idle.remove(wake)
        finally:
            self._count -= 1

    async def _run_queued(self) -> None:
        """Run queued runs in one cancel scope until none is left or one was stopped."""
        hooks = self._hooks
        entry: RunInFlight | None = None
        outcome: Outcome | None = None
        try:
            with anyio.CancelScope() as scope:
                while self._queued:
                    entry = self._queued.popleft()
                    if self._queued and not self._calling:
                        self._call_runner()  # for the others, in case this one waits
                    entry.scope = scope
                    outcome = None
                    outcome = await attempt(entry, hooks.worker_id, hooks.threads)
                    entry.scope = None
                    if scope.cancel_called:
                        break  # Stopped just as it ended: the scope is spent.
                    if not hooks.finished(entry, outcome):
                        await hooks.settle(entry, outcome)
                    entry = None
            if entry is not None:
                # Its body was stopped (lease lost, or cancelled as asked).
                entry.scope = None
                outcome = verdict(entry, outcome)
                if not hooks.finished(entry, outcome):
                    await hooks.settle(entry, outcome)
        except anyio.get_cancelled_exc_class():
            if entry is not None:
                entry.scope = None
                await hooks.abandon(entry)
            raise


def verdict(entry: RunInFlight, outcome: Outcome | None) -> Outcome | None:
    """What an attempt came to, given what happened to the run meanwhile."""
    if entry.lost:
        return None
    if entry.cancelled:
        return Outcome(cancelled=True)
    return outcome


async def attempt(
    entry: RunInFlight, worker_id: str, threads: anyio.CapacityLimiter | None
) -> Outcome | None:
    """Run the task once; ``None`` if the lease was lost meanwhile or it stopped the worker.

    The caller gives the run a cancel scope (``entry.scope``) around the call.
    With OpenTelemetry installed, the attempt is a span, a child of the submitter's.
    """
    record = entry.record
    if otel is None or not otel.records_spans(record.trace_context):
        return await _attempt(entry, worker_id, threads)
    with otel.run_span(
        entry.task.name, record.id, record.attempts, worker_id, record.trace_context
    ) as span:
        outcome = await _attempt(entry, worker_id, threads)
        if outcome is None:
            otel.end_run(span, "handed_back" if entry.stop_worker else "lost", None)
        elif outcome.cancelled:
            otel.end_run(span, "cancelled", None)
        elif outcome.error is not None:
            retried = outcome.retry and record.retries_left > 0
            otel.end_run(span, "retried" if retried else "failed", outcome.exception)
        else:
            otel.end_run(span, "completed", None)
    return outcome


async def _attempt(
    entry: RunInFlight, worker_id: str, threads: anyio.CapacityLimiter | None
) -> Outcome | None:
    if entry.lost or entry.cancelled:
        return verdict(entry, None)  # Stopped before it started: it never starts.
    record, task = entry.record, entry.task
    try:
        args, kwargs = decode_arguments(record.payload)
    except PayloadError as exc:
        return Outcome.failure(exc, retry=False, traceback=False)
    running(
        RunContext(
            run_id=record.id,
            task=task.name,
            attempt=record.attempts,
            retries_left=record.retries_left,
            worker=worker_id,
        )
    )
    outcome: Outcome | None = None
    try:
        value = await _call(task, args, kwargs, record.timeout, threads)
    except StopTaskWorker:
        entry.stop_worker = True
    except TaskTimeoutError as exc:
        outcome = Outcome.failure(exc, retry=task.should_retry(exc), traceback=False)
    except Exception as exc:
        outcome = Outcome.failure(exc, retry=task.should_retry(exc))
    else:
        try:
            outcome = Outcome(result=encode_result(value, task_name=task.name))
        except TypeError as exc:
            outcome = Outcome.failure(exc, retry=False)
    outcome = verdict(entry, outcome)  # The flags may have been set while it ran.
    if outcome is not None and outcome.retry:
        outcome.retry_delay = task.delay_before_retry(record)
    return outcome


async def _call(
    task: Task[Any, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    timeout: float | None,
    threads: anyio.CapacityLimiter | None,
) -> Any:
    if task.is_async:
        if timeout is None:
            return await task.function(*args, **kwargs)
        with anyio.move_on_after(timeout):
            return await task.function(*args, **kwargs)
        raise TaskTimeoutError(f"task {task.name!r} took longer than its timeout of {timeout:g} s")
    call = functools.partial(task.function, *args, **kwargs)
    if timeout is None:
        # A thread cannot be interrupted: a stop or a lost lease waits for it to return.
        return await anyio.to_thread.run_sync(call, limiter=threads)
    # Only the task's own timeout gives up on the thread, which is left to finish.
    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=threads)
    raise TaskTimeoutError(
        f"task {task.name!r} took longer than its timeout of {timeout:g} s; its thread "
        "cannot be interrupted, so it was left running to finish and its result will "
        "be discarded"
    )
