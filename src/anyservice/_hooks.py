"""Observation hooks: where the metrics and the traces see an event that no state keeps.

Most of what the status server exports is read from the services at scrape time
(states, restart counts, timer statistics, task-worker counts). A histogram needs every
observation, and a trace every restart and crash as it happens, so the places that see
one call the hook here; each is ``None`` while nobody listens (no metrics collected, no
OpenTelemetry installed), so the cost then is one global read and a comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["service_crash", "service_restart", "task_run", "timer_tick"]

#: ``(service, timer name, lateness in seconds)`` after each timer body.
timer_tick: Callable[[Any, str, float], None] | None = None

#: ``(worker, task name, outcome, seconds or None)`` for each outcome of a task run: the
#: outcome is one of the worker's ``counts`` keys; the duration is known for completed,
#: failed and retried attempts.
task_run: Callable[[Any, str, str, float | None], None] | None = None

#: ``(service,)`` when a service starts again after an earlier run (its restart counted).
service_restart: Callable[[Any], None] | None = None

#: ``(service, reason)`` when a service crashes, with the error that crashed it.
service_crash: Callable[[Any, BaseException], None] | None = None
