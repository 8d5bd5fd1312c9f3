"""Health checks: core_service's monitoring, on a drift-free grid.

A service that overrides ``healthcheck()`` gets a monitor among its background tasks: every
``monitoring_interval`` seconds it calls ``check_health()``, and an unhealthy result crashes
the service with that reason, so a supervisor above restarts it.
"""

from __future__ import annotations

import anyio

from .._schedule import IntervalSchedule
from ._host import Host
from ._specs import BackgroundSpec
from ._state import Health, UnhealthyError

__all__ = ["HealthMonitorSpec", "monitor_health", "run_healthcheck"]


async def run_healthcheck(service: Host) -> Health:
    """Run ``service.healthcheck()`` within ``healthcheck_timeout``; never raises for a failure."""
    timeout = service.healthcheck_timeout
    try:
        with anyio.move_on_after(timeout) as scope:
            await service.healthcheck()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, UnhealthyError) else f"{type(exc).__name__}: {exc}"
        return Health(False, anyio.current_time(), reason, exc)
    if scope.cancelled_caught:
        reason = f"healthcheck did not answer within {timeout}s"
        return Health(False, anyio.current_time(), reason, UnhealthyError(reason))
    return Health(True, anyio.current_time())


class HealthMonitorSpec(BackgroundSpec):
    """Calls ``check_health()`` every ``monitoring_interval``; an unhealthy result crashes."""

    kind = "healthcheck"

    def __init__(self) -> None:
        async def healthcheck(service: Host) -> None:
            await service.healthcheck()

        super().__init__(healthcheck)

    async def run(self, service: Host) -> None:
        await service.monitoring_task()


async def monitor_health(service: Host) -> None:
    """The default ``monitoring_task()``: check the health on a drift-free grid, forever.

    Raises:
        UnhealthyError: at the first failed check, which crashes the service.
    """
    schedule = IntervalSchedule(service.monitoring_interval, start=anyio.current_time())
    while True:
        await anyio.sleep_until(schedule.due)
        started = anyio.current_time()
        health = await service.check_health()
        if not health.healthy:
            assert health.error is not None
            service.log.error("unhealthy: %s", health.reason)
            raise UnhealthyError(f"{service.name} is unhealthy: {health.reason}") from (
                health.error
            )
        schedule.advance(started, anyio.current_time())
