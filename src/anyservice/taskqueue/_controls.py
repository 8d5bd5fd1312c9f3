"""Run controls as pure transitions: cancelling a RUNNING run, re-queuing a finished one.

They extend the state machine of ``_records.py``::

    RUNNING --cancel requested, the worker stopped the body--> CANCELLED
    FAILED / CRASHED / CANCELLED --retry--> SCHEDULED (a new series of attempts)

Like the others they take the time and the caller and do no I/O, so each broker applies
the same rules.
"""

from __future__ import annotations

from dataclasses import replace

from ._records import RunRecord, RunState, held

__all__ = ["RETRYABLE_STATES", "end_cancelled", "requeue"]

#: The states ``requeue`` starts a new series of attempts from.
RETRYABLE_STATES = frozenset({RunState.FAILED, RunState.CRASHED, RunState.CANCELLED})


def end_cancelled(run: RunRecord, owner: str, attempt: int, now: float) -> RunRecord | None:
    """End CANCELLED a RUNNING run whose body ``owner`` stopped; fenced by its claim."""
    if not held(run, owner, attempt):
        return None
    return replace(
        run, state=RunState.CANCELLED, finished_at=now, lease_owner=None, lease_expires_at=None
    )


def requeue(run: RunRecord, now: float, retries: int) -> RunRecord | None:
    """Start a FAILED, CRASHED or CANCELLED run over: SCHEDULED now, no attempts yet.

    The last error is kept until a new attempt ends; ``retries`` is the new series' budget.
    """
    if run.state not in RETRYABLE_STATES:
        return None
    return replace(
        run,
        state=RunState.SCHEDULED,
        attempts=0,
        retries_left=retries,
        scheduled_at=now,
        started_at=None,
        finished_at=None,
        lease_owner=None,
        lease_expires_at=None,
        result=None,
    )
