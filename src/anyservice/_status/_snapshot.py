"""What the status server answers, read from a running tree through public properties only.

Everything here is a pure read of the services' state at the moment of the request: no
bookkeeping runs while nobody asks. A service that an overridden ``children()`` lists
twice is shown, checked and counted once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._core_names import Service, ServiceState, TimerStats

if TYPE_CHECKING:
    from ..taskqueue import TaskWorker

__all__ = ["liveness", "readiness", "task_workers", "tree", "walk"]


def walk(root: Service) -> Iterator[Service]:
    """Every service of the tree, root first, depth first, each once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        service = stack.pop()
        if id(service) in seen:
            continue
        seen.add(id(service))
        yield service
        stack.extend(reversed(service.children()))


def _worker_class() -> type[TaskWorker]:
    # Imported here: the task queue imports the runner, which imports this package.
    from ..taskqueue import TaskWorker

    return TaskWorker


def task_workers(services: Iterable[Service]) -> list[TaskWorker]:
    """The task workers among ``services`` (a tree's :func:`walk`), in their order."""
    worker_class = _worker_class()
    return [service for service in services if isinstance(service, worker_class)]


def _number(value: float | None) -> float | None:
    # JSON has no infinity or NaN.
    return value if value is None or math.isfinite(value) else None


def _timer(stats: TimerStats) -> dict[str, Any]:
    return {
        "interval": _number(stats.interval),
        "ticks": stats.ticks,
        "late_ticks": stats.late_ticks,
        "overruns": stats.overruns,
        "missed": stats.missed,
        "errors": stats.errors,
        "mean_lateness": stats.mean_lateness,
        "worst_lateness": stats.worst_lateness,
        "last_duration": stats.last_duration,
        "worst_duration": stats.worst_duration,
    }


def _node(service: Service, seen: set[int], worker_class: type[TaskWorker]) -> dict[str, Any]:
    seen.add(id(service))
    health = service.last_health
    crash = service.crash_reason if service.state is ServiceState.CRASHED else None
    node: dict[str, Any] = {
        "name": service.name,
        "kind": type(service).__name__,
        "state": service.state.name,
        "restarts": service.restart_count,
        "health": None if health is None else {"healthy": health.healthy, "reason": health.reason},
        "flags": sorted(service.diag.flags),
        "crash": None if crash is None else f"{type(crash).__name__}: {crash}",
        "timers": {name: _timer(stats) for name, stats in service.timer_stats.items()},
    }
    if isinstance(service, worker_class):
        status = service.status()
        node["task_worker"] = {
            key: status[key] for key in ("limit", "current", "tasks", "stopping", "counts")
        }
    node["children"] = [
        _node(child, seen, worker_class) for child in service.children() if id(child) not in seen
    ]
    return node


def tree(root: Service) -> dict[str, Any]:
    """What ``GET /tree`` answers: the root's node, its children nested under ``children``."""
    return _node(root, set(), _worker_class())


def liveness(root: Service) -> tuple[bool, dict[str, Any]]:
    """What ``GET /healthz`` answers: the loop answered, so alive unless the root crashed or
    a task worker cannot reach its broker."""
    if root.state is ServiceState.CRASHED:
        reason = root.crash_reason
        why = "crashed" if reason is None else f"crashed: {type(reason).__name__}: {reason}"
        return False, {"status": "unhealthy", "reason": f"{root.name} {why}"}
    for worker in task_workers(walk(root)):
        healthy, body = worker.healthz()
        if not healthy:
            return False, body
    return True, {"status": "ok", "state": root.state.name}


def readiness(root: Service) -> tuple[bool, dict[str, Any]]:
    """What ``GET /readyz`` answers: ready when every service is RUNNING and its last health
    check (if one ran) passed; otherwise the reasons, one per service."""
    reasons = []
    for service in walk(root):
        if service.state is not ServiceState.RUNNING:
            reasons.append(f"{service.name} is {service.state.name}")
        elif service.last_health is not None and not service.last_health.healthy:
            reasons.append(f"{service.name} is unhealthy: {service.last_health.reason}")
    if reasons:
        return False, {"ready": False, "reasons": reasons}
    return True, {"ready": True}
