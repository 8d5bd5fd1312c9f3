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

import contextvars
import functools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from .._tracing import otel
from ._context import run_as
from ._errors import StopTaskWorker, TaskTimeoutError
from ._queue import Task
from ._records import PayloadError, RunError, RunRecord
from ._serialize import NO_ARGUMENTS, decode_arguments, encode_result

__all__ = ["Outcome", "RunInFlight", "RunnerHooks", "Runners", "attempt", "tracer_set", "verdict"]

#: How long a worker thread runs queued sync bodies back to back before it hands their
#: outcomes to the event loop (which records them), when runs keep coming.
THREAD_BATCH_SECONDS = 0.002
#: How long a runner called for queued sync runs leaves them to the worker threads that
#: are running sync bodies already, for as long as those threads keep finishing bodies: a
#: thread hop per run would cost more than the run. A thread still in the same body after
#: this long may be blocked in it, and the runner takes the queued run itself.
THREAD_PATIENCE = 0.001
#: How often the outcomes of the bodies a worker thread finished are settled while it runs
#: on: a body that takes long would otherwise hold back the record of those before it.
THREAD_RESULTS_EVERY = 0.002
#: How often at least, when the threads have finished nothing for a while.
_RESULTS_AT_MOST = 0.1
#: How often the claim loop looks whether the threads took the runs it claimed: the
#: next claim waits for that look, so it bounds how many sync runs a second the threads
#: can be given (1 ms held a limit-100 worker to about 22 000 no-op sync runs a second
#: here, 0.2 ms let it do about 30 000; a look is one pass of the loop, only while
#: threads are taking runs).
_QUEUE_POLL = 0.0002
#: Held while a worker thread moves from one run to the next (clearing the scope of the
#: run it finished, setting it on the next) and while the event loop stops a body, so that
#: a stop meant for a run that just finished never reaches the next one.
_SWITCHING = threading.Lock()


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
        "spans",
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
        began: float,
        started: float,
        traced: bool,
    ) -> None:
        self.record = record
        self.task = task
        #: Its attempt is a span (see :func:`attempt`). ``traced``: whether a tracer
        #: provider is set (:func:`tracer_set`), asked once per claim, not once per run.
        self.spans = traced or (otel is not None and record.trace_context is not None)
        #: While its body runs: the scope to cancel to stop it (its runner's).
        self.scope: anyio.CancelScope | None = None
        #: When it was claimed: on the wall clock, and on the backend's (for its duration).
        self.started = started
        self.began = began
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
        with _SWITCHING:
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
        stopping: Whether the worker is stopping (no new runner or task is started then).
        worker_id, threads: For :func:`attempt`.
    """

    __slots__ = ("abandon", "finished", "in_flight", "settle", "stopping", "threads", "worker_id")

    def __init__(
        self,
        *,
        in_flight: Callable[[], AbstractContextManager[None]],
        finished: Callable[[RunInFlight, Outcome | None], bool],
        settle: Callable[[RunInFlight, Outcome | None], Awaitable[None]],
        abandon: Callable[[RunInFlight], Awaitable[None]],
        stopping: Callable[[], bool],
        worker_id: str,
    ) -> None:
        self.in_flight = in_flight
        self.finished = finished
        self.settle = settle
        self.abandon = abandon
        self.stopping = stopping
        self.worker_id = worker_id
        self.threads: anyio.CapacityLimiter | None = None


class _ThreadBatch:
    """What a runner and the worker thread it waits for share while the thread runs bodies.

    The runner's cancel scope is the scope of whichever run the thread is executing
    (``current``), so ``anyio.from_thread.run()`` and ``check_cancelled()`` in a body
    belong to its own run, and stopping that run cancels it.
    """

    __slots__ = ("cancelled", "current", "ran", "scope", "started", "worker_id")

    def __init__(self, first: RunInFlight, scope: anyio.CancelScope, worker_id: str) -> None:
        #: The run whose body the thread is executing, or is about to.
        self.current: RunInFlight | None = first
        #: The runs whose bodies ended, each with what it came to, to be settled (by the
        #: runner, or while the thread runs on by :meth:`Runners._watch`).
        self.ran: deque[tuple[RunInFlight, Outcome | None]] = deque()
        self.scope = scope
        #: Bodies started so far: how the runners see that the thread keeps up.
        self.started = 1
        self.worker_id = worker_id
        self.cancelled = anyio.get_cancelled_exc_class()


class Runners:
    """A pool of long-lived runner tasks that run claimed runs one after another.

    A runner does not wait for its run's outcome to be recorded: it hands the outcome to
    the worker (see :class:`RunnerHooks`) and takes the next queued run, so runs that
    never wait for anything (a no-op) run one after another in one task, without a
    task switch. A runner that takes a run wakes (or starts) one more runner if more are
    queued, so runs that do wait run side by side, up to the worker's ``limit``.

    A sync run (one without a timeout or a span to record) goes to a worker thread, which
    then takes the next queued sync runs itself, each once its body before returned, for
    up to :data:`THREAD_BATCH_SECONDS`: one thread hop for a series of runs, not one per
    run. Their outcomes come back to the runner when the thread returns. The runner woken
    for the runs still queued leaves them to such threads while they keep finishing
    bodies, and takes one itself once none has for :data:`THREAD_PATIENCE`, so a run does
    not wait for a body that blocks.

    One cancel scope per runner, entered once and kept across its runs, stops a run's
    body when its lease is lost or a user cancels it (:meth:`RunInFlight.stop_body`);
    the runner then enters a new one. A stop cancels the idle runners, so runs still
    queued then are handed back by the worker (see :meth:`taken`).
    """

    def __init__(self, spawn: Callable[..., object], hooks: RunnerHooks) -> None:
        self._spawn = spawn
        self._hooks = hooks
        #: Claimed runs waiting for a runner, and the runners waiting for a run. Worker
        #: threads take runs from it too (``popleft`` is atomic), so every take allows
        #: for its being empty by then.
        self._queued: deque[RunInFlight] = deque()
        self._idle: list[anyio.Event] = []
        self._count = 0
        #: Most runners busy at once (the worker's ``limit``): runs claimed ahead of it
        #: wait in the queue for a runner to finish its run.
        self._most: int | None = None
        #: A runner was woken (or started) for the queued runs and has not taken one yet.
        self._calling = False
        #: The worker threads running sync bodies now.
        self._batches: list[_ThreadBatch] = []
        #: A stop handed the queued runs back: threads take no more.
        self._closing = False
        #: A task settles what the threads finished while they run on (see :meth:`_watch`).
        self._watching = False
        #: Set (and made anew) when a thread returns, for whoever waits on the threads.
        self._returned = anyio.Event()

    def reset(self, threads: anyio.CapacityLimiter, most: int | None = None) -> None:
        """Forget the runners of an earlier start (their tasks ended with it); at most
        ``most`` runners busy at once from now on (``None``: as many as runs queued)."""
        self._most = most
        self._queued.clear()
        self._idle = []
        self._count = 0
        self._calling = False
        self._batches = []
        self._closing = False
        self._watching = False
        self._returned = anyio.Event()
        self._hooks.threads = threads

    @property
    def waiting(self) -> int:
        """How many runs wait in the queue for a runner (claimed ahead of the limit)."""
        return len(self._queued)

    @property
    def idle(self) -> int:
        """How many runners wait for a run (one takes the next queued at once)."""
        return len(self._idle)

    def put(self, entry: RunInFlight) -> None:
        """Queue a run for the next idle runner, or for a new one."""
        self._queued.append(entry)
        if not self._calling:
            self._call_runner()

    def _call_runner(self) -> None:
        """Wake an idle runner for the queued runs, or start one (not while stopping),
        unless ``most`` runners are busy already: one of them takes the run next."""
        if self._full():
            return
        if self._idle:
            self._calling = True
            self._idle.pop().set()
        elif not self._hooks.stopping():
            self._calling = True
            self._count += 1
            self._spawn(self._runner, name=f"runner {self._count}")

    def _full(self) -> bool:
        """Whether ``most`` runners are busy (none waits for a run)."""
        most = self._most
        return most is not None and self._count - len(self._idle) >= most

    def _take(self) -> RunInFlight | None:
        """The next queued run, if a worker thread did not take the last meanwhile."""
        try:
            return self._queued.popleft()
        except IndexError:
            return None

    async def taken(self, stopping: Callable[[], bool]) -> list[RunInFlight]:
        """Wait until runners took every queued run they can take now (runs claimed
        ahead wait for a busy runner); the runs left if a stop came first."""
        while self._queued:
            if stopping():
                return self.close()
            if not self._calling and (not self._batches or self._full()):
                return []  # Every runner is busy: the one done first takes the next.
            if self._batches:
                # Threads are taking them: a pass of the loop each would keep the GIL from them.
                await anyio.sleep(_QUEUE_POLL)
            else:
                await anyio.lowlevel.checkpoint()
        return []

    def close(self) -> list[RunInFlight]:
        """The runs still queued, taken out for the worker to hand back (a stop): runners
        and threads take no more."""
        self._closing = True
        left = []
        while (entry := self._take()) is not None:
            left.append(entry)
        return left

    async def _runner(self) -> None:
        try:
            while True:
                await self._leave_to_threads()
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

    async def _leave_to_threads(self) -> None:
        """Wait while the worker threads running sync bodies keep taking the queued runs."""
        while self._batches and _in_a_thread(_head(self._queued)):
            seen = [(batch, batch.started) for batch in self._batches]
            returned = self._returned
            with anyio.move_on_after(THREAD_PATIENCE):
                await returned.wait()
            if returned.is_set():
                continue  # A thread returned: its runner may take the runs, or nobody.
            if all(batch in self._batches and batch.started == n for batch, n in seen):
                return  # Each is still in the body it was in: maybe blocked there.

    def end_stopped(self) -> None:
        """End at once the queued runs stopped before a runner took them (a lost lease, a
        cancellation asked for): each in a task of its own, where it never starts, rather
        than when a runner is free."""
        for entry in list(self._queued):  # a copy: threads take from the queue meanwhile
            if entry.lost or entry.cancelled:
                try:
                    self._queued.remove(entry)
                except ValueError:
                    continue  # A thread took it meanwhile: it ends there.
                self.run_now(entry)

    def run_now(self, entry: RunInFlight) -> None:
        """Run ``entry`` at once in a task of its own, past ``most`` (it is not queued)."""
        self._spawn(functools.partial(self._run_one, entry), name=f"run {entry.record.id}")

    async def _run_one(self, entry: RunInFlight) -> None:
        with self._hooks.in_flight():
            await self._run_queued(functools.partial(next, iter((entry,)), None))

    async def _run_queued(self, take: Callable[[], RunInFlight | None] | None = None) -> None:
        """Run queued runs (or those ``take`` gives) in one cancel scope until none is left
        or one was stopped."""
        hooks = self._hooks
        entry: RunInFlight | None = None
        outcome: Outcome | None = None
        ran: deque[tuple[RunInFlight, Outcome | None]] = deque()  # a thread's, to settle
        take = take or self._take
        try:
            with anyio.CancelScope() as scope:
                while (entry := take()) is not None:
                    if self._queued and not self._calling:
                        self._call_runner()  # for the others, in case this one waits
                    entry.scope = scope
                    outcome = None
                    if not entry.task.is_async and _in_a_thread(entry):
                        batch = _ThreadBatch(entry, scope, hooks.worker_id)
                        try:
                            await self._in_thread(batch)
                        finally:
                            ran.extend(batch.ran)
                            batch.ran.clear()
                            entry = batch.current  # Its body raised past the thread.
                        if scope.cancel_called:
                            break  # A run of the thread's was stopped: the scope is spent.
                        await self._settle(ran)
                        continue
                    # Without a span, the attempt itself: a coroutine fewer per run.
                    run = attempt if entry.spans else _attempt
                    outcome = await run(entry, hooks.worker_id, hooks.threads)
                    entry.scope = None
                    if scope.cancel_called:
                        break  # Stopped just as it ended: the scope is spent.
                    if not hooks.finished(entry, outcome):
                        await hooks.settle(entry, outcome)
                    entry = None
            await self._settle(ran)
            if entry is not None:
                # Its body was stopped (lease lost, or cancelled as asked).
                entry.scope = None
                outcome = verdict(entry, outcome)
                if not hooks.finished(entry, outcome):
                    await hooks.settle(entry, outcome)
        except anyio.get_cancelled_exc_class():
            await self._abandon(ran, entry)
            raise

    async def _in_thread(self, batch: _ThreadBatch) -> None:
        """Run ``batch``'s first body, and the queued sync runs after it, in a worker thread."""
        self._batches.append(batch)
        if not self._watching and not self._hooks.stopping():
            self._watching = True
            self._spawn(self._watch, name="thread watcher")
        try:
            await anyio.to_thread.run_sync(self._thread_loop, batch, limiter=self._hooks.threads)
        finally:
            self._batches.remove(batch)
            self._returned.set()
            self._returned = anyio.Event()

    async def _watch(self) -> None:
        """While threads run bodies, settle those they finished every so often.

        A thread hands its outcomes over when it returns, which a body that takes long
        (or blocks) would put off: the runs before it would wait for it to be recorded.
        """
        try:
            with self._hooks.in_flight():  # Until the last thread returns: a stop waits.
                every = THREAD_RESULTS_EVERY
                while self._batches:
                    returned = self._returned
                    with anyio.move_on_after(every):
                        await returned.wait()
                    found = returned.is_set()
                    for batch in list(self._batches):
                        found = found or bool(batch.ran)
                        await self._settle(batch.ran)
                    # Less often while the threads are in long bodies: nothing to settle.
                    every = THREAD_RESULTS_EVERY if found else min(2 * every, _RESULTS_AT_MOST)
        finally:
            self._watching = False

    def _thread_loop(self, batch: _ThreadBatch) -> None:
        """In the worker thread: run bodies while queued sync runs come, within bounds."""
        until = time.monotonic() + THREAD_BATCH_SECONDS
        entry = batch.current
        while entry is not None:
            # A context of its own per body, as a thread hop of its own would give it.
            outcome = contextvars.copy_context().run(_run_in_thread, entry, batch.worker_id)
            with _SWITCHING:
                entry.scope = None
                batch.ran.append((entry, _concluded(entry, outcome)))
                batch.current = None
                if entry.stop_worker or self._closing or time.monotonic() >= until:
                    return
                try:
                    anyio.from_thread.check_cancelled()
                except batch.cancelled:
                    return  # A stop, or a run of the batch was stopped as it ended.
                entry = self._take_in_thread()
                if entry is not None:
                    entry.scope = batch.scope
                    batch.current = entry
                    batch.started += 1

    def _take_in_thread(self) -> RunInFlight | None:
        """The next queued run if it is a sync run this thread may run."""
        if self._closing:
            return None
        entry = self._take()
        if entry is not None and not _in_a_thread(entry):
            # Not a body for this thread: back to the front, for its runner to run next.
            self._queued.appendleft(entry)
            return None
        return entry

    async def _settle(self, ran: deque[tuple[RunInFlight, Outcome | None]]) -> None:
        """Settle the runs a thread ran, in order, taking each from ``ran`` (which the
        thread may still be adding to, and another task settling from)."""
        hooks = self._hooks
        while ran:
            entry, outcome = ran.popleft()
            try:
                if not hooks.finished(entry, outcome):
                    await hooks.settle(entry, outcome)
            except anyio.get_cancelled_exc_class():
                await hooks.abandon(entry)
                raise

    async def _abandon(
        self, ran: deque[tuple[RunInFlight, Outcome | None]], entry: RunInFlight | None
    ) -> None:
        """The runner was cancelled (a forced stop): hand back what it could not settle at
        once, and the runs still queued, which no runner will take now."""
        hooks = self._hooks
        while ran:
            done, outcome = ran.popleft()
            if not hooks.finished(done, outcome):
                await hooks.abandon(done)
        if entry is not None:
            entry.scope = None
            await hooks.abandon(entry)
        while (entry := self._take()) is not None:
            await hooks.abandon(entry)


