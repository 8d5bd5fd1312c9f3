"""What a worker tells its broker about the runs it holds, and what it counts of them.

Recording an outcome must never leave a run RUNNING for good: a record that meets broker
errors (a database locked by another process, a full disk) is retried with backoff for
as long as the lease lasts, and the lease keeper goes on renewing it meanwhile. Once the
lease has run out the worker gives up: the run is claimable again by any worker, this one
included, and the attempt number fences off this attempt's late writes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import anyio

from .. import _hooks
from ._errors import BrokerError
from ._execution import Outcome, RunInFlight
from ._records import RunRecord
from .brokers import Broker

__all__ = ["OUTCOMES", "Batches", "Recorder", "WorkerStats", "results_of", "run_log_extra"]

#: What became of the runs a worker ran: the keys of ``TaskWorker.counts``.
OUTCOMES = ("completed", "failed", "retried", "cancelled", "handed_back", "lost", "not_recorded")

#: Backoff between broker calls that failed (the broker already retried a locked file).
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 2.0
#: Longest a claim or a hand-back may hold off a cancellation; past it, leases expiring do.
HAND_BACK_BUDGET = 5.0
#: How many finished run ids the status server lists.
FINISHED_SHOWN = 100

Log = logging.LoggerAdapter[logging.Logger]


def run_log_extra(service: str, record: RunRecord) -> dict[str, Any]:
    """The ``extra`` of a log record about a run: JSON log lines carry these fields."""
    return {
        "service": service,
        "task": record.task,
        "run_id": record.id,
        "attempt": record.attempts,
    }


class WorkerStats:
    """Outcomes counted since the worker was made, and whether its broker answers.

    Args:
        log: The worker's logger.
        worker: The worker itself, as the metrics hook and the log records name it.
    """

    def __init__(self, log: Log, worker: Any) -> None:
        self.log = log
        self.worker = worker
        #: How many runs came to each of ``OUTCOMES``.
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.finished: deque[str] = deque(maxlen=FINISHED_SHOWN)
        #: Why the last broker call failed, while it does.
        self.broker_problem: str | None = None

    def count(self, record: RunRecord, outcome: str, seconds: float | None = None) -> None:
        """Count one ``outcome`` of ``record`` (a ``counts`` key) and tell the metrics."""
        self.counts[outcome] += 1
        observe = _hooks.task_run
        if observe is not None:
            observe(self.worker, record.task, outcome, seconds)

    def extra(self, record: RunRecord) -> dict[str, Any]:
        """The ``extra`` of this worker's log records about ``record``."""
        return run_log_extra(self.worker.name, record)

    def broker_failed(self, exc: BrokerError, doing: str) -> None:
        problem = f"broker error while {doing}: {exc}"
        if problem != self.broker_problem:
            self.log.warning("%s (retrying)", problem)
        self.broker_problem = problem

    def broker_worked(self) -> None:
        if self.broker_problem is not None:
            self.log.info("broker reachable again")
            self.broker_problem = None

    async def retrying(self, call: Callable[[], Awaitable[bool]], doing: str) -> bool:
        """``await call()`` until the broker answers, backing off through its errors."""
        backoff = FIRST_BACKOFF
        while True:
            try:
                done = await call()
            except BrokerError as exc:
                self.broker_failed(exc, doing)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                self.broker_worked()
                return done


