"""Task runs as records, and the pure transitions between their states.

A run's life is a small state machine::

    SCHEDULED --claim--> RUNNING --complete--> COMPLETED
        ^  |                |  |--fail (no retry left)--> FAILED
        |  |                |  '--lease expired after max_attempts claims--> CRASHED
        |  '--cancel--> CANCELLED
        '--------release / fail with a retry left--'

Each transition here is a pure function of a record, the caller and the time: no I/O, no
clock, no randomness, so it can be checked exhaustively (``tests/taskqueue/test_records.py``)
and every broker agrees on it. The memory broker applies these functions to its dict; the
SQLite broker says the same in SQL, and the conformance suite checks that its rows equal
what these functions give for the same operations.

Fencing: the transitions a worker asks for while it runs a run (renew, complete, fail,
release) take the ``owner`` that claimed it and the ``attempt`` its claim made (the run's
``attempts`` right after that claim), and refuse (return ``None``, the record stays as it
is) unless the run is still RUNNING under that very claim. A lease that expired makes the
run claimable by anyone, the worker that held it included; the new claim counts an
attempt, so whoever held the old one, even the same worker, can change nothing.

All times are wall-clock epoch seconds, given by the caller.
"""

from __future__ import annotations

import enum
import json
import os
import traceback as traceback_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "ABANDONED_ERROR_TYPE",
    "CORRUPT_RUN_ERROR_TYPE",
    "DEFAULT_MAX_ATTEMPTS",
    "FINISHED_STATES",
    "PayloadError",
    "Picked",
    "RunError",
    "RunRecord",
    "RunState",
    "abandon",
    "abandoned_error",
    "cancel",
    "claim",
    "claim_order",
    "claimable",
    "complete",
    "describe_stored",
    "due_at",
    "fail",
    "free_slots",
    "held",
    "new_run",
    "new_run_id",
    "new_run_ids",
    "pick_claims",
    "release",
    "renew",
    "sibling_runs",
    "takes_a_slot",
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


class PayloadError(ValueError):
    """Stored run arguments, a result or an error could not be decoded."""


# Public from anyservice.taskqueue, and recorded by name as a run's error type: the name
# must not change when the private module it is defined in does.
PayloadError.__module__ = "anyservice.taskqueue"


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
        priority: Among due runs, higher is claimed first (0 by default; negative is
            allowed).
        started_at: When the current attempt was claimed, if one is in flight or ended.
        finished_at: When it reached a finished state.
        lease_owner: The worker that holds it, while RUNNING.
        lease_expires_at: When that lease expires unless renewed.
        result: JSON text of the return value, once COMPLETED.
        error: Why it last failed, crashed or was found corrupt.
        trace_context: The submitter's span as a W3C ``traceparent`` header, when
            OpenTelemetry is installed and a span was current at the submit; each
            attempt's span is its child.
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
    priority: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    result: str | None = None
    error: RunError | None = None
    trace_context: str | None = None

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


# --- transitions -------------------------------------------------------------------------


_RECORD_FIELDS = tuple(field.name for field in fields(RunRecord))


def record_of(values: Iterable[Any]) -> RunRecord:
    """A :class:`RunRecord` of its field values in order, unchecked (each of the right type).

    For records made by the thousand (claims, batches): the frozen dataclass's own
    ``__init__`` sets each of its 19 fields through ``object.__setattr__``, which costs
    twice as much as filling its ``__dict__`` at once.
    """
    record: RunRecord = object.__new__(RunRecord)
    record.__dict__.update(zip(_RECORD_FIELDS, values, strict=True))
    return record


def new_run_id() -> str:
    """A fresh run id: a uuid4 hex string, as ``uuid.uuid4().hex`` (version 4, RFC 4122
    variant) without the ``UUID`` object made and checked on the way (every submit makes
    one on its way to its statement)."""
    (run_id,) = new_run_ids(1)
    return run_id


def new_run_ids(count: int) -> list[str]:
    """``count`` fresh run ids: uuid4 hex strings, from one read of the system's randomness.

    The same as ``uuid.uuid4().hex`` each (version 4, RFC 4122 variant), at a fraction
    of its cost per id, for batches of thousands.
    """
    # Not mutated: reading more bytes than used (17 * count) leaves the ids as random.
    randomness = bytearray(os.urandom(16 * count))  # pragma: no mutate
    for start in range(0, 16 * count, 16):
        randomness[start + 6] = (randomness[start + 6] & 0x0F) | 0x40
        randomness[start + 8] = (randomness[start + 8] & 0x3F) | 0x80
    text = randomness.hex()
    return [text[start : start + 32] for start in range(0, 32 * count, 32)]