def _head(queued: deque[RunInFlight]) -> RunInFlight | None:
    try:
        return queued[0]
    except IndexError:
        return None


def _in_a_thread(entry: RunInFlight | None) -> bool:
    """Whether a worker thread may run ``entry`` among others: a sync body, no timeout
    (which the event loop must keep) and no span to record (which the event loop opens)."""
    if entry is None or entry.task.is_async or entry.record.timeout is not None:
        return False
    return not entry.spans


def tracer_set() -> bool:
    """Whether a tracer provider is set, so that every attempt is a span: asked once per
    claim (it reads the environment and OpenTelemetry's globals), not once per run."""
    return otel is not None and otel.records_spans(None)


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
    if not entry.spans:
        return await _attempt(entry, worker_id, threads)
    record = entry.record
    assert otel is not None
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
    prepared = _prepared(entry, worker_id)
    if isinstance(prepared, Outcome):
        return prepared
    args, kwargs = prepared
    task = entry.task
    outcome: Outcome | None = None
    timeout = entry.record.timeout
    try:
        if task.is_async and timeout is None:
            value = await task.function(*args, **kwargs)  # the usual run: no call between
        else:
            value = await _call(task, args, kwargs, timeout, threads)
    except StopTaskWorker:
        entry.stop_worker = True
    except TaskTimeoutError as exc:
        outcome = Outcome.failure(exc, retry=task.should_retry(exc), traceback=False)
    except Exception as exc:
        outcome = Outcome.failure(exc, retry=task.should_retry(exc))
    else:
        if value is not None:
            outcome = _returned(task, value)
        elif not (entry.lost or entry.cancelled):
            return _RETURNED_NONE  # the usual run, as _concluded would find it
    return _concluded(entry, outcome)  # The flags may have been set while it ran.


