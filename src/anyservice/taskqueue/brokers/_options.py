"""Checks of the arguments users pass to a broker, shared so every broker rejects the same."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from ..._checks import (
    MAX_COUNT,
    check_count,
    check_number,
    check_optional_seconds,
    check_seconds,
)

__all__ = [
    "check_attempt",
    "check_claim_options",
    "check_completions",
    "check_concurrency",
    "check_heartbeat_options",
    "check_priority",
    "check_purge_options",
    "check_retry_delay",
    "check_submit_options",
    "hide_password",
]


def hide_password(url: str) -> str:
    """``url`` with the password of its user part, if any, shown as ``***``."""
    scheme, separator, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if not separator or not at or ":" not in user:
        return url
    return f"{scheme}://{user.partition(':')[0]}:***@{host}{slash}{path}"


def check_submit_options(
    task: str,
    payload: str,
    *,
    retries: int,
    retry_delay: float,
    timeout: float | None,
    max_attempts: int,
    scheduled_at: float | None,
    priority: int = 0,
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
    if _plain_submit_options(retries, retry_delay, timeout, max_attempts, scheduled_at, priority):
        return
    check_count(retries, "retries")
    check_retry_delay(retry_delay)
    check_optional_seconds(timeout, "timeout")
    check_count(max_attempts, "max_attempts", minimum=1)
    if scheduled_at is not None:
        check_number(scheduled_at, "scheduled_at")
    check_priority(priority)


def _plain_submit_options(
    retries: object,
    retry_delay: object,
    timeout: object,
    max_attempts: object,
    scheduled_at: object,
    priority: object,
) -> bool:
    """Whether the options are plain ints and floats in range, as a task submits them.

    Every submission is checked, on the latency path of a run: the general checks
    (ABC instance checks, conversions) cost several times this. A shortcut only: for
    anything else the checks below give the same answer, more slowly.
    """
    return (
        type(retries) is int
        and 0 <= retries <= MAX_COUNT
        and type(retry_delay) is float
        and 0.0 <= retry_delay < math.inf
        and (timeout is None or (type(timeout) is float and 0.0 < timeout < math.inf))
        and type(max_attempts) is int
        and 1 <= max_attempts <= MAX_COUNT
        and (scheduled_at is None or (type(scheduled_at) is float and math.isfinite(scheduled_at)))
        and type(priority) is int
        and -MAX_COUNT <= priority <= MAX_COUNT
    )


def check_retry_delay(retry_delay: object) -> float:
    """Validate seconds until a retry is due.

    Raises:
        TypeError: ``retry_delay`` is not a duration.
        ValueError: it is negative or not finite.
    """
    return check_seconds(retry_delay, "retry_delay", allow_zero=True)


def check_priority(priority: object, name: str = "priority") -> int:
    """Validate a run's priority: any int that every broker stores (a 32-bit integer).

    Raises:
        TypeError: ``priority`` is not an int.
        ValueError: it is beyond +/- ``MAX_COUNT``.
    """
    return check_count(priority, name, minimum=-MAX_COUNT, maximum=MAX_COUNT)


def _check_lease_seconds(lease_seconds: float) -> None:
    check_seconds(lease_seconds, "lease_seconds")


def check_attempt(attempt: object, name: str = "attempt") -> None:
    """Validate the attempt number that fences a call (what the claim returned).

    Raises:
        TypeError: ``attempt`` is not an int.
        ValueError: ``attempt`` is below 1 (no claim gives that).
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise TypeError(
            f"{name} must be the int attempt number the claim returned, got {attempt!r}"
        )
    if attempt < 1:
        raise ValueError(f"{name} must be >= 1 (a claim counts from 1), got {attempt!r}")


def check_heartbeat_options(leases: Mapping[str, int], *, lease_seconds: float) -> None:
    """Validate :meth:`Broker.heartbeat` arguments.

    Raises:
        TypeError: ``leases`` is not a mapping of run ids to attempt numbers.
        ValueError: ``lease_seconds`` is not a finite number > 0, or an attempt is < 1.
    """
    if not isinstance(leases, Mapping):
        raise TypeError(
            "leases must map each run id to the attempt its claim returned "
            f"({{run_id: attempt}}), got {leases!r}"
        )
    for run_id, attempt in leases.items():
        check_attempt(attempt, f"leases[{run_id!r}] (the attempt of that run)")
    _check_lease_seconds(lease_seconds)


def check_completions(results: Mapping[str, tuple[int, str]]) -> None:
    """Validate :meth:`Broker.complete_many` arguments.

    Raises:
        TypeError: ``results`` is not a mapping of run ids to ``(attempt, result)`` pairs
            with a string result; the message names the run.
        ValueError: An attempt is < 1.
    """
    if not isinstance(results, Mapping):
        raise TypeError(
            "results must map each run id to (attempt, JSON result) "
            f"({{run_id: (attempt, result)}}), got {results!r}"
        )
    for run_id, pair in results.items():
        if type(pair) is tuple and len(pair) == 2:
            attempt, result = pair
            # What a worker passes (checked once per run, so without a call of its own).
            if type(attempt) is int and attempt >= 1 and type(result) is str:
                continue
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"results[{run_id!r}] must be an (attempt, result) pair, got {pair!r}")
        attempt, result = pair
        check_attempt(attempt, f"results[{run_id!r}] (the attempt of that run)")
        if not isinstance(result, str):
            raise TypeError(
                f"results[{run_id!r}]: the result must be JSON text (encode it first), "
                f"got {type(result).__name__}"
            )


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


def check_concurrency(concurrency: object, tasks: Collection[str] | None) -> dict[str, int]:
    """Validate a claim's ``concurrency``: the limits of the claimed ``tasks`` among it.

    Returns:
        ``{task: limit}`` for the tasks of ``tasks`` (of any task: ``None``) that have one.

    Raises:
        TypeError: ``concurrency`` is not a mapping of task names to ints.
        ValueError: a limit is below 1.
    """
    if concurrency is None:
        return {}
    if not isinstance(concurrency, Mapping):
        raise TypeError(f"concurrency must map task names to their limit, got {concurrency!r}")
    limits: dict[str, int] = {}
    for task, limit in concurrency.items():
        if not isinstance(task, str):
            raise TypeError(f"concurrency keys must be task names, got {task!r}")
        checked = check_count(limit, f"concurrency[{task!r}]", minimum=1)
        if tasks is None or task in tasks:
            limits[task] = checked
    return limits


def check_purge_options(older_than: float) -> None:
    """Validate :meth:`Broker.purge` arguments.

    Raises:
        TypeError: ``older_than`` is not a number.
        ValueError: ``older_than`` is negative or not finite.
    """
    check_seconds(older_than, "older_than", allow_zero=True)
