"""Claims of the runs that pokes named: a primary-key lookup instead of the full claim.

A submit of one run due now pokes the other processes with the run's id (see
``_wake_channel.py``). A worker woken only by such pokes since a full claim that found
nothing more due may claim just those runs by id (one SELECT each and one UPDATE, in
the claim's transaction, fenced as every claim is): nothing older can be due, since the
full claim would have seen it, no scheduled run's time has come since (the full claim's
next due time has not passed), and an expired lease or a dead worker's run waits at most
:data:`LOOK_EVERY` for the next full claim (as it would for an idle worker's next claim).
Any other work (a poke that named
no run or made no sense, this process's own writes, a poll that saw a commit nobody
signalled) means a full claim; so does a named run that is not there to claim, in the
same transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .. import _records as records
from .._records import RunRecord
from ._base import AheadClaimer
from ._notifier import ChangeNotifier
from ._sqlite_rows import RELEASE, SELECT, lease_in_place, lease_rows, read_row, update_held
from ._sqlite_thread import ConnectionThread

__all__ = ["LOOK_EVERY", "NamedWork", "claim_named", "poked"]

_log = logging.getLogger("anyservice.taskqueue")

#: Most runs named since the last claim that are claimed by id; past that, a full claim.
_MOST_NAMED = 32

#: Most seconds between two full claims of a worker that claims by id: as long as a
#: waiting worker's longest wait between claims (each ends in a full claim), so a run
#: submitted to a worker idle for a while is claimed by id as well; far shorter than
#: a lease, and the takeover of a dead worker's runs waits no longer than an idle
#: worker's next claim would.
LOOK_EVERY = 1.0


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
        if unnamed or not self._by_id(named, tasks, limit, next_due, now):
            return []
        return list(dict.fromkeys(named))

    def ahead(
        self, run_ids: list[str], tasks: list[str], limit: int, next_due: float | None, now: float
    ) -> tuple[list[str], int]:
        """As pokes naming ``run_ids`` arrive (before the work generation moves for
        them): the runs a claim by id would take now (those named since the last claim
        too), or ``[]`` if the claim loop must claim (then :meth:`poked` records them);
        and the work generation seen."""
        generation = self._notifier.generation(work=True)
        named = [*self._named, *run_ids]
        if generation - self._generation != self._named_moves:
            return [], generation
        if not self._by_id(named, tasks, limit, next_due, now):
            return [], generation
        return list(dict.fromkeys(named)), generation

    def claimed_ahead(self, generation: int, whole: bool) -> None:
        """The runs :meth:`ahead` gave at ``generation`` were claimed (all, if
        ``whole``; else the next claim is a full one); the work generation moves once
        right after, for the pokes."""
        self._named = []
        self._generation, self._named_moves = generation, 1
        if not whole:
            self._clear = None

    def _by_id(
        self, named: list[str], tasks: list[str], limit: int, next_due: float | None, now: float
    ) -> bool:
        """Whether a claim of ``tasks`` at ``now`` may take just the ``named`` runs."""
        clear = self._clear
        if not named or len(named) > limit or clear is None:
            return False
        looked_tasks, looked_at, looked_monotonic = clear
        if not looked_tasks.issuperset(tasks) or (next_due is not None and next_due <= now):
            return False
        return max(now - looked_at, time.monotonic() - looked_monotonic) < self._look_every

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
            if not corrupt and run.task in tasks and records.claimable(run, now):
                lease = lease_in_place(run, now, owner, now + lease_seconds)
        if lease is None:
            whole = False
            break
        claimed.append(((-run.priority, run.scheduled_at, seq), lease))
    lease_rows(conn, [seq for (_, _, seq), _ in claimed], (now, owner, now + lease_seconds))
    claimed.sort(key=lambda item: item[0])
    return [run for _, run in claimed], whole


class _PokedBroker(Protocol):
    """What :func:`poked` uses of the SQLite broker."""

    _ahead_claimer: AheadClaimer | None
    _named: NamedWork
    _db: ConnectionThread
    _next_due: float | None
    _notifier: ChangeNotifier
    _clock: Callable[[], float]

    def _claimed_ahead(self, generation: int) -> None: ...


def poked(broker: _PokedBroker, work: bool, run_ids: list[str] | None) -> None:
    """Pokes arrived at ``broker`` from other processes: wake its waiters, and first, if
    they named runs the claim loop waiting for work would claim by id, claim them here
    and start them (in the event loop watching the socket), so that the loop's wait
    goes on. Anything else (the loop's claim would be a full one, the connection is in
    use, the claim here failed) leaves the claim to the loop.

    Never raises: it runs in the socket's reader, which on trio is a system task (an
    exception there would end the whole event loop); anything that goes wrong is logged
    and the claim left to the loop."""
    claimed = None
    if work and run_ids:
        try:
            claimed = _claim_ahead(broker, run_ids)
        except Exception:
            _log.exception("claiming runs %s as their poke arrived failed", run_ids)
            run_ids = None  # The loop's next claim is a full one.
    if work and claimed is None:
        broker._named.poked(run_ids)
    whole = claimed is not None and claimed[0]
    generation = broker._notifier.notify_from_thread(work=work, claimed=whole)
    # Another thread's change in between is work of its own: the loop claims then.
    if whole and claimed is not None and generation == claimed[1] + 1:
        broker._claimed_ahead(generation)


def _claim_ahead(broker: _PokedBroker, run_ids: list[str]) -> tuple[bool, int] | None:
    """Claim the named runs for the waiting claim loop and start them; whether all were
    claimed (``False``: the loop's next claim is a full one) and the work generation seen,
    or ``None`` if nothing was claimed here."""
    claimer = broker._ahead_claimer
    if claimer is None or claimer.thread != threading.get_ident():
        return None
    named = broker._named
    tasks = claimer.tasks
    ids, generation = named.ahead(
        run_ids, tasks, claimer.free_slots(), broker._next_due, broker._clock()
    )
    if not ids:
        return None
    unlimited = [name for name in tasks if name not in claimer.concurrency]
    db, clock = broker._db, broker._clock

    def claim(conn: sqlite3.Connection) -> tuple[list[RunRecord], bool]:
        db.check_file()
        return claim_named(conn, ids, unlimited, claimer.owner, (clock(), claimer.lease_seconds))

    done = db.run_here(claim)
    if done is None:
        return None
    runs, whole = done
    named.claimed_ahead(generation, whole)
    if runs:
        try:
            claimer.start(runs)
        except Exception:
            # The claim loop's next claim (a full one) takes them again, and meets the
            # error itself if it comes again.
            _log.exception("starting runs claimed ahead failed; handing them back")
            _hand_back(db, runs, claimer.owner)
            named.claimed_ahead(generation, whole=False)
            return False, generation
    return whole, generation


def _hand_back(db: ConnectionThread, runs: list[RunRecord], owner: str) -> None:
    """Make the runs just leased to ``owner`` claimable again at once (each still under
    that lease only); runs that cannot be (the connection busy or failing) wait out
    their lease."""

    def release(conn: sqlite3.Connection) -> bool:
        for run in runs:
            update_held(conn, RELEASE, {"id": run.id, "owner": owner, "attempt": run.attempts})
        return True

    if db.run_here(release) is None:
        _log.error(
            "runs %s claimed ahead could not be handed back: claimable once their lease ends",
            [run.id for run in runs],
        )