def _run_in_thread(entry: RunInFlight, worker_id: str) -> Outcome | None:
    """One sync body, in a worker thread (see :meth:`Runners._thread_loop`)."""
    if entry.lost or entry.cancelled:
        return None  # Stopped before it started: it never starts.
    prepared = _prepared(entry, worker_id)
    if isinstance(prepared, Outcome):
        return prepared
    args, kwargs = prepared
    task = entry.task
    try:
        value = task.function(*args, **kwargs)
    except StopTaskWorker:
        entry.stop_worker = True
        return None
    except Exception as exc:
        return Outcome.failure(exc, retry=task.should_retry(exc))
    return _returned(task, value)


def _prepared(entry: RunInFlight, worker_id: str) -> tuple[list[Any], dict[str, Any]] | Outcome:
    """The run's arguments, its context set for the body; a failure if they do not decode."""
    record = entry.record
    payload = record.payload
    try:
        # No call for the usual payload of no arguments.
        args, kwargs = ([], {}) if payload == NO_ARGUMENTS else decode_arguments(payload)
    except PayloadError as exc:
        return Outcome.failure(exc, retry=False, traceback=False)
    run_as([record, worker_id, None])
    return args, kwargs


#: The outcome of every run that returned ``None``: nothing changes an outcome that
#: carries a result, so they share one.
_RETURNED_NONE = Outcome(result="null")


def _returned(task: Task[Any, Any], value: object) -> Outcome:
    if value is None:
        return _RETURNED_NONE
    try:
        return Outcome(result=encode_result(value, task_name=task.name))
    except TypeError as exc:
        return Outcome.failure(exc, retry=False)


def _concluded(entry: RunInFlight, outcome: Outcome | None) -> Outcome | None:
    """What the body came to, given what happened to the run while it ran."""
    outcome = verdict(entry, outcome)
    if outcome is not None and outcome.retry:
        outcome.retry_delay = entry.task.delay_before_retry(entry.record)
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
