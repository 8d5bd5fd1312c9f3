"""Cluster records: named leases (leader election) and stored ticks, with pure transitions.

A *lease* names one holder of something only one process may do at a time (a singleton
service). It is held until ``expires_at`` unless renewed; acquiring succeeds when nobody
holds it, when its lease expired, or when the caller already holds it (a renewal).

A *tick* of a schedule is stored once, under the key (schedule, due time): storing it
again is refused (``TickResult.TAKEN``), and with ``overlap=False`` a tick due while a run
of the same schedule is RUNNING is recorded as skipped instead of getting a run.

Like ``_records.py``, nothing here does I/O or reads a clock: the memory broker applies
these functions, the SQLite broker says the same in SQL, and one conformance suite checks
both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Lease", "StoredTick", "TickCounts", "TickResult", "acquire_lease", "release_lease"]


@dataclass(frozen=True)
class Lease:
    """Who holds a named lease, and until when (broker wall-clock epoch seconds)."""

    name: str
    holder: str
    expires_at: float

    def live(self, now: float) -> bool:
        """Whether the lease is still held at ``now``."""
        return self.expires_at > now


def acquire_lease(
    current: Lease | None, name: str, holder: str, now: float, lease_seconds: float
) -> Lease | None:
    """Take or renew the lease until ``now + lease_seconds``; ``None`` if another holds it."""
    if current is not None and current.holder != holder and current.live(now):
        return None
    return Lease(name=name, holder=holder, expires_at=now + lease_seconds)


def release_lease(current: Lease | None, holder: str) -> bool:
    """Whether ``holder`` may give the lease up (it holds it, expired or not)."""
    return current is not None and current.holder == holder


class TickResult(enum.Enum):
    """What storing a tick did."""

    #: This call stored the tick and its run.
    STORED = "stored"
    #: The tick was already stored (by another worker, or before).
    TAKEN = "taken"
    #: Stored as skipped, without a run: the previous run of the schedule was RUNNING.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StoredTick:
    """The outcome of storing one tick: what happened, and the run id if one was stored."""

    result: TickResult
    run_id: str | None = None


@dataclass(frozen=True)
class TickCounts:
    """How many ticks of a schedule got a run, how many were skipped, and the latest."""

    runs: int = 0
    skipped: int = 0
    latest: float | None = None
