"""Lifecycle states, the run phase, health results and the transitions: pure, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ALLOWED",
    "Health",
    "Pending",
    "RunPhase",
    "ServiceError",
    "ServiceState",
    "UnhealthyError",
    "check_transition",
]


class ServiceState(enum.StrEnum):
    """Where a service is in its life.

    ``INIT → STARTING → RUNNING → STOPPING → STOPPED``, and ``CRASHED`` from any of the
    active states. A STOPPED or CRASHED service may be started again.

    A ``StrEnum`` with mode's lowercase values, so ``service.state == "running"`` holds
    while RUNNING, as it does for a mode service; ``str(state)`` is the value.
    """

    INIT = "init"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"

    @property
    def is_final(self) -> bool:
        """True for STOPPED and CRASHED: nothing of the service is running."""
        return self in _FINAL

    @property
    def is_active(self) -> bool:
        """True while the service's scope is open (STARTING, RUNNING, STOPPING)."""
        return self in _ACTIVE


_FINAL = frozenset({ServiceState.STOPPED, ServiceState.CRASHED})
_ACTIVE = frozenset({ServiceState.STARTING, ServiceState.RUNNING, ServiceState.STOPPING})

#: The states a service may go to from each state.
ALLOWED: dict[ServiceState, frozenset[ServiceState]] = {
    # A stop requested before the first start ends the service without starting anything.
    ServiceState.INIT: frozenset(
        {ServiceState.STARTING, ServiceState.STOPPED, ServiceState.CRASHED}
    ),
    ServiceState.STARTING: frozenset(
        {ServiceState.RUNNING, ServiceState.STOPPING, ServiceState.CRASHED}
    ),
    ServiceState.RUNNING: frozenset({ServiceState.STOPPING, ServiceState.CRASHED}),
    ServiceState.STOPPING: frozenset({ServiceState.STOPPED, ServiceState.CRASHED}),
    # crash() on a service that is not running records the reason.
    ServiceState.STOPPED: frozenset({ServiceState.STARTING, ServiceState.CRASHED}),
    ServiceState.CRASHED: frozenset({ServiceState.STARTING}),
}


class ServiceError(RuntimeError):
    """A service was used in a way its lifecycle does not allow."""


def check_transition(name: str, old: ServiceState, new: ServiceState) -> None:
    """Raise unless a service may go from ``old`` to ``new``.

    Raises:
        ServiceError: naming the service and both states.
    """
    if new not in ALLOWED[old]:
        raise ServiceError(f"service {name!r} cannot go from {old.name} to {new.name}")


class RunPhase(enum.IntEnum):
    """How far one run of a service has gone; it only moves forward.

    The service's :class:`ServiceState` is what users see; the phase is what the run's own
    code needs to know about itself (see :mod:`anyservice._core._run`).
    """

    #: Dependencies, ``on_start``, resources, background tasks, ``on_started``.
    STARTING = 1
    #: Reported RUNNING; waiting for a stop.
    RUNNING = 2
    #: The stop sequence runs: ``on_stop``, the tasks end, ``on_shutdown``.
    STOPPING = 3
    #: Something raised: the task group is being cancelled; no more hooks run.
    CRASHING = 4
    #: The body is over: the task group takes no new tasks, it only waits for its own.
    CLOSED = 5


class Pending(enum.Enum):
    """What comes after the current run, or at the next ``run()`` of a stopped service."""

    NOTHING = 0
    #: A stop came before the run: the next run ends at once, with nothing started.
    STOP = 1
    #: ``restart()``: the run that is ending is followed by another.
    RESTART = 2


class UnhealthyError(Exception):
    """A health check failed; raise it from ``healthcheck()`` with the reason."""


@dataclass(frozen=True, slots=True)
class Health:
    """The result of one health check.

    Attributes:
        healthy: Whether the check passed.
        reason: Why not, if it did not.
        error: The exception the check raised (an ``UnhealthyError`` for a timeout).
        checked_at: The backend clock's reading when the check finished.
    """

    healthy: bool
    checked_at: float
    reason: str | None = None
    error: BaseException | None = None

    def describe(self) -> str:
        return "ok" if self.healthy else f"UNHEALTHY ({self.reason})"
