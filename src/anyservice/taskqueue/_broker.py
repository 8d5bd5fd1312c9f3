"""The storage side of task runs: the broker protocol, run records and broker errors.

A broker stores task runs and hands them to workers under a lease. The worker only ever
talks to :class:`Broker`, so a PostgreSQL broker can be added without touching it. Every
broker keeps the same promises, checked by one conformance test suite:

* A run is claimed by one owner at a time: while its lease is live nobody else gets it.
* A lease that expires (the worker died) makes the run claimable again, and ``attempts``
  counts the claims. A run whose lease expires once ``attempts`` has reached
  ``max_attempts`` ends :attr:`RunState.CRASHED` instead of being claimed forever.
* Completing, failing, releasing and heartbeating only succeed for the current lease
  owner: a worker that lost its lease is told so (``False``) and changes nothing.
* Payloads and results are opaque JSON text to the broker (see ``_serialize.py``), so a
  run with an undecodable payload never breaks a claim: the worker decides what to do.

All times are wall-clock epoch seconds from the broker's ``clock`` (``time.time`` by
default), because leases are shared by processes that have no common monotonic clock.
"""

from __future__ import annotations

import enum
import json
import math
import threading
import traceback as traceback_module
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.lowlevel

__all__ = [
    "ABANDONED_ERROR_TYPE",
    "CORRUPT_RUN_ERROR_TYPE",
    "DEFAULT_MAX_ATTEMPTS",
    "FINISHED_STATES",
    "Broker",
    "BrokerBusyError",
    "BrokerError",
    "ChangeNotifier",
    "PayloadError",
    "RunError",
    "RunRecord",
    "RunState",
    "abandoned_error",
    "check_claim_options",
    "check_heartbeat_options",
    "check_submit_options",
    "describe_stored",
    "wait_until_finished",
]

DEFAULT_MAX_ATTEMPTS = 5

#: ``RunError.type`` of a run that ended CRASHED because its workers kept dying on it.
ABANDONED_ERROR_TYPE = "RunAbandonedError"
#: ``RunError.type`` of a run whose stored row a broker cannot read.
CORRUPT_RUN_ERROR_TYPE = "CorruptRunError"


class RunState(enum.StrEnum):
    """Where a task run is in its life (Prefect's state names)."""

    SCHEDULED = "SCHEDULED"
    """Waiting to be claimed once its ``scheduled_at`` is due."""
    RUNNING = "RUNNING"
    """Claimed by a worker that holds its lease."""
    COMPLETED = "COMPLETED"
    """Finished and returned a result."""
    FAILED = "FAILED"
    """Raised with no retries left (or its stored row is corrupt)."""
    CANCELLED = "CANCELLED"
    """Cancelled by a user before a worker claimed it."""
    CRASHED = "CRASHED"
    """Abandoned by a worker (its lease expired) after ``max_attempts`` claims."""

    @property
    def finished(self) -> bool:
        """Whether the run will never change state again."""
        return self in FINISHED_STATES


FINISHED_STATES = frozenset(
    {RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED, RunState.CRASHED}
)


class BrokerError(Exception):
    """The broker's storage cannot be used: closed, unreachable, corrupt or too new."""


class BrokerBusyError(BrokerError):
    """The database stayed locked by other connections for longer than allowed."""


class PayloadError(ValueError):
    """Stored run arguments, a result or an error could not be decoded."""


