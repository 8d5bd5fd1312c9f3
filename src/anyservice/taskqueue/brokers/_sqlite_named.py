"""Claims of the runs that pokes named: a primary-key lookup instead of the full claim.

A submit of one run due now pokes the other processes with the run's id (see
``_wake_channel.py``). A worker woken only by such pokes since a full claim that found
nothing more due may claim just those runs by id (one SELECT and one UPDATE each, in
the claim's transaction, fenced as every claim is): nothing older can be due, since the
full claim would have seen it, no scheduled run's time has come since (the full claim's
next due time has not passed), and no lease can have expired since (the full claims come
at least every poll interval, far shorter than a lease). Any other work (a poke that named
no run or made no sense, this process's own writes, a poll that saw a commit nobody
signalled) means a full claim; so does a named run that is not there to claim, in the
same transaction.
"""

from __future__ import annotations

import sqlite3
import time

from .. import _records as records
from .._records import RunRecord
from ._notifier import ChangeNotifier
from ._sqlite_rows import SELECT, read_row

__all__ = ["NamedWork", "claim_named"]

#: Most runs named since the last claim that are claimed by id; past that, a full claim.
_MOST_NAMED = 32

_CLAIM = (
    "UPDATE anyservice_runs SET state = 'RUNNING', attempts = ?,"
    " started_at = ?, lease_owner = ?, lease_expires_at = ? WHERE seq = ?"
)


class NamedWork:
    """The runs pokes named since the last claim, and what the last full claim saw.

    Used from the broker's event loop, except :meth:`looked`, which the full claim calls
    from wherever its statements run, before its caller resumes.

    Args:
        notifier: The broker's notifier, whose work generation counts every piece of work
            this process heard of, named or not.
        look_every: Most seconds between two full claims of a worker claiming by id.
    """

    def __init__(self, notifier: ChangeNotifier, look_every: float) -> None:
        self._notifier = notifier
        self._look_every = look_every
        self._named: list[str] = []
        #: Work generations that named pokes moved since the last claim.
        self._named_moves = 0
        self._generation = notifier.generation(work=True)
        #: The last full claim: its tasks, and when it began (wall clock, monotonic), if
        #: it found nothing more due; ``None`` otherwise.
        self._clear: tuple[frozenset[str], float, float] | None = None

    def poked(self, run_ids: list[str] | None) -> None:
        """Pokes of work arrived, naming these runs (``None``: not all were named); the
        notifier's work generation moves once right after."""
        if run_ids is None or len(self._named) + len(run_ids) > _MOST_NAMED:
            self._clear = None
        else:
            self._named.extend(run_ids)
            self._named_moves += 1

    def take(self, tasks: list[str], limit: int, next_due: float | None, now: float) -> list[str]:
        """As a claim begins: the runs to claim by id, or ``[]`` for a full claim.

        ``next_due`` is when the last full claim said the next run becomes due.
        """
        generation = self._notifier.generation(work=True)
        named, self._named = self._named, []
        unnamed = generation - self._generation != self._named_moves
        self._generation, self._named_moves = generation, 0
        clear = self._clear
        if not named or unnamed or len(named) > limit or clear is None:
            return []
        looked_tasks, looked_at, looked_monotonic = clear
        if not looked_tasks.issuperset(tasks) or (next_due is not None and next_due <= now):
            return []
        if max(now - looked_at, time.monotonic() - looked_monotonic) >= self._look_every:
            return []
        return list(dict.fromkeys(named))

    def looked(self, tasks: list[str], now: float, clear: bool) -> None:
        """A full claim of these tasks began at ``now``; ``clear``: it left nothing due."""
        self._clear = (frozenset(tasks), now, time.monotonic()) if clear else None


def claim_named(
    conn: sqlite3.Connection,
    run_ids: list[str],
    tasks: list[str],
    owner: str,
    times: tuple[float, float],
) -> tuple[list[RunRecord], bool]:
    """Lease these runs, those of ``tasks`` that are claimable; and whether all were.

    ``times`` is ``(now, lease seconds)``. ``tasks`` leaves out those with a concurrency
    limit: their runs are left to the full claim, which counts their slots. In claim
    order.
    """
    now, lease_seconds = times
    claimed: list[tuple[tuple[int, float, int], RunRecord]] = []
    whole = True
    for run_id in run_ids:
        row = conn.execute(f"{SELECT} WHERE id = ?", (run_id,)).fetchone()
        lease = None
        if row is not None:
            seq, run, corrupt = read_row(row)
            if not corrupt and run.task in tasks:
                lease = records.claim(run, owner, now, lease_seconds)
        if lease is None:
            whole = False
            break
        conn.execute(_CLAIM, (lease.attempts, now, owner, lease.lease_expires_at, seq))
        claimed.append(((-run.priority, run.scheduled_at, seq), lease))
    claimed.sort(key=lambda item: item[0])
    return [run for _, run in claimed], whole
