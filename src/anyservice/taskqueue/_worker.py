"""The executing side of task runs: ``TaskWorker`` (a Service) and ``serve()``.

A worker is three kinds of background work in the service's scope:

- the *claim loop* waits for free capacity and for work, claims up to that many runs
  under a lease in one broker call, and starts each in its own task;
- each *run* executes the task inside ``in_flight()`` (a stop lets it finish within the
  grace period), then records the outcome (``_recording.py``); cancelled at the stop
  deadline, it hands the run back at once with ``broker.release()``, shielded, so nobody
  waits for its lease;
- the *lease keeper* renews the leases of the runs in flight (and of those whose outcome
  is being recorded) every ``lease_seconds / 3`` and cancels, here, any run that was
  claimed again after its lease expired, or whose cancellation a user asked for;
- the *cancel watch* hears from the broker of cancel requests as they are stored (all
  the brokers here tell their workers at once: in-process, by a datagram beside the
  SQLite file, by NOTIFY on PostgreSQL) and stops the runs held here at once, as the
  lease keeper would at its next heartbeat.

A stop cancels the idle waits at once (nothing new is claimed) and lets the runs in flight
finish; an optional status server keeps answering until they have.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from .._checks import (
    Seconds,
    check_choice,
    check_host,
    check_optional_count,
    check_port,
    check_seconds,
)
from .._core import Service, ServiceState
from .._core import task as background_task
from .._runner import run as run_service
from .._runner import run_here as run_service_here
from .._status import StatusServer
from ._errors import BrokerError
from ._execution import Outcome, RunInFlight, RunnerHooks, Runners, tracer_set
from ._queue import Task, TaskQueue, TaskRun, in_event_loop
from ._recording import HAND_BACK_BUDGET, Batches, Recorder, WorkerStats, results_of
from ._records import RunRecord
from ._scheduler import keep_schedule
from .brokers._base import AheadClaimer

__all__ = ["TaskWorker", "serve"]

#: The shortest lease a worker takes, in seconds: its renewal, every third of it, must
#: have time to reach the broker. Production leases are tens of seconds.
MIN_LEASE_SECONDS = 0.05

#: Most runs claimed in one broker call when the worker has no limit; also the most a
#: claim takes by default (``limit`` plus the default ``prefetch``).
_UNLIMITED_CLAIM = 100
#: Longest wait for work between claims; the broker usually wakes the worker sooner.
_IDLE_WAIT = 1.0
#: Backoff between claims that failed (the broker already retried a locked file).
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
#: Threads for sync tasks when the worker has no limit (anyio's default thread limit).
_UNLIMITED_THREADS = 40
#: How often a worker purges the runs its queue's retention has passed.
_PURGE_EVERY = 600.0


def _epoch_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def _in_flight_status(runs: dict[str, RunInFlight]) -> dict[str, Any]:
    return {
        run_id: {
            "task": entry.task.name,
            "attempt": entry.attempt,
            "started": _epoch_iso(entry.started),
        }
        for run_id, entry in runs.items()
    }


def _status_of(
    worker: TaskWorker, runs: dict[str, RunInFlight], stats: WorkerStats
) -> dict[str, Any]:
    """The body of :meth:`TaskWorker.status`."""
    prefetched = worker._runners.waiting
    current = len(runs) - prefetched
    limit = worker.limit
    return {
        "client_id": worker.client_id,
        "name": worker.name,
        "state": worker.state.name,
        "started_at": worker.started_at.isoformat() if worker.started_at else None,
        "stopping": worker.should_stop,
        "limit": limit,
        "current": current,
        "available": None if limit is None else max(limit - current, 0),
        "prefetch": worker.prefetch,
        "prefetched": prefetched,
        "tasks": sorted(worker.tasks),
        "database": worker.queue.location,
        "finished": list(stats.finished),
        "in_flight": _in_flight_status(runs),
        "counts": dict(stats.counts),
    }


def _call_soon_in_loop(token: anyio.lowlevel.EventLoopToken, function: Any, name: str) -> None:
    """Have ``function()`` called in the event loop of ``token``, from any thread or handler."""

    def call() -> None:
        try:
            anyio.from_thread.run_sync(function, token=token)
        except RuntimeError:
            pass  # The event loop ended meanwhile: nothing is left to call it for.

    # A thread of its own: a signal handler may run on the event loop's thread, which must
    # not block waiting for itself.
    threading.Thread(target=call, name=name, daemon=True).start()


def _check_tasks(name: str, tasks: tuple[Task[Any, Any], ...]) -> TaskQueue:
    """The one queue of ``tasks``."""
    if not tasks:
        raise TypeError(f"{name}: give the tasks to serve, e.g. TaskWorker(say)")
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"{name}: {task!r} is not a task; decorate it with @queue.task")
    queues = {id(task.queue): task.queue for task in tasks}
    if len(queues) > 1:
        urls = ", ".join(sorted(queue.url for queue in queues.values()))
        raise ValueError(f"{name}: the tasks come from different queues ({urls})")
    return tasks[0].queue


def default_prefetch(limit: int | None) -> int:
    """The runs a worker claims ahead of ``limit`` unless told: as many as ``limit``, so
    that each claim takes twice as many runs, up to :data:`_UNLIMITED_CLAIM` a claim;
    none without a limit (its claims take that many already)."""
    if limit is None:
        return 0
    return max(0, min(limit, _UNLIMITED_CLAIM - limit))


def _check_options(
    name: str,
    limit: object,
    prefetch: object,
    lease_seconds: object,
    status_server_port: object,
    status_server_host: object,
) -> tuple[int | None, int, float, str]:
    """The worker's ``limit``, ``prefetch``, ``lease_seconds`` and status host, checked."""
    checked_limit = check_optional_count(limit, f"{name}: limit", minimum=1)
    ahead = check_optional_count(prefetch, f"{name}: prefetch")
    if ahead is None:
        ahead = default_prefetch(checked_limit)
    # The lease is renewed every third of it: the renewal must have time to reach the
    # broker before the lease lapses, or a run that takes longer never completes.
    lease = check_seconds(lease_seconds, f"{name}: lease_seconds", minimum=MIN_LEASE_SECONDS)
    host = check_host(status_server_host, f"{name}: status_server_host")
    if status_server_port is not None:
        check_port(status_server_port, f"{name}: status_server_port")
    return checked_limit, ahead, lease, host


