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

A broker without them (a plugin written before they existed) raises ``BrokerError`` saying
so, at the call.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Protocol

from .._errors import BrokerError
from .._leases import Lease, StoredTick, TickCounts, TickResult
from .._records import DEFAULT_MAX_ATTEMPTS, RunRecord, new_run
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

    def now(self) -> float:
        return self._clock()

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
    ) -> StoredTick:
        _check_name(schedule, "schedule")
        if isinstance(due, bool) or not isinstance(due, int | float):
            raise TypeError(f"due must be epoch seconds, got {due!r}")
        if not math.isfinite(due):
            raise ValueError(f"due must be finite, got {due!r}")
        check_submit_options(
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=due,
        )
        key = tick_key(due)
        run = new_run(
            uuid.uuid4().hex,
            task,
            payload,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=key,
            now=self._clock(),
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
