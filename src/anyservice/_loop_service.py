"""Prefect's ``LoopService`` on scopes, and ``run_services`` under one signal handler."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import anyio.abc

from ._checks import Seconds, check_optional_count
from ._core import Host, Service
from ._schedule import MissedTickPolicy, TickOutcome, TimerStats, check_interval
from ._timers import TimerSpec

__all__ = ["LoopService", "run_services"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _LoopSpec(TimerSpec):
    """The loop of a LoopService: a timer on the instance's ``loop_seconds``, Prefect-style.

    It fires at start, then ``loop_seconds`` after each run started; a run that overruns is
    followed at once by the next (the ``delay`` policy) with Prefect's warning each time.
    Errors are logged and the loop goes on, but for ``NotImplementedError``.
    """

    kind = "loop"
    propagate = (NotImplementedError,)

    def __init__(self) -> None:
        super().__init__(
            LoopService.run_once,
            60.0,
            policy=MissedTickPolicy.DELAY,
            exec_first=True,
            on_error="log",
        )
        self.name = "run_once"

    async def run(self, service: Host) -> None:
        assert isinstance(service, LoopService)
        # Counted here rather than in on_start: a subclass that overrides on_start without
        # calling super() still gets its ``loops`` on every start.
        service.loops_run = 0
        await super().run(service)

    async def call(self, service: Host) -> None:
        assert isinstance(service, LoopService)
        await service.run_once()

    def prepare_bare(self, service: Host, now: float) -> tuple[float, object] | None:
        return None  # it fires at start, and run() counts the loops of each start

    def interval_for(self, service: Host) -> float:
        assert isinstance(service, LoopService)
        # Checked again at each start: an instance attribute may have been set since.
        return check_interval(service.loop_seconds, f"{service.name}: loop_seconds")

    def new_stats(self) -> TimerStats:
        return TimerStats()

    def report_overrun(
        self, service: Host, stats: TimerStats, duration: float, outcome: TickOutcome
    ) -> None:
        assert isinstance(service, LoopService)
        service.log.warning(
            "%s took %.3f seconds to run, which is longer than its loop interval of %s seconds.",
            service.name,
            duration,
            service.loop_seconds,
        )

    async def after_tick(self, service: Host) -> None:
        assert isinstance(service, LoopService)
        service.loops_run += 1
        if service._loops is not None and service.loops_run >= service._loops:
            await service.stop()


class LoopService(Service):
    """A service that calls ``run_once()`` every ``loop_seconds`` (Prefect's ``LoopService``).

    The next run starts ``loop_seconds`` after the previous one *started*, on a grid that
    does not drift; a run that takes longer logs Prefect's warning and the next starts at
    once. An exception in ``run_once`` is logged and the loop goes on, except
    ``NotImplementedError`` (``run_once`` not overridden), which propagates. A stop ends an
    idle wait at once and lets a run in progress finish within ``shutdown_timeout``.

    ``await service.start(loops=N)`` returns after N runs with the service STOPPED;
    ``loops=None`` runs until stopped. With ``handle_signals=True``, SIGINT and SIGTERM stop
    it gracefully. ``timer_stats["run_once"]`` holds the loop's statistics.
    """

    loop_seconds: float = 60

    def __init__(
        self,
        loop_seconds: Seconds | None = None,
        handle_signals: bool = False,
        *,
        name: str | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        super().__init__(name=name, shutdown_timeout=shutdown_timeout)
        self.loop_seconds = check_interval(
            self.loop_seconds if loop_seconds is None else loop_seconds,
            f"{self.name}: loop_seconds",
        )
        self.handle_signals = bool(handle_signals)
        self._loops: int | None = None
        #: How many times ``run_once`` ran since the last start.
        self.loops_run = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every LoopService runs the loop, whatever else its subclass decorates.
        cls._background_specs = (_LOOP, *cls._background_specs)

    async def run_once(self) -> None:
        """One run of the loop: override it.

        Raises:
            NotImplementedError: always, in the base class.
        """
        raise NotImplementedError("LoopService subclasses must implement run_once()")

    async def start(self, loops: int | None = None) -> None:
        """Run the loop until stopped, or for ``loops`` runs; returns with the service STOPPED.

        Raises:
            TypeError: if ``loops`` is not an int or None.
            ValueError: if ``loops`` is below 1 or above ``MAX_COUNT``.
            BaseExceptionGroup: if the service crashed.
        """
        self._loops = check_optional_count(loops, f"{self.name}: loops", minimum=1)
        if self.handle_signals:
            await run_services(self, handle_signals=True)
        else:
            await self.run()


_LOOP = _LoopSpec()
LoopService._background_specs = (_LOOP,)


async def run_services(*services: Service | Iterable[Service], handle_signals: bool = True) -> None:
    """Run several services until all have stopped, under one signal handler.

    Prefect's ``run_multiple_services``: ``run_services([a, b])`` as Prefect takes them, or
    ``run_services(a, b)``. With ``handle_signals=True``, the first SIGINT or SIGTERM stops
    every service gracefully. A LoopService runs for the ``loops`` its last
    ``start(loops=)`` asked for (by default, until stopped).

    Raises:
        TypeError: if something given is not a service.
        ValueError: if no services are given or one is given twice.
        BaseExceptionGroup: what crashed any of them (the others are then stopped).
    """
    services = _flatten(services)
    if not services:
        raise ValueError("run_services() needs at least one service")
    if len({id(service) for service in services}) != len(services):
        raise ValueError("run_services(): a service was given twice")
    async with anyio.create_task_group() as outer:
        if handle_signals:
            await outer.start(_stop_on_signal, services)
        async with anyio.create_task_group() as inner:
            for service in services:
                inner.start_soon(service.run, name=f"anyservice {service.name}")
        outer.cancel_scope.cancel()


def _flatten(given: tuple[Service | Iterable[Service], ...]) -> tuple[Service, ...]:
    flat: list[Service] = []
    for item in given:
        if isinstance(item, Service):
            flat.append(item)
        elif isinstance(item, Iterable):
            for service in item:
                if not isinstance(service, Service):
                    raise TypeError(f"run_services() takes services, got {service!r}")
                flat.append(service)
        else:
            raise TypeError(f"run_services() takes services or a list of them, got {item!r}")
    return tuple(flat)


async def _stop_on_signal(
    services: Sequence[Service], *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as received:
        task_status.started()
        async for signum in received:
            for service in services:
                service.log.info("received %s: stopping", signal.Signals(signum).name)
                await service.stop(block=False)