async def _purge_now_and_then(queue: TaskQueue, stats: WorkerStats) -> None:
    """Delete the runs finished longer ago than the queue's retention, now and then.

    Every worker does it; on PostgreSQL the one holding the housekeeping lock at the
    moment deletes, the others find nothing to do.
    """
    if queue.retention is None:
        return
    while True:
        try:
            purged = await queue.purge()
        except BrokerError as exc:
            stats.broker_failed(exc, "purging old runs")
        else:
            if purged:
                stats.log.info("purged %d run(s) finished over %gs ago", purged, queue.retention)
        await anyio.sleep(_PURGE_EVERY)


def _claim_options(worker: TaskWorker) -> dict[str, Any]:
    """What goes with every claim: the lease, and the tasks' concurrency limits (the broker
    counts their RUNNING runs across the cluster)."""
    tasks = worker.tasks.items()
    limits = {name: task.concurrency for name, task in tasks if task.concurrency}
    return {"lease_seconds": worker.lease_seconds, "concurrency": limits}


def _announcement(worker: TaskWorker) -> str:
    """The line a worker prints once it serves."""
    url = worker.status_url
    status = "no status server" if url is None else f"status: {url}"
    return (
        f"anyservice task worker {worker.name}: serving {', '.join(sorted(worker.tasks))} "
        f"from {worker.queue.location} (limit {worker.limit}); {status}"
    )


def _free_slots(worker: TaskWorker) -> int:
    """How many runs to claim now: free slots, counting only runs not yet ended.

    Up to ``prefetch`` runs are claimed ahead of the ``limit`` running: they wait, held,
    for a runner to finish its run. Runs whose results wait to be recorded hold no slot,
    so the next claim goes out while they are recorded (on SQLite, in the same
    transaction); at most ``limit + prefetch`` such runs are held besides the others.
    """
    limit = worker.limit
    if limit is None:
        return _UNLIMITED_CLAIM
    held, most = len(worker._runs), limit + worker.prefetch
    return min(most - (held - worker._batches.held), 2 * most - held)