def sibling_runs(
    first: RunRecord, run_ids: Iterable[str], payloads: Iterable[str]
) -> list[RunRecord]:
    """Runs submitted in the same batch as ``first``: its options, each with an id of
    ``run_ids`` and the payload of ``payloads`` beside it (as many of each).

    Batches have thousands of runs: each record's ``__dict__`` is filled at once from
    ``first``'s fields, at a third of what :func:`record_of` costs per record.
    """
    options = {name: getattr(first, name) for name in _RECORD_FIELDS}
    make = object.__new__
    runs: list[RunRecord] = []
    for run_id, payload in zip(run_ids, payloads, strict=True):
        run = make(RunRecord)
        run.__dict__.update(options, id=run_id, payload=payload)
        runs.append(run)
    return runs


def new_run(
    run_id: str,
    task: str,
    payload: str,
    *,
    retries: int,
    retry_delay: float,
    timeout: float | None,
    max_attempts: int,
    scheduled_at: float | None,
    now: float,
    priority: int = 0,
    trace_context: str | None = None,
) -> RunRecord:
    """A submitted run: SCHEDULED, due at ``scheduled_at`` (``now`` by default).

    Made positionally (:func:`record_of`): every submit makes one on its way to the
    statement a run's start waits on.
    """
    return record_of((
        run_id, task, payload, RunState.SCHEDULED, 0, max_attempts, retries,
        float(retry_delay), None if timeout is None else float(timeout), now,
        now if scheduled_at is None else float(scheduled_at),
        priority, None, None, None, None, None, None, trace_context,
    ))  # fmt: skip


def _lease_expired(run: RunRecord, now: float) -> bool:
    """Whether ``run`` is RUNNING under a lease that has expired, whoever held it."""
    if run.state is not RunState.RUNNING:
        return False
    # A RUNNING record without an expiry is not leased to anyone alive.
    return run.lease_expires_at is None or run.lease_expires_at <= now


def claimable(run: RunRecord, now: float) -> bool:
    """Whether a claim at ``now`` may take ``run``.

    A SCHEDULED run is claimable once due. A RUNNING run is claimable once its lease
    expired, unless that was its last allowed attempt (then it is to be
    :func:`abandon`-ed), by any owner, the one that held it included: the new claim counts
    an attempt, and the attempt number fences off whoever held the old one.
    """
    if run.state is RunState.SCHEDULED:
        return run.scheduled_at <= now
    return _lease_expired(run, now) and run.attempts < run.max_attempts


def claim_order(run: RunRecord, sequence: int) -> tuple[int, float, int]:
    """The key claims sort due runs by: higher ``priority`` first, then the earlier due
    (``scheduled_at``), then the earlier submitted (``sequence``, the submission order)."""
    return (-run.priority, run.scheduled_at, sequence)


def takes_a_slot(run: RunRecord, now: float) -> bool:
    """Whether ``run`` counts against its task's concurrency limit at ``now``: it is
    RUNNING under a live lease. A run whose lease expired is not (its worker is gone)."""
    return run.state is RunState.RUNNING and not _lease_expired(run, now)


def free_slots(
    runs: Iterable[RunRecord], concurrency: Mapping[str, int], now: float
) -> dict[str, int]:
    """How many more runs of each limited task may be claimed at ``now``.

    ``concurrency`` maps task names to their limit; ``runs`` is every stored run (or at
    least every RUNNING one).
    """
    free = dict(concurrency)
    for run in runs:
        if run.task in free and takes_a_slot(run, now):
            free[run.task] -= 1
    return {task: max(slots, 0) for task, slots in free.items()}


@dataclass
class Picked:
    """What one claim takes of the due runs (see :func:`pick_claims`).

    Attributes:
        runs: The runs to claim, in claim order.
        left_over: Due runs were left for the next claim because of its ``limit``.
        held_back: Due runs were left because their task's concurrency limit is reached:
            a slot frees when a run of it finishes (or its lease expires).
    """

    runs: list[RunRecord]
    left_over: bool = False
    held_back: bool = False