def describe_stored(text: object, limit: int = 80) -> str:
    """A short ``repr`` of stored text for error messages (long rows are cut)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass(frozen=True)
class RunError:
    """Why a run failed, in a form that survives a round trip through the database.

    Attributes:
        type: The exception's qualified type name, e.g. ``"ValueError"`` or
            ``"mypkg.errors.Boom"``.
        message: ``str()`` of the exception.
        traceback: The formatted traceback, or ``""`` when there is none.
    """

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> RunError:
        """Capture an exception's type, message and traceback."""
        kind = type(exc)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        formatted = "".join(traceback_module.format_exception(exc))
        return cls(type=name, message=str(exc), traceback=formatted)

    def to_json(self) -> str:
        """Encode as a JSON object with ``type``, ``message`` and ``traceback``."""
        return json.dumps(
            {"type": self.type, "message": self.message, "traceback": self.traceback},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> RunError:
        """Decode what :meth:`to_json` produced.

        Raises:
            PayloadError: ``text`` is not a JSON object with string ``type`` and
                ``message`` (and optionally ``traceback``) fields.
        """
        try:
            data: Any = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise PayloadError(
                f"stored run error is not valid JSON ({exc}): {describe_stored(text)}"
            ) from exc
        if not isinstance(data, dict):
            raise PayloadError(f"stored run error is not a JSON object: {describe_stored(text)}")
        kind, message, trace = data.get("type"), data.get("message"), data.get("traceback", "")
        if not (isinstance(kind, str) and isinstance(message, str) and isinstance(trace, str)):
            raise PayloadError(
                "stored run error needs string 'type', 'message' and 'traceback' fields: "
                f"{describe_stored(text)}"
            )
        return cls(type=kind, message=message, traceback=trace)


@dataclass(frozen=True)
class RunRecord:
    """A snapshot of one task run as the broker stores it.

    Attributes:
        id: A uuid4 hex string.
        task: The task's registered name.
        payload: JSON text of the arguments (see ``encode_arguments``); the broker never
            decodes it.
        state: Where the run is in its life.
        attempts: How many times a worker claimed it (a released claim is not counted).
        max_attempts: After this many claims, an expired lease ends the run CRASHED.
        retries_left: Failures that may still be retried.
        retry_delay: Seconds between a failure and the retry becoming due.
        timeout: Seconds a single attempt may take (enforced by the worker), or ``None``.
        created_at: When it was submitted (epoch seconds).
        scheduled_at: When it is (or was) due to be claimed.
        started_at: When the current attempt was claimed, if one is in flight or ended.
        finished_at: When it reached a finished state.
        lease_owner: The worker that holds it, while RUNNING.
        lease_expires_at: When that lease expires unless renewed.
        result: JSON text of the return value, once COMPLETED.
        error: Why it last failed, crashed or was found corrupt.
    """

    id: str
    task: str
    payload: str
    state: RunState
    attempts: int
    max_attempts: int
    retries_left: int
    retry_delay: float
    timeout: float | None
    created_at: float
    scheduled_at: float
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    result: str | None = None
    error: RunError | None = None

    @property
    def finished(self) -> bool:
        """Whether the run reached COMPLETED, FAILED, CANCELLED or CRASHED."""
        return self.state in FINISHED_STATES


def abandoned_error(run_id: str, task: str, attempts: int, max_attempts: int) -> RunError:
    """The error of a run whose lease expired after its last allowed claim."""
    return RunError(
        type=ABANDONED_ERROR_TYPE,
        message=(
            f"run {run_id} of task {task!r} was abandoned by a worker: its lease expired "
            f"before the run finished, and it had been claimed {attempts} times "
            f"(max_attempts={max_attempts}), so it is not claimed again"
        ),
    )


class Broker(Protocol):
    """Durable storage of task runs, shared by the processes that submit and run them.

    Every method may raise :class:`BrokerError` when the storage cannot be used (not
    open, closed, unreachable); transient lock contention is retried internally.
    """

    @property
    def url(self) -> str:
        """The URL this broker was made from, e.g. ``"sqlite:///anyservice.db"``."""
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
    ) -> RunRecord:
        """Store a new SCHEDULED run, due at ``scheduled_at`` (now by default).

        Raises:
            ValueError: An option is out of range (negative retries, ``max_attempts`` < 1,
                a non-positive timeout, an empty task name).
        """
        ...

    async def claim(
        self, owner: str, tasks: Collection[str], *, limit: int, lease_seconds: float
    ) -> list[RunRecord]:
        """Lease up to ``limit`` due runs of the named tasks to ``owner``, oldest first.

        Claimable are SCHEDULED runs whose ``scheduled_at`` is due and RUNNING runs whose
        lease expired and is held by another owner (``owner`` must be unique per worker
        instance: a live owner is still working on its own runs). Each claim counts an
        attempt. Before claiming, runs (of any task) whose lease expired after their
        last allowed attempt are marked CRASHED.

        Raises:
            ValueError: ``limit`` is negative or ``lease_seconds`` is not positive.
            TypeError: ``tasks`` is a single string instead of a collection of names.
        """
        ...

    async def heartbeat(
        self, owner: str, run_ids: Collection[str], *, lease_seconds: float
    ) -> set[str]:
        """Renew ``owner``'s leases to ``now + lease_seconds``.

        Returns:
            The ids whose lease ``owner`` still held (and now renewed); the others were
            lost to another worker or are no longer running.
        """
        ...

    async def complete(self, owner: str, run_id: str, result: str) -> bool:
        """Record a COMPLETED run with its JSON ``result``, if ``owner`` holds its lease."""
        ...

    async def fail(self, owner: str, run_id: str, error: RunError, *, retry: bool) -> bool:
        """Record a failed attempt, if ``owner`` holds the run's lease.

        With ``retry`` and retries left, the run goes back to SCHEDULED, due after its
        ``retry_delay``, with one retry fewer; otherwise it ends FAILED. The error is kept
        either way.
        """
        ...

    async def release(self, owner: str, run_id: str) -> bool:
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

    async def wait_for_work(self, timeout: float) -> None:
        """Wait until work may be claimable, for at most ``timeout`` seconds.

        Returns early when a run was submitted, released or rescheduled since this
        broker's last :meth:`claim` (at once if that already happened), when another
        process may have changed the runs, or when a run that the last claim saw
        scheduled for later (or leased to someone else) becomes due. Spurious returns are
        allowed; the caller just claims again.
        """
        ...

    async def wait_until_finished(self, run_id: str, timeout: float) -> RunRecord | None:
        """Wait for the run to finish, for at most ``timeout`` seconds.

        Returns:
            The finished record, its latest unfinished record once ``timeout`` elapsed,
            or ``None`` if there is no such run.
        """
        ...


