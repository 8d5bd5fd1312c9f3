"""Checks of the arguments users pass to a broker, shared so every broker rejects the same."""

from __future__ import annotations

from collections.abc import Collection

from ..._checks import check_count, check_number, check_optional_seconds, check_seconds

__all__ = [
    "check_claim_options",
    "check_heartbeat_options",
    "check_purge_options",
    "check_submit_options",
]


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
        TypeError: ``task`` or ``payload`` is not a string, or an option has the wrong type.
        ValueError: An option is out of range.
    """
    if not isinstance(task, str) or not isinstance(payload, str):
        raise TypeError("task name and payload must be strings (encode arguments first)")
    if not task:
        raise ValueError("task name must not be empty")
    check_count(retries, "retries")
    check_seconds(retry_delay, "retry_delay", allow_zero=True)
    check_optional_seconds(timeout, "timeout")
    check_count(max_attempts, "max_attempts", minimum=1)
    if scheduled_at is not None:
        check_number(scheduled_at, "scheduled_at")


def _check_lease_seconds(lease_seconds: float) -> None:
    check_seconds(lease_seconds, "lease_seconds")


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
    check_count(limit, "limit")
    _check_lease_seconds(lease_seconds)


def check_purge_options(older_than: float) -> None:
    """Validate :meth:`Broker.purge` arguments.

    Raises:
        TypeError: ``older_than`` is not a number.
        ValueError: ``older_than`` is negative or not finite.
    """
    check_seconds(older_than, "older_than", allow_zero=True)