class _RunEnds:
    """What becomes of a run once its runner is done with its body: the runner's hooks."""

    def __init__(self, worker: TaskWorker) -> None:
        self._worker = worker

    def finished(self, entry: RunInFlight, outcome: Outcome | None) -> bool:
        """Take ``entry`` over if that needs no wait: a result (to the batch) or a loss."""
        worker = self._worker
        if outcome is not None and outcome.result is not None:
            worker._batches.add(entry, outcome)
            if worker._freed is not None:  # _slot_freed(), without a call per run
                worker._slot_freed()
            return True
        if outcome is None and not entry.stop_worker:
            worker._forget(entry)  # Lost: the new claim's holder records it.
            return True
        return False

    async def settle(self, entry: RunInFlight, outcome: Outcome | None) -> None:
        """Record what the batch does not (a failure, a cancellation), or hand the run back."""
        # Cancelled meanwhile, the runner hands the run back (if it must) and forgets it.
        worker = self._worker
        if entry.stop_worker:
            # Stop first: handed back before, the run could be claimed again here.
            worker.log.info("%s raised StopTaskWorker: stopping", entry.describe())
            worker._request_stop()
            entry.settled = True
            await worker._recorder.hand_back(entry.record, "its task raised StopTaskWorker")
        elif outcome is not None:
            await worker._recorder.settle(entry, outcome)
        worker._forget(entry)

    def lose(self, entry: RunInFlight) -> None:
        """The claim no longer holds the run: stop its attempt, record nothing."""
        if entry.lost or entry.settled:
            return
        entry.lost = True
        if entry.settling:
            return  # The record in progress gives up (or was refused) by itself.
        stats = self._worker._stats
        stats.count(entry.record, "lost")
        self._worker.log.warning(
            "%s: its lease was lost (the run was claimed again): cancelled here",
            entry.describe(),
            extra=stats.extra(entry.record),
        )
        entry.stop_body()

    async def abandon(self, entry: RunInFlight) -> None:
        """The runner was cancelled (the stop deadline, a forced stop, a crash)."""
        worker = self._worker
        try:
            if not entry.settled and not entry.lost:
                # Hand the run back now rather than after its lease.
                entry.settled = True
                await worker._recorder.hand_back(entry.record, "its worker was cancelled")
        finally:
            worker._forget(entry)


