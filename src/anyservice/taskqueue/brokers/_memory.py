"""A broker that keeps runs in this process's memory (``memory://``).

For tests and for applications whose submitters and workers share one process and one
event loop. Nothing survives the process; use the SQLite broker for durability. Its
storage is a dict of records, changed only by the transitions of ``_records.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Self

import anyio.lowlevel

from .. import _records as records
from .._controls import end_cancelled, requeue
from .._errors import BrokerError
from .._leases import Lease, TickCounts, TickResult, acquire_lease, release_lease
from .._records import RunError, RunRecord, RunState
from ._base import BaseBroker, Claimed

__all__ = ["MemoryBroker"]


class MemoryBroker(BaseBroker):
    """Task runs in a dict, with the same semantics as every other broker.

    Use it from one event loop. Closing it keeps the runs, so it can be opened again.

    Args:
        clock: Wall-clock time in epoch seconds; tests pass a fake one to move time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self._runs: dict[str, RunRecord] = {}
        # Submission order breaks ties between runs of one priority due at the same time.
        self._sequence: dict[str, int] = {}
        self._unfinished: set[str] = set()
        self._is_open = False
        # Ticks by schedule: due time -> the run's id, or None for a skipped tick.
        self._ticks: dict[str, dict[float, str | None]] = {}
        # Each schedule's counts since its first tick: a purge deletes old ticks, not these.
        self._tick_counts_of: dict[str, TickCounts] = {}
        # The tick each run of a schedule was stored for: (schedule, due).
        self._tick_of: dict[str, tuple[str, float]] = {}
        self._leases: dict[str, Lease] = {}
        self._keys: dict[str, str] = {}
        self._cancel_requested: set[str] = set()

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> Self:
        """``memory://``, which takes no path or options."""
        if url.partition("://")[2]:
            raise ValueError(
                f"a memory broker URL takes no path or options: use 'memory://', not {url!r}"
            )
        return cls(clock=clock)

    @property
    def url(self) -> str:
        """``"memory://"``."""
        return "memory://"

    def __repr__(self) -> str:
        return f"<MemoryBroker {len(self._runs)} runs>"

    async def _open(self) -> bool:
        await anyio.lowlevel.checkpoint()
        opened = not self._is_open
        self._is_open = True
        return opened

    async def close(self) -> None:
        """Refuse further calls until :meth:`open`; the runs are kept."""
        await anyio.lowlevel.checkpoint()
        self._is_open = False

    async def _check_open(self) -> None:
        # Checkpoint before touching anything, so a cancelled call has changed nothing.
        await anyio.lowlevel.checkpoint()
        if not self._is_open:
            raise BrokerError(
                "memory broker is not open; use 'async with broker:' or 'await broker.open()'"
            )

    def _store(self, run: RunRecord) -> RunRecord:
        self._runs[run.id] = run
        if run.finished:
            self._unfinished.discard(run.id)
        else:
            self._unfinished.add(run.id)
        return run

    def _apply(self, run: RunRecord | None) -> bool:
        """Store the result of a transition, unless it was refused (``None``)."""
        if run is None:
            return False
        self._store(run)
        return True

    async def _insert(self, run: RunRecord) -> None:
        await self._insert_many([run])

    async def _insert_many(self, runs: Sequence[RunRecord]) -> None:
        # One check, then no await: a cancellation cannot leave half a batch stored.
        await self._check_open()
        for run in runs:
            self._sequence[run.id] = len(self._sequence)
            self._store(run)

    async def _claim(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> Claimed:
        await self._check_open()
        now = self._clock()
        names = set(tasks)
        outcome = Claimed()
        due: list[RunRecord] = []
        later: list[float] = []
        for run_id in list(self._unfinished):
            run = self._runs[run_id]
            if self._apply(records.abandon(run, now)):
                outcome.finished = True
            elif run.task in names:
                if records.claimable(run, now):
                    due.append(run)
                else:
                    at = records.due_at(run)
                    if at is not None and at > now:
                        later.append(at)
        due.sort(key=lambda run: records.claim_order(run, self._sequence[run.id]))
        free = records.free_slots(
            (self._runs[run_id] for run_id in self._unfinished), concurrency, now
        )
        picked = records.pick_claims(due, limit, free)
        for run in picked.runs:
            claimed = records.claim(run, owner, now, lease_seconds)
            if claimed is not None:
                outcome.runs.append(self._store(claimed))
        # Work left behind by the limit is due now; otherwise wake when the next run is.
        outcome.next_due = now if picked.left_over else min(later, default=None)
        outcome.held_back = picked.held_back
        return outcome

    async def _heartbeat(
        self, owner: str, leases: dict[str, int], lease_seconds: float
    ) -> set[str]:
        await self._check_open()
        now = self._clock()
        return {
            run_id
            for run_id, attempt in leases.items()
            if run_id in self._runs
            and self._apply(records.renew(self._runs[run_id], owner, attempt, now, lease_seconds))
        }

    async def _complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        await self._check_open()
        run = self._runs.get(run_id)
        return run is not None and self._apply(
            records.complete(run, owner, attempt, result, self._clock())
        )

    async def _complete_many(self, owner: str, results: dict[str, tuple[int, str]]) -> set[str]:
        await self._check_open()
        now = self._clock()
        return {
            run_id
            for run_id, (attempt, result) in results.items()
            if run_id in self._runs
            and self._apply(records.complete(self._runs[run_id], owner, attempt, result, now))
        }

    async def _fail(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        error: RunError,
        retry: bool,
        retry_delay: float | None,
    ) -> RunState | None:
        await self._check_open()
        run = self._runs.get(run_id)
        if run is None:
            return None
        now = self._clock()
        failed = records.fail(run, owner, attempt, error, now, retry=retry, retry_delay=retry_delay)
        return None if failed is None else self._store(failed).state

    async def _release(self, owner: str, run_id: str, attempt: int) -> bool:
        await self._check_open()
        run = self._runs.get(run_id)
        return run is not None and self._apply(records.release(run, owner, attempt))

    async def _claim_run(
        self, owner: str, run_id: str, lease_seconds: float, concurrency: dict[str, int]
    ) -> RunRecord | None:
        await self._check_open()
        run = self._runs.get(run_id)
        if run is None:
            return None
        now = self._clock()
        free = records.free_slots(
            (self._runs[other] for other in self._unfinished), concurrency, now
        )
        if free.get(run.task, 1) <= 0:
            return None
        claimed = records.claim(run, owner, now, lease_seconds)
        return None if claimed is None else self._store(claimed)

    async def _cancel(self, run_id: str) -> bool:
        await self._check_open()
        run = self._runs.get(run_id)
        return run is not None and self._apply(records.cancel(run, self._clock()))

    async def _get(self, run_id: str) -> RunRecord | None:
        await self._check_open()
        return self._runs.get(run_id)

    async def _purge(self, before: float, limit: int) -> int:
        await self._check_open()
        doomed = [
            run_id
            for run_id, run in self._runs.items()
            if run.finished and run.finished_at is not None and run.finished_at < before
        ][:limit]
        for run_id in doomed:
            del self._runs[run_id]
            self._sequence.pop(run_id, None)
            tick = self._tick_of.pop(run_id, None)
            if tick is not None:
                self._forget_tick(*tick)
        gone = set(doomed)
        for key in [key for key, run_id in self._keys.items() if run_id in gone]:
            del self._keys[key]
        for schedule, ticks in self._ticks.items():
            skipped = [due for due, run_id in ticks.items() if run_id is None and due < before]
            for due in skipped[:limit]:
                self._forget_tick(schedule, due)
        return len(doomed)

    def _forget_tick(self, schedule: str, due: float) -> None:
        """Delete a tick, unless it is its schedule's latest (the next tick follows it)."""
        if due != self._tick_counts_of[schedule].latest:
            del self._ticks[schedule][due]

    async def _counts(self) -> dict[RunState, int]:
        await self._check_open()
        counts = dict.fromkeys(RunState, 0)
        for run in self._runs.values():
            counts[run.state] += 1
        return counts

    # --- the cluster's storage (see _cluster.py) -------------------------------------------

    async def _insert_tick(
        self, schedule: str, due: float, run: RunRecord, overlap: bool
    ) -> TickResult:
        await self._check_open()
        ticks = self._ticks.setdefault(schedule, {})
        if due in ticks:
            return TickResult.TAKEN
        if not overlap and any(
            run_id in self._tick_of
            and self._tick_of[run_id][0] == schedule
            and self._runs[run_id].state is RunState.RUNNING
            for run_id in self._unfinished
        ):
            ticks[due] = None
            self._count_tick(schedule, due, skipped=True)
            return TickResult.SKIPPED
        ticks[due] = run.id
        self._count_tick(schedule, due, skipped=False)
        self._tick_of[run.id] = (schedule, due)
        self._sequence[run.id] = len(self._sequence)
        self._store(run)
        return TickResult.STORED

    def _count_tick(self, schedule: str, due: float, *, skipped: bool) -> None:
        counts = self._tick_counts_of.get(schedule, TickCounts())
        self._tick_counts_of[schedule] = TickCounts(
            runs=counts.runs + (not skipped),
            skipped=counts.skipped + skipped,
            latest=due if counts.latest is None else max(counts.latest, due),
        )

    async def _tick_counts(self, schedule: str) -> TickCounts:
        await self._check_open()
        return self._tick_counts_of.get(schedule, TickCounts())

    async def _acquire_lease(self, name: str, holder: str, lease_seconds: float) -> Lease | None:
        await self._check_open()
        lease = acquire_lease(self._leases.get(name), name, holder, self._clock(), lease_seconds)
        if lease is not None:
            self._leases[name] = lease
        return lease

    async def _release_lease(self, name: str, holder: str) -> bool:
        await self._check_open()
        if not release_lease(self._leases.get(name), holder):
            return False
        del self._leases[name]
        return True

    async def _get_lease(self, name: str) -> Lease | None:
        await self._check_open()
        return self._leases.get(name)

    async def _insert_keyed(self, key: str, run: RunRecord) -> RunRecord:
        await self._check_open()
        existing = self._keys.get(key)
        if existing is not None and existing in self._unfinished:
            return self._runs[existing]
        self._keys[key] = run.id
        self._sequence[run.id] = len(self._sequence)
        return self._store(run)

    async def _list_runs(
        self, state: RunState | None, task: str | None, since: float | None, limit: int
    ) -> list[RunRecord]:
        await self._check_open()
        found = [
            run
            for run in self._runs.values()
            if (state is None or run.state is state)
            and (task is None or run.task == task)
            and (since is None or run.created_at >= since)
        ]
        found.sort(key=lambda run: (run.created_at, self._sequence[run.id]), reverse=True)
        return found[:limit]

    async def _requeue(self, run_id: str, retries: int) -> RunRecord | None:
        await self._check_open()
        run = self._runs.get(run_id)
        again = None if run is None else requeue(run, self._clock(), retries)
        if again is None:
            return None
        self._cancel_requested.discard(run_id)
        return self._store(again)

    async def _request_cancel(self, run_id: str) -> RunState | None:
        await self._check_open()
        run = self._runs.get(run_id)
        if run is None:
            return None
        if self._apply(records.cancel(run, self._clock())):
            return RunState.CANCELLED
        if run.state is RunState.RUNNING:
            self._cancel_requested.add(run_id)
            return RunState.RUNNING
        return None

    async def _cancel_requests(self, owner: str, run_ids: list[str]) -> set[str]:
        await self._check_open()
        return {
            run_id
            for run_id in run_ids
            if run_id in self._cancel_requested and self._runs[run_id].lease_owner == owner
        }

    async def _end_cancelled(self, owner: str, run_id: str, attempt: int) -> bool:
        await self._check_open()
        run = self._runs.get(run_id)
        if run is None or not self._apply(end_cancelled(run, owner, attempt, self._clock())):
            return False
        self._cancel_requested.discard(run_id)
        return True