def pick_claims(due: Iterable[RunRecord], limit: int, free: Mapping[str, int]) -> Picked:
    """Choose the runs a claim takes from ``due`` (claimable runs, in claim order).

    At most ``limit`` runs, and of a task in ``free`` (limited tasks: their free slots, as
    :func:`free_slots` gives) at most that many: a run of a full task is passed over, not
    claimed, and the runs after it still are.
    """
    slots = dict(free)
    picked = Picked([])
    for run in due:
        left = slots.get(run.task)
        if left is not None and left <= 0:
            picked.held_back = True
            continue
        if len(picked.runs) == limit:
            picked.left_over = True
            break
        picked.runs.append(run)
        if left is not None:
            slots[run.task] = left - 1
    return picked


def due_at(run: RunRecord) -> float | None:
    """When ``run`` may next become claimable (or abandoned), if ever."""
    if run.state is RunState.SCHEDULED:
        return run.scheduled_at
    if run.state is RunState.RUNNING:
        return run.lease_expires_at
    return None


def claim(run: RunRecord, owner: str, now: float, lease_seconds: float) -> RunRecord | None:
    """Lease a :func:`claimable` run to ``owner`` until ``now + lease_seconds``.

    Each claim counts an attempt: the new ``attempts`` is the claim's fencing token.
    Returns ``None`` if the run is not claimable.
    """
    if not claimable(run, now):
        return None
    return replace(
        run,
        state=RunState.RUNNING,
        attempts=run.attempts + 1,
        started_at=now,
        lease_owner=owner,
        lease_expires_at=now + lease_seconds,
    )


def abandon(run: RunRecord, now: float) -> RunRecord | None:
    """End CRASHED a run whose lease expired after its last allowed attempt.

    Returns ``None`` if the run is not abandoned.
    """
    if not _lease_expired(run, now) or run.attempts < run.max_attempts:
        return None
    return replace(
        run,
        state=RunState.CRASHED,
        finished_at=now,
        lease_owner=None,
        lease_expires_at=None,
        error=abandoned_error(run.id, run.task, run.attempts, run.max_attempts),
    )


def held(run: RunRecord, owner: str, attempt: int) -> bool:
    """Whether ``owner``'s claim number ``attempt`` still holds ``run`` (the fence)."""
    return run.state is RunState.RUNNING and run.lease_owner == owner and run.attempts == attempt


def renew(
    run: RunRecord, owner: str, attempt: int, now: float, lease_seconds: float
) -> RunRecord | None:
    """Renew the lease to ``now + lease_seconds`` (a heartbeat); fenced."""
    if not held(run, owner, attempt):
        return None
    return replace(run, lease_expires_at=now + lease_seconds)


def complete(run: RunRecord, owner: str, attempt: int, result: str, now: float) -> RunRecord | None:
    """End COMPLETED with the JSON ``result``; fenced."""
    if not held(run, owner, attempt):
        return None
    return replace(
        run,
        state=RunState.COMPLETED,
        finished_at=now,
        lease_owner=None,
        lease_expires_at=None,
        result=result,
        error=None,
    )


def fail(
    run: RunRecord,
    owner: str,
    attempt: int,
    error: RunError,
    now: float,
    *,
    retry: bool,
    retry_delay: float | None = None,
) -> RunRecord | None:
    """Record a failed attempt; fenced.

    With ``retry`` and retries left the run is SCHEDULED again, due ``retry_delay``
    seconds from ``now`` (the run's stored ``retry_delay`` unless the caller, which may
    back off further at each retry, gives one), with one retry fewer; otherwise it ends
    FAILED. The error is kept either way.
    """
    if not held(run, owner, attempt):
        return None
    if retry and run.retries_left > 0:
        delay = run.retry_delay if retry_delay is None else retry_delay
        run = replace(
            run,
            state=RunState.SCHEDULED,
            retries_left=run.retries_left - 1,
            scheduled_at=now + delay,
            started_at=None,
        )
    else:
        run = replace(run, state=RunState.FAILED, finished_at=now)
    return replace(run, lease_owner=None, lease_expires_at=None, error=error)


def release(run: RunRecord, owner: str, attempt: int) -> RunRecord | None:
    """Hand a run back: SCHEDULED, lease cleared, the attempt not counted; fenced."""
    if not held(run, owner, attempt):
        return None
    return replace(
        run,
        state=RunState.SCHEDULED,
        attempts=max(run.attempts - 1, 0),
        started_at=None,
        lease_owner=None,
        lease_expires_at=None,
    )


def cancel(run: RunRecord, now: float) -> RunRecord | None:
    """End CANCELLED a run no worker has claimed yet (only a SCHEDULED run)."""
    if run.state is not RunState.SCHEDULED:
        return None
    return replace(run, state=RunState.CANCELLED, finished_at=now)