class Batches:
    """Results handed over by runners that did not wait, recorded in batches.

    A runner hands a successful run over (:meth:`add`) and takes its next one; one task
    (:meth:`serve`) records whatever was handed over meanwhile in one ``complete_many``
    call, under one shielded deadline, then settles and forgets each run of the batch.
    Nobody waiting for a run hears of its result before the call that stored it
    returned, and the lease keeper renews the leases of the runs waiting here.

    The worker's claim loop takes the batch itself (:meth:`take`) when it is about to
    claim, so the results and the next claim share one broker call: ``defer()`` says
    when :meth:`serve` leaves them to it.

    Args:
        recorder: Records the batch, fenced by each run's claim.
        forget: The worker's: done with a run (its slot and ``finished()`` event).
        defer: Whether the claim loop is about to take what is handed over.
    """

    def __init__(
        self,
        recorder: Recorder,
        forget: Callable[[RunInFlight], None],
        defer: Callable[[], bool] = lambda: False,
    ) -> None:
        self._recorder = recorder
        self._forget = forget
        self._defer = defer
        self._pending: list[tuple[RunInFlight, Outcome]] = []
        #: What :meth:`serve` waits on, for :meth:`poke`; and for :meth:`add` too, unless
        #: the claim loop takes what is handed over (it pokes when it no longer does).
        self._wake: anyio.Event | None = None
        self._wake_on_add: anyio.Event | None = None
        #: Runs handed over and not yet forgotten.
        self.held = 0

    def reset(self) -> None:
        """Forget an earlier start's runs (the worker forgot them too)."""
        self._pending = []
        self._wake = self._wake_on_add = None
        self.held = 0

    def add(self, entry: RunInFlight, outcome: Outcome) -> None:
        """Hand over a run whose body ended with a result: it is recorded soon."""
        entry.settling = True
        self._pending.append((entry, outcome))
        self.held += 1
        wake = self._wake_on_add  # poke(), without a call per run
        if wake is not None:
            self._wake = self._wake_on_add = None
            wake.set()

    def poke(self) -> None:
        """Wake :meth:`serve`: runs were handed over, it may be done, or the claim loop
        no longer takes the results with its claims."""
        wake = self._wake
        if wake is not None:
            self._wake = self._wake_on_add = None
            wake.set()

    async def serve(self, done: Callable[[], bool]) -> None:
        """Record what is handed over, until ``done()`` with nothing left to record.

        Cancelled (the stop's deadline), it still records what was handed over, within
        :data:`HAND_BACK_BUDGET`: those runs have ended, and would otherwise run again.
        """
        try:
            while True:
                while (deferred := self._defer()) or not self._pending:
                    if not self._pending and done():
                        return
                    wake = self._wake = anyio.Event()
                    # Not woken by every result the claim loop is about to take anyway.
                    self._wake_on_add = None if deferred else wake
                    await wake.wait()
                await self._record_pending()
        except anyio.get_cancelled_exc_class():
            with anyio.move_on_after(HAND_BACK_BUDGET, shield=True):
                while self._pending:
                    await self._record_pending()
            raise

    @property
    def pending(self) -> bool:
        """Whether results wait to be recorded."""
        return bool(self._pending)

    def take(self) -> list[tuple[RunInFlight, Outcome]]:
        """The next batch to record (runs of distinct ids), taken from what is pending.

        Whoever takes it ends with :meth:`recorded` (or :meth:`settle_many` does).
        """
        pending = self._pending
        if len({entry.record.id for entry, _ in pending}) == len(pending):
            self._pending = []  # The usual batch: one attempt of each run.
            return pending
        batch: list[tuple[RunInFlight, Outcome]] = []
        later: list[tuple[RunInFlight, Outcome]] = []
        ids: set[str] = set()
        for item in pending:
            run_id = item[0].record.id
            # Another attempt of a run already in the batch waits for the next one.
            (later if run_id in ids else batch).append(item)
            ids.add(run_id)
        self._pending = later
        return batch

    def recorded(self, batch: list[tuple[RunInFlight, Outcome]], stored: bool) -> None:
        """Done with a batch of :meth:`take`: forget its runs if ``stored`` (or settled
        on the way); otherwise the unsettled ones go back to be recorded again."""
        forget = self._forget
        if stored:
            self.held -= len(batch)
            for entry, _ in batch:
                forget(entry)
            return
        back = [item for item in batch if not item[0].settled]
        for entry, _ in batch:
            if entry.settled:
                self.held -= 1
                forget(entry)
        if back:
            self._pending[:0] = back
            self.poke()

    async def _record_pending(self) -> None:
        batch = self.take()
        try:
            await self._recorder.settle_many(batch)
        finally:
            self.recorded(batch, True)


def results_of(batch: list[tuple[RunInFlight, Outcome]]) -> dict[str, tuple[int, str]]:
    """What ``complete_many()`` takes for a batch: ``{run_id: (attempt, result)}``."""
    return {e.record.id: (e.record.attempts, o.result or "null") for e, o in batch}


