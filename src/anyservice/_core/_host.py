"""What background specs, health checks and diagnostics need from the service they serve.

Typed against this Protocol rather than the concrete ``Service``, the modules that plug work
into a service (``@task``, ``@timer``, the health monitor, tree dumps) never import the
service module, so the core has no import circle.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .._schedule import TimerStats
from ._state import Health

__all__ = ["Host"]


class Host(Protocol):
    """A running service as the work it hosts sees it."""

    @property
    def name(self) -> str: ...

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

    @property
    def should_stop(self) -> bool: ...

    @property
    def monitoring_interval(self) -> float: ...

    @property
    def healthcheck_timeout(self) -> float: ...

    @property
    def timer_stats(self) -> dict[str, TimerStats]: ...

    def in_flight(self) -> AbstractAsyncContextManager[None]: ...

    async def healthcheck(self) -> None: ...

    async def monitoring_task(self) -> None: ...

    async def check_health(self) -> Health: ...

    def describe(self) -> str: ...

    def children(self) -> tuple[Host, ...]: ...