class TaskWorker(Service, overrides=("run",)):
    """Runs the task runs that other code submits (Prefect's ``TaskWorker``, durably).

    Claims runs of ``tasks`` from their queue's broker under a lease, runs at most
    ``limit`` at once, renews the leases while they run, and records each outcome. A
    worker that dies loses nothing: its leases expire and another worker takes the runs
    (at-least-once; ``attempts`` counts the claims). A stop claims nothing more, lets the
    runs in flight finish within ``shutdown_timeout``, and hands back at once whatever is
    still running at that deadline. Prefect's names work: ``await worker.start()`` runs
    it until stopped, ``await worker.stop()`` stops it, ``handle_sigterm`` is a signal
    handler, ``execute_task_run(run)`` runs one given run here, and a task that raises
    :class:`StopTaskWorker` stops its worker.

    Args:
        *tasks: The tasks to serve, all from one :class:`TaskQueue`.
        limit: Most runs in flight at once; ``None`` for no limit.
        prefetch: Most runs claimed ahead of ``limit``: held under lease (renewed, state
            ``RUNNING``, ``started_at`` their claim's time) and queued until a run
            finishes, so the next one starts at once and a claim takes more runs. Handed
            back at a stop. ``None`` (the default): as many as ``limit``, up to 100 runs
            a claim in all; 0 claims only for free slots. Ignored without a limit.
        lease_seconds: How long a claim lasts without renewal; renewed every third of
            it. A worker that dies holds its runs this long. At least
            :data:`MIN_LEASE_SECONDS`; a number, a ``timedelta`` or a numeric string.
        status_server_port: Serve ``GET /status`` and ``GET /healthz`` on this port
            (0 picks a free one: read :attr:`status_server_port` once started). Needs
            ``anyservice[http]``.
        status_server_host: The address the status server binds to.
        name, shutdown_timeout: As for every :class:`~anyservice.Service`.

    Attributes:
        client_id: This worker's lease-owner id, unique per instance (Prefect's name).
        queue, tasks: The tasks' queue, and the served tasks by name.
        counts: Outcomes since the worker was made (the keys are ``OUTCOMES``): completed,
            failed, retried, cancelled, handed_back, lost, not_recorded.

    Raises:
        TypeError, ValueError: no tasks, a non-task, tasks of two queues, a bad option.
        ImportError: a status server was asked for and hypercorn is not installed.
    """

    # Within Kubernetes' 30 s from SIGTERM to SIGKILL, with time left to hand runs back.
    shutdown_timeout = 25.0

    def __init__(
        self,
        *tasks: Task[Any, Any],
        limit: int | None = 10,
        lease_seconds: Seconds = 30.0,
        status_server_port: int | None = None,
        status_server_host: str = "127.0.0.1",
        name: str | None = None,
        shutdown_timeout: Seconds | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(name=name, shutdown_timeout=shutdown_timeout)
        self.queue: TaskQueue = _check_tasks(self.name, tasks)
        limit, prefetch, lease, host = _check_options(
            self.name, limit, prefetch, lease_seconds, status_server_port, status_server_host
        )
        #: The status server (the one of :class:`anyservice.StatusServer`), if asked for.
        self.status_server = (
            None
            if status_server_port is None
            else StatusServer(self, port=status_server_port, host=host)
        )
        self.tasks: dict[str, Task[Any, Any]] = {task.name: task for task in tasks}
        self.limit = limit
        #: Most runs claimed ahead of ``limit`` (0 without a limit).
        self.prefetch = prefetch if limit is not None else 0
        self.lease_seconds = lease
        self.status_server_host = host
        #: The status server's port: as asked until started, then the one bound.
        self.status_server_port = status_server_port
        self.client_id = uuid.uuid4().hex
        self.started_at: datetime | None = None
        self._stats = WorkerStats(self.log, self)
        self.counts = self._stats.counts
        self._recorder = Recorder(
            lambda: self.queue.broker, self.client_id, self.lease_seconds, self._stats
        )
        self._runs: dict[str, RunInFlight] = {}
        self._batches = Batches(self._recorder, self._forget, self._claims_results)
        #: The claim loop is about to claim, taking the batch of results with it.
        self._claiming = False
        self._ends = ends = _RunEnds(self)
        hooks = RunnerHooks(
            in_flight=self.in_flight,
            finished=ends.finished,
            settle=ends.settle,
            abandon=ends.abandon,
            stopping=self._stopping,
            worker_id=self.client_id,
        )
        self._runners = Runners(self.spawn, hooks)
        # Made per start, inside the event loop.
        self._busy = self._idle = self._drained = anyio.Event()
        self._freed: anyio.Event | None = None
        self._threads: anyio.CapacityLimiter | None = None
        self._holding_queue = False
        self._token: anyio.lowlevel.EventLoopToken | None = None
        #: Set by serve(): print one line at start, logging configured or not.
        self._announce = False

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self._runs = {}
        self._busy, self._idle, self._drained = anyio.Event(), anyio.Event(), anyio.Event()
        self._idle.set()
        self._freed = None
        self._threads = anyio.CapacityLimiter(self.limit or _UNLIMITED_THREADS)
        self._runners.reset(self._threads, self.limit)
        self._batches.reset()
        self._token = anyio.lowlevel.current_token()
        if not self._holding_queue:
            await self.queue.hold()
            self._holding_queue = True
        server = self.status_server
        if server is not None:
            server.bind()
            self.add_context(closing(server))
            self.status_server_port = server.port
            self.spawn(self._serve_status, name="status server")
        for schedule in self.queue.schedules.values():
            if schedule.task.name in self.tasks:
                self.spawn(
                    functools.partial(keep_schedule, schedule, self.log),
                    name=f"schedule {schedule.name}",
                )
        self.started_at = datetime.now(UTC)
        self.log.info(
            "serving %s from %s with limit %s as %s%s",
            ", ".join(sorted(self.tasks)),
            self.queue.location,
            self.limit,
            self.client_id,
            "" if self.status_url is None else f"; status on {self.status_url}",
        )
        if self._announce:
            print(_announcement(self), file=sys.stderr, flush=True)

    @property
    def status_url(self) -> str | None:
        """``http://host:port/status`` once the status server is bound, else ``None``."""
        server = self.status_server
        if server is None or self.started_at is None:
            return None
        return f"{server.url}status"

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

    async def start(self) -> None:
        """Run until stopped (Prefect's ``TaskWorker.start()``); same as :meth:`run`.

        Raises:
            ServiceError: the worker is already running.
            BaseExceptionGroup: what crashed it.
        """
        await self.run()

    def handle_sigterm(self, signum: int, frame: object) -> None:
        """Stop gracefully: a handler for ``signal.signal(signal.SIGTERM, ...)`` (Prefect's).

        Safe from a signal handler and from any thread: the stop is handed over to the
        worker's event loop. Unlike Prefect's, it does not exit the process: ``start()``
        returns once the runs in flight have finished (or been handed back).
        """
        token = self._token
        if token is None or self.state not in (ServiceState.STARTING, ServiceState.RUNNING):
            return
        self.log.info("received signal %d: stopping gracefully", signum)
        _call_soon_in_loop(token, self._request_stop, f"{self.name} stop")

    async def execute_task_run(self, run: TaskRun[Any] | RunRecord | str) -> bool:
        """Claim this one run and execute it here, now (Prefect's ``execute_task_run``).

        Returns once its outcome is recorded: ``True`` if this worker claimed and ran it,
        ``False`` if it was not claimable (not due, claimed elsewhere, finished, at its
        task's ``concurrency``).

        Raises:
            RuntimeError: the worker is not running.
            ValueError: the run is of a task this worker does not serve, or no such run.
        """
        if self.state is not ServiceState.RUNNING:
            raise RuntimeError(f"{self.name}: execute_task_run() needs a running worker")
        run_id = run if isinstance(run, str) else run.id
        broker = self.queue.broker
        found = await broker.get(run_id)
        if found is None:
            raise ValueError(f"{self.name}: no run {run_id!r} in {self.queue.location}")
        if found.task not in self.tasks:
            raise ValueError(
                f"{self.name}: run {run_id} is of task {found.task!r}, which this worker "
                f"does not serve ({', '.join(sorted(self.tasks))})"
            )
        record = await broker.claim_run(self.client_id, run_id, **_claim_options(self))
        if record is None:
            return False
        # Asked for before the first checkpoint, so before a runner can be done with it.
        done = self._start([record], self._runners.run_now).finished()
        await done.wait()
        return True

    async def on_stop(self) -> None:
        if self._runs:
            self.log.info(
                "stopping: no new claims; waiting up to %ss for %d run(s) in flight",
                self.shutdown_timeout,
                len(self._runs),
            )
        else:
            self._drained.set()
            self._batches.poke()

    async def _serve_status(self) -> None:
        # In flight for its whole life: it keeps answering (stopping: true) while the runs
        # drain, and shuts down once they have.
        assert self.status_server is not None
        async with self.in_flight():
            await self.status_server.serve(self._drained.wait)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Prefect's status fields, plus ``state``, ``counts`` and ``database``.

        ``finished`` lists the ids of the last runs this worker finished (at most 100);
        ``in_flight`` maps the ids of the runs it holds to their task, attempt and start;
        ``database`` is where the runs are stored (a SQLite file's absolute path).
        """
        return _status_of(self, self._runs, self._stats)

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """What ``GET /healthz`` answers: whether the last broker call worked, and if not why."""
        problem = self._stats.broker_problem
        if problem is not None:
            return False, {"status": "unhealthy", "reason": problem}
        return True, {"status": "ok", "state": self.state.name}

    # ------------------------------------------------------------------ claiming

    def _claims_results(self) -> bool:
        """Whether the claim loop takes the pending results with its next claim (one
        broker call, one transaction), rather than the batch task on its own."""
        return self._claiming and not self.should_stop and _free_slots(self) > 0

    @background_task
    async def _claim_runs(self) -> None:
        await _claim_until_stopped(self)

    def _leave_results(self) -> None:
        """The claim loop waits (or ends): the batch task records what is pending, and
        what is handed over from now on."""
        self._claiming = False
        self._batches.poke()

    async def _claim_loop(self) -> None:
        names = sorted(self.tasks)
        backoff = _FIRST_BACKOFF
        while True:
            self._claiming = True
            while (wanted := _free_slots(self)) <= 0:
                # No claim until a slot frees (a result handed over frees one, and then
                # goes with that claim): what is pending meanwhile is recorded alone.
                self._batches.poke()
                self._freed = self._freed or anyio.Event()
                await self._freed.wait()
            if self._stopping():
                return  # A stop is under way: its cancellation may not have come yet.
            async with self.in_flight():
                claimed, wanted = await _claim_while_free(self, names, wanted)
            if self._stopping():
                return  # Claimed while a stop came in: handed straight back.
            if claimed is None:
                self._leave_results()
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = _FIRST_BACKOFF
            if len(claimed) < wanted:
                self._leave_results()
                try:
                    await _wait_for_work(self, names)
                except BrokerError as exc:
                    self._stats.broker_failed(exc, "waiting for work")
                    await anyio.sleep(backoff)

    def _stopping(self) -> bool:
        # A call, not the property: a stop may come in during the claim between two looks.
        return self.should_stop

    def _start(
        self, claimed: list[RunRecord], put: Callable[[RunInFlight], None] | None = None
    ) -> RunInFlight:
        """Hold the runs just claimed and queue them for the runners (or ``put`` them); the
        last one's entry."""
        # The clocks and the tracer provider are read once per claim, not once per run.
        began, started, traced = anyio.current_time(), time.time(), tracer_set()
        runs, tasks, lease = self._runs, self.tasks, self.lease_seconds
        put = put or self._runners.put
        if not runs:
            self._busy.set()
            self._idle = anyio.Event()
        for record in claimed:
            entry = RunInFlight(
                record, tasks[record.task], lease, began=began, started=started, traced=traced
            )
            earlier = runs.get(record.id)
            if earlier is not None:
                # This worker claimed the run again after an earlier attempt's lease
                # expired: that attempt is fenced off, so stop it here.
                self._ends.lose(earlier)
            runs[record.id] = entry
            put(entry)
        return entry

    def _slot_freed(self) -> None:
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    def _forget(self, entry: RunInFlight) -> None:
        if entry.done is not None:
            entry.done.set()
        # A retry can be claimed again (a new entry under the same id) before the attempt
        # that recorded the failure has unwound: forget only this entry.
        if self._runs.get(entry.record.id) is not entry:
            return
        del self._runs[entry.record.id]
        if self._freed is not None:  # _slot_freed(), without a call per run
            self._freed.set()
            self._freed = None
        if not self._runs:
            self._idle.set()
            self._busy = anyio.Event()
            if self.should_stop:
                self._drained.set()
                self._batches.poke()

    # ------------------------------------------------------------------ running

    @background_task
    async def _record_results(self) -> None:
        # In flight for its whole life: a graceful stop waits until every run that
        # ended has been recorded, then it returns.
        async with self.in_flight():
            await self._batches.serve(lambda: self.should_stop and not self._runs)

    @background_task
    async def _purge_old_runs(self) -> None:
        # The retention loop needs only the queue and the broker health it reports to.
        await _purge_now_and_then(self.queue, self._stats)

    # ------------------------------------------------------------------ leases

    @background_task
    async def _keep_leases(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await self._busy.wait()
            # While runs are in flight, renewing their leases is in flight too: it goes on
            # through a graceful stop for as long as they do.
            async with self.in_flight():
                # Runs held were claimed since idle or the last renewal: one interval on suffices.
                renew_at = anyio.current_time() + interval
                while self._runs:
                    with anyio.move_on_after(renew_at - anyio.current_time()):
                        await self._idle.wait()
                    if self._runs and anyio.current_time() >= renew_at:
                        await self._renew()
                        renew_at = anyio.current_time() + interval

    async def _renew(self) -> None:
        for entry in await self._recorder.renew(self._runs):
            self._ends.lose(entry)
        self._runners.end_stopped()

    @background_task
    async def _watch_cancels(self) -> None:
        await _stop_as_cancels_come(self)


async def _stop_as_cancels_come(worker: TaskWorker) -> None:
    """The cancel watch: the broker tells of cancel requests as they are stored (where it
    can), and the runs held here among them are looked up and stopped as a heartbeat
    would stop them."""
    asked: set[str] = set()
    nudge = anyio.Event()

    def hear(run_ids: list[str]) -> None:
        runs = worker._runs
        asked.update(i for i in run_ids if i in runs and not runs[i].cancelled)
        if asked:
            nudge.set()

    watch = getattr(worker.queue.broker, "watch_cancels", None)
    if watch is None:
        return  # a broker of its own, made before: the heartbeats find the requests

    async def keep_watching() -> None:
        while True:
            try:
                await watch(hear)
            except BrokerError as exc:
                # The heartbeats still find the requests meanwhile.
                worker._stats.broker_failed(exc, "watching for cancel requests")
                await anyio.sleep(_MAX_BACKOFF)

    async with anyio.create_task_group() as group:
        group.start_soon(keep_watching)
        while True:
            await nudge.wait()
            nudge = anyio.Event()
            run_ids = list(asked)
            asked.clear()
            await worker._recorder.stop_cancelled(worker._runs, run_ids)
            # A run claimed ahead, not started, ends at once rather than when a runner frees.
            worker._runners.end_stopped()


async def _claim_until_stopped(worker: TaskWorker) -> None:
    """The worker's claim loop, and what is left to do once it ends, however it ends."""
    try:
        await worker._claim_loop()
    finally:
        worker._leave_results()
        # Runs the broker claimed as work arrived were for a claim the loop no longer
        # makes (it stopped, was cancelled or failed): claimable again at once.
        with anyio.move_on_after(HAND_BACK_BUDGET, shield=True):
            await worker.queue.broker.release_claimed_ahead(worker.client_id)
        # So are the runs claimed ahead of the limit that no runner took.
        await _hand_back(worker, worker._runners.close())


async def _hand_back(worker: TaskWorker, queued: list[RunInFlight]) -> None:
    """Hand back runs queued for the runners that none took (the worker is stopping)."""
    for entry in queued:
        entry.settled = True
        await worker._recorder.hand_back(entry.record, "the worker is stopping", started=False)
        worker._forget(entry)


async def _wait_for_work(worker: TaskWorker, names: list[str]) -> None:
    """The claim loop's wait for work, during which the broker may claim runs for it and
    start them (see ``Broker.claiming_ahead``)."""
    broker = worker.queue.broker
    options = _claim_options(worker)
    claimer = AheadClaimer(
        worker.client_id,
        names,
        options["lease_seconds"],
        options["concurrency"],
        free_slots=functools.partial(_free_ahead, worker),
        start=worker._start,
    )
    with broker.claiming_ahead(claimer):
        await broker.wait_for_work(_IDLE_WAIT)


def _free_ahead(worker: TaskWorker) -> int:
    """How many runs may be claimed for the waiting claim loop: none while stopping, nor
    while no runner is idle (a run claimed ahead starts in one at once; starting a new
    runner is the loop's)."""
    if worker._stopping() or not worker._runners.idle:
        return 0
    return _free_slots(worker)


async def _claim_while_free(
    worker: TaskWorker, names: list[str], wanted: int
) -> tuple[list[RunRecord] | None, int]:
    """Claim up to ``wanted`` runs and start them, storing the pending results in the
    same call; again while each claim was full and slots are free at once. The last
    claim (``None`` when the broker failed) and what it asked for.

    Shielded, within bounds: a claim cancelled once the broker has made it would leave
    its runs leased to nobody until the leases expire. Claimed, they are started or
    handed back, whatever cancellation comes. One scope serves the series, its
    deadline moved for each claim: a scope per claim would cost more than the claim's
    share of a no-op run.
    """
    claimed: list[RunRecord] | None = None
    with anyio.CancelScope(shield=True) as shield:
        while True:
            shield.deadline = anyio.current_time() + HAND_BACK_BUDGET
            batch = worker._batches.take()
            claimed = None
            try:
                try:
                    claimed = await _claim_recording(worker, batch, names, wanted)
                except BrokerError as exc:
                    worker._stats.broker_failed(exc, "claiming runs")
                    return None, wanted
                shield.deadline = math.inf
                worker._stats.broker_worked()
                if claimed and worker._stopping():
                    for record in claimed:
                        await worker._recorder.hand_back(
                            record, "the worker is stopping", started=False
                        )
                    return claimed, wanted
                if claimed:
                    worker._start(claimed)
            finally:
                # The batch's runs are forgotten once the claimed ones are held: the
                # worker does not go idle (and busy again, waking the lease keeper
                # twice) between two claims. Not stored, the batch task records them.
                worker._batches.recorded(batch, claimed is not None)
            # A stop cancelled the idle runners before they took them (the loop ends).
            await _hand_back(worker, await worker._runners.taken(worker._stopping))
            if len(claimed) < wanted or worker._stopping():
                return claimed, wanted
            wanted = _free_slots(worker)
            if wanted <= 0:
                return claimed, wanted
    # No answer before the deadline: the scope ended the claim.
    worker._stats.broker_failed(
        BrokerError(f"no answer within {HAND_BACK_BUDGET:g} s"), "claiming runs"
    )
    return None, wanted


async def _claim_recording(
    worker: TaskWorker, batch: list[tuple[RunInFlight, Outcome]], names: list[str], wanted: int
) -> list[RunRecord]:
    """Claim, storing the results of ``batch`` in the same call first: they are
    durable before anyone hears of them, and the claim sees their slots free."""
    broker = worker.queue.broker
    options = _claim_options(worker)
    batch = worker._recorder.still_held(batch, anyio.current_time())
    if not batch:
        return await broker.claim(worker.client_id, names, limit=wanted, **options)
    done, claimed = await broker.complete_and_claim(
        worker.client_id, results_of(batch), names, limit=wanted, **options
    )
    worker._recorder.completed(batch, done, anyio.current_time())
    return claimed


# ---------------------------------------------------------------------- serve()

BACKENDS = ("asyncio", "trio")


def serve(
    *tasks: Task[Any, Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    backend: Literal["asyncio", "trio"] = "asyncio",
    status_server_host: str = "127.0.0.1",
    lease_seconds: Seconds = 30.0,
    shutdown_timeout: Seconds | None = None,
    prefetch: int | None = None,
) -> Any:
    """Serve ``tasks`` until SIGINT or SIGTERM (Prefect's ``serve``); the exit code.

    From plain code it blocks: it runs a :class:`TaskWorker` with ``anyservice.run`` in a
    new event loop of ``backend`` and returns the exit code. From inside a running event
    loop it returns an awaitable instead, so ``await serve(...)`` (Prefect's spelling)
    serves in that loop, whatever its backend, and gives the exit code. Either way the
    first SIGINT/SIGTERM stops it gracefully (no new claims, runs in flight finish within
    ``shutdown_timeout``, the rest are handed back), a second one stops it at once,
    handing back what is in flight; and one line goes to stderr at start, logging
    configured or not: what it serves, from which database, and the status URL.

    Returns:
        ``anyservice.run``'s exit code (or an awaitable of it): 0 after a stop, 1 if the
        worker crashed (logged with its traceback), 128 + the signal's number after a
        second signal.

    Raises:
        ValueError: an unknown backend, or bad worker options (see :class:`TaskWorker`).
    """
    check_choice(backend, "backend", BACKENDS)
    worker = TaskWorker(
        *tasks,
        limit=limit,
        status_server_port=status_server_port,
        status_server_host=status_server_host,
        lease_seconds=lease_seconds,
        shutdown_timeout=shutdown_timeout,
        prefetch=prefetch,
    )
    worker._announce = True
    if in_event_loop():
        return run_service_here(worker, handle_signals=True)
    return run_service(worker, backend=backend, handle_signals=True)
