"""A broker that keeps runs in this process's memory (``memory://``).

For tests and for applications whose submitters and workers share one process and one
event loop. Nothing survives the process; use the SQLite broker for durability.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import replace
from types import TracebackType
from typing import Self

import anyio.lowlevel

from ._broker import (
    DEFAULT_MAX_ATTEMPTS,
    BrokerError,
    ChangeNotifier,
    RunError,
    RunRecord,
    RunState,
    abandoned_error,
    check_claim_options,
    check_heartbeat_options,
    check_submit_options,
    wait_until_finished,
)

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Task runs in a dict, with the same semantics as every other broker.

    Use it from one event loop. Closing it keeps the runs, so it can be opened again.

    Args:
        clock: Wall-clock time in epoch seconds; tests pass a fake one to move time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._runs: dict[str, RunRecord] = {}
        # Submission order breaks ties between runs due at the same time.
        self._sequence: dict[str, int] = {}
        self._unfinished: set[str] = set()
        self._is_open = False
        self._notifier = ChangeNotifier()
        self._work_seen_by_claim = 0
        self._next_due: float | None = None

    @property
    def url(self) -> str:
        """``"memory://"``."""
        return "memory://"

    def __repr__(self) -> str:
        return f"<MemoryBroker {len(self._runs)} runs>"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Make the broker usable. Calling it again does nothing."""
        await anyio.lowlevel.checkpoint()
        if not self._is_open:
            self._is_open = True
            self._work_seen_by_claim = self._notifier.generation(work=True)

    async def close(self) -> None:
        """Refuse further calls until :meth:`open`; the runs are kept."""
        await anyio.lowlevel.checkpoint()
        self._is_open = False

    async def _enter(self) -> None:
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

    def _held_by(self, owner: str, run_id: str) -> RunRecord | None:
        run = self._runs.get(run_id)
        if run is None or run.state is not RunState.RUNNING or run.lease_owner != owner:
            return None
        return run

    async def submit(
        self,
        task: str,
        payload: str,
        *,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        scheduled_at: float | None = None,
    ) -> RunRecord:
        """See :meth:`Broker.submit`."""
        check_submit_options(
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=scheduled_at,
        )
        await self._enter()
        now = self._clock()
        run = RunRecord(
            id=uuid.uuid4().hex,
            task=task,
            payload=payload,
            state=RunState.SCHEDULED,
            attempts=0,
            max_attempts=max_attempts,
            retries_left=retries,
            retry_delay=float(retry_delay),
            timeout=None if timeout is None else float(timeout),
            created_at=now,
            scheduled_at=now if scheduled_at is None else float(scheduled_at),
        )
        self._sequence[run.id] = len(self._sequence)
        self._store(run)
        self._notifier.notify(work=True)
        return run

    async def claim(
        self, owner: str, tasks: Collection[str], *, limit: int, lease_seconds: float
    ) -> list[RunRecord]:
        """See :meth:`Broker.claim`."""
        check_claim_options(owner, tasks, limit=limit, lease_seconds=lease_seconds)
        await self._enter()
        self._work_seen_by_claim = self._notifier.generation(work=True)
        now = self._clock()
        names = set(tasks)
        due: list[RunRecord] = []
        later: list[float] = []
        crashed = False
        for run_id in list(self._unfinished):
            run = self._runs[run_id]
            if run.state is RunState.RUNNING and run.lease_owner != owner:
                expires = run.lease_expires_at
                if expires is None or expires > now:
                    if expires is not None and run.task in names:
                        later.append(expires)
                elif run.attempts >= run.max_attempts:
                    self._store(self._crash(run, now))
                    crashed = True
                elif run.task in names:
                    due.append(run)
            elif run.state is RunState.SCHEDULED and run.task in names:
                if run.scheduled_at <= now:
                    due.append(run)
                else:
                    later.append(run.scheduled_at)
        due.sort(key=lambda run: (run.scheduled_at, self._sequence[run.id]))
        claimed = [
            self._store(
                replace(
                    run,
                    state=RunState.RUNNING,
                    attempts=run.attempts + 1,
                    started_at=now,
                    lease_owner=owner,
                    lease_expires_at=now + lease_seconds,
                )
            )
            for run in due[:limit]
        ]
        # Work left behind by the limit is due now; otherwise wake when the next run is.
        self._next_due = now if len(due) > limit else min(later, default=None)
        if crashed:
            self._notifier.notify(work=False)
        return claimed

    @staticmethod
    def _crash(run: RunRecord, now: float) -> RunRecord:
        return replace(
            run,
            state=RunState.CRASHED,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error=abandoned_error(run.id, run.task, run.attempts, run.max_attempts),
        )

    async def heartbeat(
        self, owner: str, run_ids: Collection[str], *, lease_seconds: float
    ) -> set[str]:
        """See :meth:`Broker.heartbeat`."""
        check_heartbeat_options(run_ids, lease_seconds=lease_seconds)
        await self._enter()
        expires = self._clock() + lease_seconds
        held = set()
        for run_id in run_ids:
            run = self._held_by(owner, run_id)
            if run is not None:
                self._store(replace(run, lease_expires_at=expires))
                held.add(run_id)
        return held

    async def complete(self, owner: str, run_id: str, result: str) -> bool:
        """See :meth:`Broker.complete`."""
        await self._enter()
        run = self._held_by(owner, run_id)
        if run is None:
            return False
        self._store(
            replace(
                run,
                state=RunState.COMPLETED,
                finished_at=self._clock(),
                lease_owner=None,
                lease_expires_at=None,
                result=result,
                error=None,
            )
        )
        self._notifier.notify(work=False)
        return True

    async def fail(self, owner: str, run_id: str, error: RunError, *, retry: bool) -> bool:
        """See :meth:`Broker.fail`."""
        await self._enter()
        run = self._held_by(owner, run_id)
        if run is None:
            return False
        now = self._clock()
        retried = retry and run.retries_left > 0
        if retried:
            run = replace(
                run,
                state=RunState.SCHEDULED,
                retries_left=run.retries_left - 1,
                scheduled_at=now + run.retry_delay,
                started_at=None,
            )
        else:
            run = replace(run, state=RunState.FAILED, finished_at=now)
        self._store(replace(run, lease_owner=None, lease_expires_at=None, error=error))
        self._notifier.notify(work=retried)
        return True

    async def release(self, owner: str, run_id: str) -> bool:
        """See :meth:`Broker.release`."""
        await self._enter()
        run = self._held_by(owner, run_id)
        if run is None:
            return False
        self._store(
            replace(
                run,
                state=RunState.SCHEDULED,
                attempts=max(run.attempts - 1, 0),
                started_at=None,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        self._notifier.notify(work=True)
        return True

    async def cancel(self, run_id: str) -> bool:
        """See :meth:`Broker.cancel`."""
        await self._enter()
        run = self._runs.get(run_id)
        if run is None or run.state is not RunState.SCHEDULED:
            return False
        self._store(replace(run, state=RunState.CANCELLED, finished_at=self._clock()))
        self._notifier.notify(work=False)
        return True

    async def get(self, run_id: str) -> RunRecord | None:
        """See :meth:`Broker.get`."""
        await self._enter()
        return self._runs.get(run_id)

    async def counts(self) -> dict[RunState, int]:
        """See :meth:`Broker.counts`."""
        await self._enter()
        counts = dict.fromkeys(RunState, 0)
        for run in self._runs.values():
            counts[run.state] += 1
        return counts

    async def wait_for_work(self, timeout: float) -> None:
        """See :meth:`Broker.wait_for_work`."""
        await self._enter()
        if self._next_due is not None:
            timeout = min(timeout, max(self._next_due - self._clock(), 0.0))
        await self._notifier.wait(work=True, since=self._work_seen_by_claim, timeout=timeout)

    async def wait_until_finished(self, run_id: str, timeout: float) -> RunRecord | None:
        """See :meth:`Broker.wait_until_finished`."""
        return await wait_until_finished(self.get, self._notifier, run_id, timeout)
