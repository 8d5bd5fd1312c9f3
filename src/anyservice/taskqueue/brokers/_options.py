"""Checks of the arguments users pass to a broker, shared so every broker rejects the same."""

from __future__ import annotations

import math
from collections.abc import Collection

__all__ = [
    "check_claim_options",
    "check_heartbeat_options",
    "check_purge_options",
    "check_submit_options",
]


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


def check_purge_options(older_than: float) -> None:
    """Validate :meth:`Broker.purge` arguments.

    Raises:
        TypeError: ``older_than`` is not a number.
        ValueError: ``older_than`` is negative or not finite.
    """
    if isinstance(older_than, bool) or not isinstance(older_than, int | float):
        raise TypeError(f"older_than must be a number of seconds, got {older_than!r}")
    if not math.isfinite(older_than) or older_than < 0:
        raise ValueError(f"older_than must be a finite number of seconds >= 0, got {older_than!r}")
