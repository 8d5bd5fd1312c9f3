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
from .._errors import BrokerError
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
        # Submission order breaks ties between runs due at the same time.
        self._sequence: dict[str, int] = {}
        self._unfinished: set[str] = set()
        self._is_open = False

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
        self, owner: str, tasks: list[str], limit: int, lease_seconds: float
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
        due.sort(key=lambda run: (run.scheduled_at, self._sequence[run.id]))
        for run in due[:limit]:
            claimed = records.claim(run, owner, now, lease_seconds)
            if claimed is not None:
                outcome.runs.append(self._store(claimed))
        # Work left behind by the limit is due now; otherwise wake when the next run is.
        outcome.next_due = now if len(due) > limit else min(later, default=None)
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

    async def _fail(
        self, owner: str, run_id: str, attempt: int, error: RunError, retry: bool
    ) -> RunState | None:
        await self._check_open()
        run = self._runs.get(run_id)
        if run is None:
            return None
        failed = records.fail(run, owner, attempt, error, self._clock(), retry=retry)
        return None if failed is None else self._store(failed).state

    async def _release(self, owner: str, run_id: str, attempt: int) -> bool:
        await self._check_open()
        run = self._runs.get(run_id)
        return run is not None and self._apply(records.release(run, owner, attempt))

    async def _claim_run(self, owner: str, run_id: str, lease_seconds: float) -> RunRecord | None:
        await self._check_open()
        run = self._runs.get(run_id)
        claimed = None if run is None else records.claim(run, owner, self._clock(), lease_seconds)
        return None if claimed is None else self._store(claimed)

    async def _cancel(self, run_id: str) -> bool:
        await self._check_open()
        run = self._runs.get(run_id)
        return run is not None and self._apply(records.cancel(run, self._clock()))

    async def _get(self, run_id: str) -> RunRecord | None:
        await self._check_open()
        return self._runs.get(run_id)

    async def _counts(self) -> dict[RunState, int]:
        await self._check_open()
        counts = dict.fromkeys(RunState, 0)
        for run in self._runs.values():
            counts[run.state] += 1
        return counts
