"""The broker protocol, and the base class every broker of this package is built on.

A broker stores task runs and hands them to workers under a lease. The worker only ever
talks to :class:`Broker`. Every broker keeps the same promises, checked by one
conformance test suite:

* A run is claimed by one owner at a time: while its lease is live nobody else gets it.
* A lease that expires (the worker died) makes the run claimable again, and ``attempts``
  counts the claims. A run whose lease expires once ``attempts`` has reached
  ``max_attempts`` ends :attr:`RunState.CRASHED` instead of being claimed forever.
* Completing, failing, releasing and heartbeating are fenced by ``(id, attempt, owner)``:
  they only succeed for the claim that holds the run now, named by its owner and the
  attempt number the claim gave it (``RunRecord.attempts`` as the claim returned it). A
  worker whose lease expired and was claimed again, by another worker or by itself, is
  told so (``False``) and changes nothing.
* Payloads and results are opaque JSON text to the broker (see ``_serialize.py``), so a
  run with an undecodable payload never breaks a claim: the worker decides what to do.

All times are wall-clock epoch seconds from the broker's ``clock`` (``time.time`` by
default), because leases are shared by processes that have no common monotonic clock.

How a broker is written
-----------------------
:class:`BaseBroker` owns everything that is not storage: checking the arguments of each
call, waking waiters through a :class:`ChangeNotifier` (and polling for other processes'
changes where the storage cannot push them), ``wait_for_work``, ``wait_until_finished``,
``async with`` and the docstrings. A subclass writes only its storage, as these methods,
each applying the transitions of ``taskqueue/_records.py`` to the stored records:

* ``url`` (a property), ``from_url(url, clock=...)`` (a classmethod, for its scheme),
  ``_open() -> bool`` (True if it opened now, False if it was open already), ``close()``.
* ``_insert(run)``: store a new record, built by the base class with ``new_run``;
  optionally ``_insert_many(runs)``, all or none atomically (by default it calls
  ``_insert`` for each, which is atomic only for a storage whose calls cannot fail).
* ``_claim(owner, tasks, limit, lease_seconds, concurrency) -> Claimed``: first
  ``abandon`` every abandoned run (of any task), then ``claim`` up to ``limit`` claimable
  runs of ``tasks``, in ``claim_order`` (higher ``priority`` first, then ``scheduled_at``,
  then submission order), taking of a task named in ``concurrency`` (``{task: limit}``)
  no more than its limit minus its runs that ``takes_a_slot`` (``pick_claims``), all in
  one atomic step that no other claim can interleave with, reading ``now`` from the clock
  inside it; report whether any run was finished on the way, when the next run becomes
  claimable (``now`` if ``limit`` left due runs behind), and whether a concurrency limit
  held due runs back.
* ``_claim_run(owner, id, lease_seconds, concurrency) -> RunRecord | None``: ``claim``
  that one run if it is claimable and its task (if named in ``concurrency``) has a free
  slot, atomically (for a worker told to run a given run).
* ``_heartbeat(owner, leases, lease_seconds) -> set[str]`` (``renew``; ``leases`` maps
  distinct run ids to their attempt), ``_complete(owner, id, attempt, result) -> bool``,
  ``_fail(owner, id, attempt, error, retry, retry_delay) -> RunState | None`` (the state
  the run went to; ``retry_delay`` ``None`` means the run's own), ``_release(owner, id,
  attempt) -> bool``: each fenced by ``(id, attempt, owner)``: it changes the run only
  while the run is RUNNING under that claim (``lease_owner == owner`` and ``attempts ==
  attempt``), atomically with that check.
* Optionally ``_complete_many(owner, results) -> set[str]`` (``results`` maps distinct
  run ids to ``(attempt, result)``): ``complete`` each, fenced each, all in one atomic
  step; by default it calls ``_complete`` for each.
* Optionally ``_complete_and_claim(owner, results, tasks, limit, lease_seconds,
  concurrency) -> (set[str], Claimed)``: ``_complete_many`` then ``_claim``, the claim
  seeing the completions; by default two steps, one transaction where the storage can.
* ``_cancel(id) -> bool`` (only a SCHEDULED run), ``_get(id)``, ``_counts()``.
* ``_purge(before, limit) -> int``: delete up to ``limit`` finished runs whose
  ``finished_at`` is before ``before``.
* Optionally ``_poll() -> bool`` (did another process change runs?) with a
  ``poll_interval`` given to ``__init__``, and ``_check_open()`` for calls that would not
  otherwise touch the storage.

The cluster's storage methods (ticks, leases) are listed in ``brokers/_cluster.py``.

Every storage method raises :class:`BrokerError` when the storage cannot be used. A new
URL scheme is one line in ``_SCHEMES`` of ``brokers/_urls.py``.
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import anyio
import anyio.lowlevel

from .._records import (
    DEFAULT_MAX_ATTEMPTS,
    RunError,
    RunRecord,
    RunState,
    new_run_ids,
    sibling_runs,
)
from ._cluster import ClusterBroker, ClusterMethods
from ._notifier import ChangeNotifier
from ._options import (
    check_attempt,
    check_claim_options,
    check_completions,
    check_concurrency,
    check_heartbeat_options,
    check_purge_options,
    check_retry_delay,
    hide_password,
)

__all__ = ["PURGE_BATCH", "AheadClaimer", "BaseBroker", "Broker", "Claimed"]

#: Runs deleted per statement by ``purge``: small, so a purge never holds the storage long.
PURGE_BATCH = 500


class Broker(ClusterBroker, Protocol):
    """Durable storage of task runs, shared by the processes that submit and run them.

    Every method may raise :class:`BrokerError` when the storage cannot be used (not
    open, closed, unreachable); transient lock contention is retried internally.
    """

    @property
    def url(self) -> str:
        """The URL this broker was made from, e.g. ``"sqlite:///anyservice.db"``."""
        ...

    @property
    def location(self) -> str:
        """Where the runs are stored, safe to log: a SQLite file's absolute path, a URL
        without its password."""
        ...

    async def open(self) -> None:
        """Connect and create or migrate the schema. Calling it again does nothing.

        Raises:
            BrokerError: The storage cannot be opened or has a newer schema.
        """
        ...

    async def close(self) -> None:
        """Release connections. Calling it again (or before :meth:`open`) does nothing."""
        ...

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
        priority: int = 0,
        trace_context: str | None = None,
    ) -> RunRecord:
        """Store a new SCHEDULED run, due at ``scheduled_at`` (now by default).

        Among due runs, claims take those of higher ``priority`` first.
        ``trace_context`` (the submitter's span as a W3C ``traceparent``) is stored as
        it is, for the spans of the run's attempts.

        Raises:
            ValueError: An option is out of range (negative retries, ``max_attempts`` < 1,
                a non-positive timeout, an empty task name, a priority beyond 32 bits).
        """
        ...

    async def submit_many(
        self,
        task: str,
        payloads: Sequence[str],
        *,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        scheduled_at: float | None = None,
        priority: int = 0,
        trace_context: str | None = None,
    ) -> list[RunRecord]:
        """Store one SCHEDULED run per payload, all or none, in submission order.

        Every run gets the same ``trace_context``, as :meth:`submit` stores it.

        Raises:
            TypeError: A payload is not a string (the message gives its index).
            ValueError: An option is out of range, as for :meth:`submit`.
        """
        ...

    async def claim(
        self,
        owner: str,
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> list[RunRecord]:
        """Lease up to ``limit`` due runs of the named tasks to ``owner``.

        Higher ``priority`` first, then the earliest due, then the earliest submitted.
        ``concurrency`` maps task names to the most runs of that task RUNNING at once
        across every claimer: the claim counts the task's runs RUNNING under a live lease
        in the same atomic step, and takes no more than what is left (a full task's runs
        are passed over, not waited for).

        Claimable are SCHEDULED runs whose ``scheduled_at`` is due and RUNNING runs whose
        lease expired, whoever held it (``owner`` included). Each claim counts an attempt:
        the ``attempts`` of a returned record is the claim's fencing token, to pass to
        :meth:`heartbeat`, :meth:`complete`, :meth:`fail` and :meth:`release`. Before
        claiming, runs (of any task) whose lease expired after their last allowed attempt
        are marked CRASHED.

        Raises:
            ValueError: ``limit`` is negative, ``lease_seconds`` is not positive, or a
                concurrency limit is below 1.
            TypeError: ``tasks`` is a single string instead of a collection of names, or
                ``concurrency`` is not a mapping of task names to ints.
        """
        ...

    async def claim_run(
        self,
        owner: str,
        run_id: str,
        *,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> RunRecord | None:
        """Lease this one run to ``owner`` if it is claimable now, as :meth:`claim` would.

        ``concurrency`` holds the run to its task's limit as :meth:`claim` does: a run of
        a task at its limit is not claimed.

        Returns:
            The claimed record (its ``attempts`` the claim's fencing token), or ``None``
            if there is no such run or it is not claimable (not due, leased, finished,
            its task at its concurrency limit).

        Raises:
            ValueError: ``owner`` is empty, ``lease_seconds`` is not positive or a
                concurrency limit is below 1.
        """
        ...

    async def heartbeat(
        self, owner: str, leases: Mapping[str, int], *, lease_seconds: float
    ) -> set[str]:
        """Renew ``owner``'s leases, given as ``{run_id: attempt}``, to ``now + lease_seconds``.

        Returns:
            The ids whose claim still holds the run (and is now renewed); the others were
            claimed again after their lease expired, or are no longer running.

        Raises:
            TypeError: ``leases`` is not a mapping of run ids to attempt numbers.
        """
        ...

    async def complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        """Record a COMPLETED run with its JSON ``result``, if the claim still holds it."""
        ...

    async def complete_many(self, owner: str, results: Mapping[str, tuple[int, str]]) -> set[str]:
        """Record several COMPLETED runs at once: ``{run_id: (attempt, result)}``.

        Each run is fenced on its own, exactly as :meth:`complete` fences it, and every
        result is stored before the call returns (one transaction where the storage has
        them), so a worker finishing many runs pays one write for all of them.

        Returns:
            The ids whose claim still held the run, now COMPLETED; the others changed
            nothing.

        Raises:
            TypeError: ``results`` is not a mapping of run ids to ``(attempt, result)``
                pairs, or a result is not a string (the message names the run).
            ValueError: An attempt is < 1.
        """
        ...

    async def complete_and_claim(
        self,
        owner: str,
        results: Mapping[str, tuple[int, str]],
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> tuple[set[str], list[RunRecord]]:
        """:meth:`complete_many`, then :meth:`claim`: a worker's finished batch and its next.

        The completions are fenced and stored as :meth:`complete_many` stores them, and
        the claim that follows sees them (a finished run frees its task's concurrency
        slot), as a :meth:`claim` made after the call would. A broker may make both one
        transaction, so a worker pays one round trip and one commit for the two;
        ``limit=0`` only completes.

        Returns:
            The ids completed (as :meth:`complete_many` returns them) and the runs
            claimed (as :meth:`claim` returns them).

        Raises:
            TypeError, ValueError: as :meth:`complete_many` and :meth:`claim` raise them,
                before anything is stored.
        """
        ...

    async def fail(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        error: RunError,
        *,
        retry: bool,
        retry_delay: float | None = None,
    ) -> bool:
        """Record a failed attempt, if ``owner``'s claim number ``attempt`` still holds it.

        With ``retry`` and retries left, the run goes back to SCHEDULED, due after
        ``retry_delay`` seconds (the run's stored ``retry_delay`` by default: a worker
        backing off passes each retry's own), with one retry fewer; otherwise it ends
        FAILED. The error is kept either way.

        Raises:
            TypeError, ValueError: ``retry_delay`` is not a finite number of seconds >= 0.
        """
        ...

    async def release(self, owner: str, run_id: str, attempt: int) -> bool:
        """Hand a run back at once (SCHEDULED, lease cleared, the attempt not counted).

        For a worker shutting down with the run unfinished, so nobody waits for the lease
        to expire.
        """
        ...

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run that no worker has claimed yet (SCHEDULED → CANCELLED)."""
        ...

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's current record, or ``None`` if there is no such run."""
        ...

    async def counts(self) -> dict[RunState, int]:
        """How many runs are in each state (every state is a key)."""
        ...

    async def purge(self, older_than: float) -> int:
        """Delete the runs that finished more than ``older_than`` seconds ago.

        Deletes in small batches, so other calls get the storage in between. Runs that
        have not finished are never deleted.

        Returns:
            How many runs were deleted (0 while another process is purging the same
            storage, where the storage has such a lock).

        Raises:
            ValueError: ``older_than`` is negative or not a finite number.
        """
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Wait until work may be claimable, for at most ``timeout`` seconds.

        Returns early when a run was submitted, released or rescheduled since this
        broker's last :meth:`claim` (at once if that already happened), when another
        process may have changed the runs, or when a run that the last claim saw
        scheduled for later (or leased to someone else) becomes due. Spurious returns are
        allowed; the caller just claims again.
        """
        ...

    async def release_claimed_ahead(self, owner: str) -> None:
        """Release the runs this broker claimed for ``owner``'s next claim, if any.

        A broker may claim runs as their work arrives, while ``owner`` waits for work,
        for the claim that follows the wait to take (PostgreSQL does). A claimer that
        will not claim again (a worker stopping, cancelled or failing) calls this, so
        those runs are claimable at once instead of leased until the lease ends. Never
        raises :class:`BrokerError`: runs it cannot release wait out their lease.
        """
        ...

    def claiming_ahead(self, claimer: AheadClaimer) -> AbstractContextManager[None]:
        """While the block runs (a claim loop's :meth:`wait_for_work`), the broker may
        claim runs for ``claimer`` as it hears of them, and start them.

        A broker told by another process of runs that the claimer's next claim would
        take by id may claim them at once, in the claimer's event loop, with its
        arguments, and hand them to ``claimer.start``: a run's body starts without the
        wait's return and the claim's call in between. A wait whose work was all claimed
        so goes on waiting. Brokers that cannot do this claim nothing ahead.
        """
        ...

    async def wait_until_finished(self, run_id: str, timeout: float) -> RunRecord | None:
        """Wait for the run to finish, for at most ``timeout`` seconds.

        Returns:
            The finished record, its latest unfinished record once ``timeout`` elapsed,
            or ``None`` if there is no such run.
        """
        ...


@dataclass(eq=False)
class AheadClaimer:
    """A claim loop waiting for work, that its broker may claim for (see
    :meth:`Broker.claiming_ahead`).

    Attributes:
        owner, tasks, lease_seconds, concurrency: The arguments of the loop's claims
            (``tasks`` sorted and distinct).
        free_slots: How many runs the loop would claim now (0 while it takes none).
        start: Takes the runs claimed for the loop and starts them, in its event loop's
            thread (what it returns is not used); it must not raise.
        thread: That thread (the one that made the claimer).
    """

    owner: str
    tasks: list[str]
    lease_seconds: float
    concurrency: dict[str, int]
    free_slots: Callable[[], int]
    start: Callable[[list[RunRecord]], object]
    thread: int = field(default_factory=threading.get_ident)


@dataclass
class Claimed:
    """What one storage claim did, for :meth:`BaseBroker.claim` to pass on.

    Attributes:
        runs: The records now leased to the claimer.
        finished: Whether a run reached a finished state on the way (abandoned, corrupt).
        next_due: When a run of the claimed tasks becomes claimable next, if known.
        held_back: Whether due runs were passed over because their task's concurrency
            limit was reached: they become claimable when a run of the task finishes.
    """

    runs: list[RunRecord] = field(default_factory=list)
    finished: bool = False
    next_due: float | None = None
    held_back: bool = False


class _CompletingClaims:
    """:meth:`Broker.complete_and_claim` for :class:`BaseBroker`, and its storage default."""

    _notifier: ChangeNotifier
    _work_seen_by_claim: int
    _changes_seen_by_claim: int
    _next_due: float | None
    _held_back: bool

    if TYPE_CHECKING:  # BaseBroker's storage methods; declared for the type checker only

        async def _complete_many(
            self, owner: str, results: dict[str, tuple[int, str]]
        ) -> set[str]: ...

        async def _claim(
            self,
            owner: str,
            tasks: list[str],
            limit: int,
            lease_seconds: float,
            concurrency: dict[str, int],
        ) -> Claimed: ...

    async def complete_and_claim(
        self,
        owner: str,
        results: Mapping[str, tuple[int, str]],
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> tuple[set[str], list[RunRecord]]:
        check_completions(results)
        check_claim_options(owner, tasks, limit=limit, lease_seconds=lease_seconds)
        names = sorted(set(tasks))
        limits = check_concurrency(concurrency, names)
        # As claim() does: work that arrives during the call wakes the next wait.
        self._work_seen_by_claim = self._notifier.generation(work=True)
        self._changes_seen_by_claim = self._notifier.generation(work=False)
        done, claimed = await self._complete_and_claim(
            owner, dict(results), names, limit, lease_seconds, limits
        )
        self._next_due = claimed.next_due
        self._held_back = claimed.held_back
        if done or claimed.finished:
            self._notifier.notify(work=False)
        return done, claimed.runs

    async def _complete_and_claim(
        self,
        owner: str,
        results: dict[str, tuple[int, str]],
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> tuple[set[str], Claimed]:
        """``_complete_many`` then ``_claim`` (``limit`` may be 0); this default makes them
        two steps, a broker may make them one."""
        done = await self._complete_many(owner, results) if results else set()
        return done, await self._claim(owner, tasks, limit, lease_seconds, concurrency)


class _ClaimsAhead:
    """:meth:`Broker.claiming_ahead` for :class:`BaseBroker`: the claimer registered,
    for a storage that hears of named work to claim for it."""

    _notifier: ChangeNotifier
    _work_seen_by_claim: int
    #: The claim loop waiting for work that runs may be claimed for, if any.
    _ahead_claimer: AheadClaimer | None = None

    @contextmanager
    def claiming_ahead(self, claimer: AheadClaimer) -> Iterator[None]:
        check_claim_options(
            claimer.owner, claimer.tasks, limit=0, lease_seconds=claimer.lease_seconds
        )
        check_concurrency(claimer.concurrency, claimer.tasks)
        self._ahead_claimer = claimer
        try:
            yield
        finally:
            if self._ahead_claimer is claimer:
                self._ahead_claimer = None

    def _claimed_ahead(self, generation: int) -> None:
        """The work up to ``generation`` was all claimed for the claimer, and started:
        its wait for work goes on."""
        self._work_seen_by_claim = generation


class BaseBroker(_ClaimsAhead, _CompletingClaims, ClusterMethods, Broker, abc.ABC):
    """The shared half of a broker: checks, wake-ups, waiting and ``async with``.

    A subclass writes its storage (see the module's docstring) and inherits the public
    methods, documented on :class:`Broker`.

    Args:
        clock: Wall-clock time in epoch seconds; tests pass a fake one to move time.
        notifier: Wakes this broker's waiters; brokers of one storage in one process may
            share one, so a write through one wakes the waiters of all at once.
        poll_interval: Seconds between :meth:`_poll` calls while waiting, for changes
            nobody notifies about (other processes'); ``None`` never polls.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        notifier: ChangeNotifier | None = None,
        poll_interval: float | None = None,
    ) -> None:
        self._clock = clock
        self._notifier = ChangeNotifier() if notifier is None else notifier
        self._poll_interval = poll_interval
        # The work generation the last claim saw, and when a run it saw becomes due.
        self._work_seen_by_claim = 0
        self._next_due: float | None = None
        # Whether the last claim passed runs over for a concurrency limit, and the change
        # generation it saw: then any finish may free a slot, not only new work.
        self._held_back = False
        self._changes_seen_by_claim = 0
        # The run the last submit stored and the change generation just after it: a wait
        # for that run while nothing changed since need not read it first.
        self._submitted: tuple[str, int] | None = None

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> Self:
        """Make a broker from a URL of this broker's scheme (not opened yet).

        Raises:
            ValueError: The URL has no usable path or options for this broker.
        """

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

    # --- storage, written by each broker ---------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> bool:
        """Make the storage usable; True if it opened now, False if it was open already."""

    @abc.abstractmethod
    async def _insert(self, run: RunRecord) -> None:
        """Store a new run."""

    async def _insert_many(self, runs: Sequence[RunRecord]) -> None:
        """Store new runs, all or none; this default stores them one at a time."""
        for run in runs:
            await self._insert(run)

    @abc.abstractmethod
    async def _claim(
        self,
        owner: str,
        tasks: list[str],
        limit: int,
        lease_seconds: float,
        concurrency: dict[str, int],
    ) -> Claimed:
        """Abandon what is abandoned, then claim up to ``limit`` runs of ``tasks``, within
        the ``concurrency`` limits of the tasks named there."""

    @abc.abstractmethod
    async def _claim_run(
        self, owner: str, run_id: str, lease_seconds: float, concurrency: dict[str, int]
    ) -> RunRecord | None:
        """Claim the run if :func:`~anyservice.taskqueue._records.claimable` and within its
        task's ``concurrency`` limit, atomically."""

    @abc.abstractmethod
    async def _heartbeat(
        self, owner: str, leases: dict[str, int], lease_seconds: float
    ) -> set[str]:
        """Renew the leases ``owner`` holds among ``leases`` (``{run_id: attempt}``)."""

    @abc.abstractmethod
    async def _complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        """Complete the run if ``owner``'s claim ``attempt`` holds it."""

    async def _complete_many(self, owner: str, results: dict[str, tuple[int, str]]) -> set[str]:
        """Complete the runs ``owner``'s claims hold, atomically; this default does one by one."""
        return {
            run_id
            for run_id, (attempt, result) in results.items()
            if await self._complete(owner, run_id, attempt, result)
        }

    @abc.abstractmethod
    async def _fail(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        error: RunError,
        retry: bool,
        retry_delay: float | None,
    ) -> RunState | None:
        """Fail the run if the claim holds it: the state it went to, or ``None``."""

    @abc.abstractmethod
    async def _release(self, owner: str, run_id: str, attempt: int) -> bool:
        """Release the run if ``owner``'s claim ``attempt`` holds it."""

    @abc.abstractmethod
    async def _cancel(self, run_id: str) -> bool:
        """Cancel the run if it is SCHEDULED."""

    @abc.abstractmethod
    async def _get(self, run_id: str) -> RunRecord | None:
        """The stored record."""

    @abc.abstractmethod
    async def _counts(self) -> dict[RunState, int]:
        """Runs per state, every state a key."""

    @abc.abstractmethod
    async def _purge(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` runs finished before ``before``; how many went."""

    async def _poll(self) -> bool:
        """Whether another process may have changed the runs since the last poll."""
        return False

    async def _check_open(self) -> None:
        """Raise :class:`BrokerError` if the broker is not open (before a wait)."""

    # --- the protocol ----------------------------------------------------------------------

    async def open(self) -> None:
        if await self._open():
            self._work_seen_by_claim = self._notifier.generation(work=True)

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
        priority: int = 0,
        trace_context: str | None = None,
    ) -> RunRecord:
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
        await self._insert(run)
        self._notifier.notify(work=True)
        self._submitted = (run.id, self._notifier.generation(work=False))
        return run

    async def submit_many(
        self,
        task: str,
        payloads: Sequence[str],
        *,
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        scheduled_at: float | None = None,
        priority: int = 0,
        trace_context: str | None = None,
    ) -> list[RunRecord]:
        if isinstance(payloads, str):
            raise TypeError(f"payloads must be a sequence of strings, not the string {payloads!r}")
        for index, payload in enumerate(payloads):
            if not isinstance(payload, str):
                raise TypeError(
                    f"payloads[{index}] must be a string (encode arguments first), "
                    f"got {type(payload).__name__}"
                )
        # The options are the same for every run: checked once (for an empty batch too),
        # with the first run, and every run is made at the same moment.
        first = self._checked_run(
            task,
            payloads[0] if payloads else "",
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            max_attempts=max_attempts,
            scheduled_at=scheduled_at,
            priority=priority,
            trace_context=trace_context,
        )
        if not payloads:
            return []
        runs = [first]
        runs += sibling_runs(
            first, new_run_ids(len(payloads) - 1), itertools.islice(payloads, 1, None)
        )
        await self._insert_many(runs)
        self._notifier.notify(work=True)
        return runs

    async def claim(
        self,
        owner: str,
        tasks: Collection[str],
        *,
        limit: int,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> list[RunRecord]:
        check_claim_options(owner, tasks, limit=limit, lease_seconds=lease_seconds)
        names = sorted(set(tasks))
        limits = check_concurrency(concurrency, names)
        # Read before claiming: work that arrives during the claim wakes the next wait.
        self._work_seen_by_claim = self._notifier.generation(work=True)
        self._changes_seen_by_claim = self._notifier.generation(work=False)
        claimed = await self._claim(owner, names, limit, lease_seconds, limits)
        self._next_due = claimed.next_due
        self._held_back = claimed.held_back
        if claimed.finished:
            self._notifier.notify(work=False)
        return claimed.runs

    @property
    def location(self) -> str:
        return hide_password(self.url)

    async def claim_run(
        self,
        owner: str,
        run_id: str,
        *,
        lease_seconds: float,
        concurrency: Mapping[str, int] | None = None,
    ) -> RunRecord | None:
        check_claim_options(owner, (), limit=1, lease_seconds=lease_seconds)
        limits = check_concurrency(concurrency, None)
        return await self._claim_run(owner, run_id, lease_seconds, limits)

    async def heartbeat(
        self, owner: str, leases: Mapping[str, int], *, lease_seconds: float
    ) -> set[str]:
        check_heartbeat_options(leases, lease_seconds=lease_seconds)
        return await self._heartbeat(owner, dict(leases), lease_seconds)

    async def complete(self, owner: str, run_id: str, attempt: int, result: str) -> bool:
        check_attempt(attempt)
        done = await self._complete(owner, run_id, attempt, result)
        if done:
            self._notifier.notify(work=False)
        return done

    async def complete_many(self, owner: str, results: Mapping[str, tuple[int, str]]) -> set[str]:
        check_completions(results)
        if not results:
            return set()
        done = await self._complete_many(owner, dict(results))
        if done:
            self._notifier.notify(work=False)
        return done

    async def fail(
        self,
        owner: str,
        run_id: str,
        attempt: int,
        error: RunError,
        *,
        retry: bool,
        retry_delay: float | None = None,
    ) -> bool:
        check_attempt(attempt)
        delay = None if retry_delay is None else check_retry_delay(retry_delay)
        state = await self._fail(owner, run_id, attempt, error, retry, delay)
        if state is None:
            return False
        # Only a retried run (SCHEDULED again) is new work; a FAILED one is just a change.
        self._notifier.notify(work=state is RunState.SCHEDULED)
        return True

    async def release(self, owner: str, run_id: str, attempt: int) -> bool:
        check_attempt(attempt)
        done = await self._release(owner, run_id, attempt)
        if done:
            self._notifier.notify(work=True)
        return done

    async def cancel(self, run_id: str) -> bool:
        done = await self._cancel(run_id)
        if done:
            self._notifier.notify(work=False)
        return done

    async def get(self, run_id: str) -> RunRecord | None:
        return await self._get(run_id)

    async def purge(self, older_than: float) -> int:
        check_purge_options(older_than)
        before = self._clock() - older_than
        deleted = 0
        while True:
            batch = await self._purge(before, PURGE_BATCH)
            deleted += batch
            if batch < PURGE_BATCH:
                return deleted
            # Between batches, the other tasks using this broker get their turn.
            await anyio.lowlevel.checkpoint()

    async def counts(self) -> dict[RunState, int]:
        return await self._counts()

    # --- waiting ---------------------------------------------------------------------------

    async def _poll_and_notify(self) -> None:
        if await self._poll():
            self._notifier.notify(work=True)

    async def _wait(self, *, work: bool, since: int, timeout: float) -> None:
        if self._poll_interval is None:
            await self._notifier.wait(work=work, since=since, timeout=timeout)
        else:
            await self._notifier.wait(
                work=work,
                since=since,
                timeout=timeout,
                poll=self._poll_and_notify,
                poll_interval=self._poll_interval,
            )

    async def wait_for_work(self, timeout: float) -> None:
        await self._check_open()
        if self._next_due is not None:
            timeout = min(timeout, max(self._next_due - self._clock(), 0.0))
        if self._held_back:
            await self._wait(work=False, since=self._changes_seen_by_claim, timeout=timeout)
            return
        deadline = anyio.current_time() + timeout
        while True:
            since = self._work_seen_by_claim
            await self._wait(work=True, since=since, timeout=deadline - anyio.current_time())
            # Work claimed ahead for the waiting claim loop moved what its claims saw:
            # if that was all of the work since, there is nothing to claim.
            if since == self._work_seen_by_claim:
                return
            if self._notifier.generation(work=True) != self._work_seen_by_claim:
                return

    async def release_claimed_ahead(self, owner: str) -> None:
        # A broker claims nothing ahead unless it says otherwise.
        await anyio.lowlevel.checkpoint()

    async def wait_until_finished(self, run_id: str, timeout: float) -> RunRecord | None:
        deadline = anyio.current_time() + timeout
        while True:
            # Read the generation before the record: a change in between wakes the wait.
            since = self._notifier.generation(work=False)
            if self._submitted == (run_id, since):
                # Just submitted, and unfinished since, or its finish would have been
                # heard of: no read (which, on two cores, would take CPU from the
                # worker starting it now), only the wait.
                self._submitted = None
                await self._wait(work=False, since=since, timeout=timeout)
                continue
            run = await self.get(run_id)
            remaining = deadline - anyio.current_time()
            if run is None or run.finished or remaining <= 0:
                return run
            await self._wait(work=False, since=since, timeout=remaining)
