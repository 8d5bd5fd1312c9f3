"""What brokers give the cluster: ticks stored once, and named leases.

:class:`ClusterBroker` is the protocol half (part of every :class:`Broker`), and
:class:`ClusterMethods` the base-class half that :class:`BaseBroker` inherits: it checks
arguments and wakes waiters, and a broker writes only these storage methods:

* ``_insert_tick(schedule, due, run, overlap) -> TickResult``: in one atomic step, if no
  tick (``schedule``, ``due``) is stored, store it; then, unless ``overlap`` is false and
  a run of an earlier tick of ``schedule`` is RUNNING (then the tick is stored as skipped,
  without a run), store ``run`` and link it to the tick.
* ``_tick_counts(schedule) -> TickCounts``: ticks with a run, skipped ones, the latest due.
* ``_acquire_lease(name, holder, lease_seconds) -> Lease | None`` and
  ``_release_lease(name, holder) -> bool``: the transitions of ``_leases.py``, atomic,
  reading ``now`` from the clock inside the step; ``_get_lease(name)``.
* ``_insert_keyed(key, run) -> RunRecord``: in one atomic step, the unfinished run stored
  under ``key`` if there is one, else ``run``, stored and put under ``key``.
* ``_list_runs(state, task, since, limit)``: newest first (by ``created_at``).
* ``_requeue(run_id, retries)``, ``_request_cancel(run_id) -> RunState | None``,
  ``_cancel_requests(owner, run_ids)``, ``_end_cancelled(owner, run_id, attempt)``: the
  transitions of ``_controls.py`` and the cancel requests they rest on.
* Optionally ``_announce_cancel(run_id)``: tell the workers of other processes that the
  cancellation of a RUNNING run was asked for (a hint: they find the request stored), and
  ``_watch_cancels()``: what a watch of such hints must do besides waiting (read them).
  By default only the brokers of this process hear of them.

A broker without them (a plugin written before they existed) raises ``BrokerError`` saying
so, at the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import anyio

from .._errors import BrokerError
from .._leases import Lease, StoredTick, TickCounts, TickResult
from .._records import DEFAULT_MAX_ATTEMPTS, RunRecord, RunState, new_run, new_run_id
from .._ticks import tick_key
from ._notifier import ChangeNotifier
from ._options import check_submit_options

__all__ = ["ClusterBroker", "ClusterMethods"]


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {value!r}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    return value


def _check_lease_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"lease_seconds must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"lease_seconds must be a finite number > 0, got {value!r}")
    return float(value)


class ClusterBroker(Protocol):
    """The cluster's half of a broker: ticks stored once per schedule, named leases."""

    def now(self) -> float:
        """The broker's wall-clock time (epoch seconds): what due times and leases use."""
        ...

    async def submit_tick(
        self,
        schedule: str,
        due: float,
        task: str,
        payload: str,
        *,
        overlap: bool = True,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        priority: int = 0,
    ) -> StoredTick:
        """Store the tick (``schedule``, ``due``) with a run due at ``due``, once.

        Any number of processes may store the same tick: one stores it (``STORED``), the
        others are told it was ``TAKEN``. With ``overlap=False``, a tick due while a run of
        the same schedule is RUNNING is stored as ``SKIPPED``, without a run.

        Raises:
            TypeError, ValueError: an empty schedule name, a bad due time or run option.
            BrokerError: the storage cannot be used.
        """
        ...

    async def tick_counts(self, schedule: str) -> TickCounts:
        """How many ticks of ``schedule`` got a run, were skipped, and the latest due."""
        ...

    async def acquire_lease(self, name: str, holder: str, *, lease_seconds: float) -> Lease | None:
        """Take the lease ``name`` for ``holder`` (or renew it) until ``now + lease_seconds``.

        Returns:
            The lease now held, or ``None`` while another holder's lease is live.
        """
        ...

    async def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease up at once, if ``holder`` holds it; whether it did."""
        ...

    async def get_lease(self, name: str) -> Lease | None:
        """The lease's current record (maybe expired), or ``None`` if never taken."""
        ...

    async def submit_once(
        self,
        key: str,
        task: str,
        payload: str,
        *,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        scheduled_at: float | None = None,
        priority: int = 0,
        trace_context: str | None = None,
    ) -> tuple[RunRecord, bool]:
        """Store a run under ``key`` unless a run under it is not finished yet.

        Returns:
            The run under ``key`` and whether this call stored it.
        """
        ...

    async def list_runs(
        self,
        *,
        state: RunState | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs in ``state``, of ``task``, submitted at or after ``since``; newest first."""
        ...

    async def requeue(self, run_id: str, *, retries: int = 0) -> RunRecord | None:
        """Start a FAILED, CRASHED or CANCELLED run over; ``None`` if it is not one."""
        ...

    async def request_cancel(self, run_id: str) -> RunState | None:
        """Cancel a SCHEDULED run at once, or ask the worker of a RUNNING one to.

        Returns:
            CANCELLED (done), RUNNING (asked; its worker, told at once where the broker
            can, ends it, within a heartbeat at the latest), or
            ``None``: the run is finished already, or there is no such run.
        """
        ...

    async def cancel_requests(self, owner: str, run_ids: list[str]) -> set[str]:
        """The runs among ``run_ids``, held by ``owner``, whose cancellation was asked for."""
        ...

    async def end_cancelled(self, owner: str, run_id: str, attempt: int) -> bool:
        """Record CANCELLED a run ``owner``'s claim number ``attempt`` holds and stopped
        because it was asked to; ``False`` if that claim no longer holds it."""
        ...

    async def watch_cancels(self, asked: Callable[[list[str]], None]) -> None:
        """Until cancelled, call ``asked(run_ids)`` (in this event loop) when this broker
        hears that cancellation of these RUNNING runs was asked for, in any process.

        A hint, sent after the request is stored: the caller looks the requests up with
        :meth:`cancel_requests`, as it does at each heartbeat, which stays the fallback
        (a hint may be lost, and a poll-only broker hears none from other processes).
        """
        ...


class ClusterMethods(ClusterBroker):
    """The checks and wake-ups of the cluster methods; a broker writes the storage."""

    _clock: Callable[[], float]
    _notifier: ChangeNotifier

    def _unsupported(self, what: str) -> BrokerError:
        return BrokerError(f"{type(self).__name__} does not support {what}")

    async def _insert_tick(
        self, schedule: str, due: float, run: RunRecord, overlap: bool
    ) -> TickResult:
        """Store the tick and, unless skipped, its run (see the module's docstring)."""
        raise self._unsupported("scheduled ticks")

    async def _tick_counts(self, schedule: str) -> TickCounts:
        """Ticks of ``schedule`` with a run, skipped, and the latest."""
        raise self._unsupported("scheduled ticks")

    async def _acquire_lease(self, name: str, holder: str, lease_seconds: float) -> Lease | None:
        """Take or renew the lease (``acquire_lease`` of ``_leases.py``), atomically."""
        raise self._unsupported("leases")

    async def _release_lease(self, name: str, holder: str) -> bool:
        """Drop the lease if ``holder`` holds it."""
        raise self._unsupported("leases")

    async def _get_lease(self, name: str) -> Lease | None:
        """The stored lease."""
        raise self._unsupported("leases")

    async def _insert_keyed(self, key: str, run: RunRecord) -> RunRecord:
        """The unfinished run under ``key``, or ``run`` stored under it."""
        raise self._unsupported("run keys")

    async def _list_runs(
        self, state: RunState | None, task: str | None, since: float | None, limit: int
    ) -> list[RunRecord]:
        """Matching runs, newest first."""
        raise self._unsupported("listing runs")

    async def _requeue(self, run_id: str, retries: int) -> RunRecord | None:
        """Apply ``requeue`` of ``_controls.py``."""
        raise self._unsupported("retrying finished runs")

    async def _request_cancel(self, run_id: str) -> RunState | None:
        """Cancel a SCHEDULED run, or record the request for a RUNNING one."""
        raise self._unsupported("cancelling running runs")

    async def _cancel_requests(self, owner: str, run_ids: list[str]) -> set[str]:
        """Requested cancellations among ``owner``'s runs."""
        # Workers ask at every heartbeat; a broker that cannot store a request has none.
        return set()

    async def _end_cancelled(self, owner: str, run_id: str, attempt: int) -> bool:
        """Apply ``end_cancelled`` of ``_controls.py``."""
        raise self._unsupported("cancelling running runs")

    def _announce_cancel(self, run_id: str) -> None:
        """The request to cancel RUNNING ``run_id`` is stored: tell the watchers."""
        self._notifier.cancel_asked([run_id])

    async def _watch_cancels(self) -> None:
        """Hear of cancel requests until cancelled (they come to the notifier)."""
        await anyio.sleep_forever()

    def now(self) -> float:
        return self._clock()

    def _checked_run(
        self,
        task: str,
        payload: str,
        *,
        retries: int,
        retry_delay: float,
        timeout: float | None,
        max_attempts: int,
        scheduled_at: float | None,
        priority: int = 0,
        trace_context: str | None = None,
    ) -> RunRecord:
        """A new run with checked options, as ``submit`` makes it."""
        check_submit_options(
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=scheduled_at,
            priority=priority,
        )
        if trace_context is not None and not isinstance(trace_context, str):
            raise TypeError(
                f"trace_context must be a traceparent string or None, got {trace_context!r}"
            )
        return new_run(
            new_run_id(),
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=scheduled_at,
            now=self._clock(),
            priority=int(priority),
            trace_context=trace_context,
        )

    async def submit_tick(
        self,
        schedule: str,
        due: float,
        task: str,
        payload: str,
        *,
        overlap: bool = True,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        priority: int = 0,
    ) -> StoredTick:
        _check_name(schedule, "schedule")
        if isinstance(due, bool) or not isinstance(due, int | float):
            raise TypeError(f"due must be epoch seconds, got {due!r}")
        if not math.isfinite(due):
            raise ValueError(f"due must be finite, got {due!r}")
        key = tick_key(due)
        run = self._checked_run(
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=key,
            priority=priority,
        )
        result = await self._insert_tick(schedule, key, run, bool(overlap))
        if result is TickResult.STORED:
            self._notifier.notify(work=True)
            return StoredTick(result, run.id)
        return StoredTick(result)

    async def tick_counts(self, schedule: str) -> TickCounts:
        return await self._tick_counts(_check_name(schedule, "schedule"))

    async def acquire_lease(self, name: str, holder: str, *, lease_seconds: float) -> Lease | None:
        _check_name(name, "lease name")
        _check_name(holder, "lease holder")
        return await self._acquire_lease(name, holder, _check_lease_seconds(lease_seconds))

    async def release_lease(self, name: str, holder: str) -> bool:
        _check_name(name, "lease name")
        _check_name(holder, "lease holder")
        return await self._release_lease(name, holder)

    async def get_lease(self, name: str) -> Lease | None:
        return await self._get_lease(_check_name(name, "lease name"))

    async def submit_once(
        self,
        key: str,
        task: str,
        payload: str,
        *,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        scheduled_at: float | None = None,
        priority: int = 0,
        trace_context: str | None = None,
    ) -> tuple[RunRecord, bool]:
        _check_name(key, "key")
        run = self._checked_run(
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=scheduled_at,
            priority=priority,
            trace_context=trace_context,
        )
        stored = await self._insert_keyed(key, run)
        created = stored.id == run.id
        if created:
            self._notifier.notify(work=True)
        return stored, created

    async def list_runs(
        self,
        *,
        state: RunState | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        if state is not None:
            state = RunState(state)
        if task is not None:
            _check_name(task, "task")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
            raise TypeError(f"since must be epoch seconds, got {since!r}")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, got {limit!r}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        return await self._list_runs(state, task, since, limit)

    async def requeue(self, run_id: str, *, retries: int = 0) -> RunRecord | None:
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int, got {retries!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        run = await self._requeue(run_id, retries)
        if run is not None:
            self._notifier.notify(work=True)
        return run

    async def request_cancel(self, run_id: str) -> RunState | None:
        state = await self._request_cancel(run_id)
        if state is RunState.CANCELLED:
            self._notifier.notify(work=False)
        elif state is RunState.RUNNING:
            self._announce_cancel(run_id)
        return state

    async def cancel_requests(self, owner: str, run_ids: list[str]) -> set[str]:
        if not run_ids:
            return set()
        return await self._cancel_requests(owner, list(dict.fromkeys(run_ids)))

    async def watch_cancels(self, asked: Callable[[list[str]], None]) -> None:
        with self._notifier.watching_cancels(asked):
            await self._watch_cancels()

    async def end_cancelled(self, owner: str, run_id: str, attempt: int) -> bool:
        done = await self._end_cancelled(owner, run_id, attempt)
        if done:
            self._notifier.notify(work=False)
        return done
