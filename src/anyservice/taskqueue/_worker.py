"""The executing side of task runs: ``TaskWorker`` (a Service) and ``serve()``.

A worker is three kinds of background work in the service's scope:

- the *claim loop* waits for free capacity and for work, claims up to that many runs
  under a lease in one broker call, and starts each in its own task;
- each *run* executes the task inside ``in_flight()`` (a stop lets it finish within the
  grace period), then records the outcome; cancelled at the stop deadline, it hands the
  run back at once with ``broker.release()``, shielded, so nobody waits for its lease;
- the *lease keeper* renews the leases of the runs in flight every ``lease_seconds / 3``
  and cancels, here, any run whose lease another worker took over.

A stop cancels the idle waits at once (nothing new is claimed) and lets the runs in flight
finish; an optional status server keeps answering until they have.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from .._core import Service
from .._core import task as background_task
from .._runner import run as run_service
from . import _http_backend
from ._context import RunContext, running
from ._errors import BrokerError, TaskTimeoutError
from ._queue import Task, TaskQueue
from ._records import PayloadError, RunError, RunRecord
from ._serialize import decode_arguments, encode_result
from ._status import StatusApp

__all__ = ["TaskWorker", "serve"]

#: Most runs claimed in one broker call when the worker has no limit.
_UNLIMITED_CLAIM = 100
#: Longest wait for work between claims; the broker usually wakes the worker sooner.
_IDLE_WAIT = 1.0
#: Backoff between broker calls that failed (the broker already retried a locked file).
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
#: Threads for sync tasks when the worker has no limit (anyio's default thread limit).
_UNLIMITED_THREADS = 40
#: Longest a claim or a hand-back may hold off a cancellation; past it, leases expiring do.
_HAND_BACK_BUDGET = 5.0
#: How many finished run ids the status server lists.
_FINISHED_SHOWN = 100


def _epoch_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


@dataclass(eq=False)
class _Outcome:
    """What an attempt came to: a JSON result, or an error (maybe worth a retry)."""

    result: str | None = None
    error: RunError | None = None
    exception: BaseException | None = None
    retry: bool = False

    @classmethod
    def failure(cls, exc: BaseException, *, retry: bool, traceback: bool = True) -> _Outcome:
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
    prefixes = [__file__]
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


class _RunInFlight:
    """One claimed run while this worker holds it."""

    __slots__ = ("lost", "record", "scope", "settled", "settling", "started", "task")

    def __init__(self, record: RunRecord, task: Task[Any, Any]) -> None:
        self.record = record
        self.task = task
        #: Cancelled when the lease is lost, so the attempt stops here.
        self.scope = anyio.CancelScope()
        self.started = time.time()
        #: The outcome is being recorded: the lease keeper leaves it alone.
        self.settling = False
        #: The outcome is recorded (or given up on): nothing to hand back.
        self.settled = False
        #: Another worker took the run over: record nothing.
        self.lost = False

    def describe(self) -> str:
        return f"run {self.record.id} of {self.task.name!r} (attempt {self.record.attempts})"


class TaskWorker(Service, overrides=("run",)):
    """Runs the task runs that other code submits (Prefect's ``TaskWorker``, durably).

    Claims runs of ``tasks`` from their queue's broker under a lease, runs at most
    ``limit`` at once, renews the leases while they run, and records each outcome. A
    worker that dies loses nothing: its leases expire and another worker takes the runs
    (at-least-once; ``attempts`` counts the claims). A stop claims nothing more, lets the
    runs in flight finish within ``shutdown_timeout``, and hands back at once whatever is
    still running at that deadline.

    Args:
        *tasks: The tasks to serve, all from one :class:`TaskQueue`.
        limit: Most runs in flight at once; ``None`` for no limit.
        lease_seconds: How long a claim lasts without renewal; renewed every third of
            it. A worker that dies holds its runs this long.
        status_server_port: Serve ``GET /status`` and ``GET /healthz`` on this port
            (0 picks a free one: read :attr:`status_server_port` once started). Needs
            ``anyservice[http]``.
        status_server_host: The address the status server binds to.
        name, shutdown_timeout: As for every :class:`~anyservice.Service`.

    Attributes:
        client_id: This worker's lease-owner id, unique per instance (Prefect's name).
        queue: The tasks' queue.
        tasks: The served tasks, by name.

    Raises:
        TypeError, ValueError: no tasks, something that is not a task, tasks of
            different queues, or a bad limit, lease or port.
        ImportError: a status server was asked for and hypercorn is not installed.
    """

    # Within Kubernetes' default 30 s between SIGTERM and SIGKILL, with time left over to
    # hand back what did not finish.
    shutdown_timeout = 25.0

    def __init__(
        self,
        *tasks: Task[Any, Any],
        limit: int | None = 10,
        lease_seconds: float = 30.0,
        status_server_port: int | None = None,
        status_server_host: str = "127.0.0.1",
        name: str | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        super().__init__(name=name, shutdown_timeout=shutdown_timeout)
        if not tasks:
            raise TypeError(f"{self.name}: give the tasks to serve, e.g. TaskWorker(say)")
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError(
                    f"{self.name}: {task!r} is not a task; decorate it with @queue.task"
                )
        queues = {id(task.queue): task.queue for task in tasks}
        if len(queues) > 1:
            urls = ", ".join(sorted(queue.url for queue in queues.values()))
            raise ValueError(f"{self.name}: the tasks come from different queues ({urls})")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"{self.name}: limit must be an int or None, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"{self.name}: limit must be >= 1 (or None for none), got {limit}")
        if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int | float):
            raise TypeError(f"{self.name}: lease_seconds must be a number, got {lease_seconds!r}")
        if not math.isfinite(lease_seconds) or lease_seconds <= 0:
            raise ValueError(f"{self.name}: lease_seconds must be > 0, got {lease_seconds!r}")
        if status_server_port is not None:
            if isinstance(status_server_port, bool) or not isinstance(status_server_port, int):
                raise TypeError(
                    f"{self.name}: status_server_port must be an int, got {status_server_port!r}"
                )
            if not 0 <= status_server_port <= 65535:
                raise ValueError(
                    f"{self.name}: status_server_port must be within 0..65535 "
                    f"(0 picks a free port), got {status_server_port}"
                )
            _http_backend.require_hypercorn()
        self.queue: TaskQueue = tasks[0].queue
        self.tasks: dict[str, Task[Any, Any]] = {task.name: task for task in tasks}
        self.limit = limit
        self.lease_seconds = float(lease_seconds)
        self.status_server_host = status_server_host
        #: The status server's port: as asked until started, then the one bound.
        self.status_server_port = status_server_port
        self._status_requested = status_server_port
        self.client_id = uuid.uuid4().hex
        self.started_at: datetime | None = None
        #: Outcomes since the worker was made: completed, failed, retried, handed_back, lost.
        self.counts = dict.fromkeys(
            ("completed", "failed", "retried", "handed_back", "lost", "not_recorded"), 0
        )
        self._finished: deque[str] = deque(maxlen=_FINISHED_SHOWN)
        self._runs: dict[str, _RunInFlight] = {}
        # Claimed runs waiting for a runner, and the runners waiting for a run.
        self._queued: deque[_RunInFlight] = deque()
        self._idle_runners: list[anyio.Event] = []
        self._runners = 0
        self._broker_problem: str | None = None
        # Made per start, inside the event loop.
        self._busy = self._idle = self._drained = anyio.Event()
        self._freed: anyio.Event | None = None
        self._threads: anyio.CapacityLimiter | None = None
        self._holding_queue = False

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self._runs = {}
        self._queued.clear()
        self._idle_runners = []
        self._runners = 0
        self._busy, self._idle, self._drained = anyio.Event(), anyio.Event(), anyio.Event()
        self._idle.set()
        self._freed = None
        self._threads = anyio.CapacityLimiter(self.limit or _UNLIMITED_THREADS)
        if not self._holding_queue:
            await self.queue.hold()
            self._holding_queue = True
        if self._status_requested is not None:
            sock = self._bind_status_socket(self._status_requested)
            self.add_context(closing(sock))
            self.status_server_port = sock.getsockname()[1]
            self.spawn(functools.partial(self._serve_status, sock), name="status server")
        self.started_at = datetime.now(UTC)
        self.log.info(
            "serving %s from %s with limit %s as %s%s",
            ", ".join(sorted(self.tasks)),
            self.queue.url,
            self.limit,
            self.client_id,
            ""
            if self._status_requested is None
            else f"; status on http://{self.status_server_host}:{self.status_server_port}/status",
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """See :meth:`Service.run`; the broker stays open until every run has unwound."""
        # Not a resource of the service: at the stop deadline resources are released while
        # cancelled runs are still handing themselves back through the broker.
        try:
            await super().run(task_status=task_status)
        finally:
            if self._holding_queue:
                self._holding_queue = False
                await self.queue.let_go()

    async def on_stop(self) -> None:
        if self._runs:
            self.log.info(
                "stopping: no new claims; waiting up to %ss for %d run(s) in flight",
                self.shutdown_timeout,
                len(self._runs),
            )
        else:
            self._drained.set()

    def _bind_status_socket(self, port: int) -> socket.socket:
        host = self.status_server_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(100)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"{self.name}: cannot serve status on {host}:{port}: {exc.strerror}"
            ) from exc
        sock.setblocking(False)
        return sock

    async def _serve_status(self, sock: socket.socket) -> None:
        # In flight for its whole life: it keeps answering (stopping: true) while the runs
        # drain, and shuts down once they have.
        async with self.in_flight():
            await _http_backend.serve(
                StatusApp(self),
                sock,
                shutdown_trigger=self._drained.wait,
                logger=self.log.logger.getChild("status"),
            )

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Prefect's status fields, plus ``state`` and ``counts``: what ``/status`` serves.

        ``finished`` lists the ids of the last runs this worker finished (at most 100);
        ``in_flight`` maps the ids of the runs it holds to their task, attempt and start.
        """
        current = len(self._runs)
        return {
            "client_id": self.client_id,
            "name": self.name,
            "state": self.state.name,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "stopping": self.should_stop,
            "limit": self.limit,
            "current": current,
            "available": None if self.limit is None else max(self.limit - current, 0),
            "tasks": sorted(self.tasks),
            "finished": list(self._finished),
            "in_flight": {
                run_id: {
                    "task": entry.task.name,
                    "attempt": entry.record.attempts,
                    "started": _epoch_iso(entry.started),
                }
                for run_id, entry in self._runs.items()
            },
            "counts": dict(self.counts),
        }

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """What ``GET /healthz`` answers: whether the last broker call worked, and if not why."""
        if self._broker_problem is not None:
            return False, {"status": "unhealthy", "reason": self._broker_problem}
        return True, {"status": "ok", "state": self.state.name}

    def _broker_failed(self, exc: BrokerError, doing: str) -> None:
        problem = f"broker error while {doing}: {exc}"
        if problem != self._broker_problem:
            self.log.warning("%s (retrying)", problem)
        self._broker_problem = problem

    def _broker_worked(self) -> None:
        if self._broker_problem is not None:
            self.log.info("broker reachable again")
            self._broker_problem = None

    # ------------------------------------------------------------------ claiming

    @background_task
    async def _claim_runs(self) -> None:
        broker = self.queue.broker
        names = sorted(self.tasks)
        backoff = _FIRST_BACKOFF
        while True:
            while self.limit is not None and len(self._runs) >= self.limit:
                self._freed = self._freed or anyio.Event()
                await self._freed.wait()
            wanted = _UNLIMITED_CLAIM if self.limit is None else self.limit - len(self._runs)
            claimed: list[RunRecord] | None
            async with self.in_flight():
                claimed = await self._claim(names, wanted)
                if claimed and self.should_stop:
                    # Claimed while a stop came in: hand them straight back.
                    for record in claimed:
                        await self._hand_back(record, "the worker is stopping")
                    return
                for record in claimed or ():
                    self._start(record)
                if await self._hand_over():
                    return
            if claimed is None:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = _FIRST_BACKOFF
            if len(claimed) < wanted:
                try:
                    await broker.wait_for_work(_IDLE_WAIT)
                except BrokerError as exc:
                    self._broker_failed(exc, "waiting for work")
                    await anyio.sleep(backoff)

    async def _hand_over(self) -> bool:
        """Wait until runners took every started run; True if a stop came first.

        A stop cancels idle runners, so runs still queued then are handed back here.
        """
        while self._queued:
            if self.should_stop:
                while self._queued:
                    entry = self._queued.popleft()
                    entry.settled = True
                    await self._hand_back(entry.record, "the worker is stopping")
                    self._forget(entry)
                return True
            await anyio.lowlevel.checkpoint()
        return False

    async def _claim(self, names: list[str], wanted: int) -> list[RunRecord] | None:
        """Claim up to ``wanted`` runs; ``None`` when the broker failed.

        Shielded, within bounds: a claim cancelled once the broker has made it would leave
        its runs leased to nobody until the leases expire. Claimed, they are started or
        handed back, whatever cancellation comes.
        """
        with anyio.move_on_after(_HAND_BACK_BUDGET, shield=True):
            try:
                claimed = await self.queue.broker.claim(
                    self.client_id, names, limit=wanted, lease_seconds=self.lease_seconds
                )
            except BrokerError as exc:
                self._broker_failed(exc, "claiming runs")
                return None
            self._broker_worked()
            return claimed
        self._broker_failed(
            BrokerError(f"no answer within {_HAND_BACK_BUDGET:g} s"), "claiming runs"
        )
        return None

    def _start(self, record: RunRecord) -> None:
        entry = _RunInFlight(record, self.tasks[record.task])
        if not self._runs:
            self._busy.set()
            self._idle = anyio.Event()
        self._runs[record.id] = entry
        self._queued.append(entry)
        if self._idle_runners:
            self._idle_runners.pop().set()
        else:
            self._runners += 1
            self.spawn(self._runner, name=f"runner {self._runners}")

    async def _runner(self) -> None:
        """Run queued runs one after another; a pool of these, grown up to ``limit``.

        Long-lived, because starting a task per run would cost more than a no-op run.
        """
        try:
            while True:
                while not self._queued:
                    wake = anyio.Event()
                    self._idle_runners.append(wake)
                    try:
                        await wake.wait()
                    finally:
                        if not wake.is_set():
                            self._idle_runners.remove(wake)
                await self._execute(self._queued.popleft())
        finally:
            self._runners -= 1

    def _forget(self, entry: _RunInFlight) -> None:
        # A retry can be claimed again (a new entry under the same id) before the attempt
        # that recorded the failure has unwound: forget only this entry.
        if self._runs.get(entry.record.id) is not entry:
            return
        del self._runs[entry.record.id]
        if self._freed is not None:
            self._freed.set()
            self._freed = None
        if not self._runs:
            self._idle.set()
            self._busy = anyio.Event()
            if self.should_stop:
                self._drained.set()

    # ------------------------------------------------------------------ running

    async def _execute(self, entry: _RunInFlight) -> None:
        try:
            async with self.in_flight():
                outcome = await self._attempt(entry)
                if outcome is not None:
                    await self._settle(entry, outcome)
        except anyio.get_cancelled_exc_class():
            if not entry.settled and not entry.lost:
                # The stop deadline, a forced stop or a crash: hand the run back now rather
                # than after its lease.
                entry.settled = True
                await self._hand_back(entry.record, "its worker was cancelled")
            raise
        finally:
            self._forget(entry)

    async def _attempt(self, entry: _RunInFlight) -> _Outcome | None:
        """Run the task once; ``None`` if the lease was lost meanwhile."""
        record, task = entry.record, entry.task
        try:
            args, kwargs = decode_arguments(record.payload)
        except PayloadError as exc:
            return _Outcome.failure(exc, retry=False, traceback=False)
        running(
            RunContext(
                run_id=record.id,
                task=task.name,
                attempt=record.attempts,
                retries_left=record.retries_left,
                worker=self.client_id,
            )
        )
        outcome: _Outcome | None = None
        with entry.scope:
            try:
                value = await self._call(task, args, kwargs, record.timeout)
            except TaskTimeoutError as exc:
                outcome = _Outcome.failure(exc, retry=True, traceback=False)
            except Exception as exc:
                outcome = _Outcome.failure(exc, retry=True)
            else:
                try:
                    outcome = _Outcome(result=encode_result(value, task_name=task.name))
                except TypeError as exc:
                    outcome = _Outcome.failure(exc, retry=False)
        return None if entry.lost else outcome

    async def _call(
        self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        if task.is_async:
            if timeout is None:
                return await task.function(*args, **kwargs)
            with anyio.move_on_after(timeout):
                return await task.function(*args, **kwargs)
            raise TaskTimeoutError(
                f"task {task.name!r} took longer than its timeout of {timeout:g} s"
            )
        call = functools.partial(task.function, *args, **kwargs)
        if timeout is None:
            # A thread cannot be interrupted: a stop or a lost lease waits for it to return.
            return await anyio.to_thread.run_sync(call, limiter=self._threads)
        # Only the task's own timeout gives up on the thread, which is left to finish.
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            return await anyio.to_thread.run_sync(
                call, abandon_on_cancel=True, limiter=self._threads
            )
        raise TaskTimeoutError(
            f"task {task.name!r} took longer than its timeout of {timeout:g} s; its thread "
            "cannot be interrupted, so it was left running to finish and its result will "
            "be discarded"
        )

    def _record_budget(self) -> float:
        # Past the lease the broker refuses the record anyway.
        return self.lease_seconds

    async def _settle(self, entry: _RunInFlight, outcome: _Outcome) -> None:
        """Record the outcome, shielded from a stop and retried through broker errors."""
        entry.settling = True
        record = entry.record
        broker = self.queue.broker
        retrying = outcome.retry and record.retries_left > 0

        async def store() -> bool:
            if outcome.error is None:
                assert outcome.result is not None
                return await broker.complete(self.client_id, record.id, outcome.result)
            return await broker.fail(self.client_id, record.id, outcome.error, retry=outcome.retry)

        stored: bool | None = None
        with anyio.move_on_after(self._record_budget(), shield=True):
            stored = await self._retrying(store, f"recording {entry.describe()}")
        entry.settled = True
        if stored is None:
            self.counts["not_recorded"] += 1
            self.log.error(
                "%s: could not record its outcome within %ss; its lease will expire and "
                "another worker will run it again",
                entry.describe(),
                self._record_budget(),
            )
            return
        if not stored:
            self.counts["lost"] += 1
            self.log.warning(
                "%s finished, but its lease had passed to another worker: outcome not recorded",
                entry.describe(),
            )
            return
        if not retrying:
            self._finished.append(record.id)
        if outcome.error is None:
            self.counts["completed"] += 1
        elif retrying:
            self.counts["retried"] += 1
            self.log.warning(
                "%s failed: %s: %s; retrying in %gs (%d retr%s left)",
                entry.describe(),
                outcome.error.type,
                outcome.error.message,
                record.retry_delay,
                record.retries_left - 1,
                "y" if record.retries_left - 1 == 1 else "ies",
            )
        else:
            self.counts["failed"] += 1
            self.log.error(
                "%s failed: %s: %s",
                entry.describe(),
                outcome.error.type,
                outcome.error.message,
                exc_info=outcome.exception if outcome.error.traceback else None,
            )

    async def _retrying(self, call: Callable[[], Awaitable[bool]], doing: str) -> bool:
        backoff = _FIRST_BACKOFF
        while True:
            try:
                done = await call()
            except BrokerError as exc:
                self._broker_failed(exc, doing)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            else:
                self._broker_worked()
                return done

    async def _hand_back(self, record: RunRecord, why: str) -> None:
        """Release a claimed run at once, shielded from the cancellation under way."""
        released: bool | None = None
        with anyio.move_on_after(min(self.lease_seconds, _HAND_BACK_BUDGET), shield=True):
            released = await self._retrying(
                lambda: self.queue.broker.release(self.client_id, record.id),
                f"handing back run {record.id}",
            )
        if released:
            self.counts["handed_back"] += 1
            self.log.warning(
                "run %s of %r handed back unfinished (%s): another worker will run it",
                record.id,
                record.task,
                why,
            )
        elif released is None:
            self.log.error(
                "run %s of %r could not be handed back (%s); it will be run again once "
                "its lease expires",
                record.id,
                record.task,
                why,
            )
        else:
            self.log.warning(
                "run %s of %r was not handed back (%s): its lease had passed to another worker",
                record.id,
                record.task,
                why,
            )

    # ------------------------------------------------------------------ leases

    @background_task
    async def _keep_leases(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await self._busy.wait()
            # While runs are in flight, renewing their leases is in flight too: it goes on
            # through a graceful stop for as long as they do.
            async with self.in_flight():
                # Every run held now was claimed since the worker was last idle (or the
                # last renewal), so a renewal one interval on is in time for all of them;
                # a worker that goes idle for a moment between claims renews nothing more.
                renew_at = anyio.current_time() + interval
                while self._runs:
                    with anyio.move_on_after(renew_at - anyio.current_time()):
                        await self._idle.wait()
                    if self._runs and anyio.current_time() >= renew_at:
                        await self._renew()
                        renew_at = anyio.current_time() + interval

    async def _renew(self) -> None:
        ids = [run_id for run_id, entry in self._runs.items() if not entry.settling]
        if not ids:
            return
        try:
            held = await self.queue.broker.heartbeat(
                self.client_id, ids, lease_seconds=self.lease_seconds
            )
        except BrokerError as exc:
            self._broker_failed(exc, "renewing leases")
            return
        self._broker_worked()
        for run_id in ids:
            entry = self._runs.get(run_id)
            if run_id in held or entry is None or entry.settling or entry.lost:
                continue
            entry.lost = True
            self.counts["lost"] += 1
            self.log.warning(
                "%s: its lease was lost (another worker may have it): cancelled here",
                entry.describe(),
            )
            entry.scope.cancel()


# ---------------------------------------------------------------------- serve()

BACKENDS = ("asyncio", "trio")


def serve(
    *tasks: Task[Any, Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    backend: Literal["asyncio", "trio"] = "asyncio",
    status_server_host: str = "127.0.0.1",
    lease_seconds: float = 30.0,
    shutdown_timeout: float | None = None,
) -> int:
    """Serve ``tasks`` until SIGINT or SIGTERM (Prefect's ``serve``); return the exit code.

    Blocks: runs a :class:`TaskWorker` with ``anyservice.run`` in a new event loop of
    ``backend``. The first SIGINT/SIGTERM stops it gracefully (no new claims, runs in
    flight finish within ``shutdown_timeout``, the rest are handed back); a second one
    stops it at once, handing back what is in flight.

    Returns:
        ``anyservice.run``'s exit code: 0 after a stop, 1 if the worker crashed (logged
        with its traceback), 128 + the signal's number after a second signal.

    Raises:
        ValueError: an unknown backend, or bad worker options (see :class:`TaskWorker`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    worker = TaskWorker(
        *tasks,
        limit=limit,
        status_server_port=status_server_port,
        status_server_host=status_server_host,
        lease_seconds=lease_seconds,
        shutdown_timeout=shutdown_timeout,
    )
    return run_service(worker, backend=backend, handle_signals=True)