class Recorder:
    """Records outcomes and hands runs back for one worker, fenced by each claim."""

    def __init__(
        self, broker: Callable[[], Broker], owner: str, lease_seconds: float, stats: WorkerStats
    ) -> None:
        self._broker = broker
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._stats = stats
        self._log = stats.log

    async def _while_held(
        self, entry: RunInFlight, call: Callable[[], Awaitable[bool]]
    ) -> bool | None:
        """``await call()`` (recording ``entry``) through broker errors while the lease lasts.

        Returns what the broker answered, ``False`` once the claim is known to be lost,
        or ``None`` when the lease ran out with the broker still failing.
        """
        backoff = FIRST_BACKOFF
        while not entry.lost:
            remaining = entry.lease_until - anyio.current_time()
            if remaining <= 0:
                return None
            # Shielded from a stop; the lease keeper may move lease_until on meanwhile: the
            # loop looks again.
            with anyio.move_on_after(remaining, shield=True):
                try:
                    done = await call()
                except BrokerError as exc:
                    self._stats.broker_failed(exc, f"recording {entry.describe()}")
                else:
                    self._stats.broker_worked()
                    return done
                await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        return False

    async def renew(self, runs: dict[str, RunInFlight]) -> list[RunInFlight]:
        """Renew the leases of ``runs``; the runs whose claim no longer holds them."""
        # Runs whose outcome is being recorded are renewed too: the record is retried for
        # as long as the lease lasts.
        leases = {run_id: e.attempt for run_id, e in runs.items() if not e.settled}
        if not leases:
            return []
        asked_at = anyio.current_time()
        try:
            held = await self._broker().heartbeat(
                self._owner, leases, lease_seconds=self._lease_seconds
            )
        except BrokerError as exc:
            self._stats.broker_failed(exc, "renewing leases")
            return []
        self._stats.broker_worked()
        await self.stop_cancelled(runs, held)
        lost: list[RunInFlight] = []
        for run_id, number in leases.items():
            entry = runs.get(run_id)
            if entry is None or entry.attempt != number:
                continue
            if run_id in held:
                entry.lease_until = asked_at + self._lease_seconds
            else:
                lost.append(entry)
        return lost

    async def stop_cancelled(self, runs: dict[str, RunInFlight], held: Collection[str]) -> None:
        """Cancel, here, the runs among ``held`` whose cancellation a user asked for: at
        each heartbeat, and as the broker tells of a request."""
        try:
            requested = await self._broker().cancel_requests(self._owner, sorted(held))
        except BrokerError as exc:
            self._stats.broker_failed(exc, "looking for cancelled runs")
            return
        for run_id in requested:
            entry = runs.get(run_id)
            if entry is None or entry.settling or entry.lost or entry.cancelled:
                continue
            entry.cancelled = True
            self._log.info(
                "%s: cancellation asked for: cancelling its body",
                entry.describe(),
                extra=self._stats.extra(entry.record),
            )
            entry.stop_body()

    async def settle(self, entry: RunInFlight, outcome: Outcome) -> None:
        """Record the outcome, shielded from a stop, retried while the lease lasts."""
        entry.settling = True
        record = entry.record
        broker = self._broker()

        async def store() -> bool:
            if outcome.cancelled:
                return await broker.end_cancelled(self._owner, record.id, entry.attempt)
            if outcome.error is None:
                assert outcome.result is not None
                return await broker.complete(self._owner, record.id, entry.attempt, outcome.result)
            return await broker.fail(
                self._owner,
                record.id,
                entry.attempt,
                outcome.error,
                retry=outcome.retry,
                retry_delay=outcome.retry_delay,
            )

        stored = await self._while_held(entry, store)
        self._settled(entry, outcome, stored, anyio.current_time())

    async def settle_many(self, batch: list[tuple[RunInFlight, Outcome]]) -> None:
        """Record the results of ``batch`` (runs of distinct ids) in one broker call.

        Shielded from a stop, retried through broker errors while the leases last; each
        run is settled once its result is stored, refused, or its lease ran out.
        """
        backoff = FIRST_BACKOFF
        while batch:
            batch = self.still_held(batch, anyio.current_time())
            if not batch:
                return
            now = anyio.current_time()
            results = results_of(batch)
            # The lease keeper may move the leases on meanwhile: the loop looks again.
            first_lapse = min([e.lease_until for e, _ in batch])
            with anyio.move_on_after(first_lapse - now, shield=True):
                try:
                    done = await self._broker().complete_many(self._owner, results)
                except BrokerError as exc:
                    self._stats.broker_failed(exc, f"recording {len(results)} result(s)")
                    await anyio.sleep(backoff)
                else:
                    self._stats.broker_worked()
                    self.completed(batch, done, anyio.current_time())
                    return
            backoff = min(backoff * 2, MAX_BACKOFF)

    def still_held(
        self, batch: list[tuple[RunInFlight, Outcome]], now: float
    ) -> list[tuple[RunInFlight, Outcome]]:
        """The runs of ``batch`` whose result can still be stored; the others (claim lost,
        lease run out) are settled now."""
        held: list[tuple[RunInFlight, Outcome]] = []
        for entry, outcome in batch:
            if entry.lost:
                self._settled(entry, outcome, False, now)
            elif entry.lease_until <= now:
                self._settled(entry, outcome, None, now)
            else:
                held.append((entry, outcome))
        return held

    def completed(
        self, batch: list[tuple[RunInFlight, Outcome]], done: set[str], now: float
    ) -> None:
        """The batch's results are recorded, those of ``done``: settle each run.

        Run by run, as :meth:`_settled` would, with the common case (stored, counted as
        completed) without a call of its own: it is paid for every run.
        """
        stats = self._stats
        counts, finished, observe = stats.counts, stats.finished, _hooks.task_run
        for entry, outcome in batch:
            record = entry.record
            if record.id not in done or outcome.cancelled or outcome.error is not None:
                self._settled(entry, outcome, record.id in done, now)
                continue
            entry.settled = True
            finished.append(record.id)
            counts["completed"] += 1
            if observe is not None:
                observe(stats.worker, record.task, "completed", now - entry.began)

    def _settled(
        self, entry: RunInFlight, outcome: Outcome, stored: bool | None, now: float
    ) -> None:
        """The record of ``entry`` is over: count and log how it went."""
        entry.settled = True
        record = entry.record
        if stored is None:
            self._stats.count(record, "not_recorded")
            self._log.error(
                "%s: could not record its outcome before its lease ran out; the run is "
                "claimable again (by any worker, this one included) and will run again",
                entry.describe(),
                extra=self._stats.extra(record),
            )
        elif not stored:
            self._stats.count(record, "lost")
            self._log.warning(
                "%s finished, but it had been claimed again after its lease expired: "
                "outcome not recorded",
                entry.describe(),
                extra=self._stats.extra(record),
            )
        else:
            self._note_recorded(entry, outcome, now)

    def _note_recorded(self, entry: RunInFlight, outcome: Outcome, now: float) -> None:
        """Count and log an outcome the broker recorded."""
        record, stats = entry.record, self._stats
        retrying = outcome.retry and record.retries_left > 0
        if not retrying:
            stats.finished.append(record.id)
        seconds = now - entry.began
        if outcome.cancelled:
            stats.count(record, "cancelled", seconds)
            self._log.info("%s cancelled, as asked", entry.describe(), extra=stats.extra(record))
        elif outcome.error is None:
            stats.count(record, "completed", seconds)
        elif retrying:
            stats.count(record, "retried", seconds)
            left = record.retries_left - 1
            self._log.warning(
                "%s failed: %s: %s; retrying in %gs (%d retr%s left)",
                entry.describe(),
                outcome.error.type,
                outcome.error.message,
                record.retry_delay if outcome.retry_delay is None else outcome.retry_delay,
                left,
                "y" if left == 1 else "ies",
                extra=stats.extra(record),
            )
        else:
            stats.count(record, "failed", seconds)
            self._log.error(
                "%s failed: %s: %s",
                entry.describe(),
                outcome.error.type,
                outcome.error.message,
                exc_info=outcome.exception if outcome.error.traceback else None,
                extra=stats.extra(record),
            )

    async def hand_back(self, record: RunRecord, why: str, *, started: bool = True) -> None:
        """Release a claimed run at once, shielded from the cancellation under way; one
        not ``started`` (queued for a runner) is logged as routine, not as a warning."""
        released: bool | None = None
        broker = self._broker()
        with anyio.move_on_after(min(self._lease_seconds, HAND_BACK_BUDGET), shield=True):
            released = await self._stats.retrying(
                lambda: broker.release(self._owner, record.id, record.attempts),
                f"handing back run {record.id}",
            )
        shown: tuple[Any, ...] = (record.id, record.task, why)
        extra = self._stats.extra(record)
        if released and not started:
            self._stats.count(record, "handed_back")
            self._log.info("run %s of %r handed back before it started (%s)", *shown, extra=extra)
        elif released:
            self._stats.count(record, "handed_back")
            self._log.warning(
                "run %s of %r handed back unfinished (%s): another worker will run it",
                *shown,
                extra=extra,
            )
        elif released is None:
            self._log.error(
                "run %s of %r could not be handed back (%s); it will be run again once "
                "its lease expires",
                *shown,
                extra=extra,
            )
        else:
            self._log.warning(
                "run %s of %r was not handed back (%s): it had been claimed again",
                *shown,
                extra=extra,
            )