# --- checks shared by every broker, so they all reject the same bad input -------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_submit_options(
    task: str,
    payload: str,
    *,
    retries: int,
    retry_delay: float,
    timeout: float | None,
    max_attempts: int,
    scheduled_at: float | None,
) -> None:
    """Validate :meth:`Broker.submit` arguments.

    Raises:
        TypeError: ``task`` or ``payload`` is not a string.
        ValueError: An option is out of range.
    """
    if not isinstance(task, str) or not isinstance(payload, str):
        raise TypeError("task name and payload must be strings (encode arguments first)")
    if not task:
        raise ValueError("task name must not be empty")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    if not _is_number(retry_delay) or not math.isfinite(retry_delay) or retry_delay < 0:
        raise ValueError(f"retry_delay must be a finite number >= 0, got {retry_delay!r}")
    if timeout is not None and (
        not _is_number(timeout) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise ValueError(f"timeout must be None or a finite number > 0, got {timeout!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
    if scheduled_at is not None and (not _is_number(scheduled_at) or math.isnan(scheduled_at)):
        raise ValueError(f"scheduled_at must be None or epoch seconds, got {scheduled_at!r}")


def _check_lease_seconds(lease_seconds: float) -> None:
    if not _is_number(lease_seconds) or not math.isfinite(lease_seconds) or lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be a finite number > 0, got {lease_seconds!r}")


def check_heartbeat_options(run_ids: Collection[str], *, lease_seconds: float) -> None:
    """Validate :meth:`Broker.heartbeat` arguments.

    Raises:
        TypeError: ``run_ids`` is a single string instead of a collection of ids.
        ValueError: ``lease_seconds`` is not a finite number > 0.
    """
    if isinstance(run_ids, str):
        raise TypeError(f"run_ids must be a collection of run ids, not the string {run_ids!r}")
    _check_lease_seconds(lease_seconds)


def check_claim_options(
    owner: str, tasks: Collection[str], *, limit: int, lease_seconds: float
) -> None:
    """Validate :meth:`Broker.claim` arguments.

    Raises:
        TypeError: ``tasks`` is a single string, which would claim one-letter task names.
        ValueError: ``owner`` is empty, ``limit`` negative or ``lease_seconds`` not > 0.
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a collection of task names, not the string {tasks!r}")
    if not owner:
        raise ValueError("owner must be a non-empty worker id")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
    _check_lease_seconds(lease_seconds)


# --- waking waiters --------------------------------------------------------------------


@dataclass(eq=False)
class _Waiter:
    event: anyio.Event
    thread: int
    work_only: bool


class ChangeNotifier:
    """Counts changes to runs and wakes the tasks waiting for one.

    Two generation counters: ``changes`` moves on every write, ``work`` only on writes
    that may make a run claimable (submit, release, retry). Waiters compare a generation
    they saw earlier with the current one, so a change between "look" and "wait" is never
    missed.

    Brokers of one SQLite file in one process share a notifier, and they may run in
    different threads with their own event loops. An anyio event can only be set from its
    own loop, so :meth:`notify` sets the events of waiters in the calling thread (whose
    loop is the caller's) and waiters elsewhere see the new generation at their next poll.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes = 0
        self._work = 0
        self._waiters: list[_Waiter] = []

    def generation(self, *, work: bool) -> int:
        """The current ``work`` (or ``changes``) generation."""
        return self._work if work else self._changes

    def notify(self, *, work: bool) -> None:
        """Record a change (one that may have made work claimable, if ``work``)."""
        thread = threading.get_ident()
        with self._lock:
            self._changes += 1
            if work:
                self._work += 1
            ready = [w for w in self._waiters if w.thread == thread and (work or not w.work_only)]
            for waiter in ready:
                self._waiters.remove(waiter)
        for waiter in ready:
            waiter.event.set()

    async def wait(
        self,
        *,
        work: bool,
        since: int,
        timeout: float,
        poll: Callable[[], Awaitable[None]] | None = None,
        poll_interval: float = 0.005,
    ) -> None:
        """Return once the generation differs from ``since``, or after ``timeout`` seconds.

        ``poll``, if given, is awaited every ``poll_interval`` seconds to detect changes
        nobody notifies about (another process's commits); it calls :meth:`notify` itself.
        """
        await anyio.lowlevel.checkpoint()
        if self.generation(work=work) != since or timeout <= 0:
            return
        deadline = anyio.current_time() + timeout
        waiter = _Waiter(anyio.Event(), threading.get_ident(), work)
        with self._lock:
            self._waiters.append(waiter)
        try:
            while self.generation(work=work) == since:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return
                step = remaining if poll is None else min(remaining, poll_interval)
                with anyio.move_on_after(step):
                    await waiter.event.wait()
                if poll is not None and self.generation(work=work) == since:
                    await poll()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


async def wait_until_finished(
    get: Callable[[str], Awaitable[RunRecord | None]],
    notifier: ChangeNotifier,
    run_id: str,
    timeout: float,
    *,
    poll: Callable[[], Awaitable[None]] | None = None,
    poll_interval: float = 0.005,
) -> RunRecord | None:
    """:meth:`Broker.wait_until_finished` for brokers that signal changes via a notifier."""
    deadline = anyio.current_time() + timeout
    while True:
        # Read the generation before the record: a change in between wakes the wait.
        since = notifier.generation(work=False)
        run = await get(run_id)
        remaining = deadline - anyio.current_time()
        if run is None or run.finished or remaining <= 0:
            return run
        await notifier.wait(
            work=False, since=since, timeout=remaining, poll=poll, poll_interval=poll_interval
        )
