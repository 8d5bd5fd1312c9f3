"""Supervisor: a service whose children are restarted instead of crashing it (OTP-style)."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._checks import Seconds, check_choice, check_count
from ._core import (
    Countdown,
    Service,
    ServiceError,
    ServiceState,
    Started,
    TaskSpec,
    adopt,
    attach_spec,
    leaves,
    report_ready,
    run_as_restart,
    start_beside,
    start_is_observable,
    stop_service,
    unwind_unobservable,
)
from ._restart import Backoff, RestartIntensity
from ._schedule import check_interval

__all__ = ["RestartType", "Strategy", "Supervisor", "SupervisorError"]


class Strategy(enum.Enum):
    """Which children restart when one of them exits."""

    #: Only the child that exited.
    ONE_FOR_ONE = "one_for_one"
    #: Every child: the others are stopped (in reverse order) and all started again.
    ONE_FOR_ALL = "one_for_all"
    #: The child that exited and those started after it.
    REST_FOR_ONE = "rest_for_one"


class RestartType(enum.Enum):
    """When a child is restarted."""

    #: Always: after a crash and after it stopped by itself.
    PERMANENT = "permanent"
    #: Only after a crash.
    TRANSIENT = "transient"
    #: Never.
    TEMPORARY = "temporary"


class SupervisorError(RuntimeError):
    """A supervisor gave up: its children restarted more often than its intensity allows."""


class _Child:
    """A child of a supervisor, and what its run tells the supervisor.

    It is the run's ``task_status`` (told once per run that the child is RUNNING) and the
    run's ``ended`` (see ``run_as_restart``), so no coroutine of the supervisor's wraps
    the child's run, and nothing else is made per child to start it.
    """

    __slots__ = (
        "ended",
        "failures",
        "restart",
        "running",
        "service",
        "started_at",
        "status",
        "stopping",
        "supervisor",
    )

    def __init__(self, supervisor: Supervisor, service: Service, restart: RestartType) -> None:
        self.supervisor = supervisor
        self.service = service
        self.restart = restart
        #: Restarts in a row without the child having run for ``within`` seconds between.
        self.failures = 0
        self.started_at = 0.0
        #: The supervisor is stopping it on purpose (one-for-all / rest-for-one): not an exit.
        self.stopping = False
        self.running = False
        #: Told when the child's run has ended, while the supervisor waits for it with others.
        self.ended: Countdown | None = None
        #: Told once that the current run is RUNNING (or over): the start waits on it.
        self.status: Started | Countdown | None = None

    def __repr__(self) -> str:
        return f"<child {self.service.name!r} {self.restart.value}>"

    def started(self, value: object = None) -> None:
        status, self.status = self.status, None
        if status is not None:
            status.started()

    def __call__(self, error: BaseException | None) -> None:
        """The child's run is over; ``error`` is what it raised, if anything."""
        self.running = False
        self.started()
        ended, self.ended = self.ended, None
        if ended is not None:
            ended.started()
        if error is not None and not isinstance(error, Exception):
            return  # cancelled: the supervisor itself is going, and decides nothing
        exits = self.supervisor._exits
        if exits is not None:
            # What the child crashed with, not the group its task group wraps it in.
            outcome = None if error is None else (self.service.crash_reason or error)
            try:
                exits.send_nowait((self, outcome))
            except anyio.ClosedResourceError:
                pass  # the supervisor stopped supervising meanwhile: nothing to decide


def _run_child(child: _Child) -> Coroutine[Any, Any, None]:
    # The child's run itself, in the supervisor's task group: no frame around it.
    return run_as_restart(child.service, task_status=child, ended=child)


_Exit = tuple[_Child, BaseException | None]

F = TypeVar("F", bound=Callable[..., Any])


class _ReadySpec(TaskSpec):
    """A ``@task`` whose service reports RUNNING only once the task calls ``report_ready()``."""

    reports_ready = True


def _reports_ready(function: F) -> F:
    return attach_spec(function, _ReadySpec(function))


class Supervisor(Service):
    """Runs children and restarts them when they exit, instead of crashing (Erlang/OTP's).

    ``strategy`` says which children restart (one-for-one, one-for-all, rest-for-one); each
    child's restart type says when (permanent, transient, temporary). At most
    ``max_restarts`` restarts within any ``within`` seconds (a sliding window); one more and
    the supervisor itself crashes with a ``SupervisorError`` chained to the child's error,
    so a supervisor above it can restart it. Between consecutive restarts of a child,
    ``backoff`` waits (exponential, capped) so a child that dies at once does not spin.
    Children start in order, each RUNNING before the next, and stop in reverse order;
    children that run none of the user's code at start (or at stop) cannot tell that
    order, and start (or stop) together.

    Raises:
        ValueError: for an unknown strategy or restart type, or bad intensity numbers.
    """

    strategy: Strategy = Strategy.ONE_FOR_ONE
    max_restarts: int = 3
    within: float = 5.0
    backoff: Backoff = Backoff()

    def __init__(
        self,
        *children: Service,
        strategy: Strategy | str | None = None,
        max_restarts: int | None = None,
        within: Seconds | None = None,
        backoff: Backoff | None = None,
        name: str | None = None,
        shutdown_timeout: Seconds | None = None,
    ) -> None:
        super().__init__(name=name, shutdown_timeout=shutdown_timeout)
        self.strategy = check_choice(
            self.strategy if strategy is None else strategy, f"{self.name}: strategy", Strategy
        )
        self.max_restarts = check_count(
            self.max_restarts if max_restarts is None else max_restarts,
            f"{self.name}: max_restarts",
        )
        self.within = check_interval(
            self.within if within is None else within, f"{self.name}: within"
        )
        if backoff is not None:
            if not isinstance(backoff, Backoff):
                raise TypeError(f"{self.name}: backoff must be a Backoff, got {backoff!r}")
            self.backoff = backoff
        self._children: list[_Child] = []
        self._exits: MemoryObjectSendStream[_Exit] | None = None
        self._exits_received: MemoryObjectReceiveStream[_Exit] | None = None
        for child in children:
            self.add_child(child)

    def add_child(
        self, service: Service, *, restart: RestartType | str = RestartType.PERMANENT
    ) -> Service:
        """Add a child before the supervisor starts; returns ``service``.

        Raises:
            ServiceError: if the supervisor is running (use ``start_child``).
            ValueError: for an unknown restart type, or a service that belongs elsewhere.
        """
        if self.state.is_active:
            raise ServiceError(
                f"{self.name}: add_child() is for a supervisor that is not running; "
                "use 'await start_child(...)'"
            )
        self._add(service, restart)
        return service

    async def start_child(
        self, service: Service, *, restart: RestartType | str = RestartType.PERMANENT
    ) -> Service:
        """Add a child to a running supervisor and start it; returns once it is RUNNING.

        Raises:
            ServiceError: if the supervisor is not RUNNING.
        """
        if self.state is not ServiceState.RUNNING:
            raise ServiceError(f"{self.name}: start_child() needs a RUNNING supervisor")
        self._open_exits()
        child = self._add(service, restart)
        await self._start(child)
        return service

    def _add(self, service: Service, restart: RestartType | str) -> _Child:
        kind = check_choice(restart, f"{self.name}: restart", RestartType)
        adopt(self, service, "child")
        child = _Child(self, service, kind)
        self._children.append(child)
        return child

    def children(self) -> tuple[Service, ...]:
        return (*super().children(), *(child.service for child in self._children))

    # ------------------------------------------------------------------ supervision

    def _open_exits(self) -> tuple[MemoryObjectSendStream[_Exit], MemoryObjectReceiveStream[_Exit]]:
        if self._exits is None or self._exits_received is None:
            self._exits, self._exits_received = anyio.create_memory_object_stream[_Exit](math.inf)
        return self._exits, self._exits_received

    @_reports_ready
    async def supervise(self) -> None:
        send, receive = self._open_exits()
        intensity = RestartIntensity(self.max_restarts, self.within)
        try:
            with send, receive:
                await self._start_in_order([c for c in self._children if not c.running])
                # Every child is RUNNING (or has already exited): the supervisor may be.
                report_ready()
                await self._supervise(receive, intensity)
        finally:
            self._exits = self._exits_received = None
            # Stopping or crashing: the children stop gracefully, in reverse order, within
            # the supervisor's own stop deadline.
            with anyio.CancelScope(shield=True, deadline=self.stop_deadline):
                await self._stop_in_order(self._children[::-1])

    async def _supervise(
        self,
        exits: MemoryObjectReceiveStream[_Exit],
        intensity: RestartIntensity,
    ) -> None:
        async for child, error in exits:
            if child.stopping:
                child.stopping = False
                continue
            if not self._should_restart(child, error):
                self.log.info(
                    "child %s %s; %s children are not restarted",
                    child.service.name,
                    "stopped" if error is None else f"crashed ({error!r})",
                    child.restart.value,
                )
                continue
            now = anyio.current_time()
            if not intensity.allow(now):
                raise SupervisorError(
                    f"{self.name}: more than {self.max_restarts} restarts within "
                    f"{self.within}s; giving up after {child.service.name} "
                    + ("stopped" if error is None else "crashed")
                ) from error
            if now - child.started_at >= self.within:
                child.failures = 0
            child.failures += 1
            delay = self.backoff.delay(child.failures)
            targets = self._targets(child)
            self.log.warning(
                "child %s %s; restarting %s (%s)%s",
                child.service.name,
                "stopped" if error is None else f"crashed: {_reason(error)}",
                ", ".join(target.service.name for target in targets),
                self.strategy.value,
                f" in {delay:.3g}s" if delay else "",
            )
            await self._stop_in_order([other for other in targets[::-1] if other is not child])
            if delay:
                await anyio.sleep(delay)
            await self._start_in_order(targets)

    def _should_restart(self, child: _Child, error: BaseException | None) -> bool:
        if child.restart is RestartType.PERMANENT:
            return True
        return child.restart is RestartType.TRANSIENT and error is not None

    def _targets(self, child: _Child) -> list[_Child]:
        if self.strategy is Strategy.ONE_FOR_ONE:
            return [child]
        if self.strategy is Strategy.ONE_FOR_ALL:
            return [other for other in self._children if other.running or other is child]
        index = self._children.index(child)
        return [child, *(other for other in self._children[index + 1 :] if other.running)]

    async def _start_in_order(self, children: list[_Child]) -> None:
        """Start ``children`` in order, each RUNNING before the next where it shows.

        A child whose start runs none of the user's code cannot tell whether the one before
        it is RUNNING yet: a run of such children starts together, with one wait for all of
        them, before the next child that can tell.
        """
        together = Countdown()
        # One reading of the clock for children started together: no time passes between.
        now: float | None = None
        for child in children:
            if start_is_observable(child.service):
                await together.wait()
                together = Countdown()
                await self._start(child)
                now = None
            elif not self.should_stop:
                together.remaining += 1
                if now is None:
                    now = anyio.current_time()
                self._spawn_child(child, together, now)
        await together.wait()

    async def _stop_in_order(self, children: list[_Child]) -> None:
        """Stop the running ones of ``children`` gracefully, one at a time where it shows.

        A child whose stop runs none of the user's code is only told to stop; before the
        next child whose stop can be seen, and at the end, the supervisor waits for those.
        """
        unwinding: list[_Child] = []
        for child in children:
            if not child.running:
                continue
            child.stopping = True
            if unwind_unobservable(child.service):
                unwinding.append(child)
                continue
            await self._wait_ended(unwinding)
            unwinding.clear()
            await stop_service(child.service)
        await self._wait_ended(unwinding)

    async def _wait_ended(self, children: list[_Child]) -> None:
        """Wait until the runs of ``children``, told to stop, have ended: one wait for all.

        They run none of the user's code at stop, so they end at once; the bound is the
        one a stop of each would have had, in case one does not.
        """
        if not children:
            return
        ended = Countdown()
        for child in children:
            if child.running:
                child.ended = ended
                ended.remaining += 1
        bound = max((child.service.shutdown_timeout for child in children), default=0.0)
        with anyio.move_on_after(bound + 1.0):
            await ended.wait()

    async def _start(self, child: _Child) -> None:
        """Start ``child`` in the supervisor's scope; returns once it is RUNNING (or ended).

        A stop of the supervisor meanwhile starts nothing more: it is a clean stop.
        """
        if self.should_stop:
            return
        started = Started()
        self._spawn_child(child, started)
        await started.wait()

    def _spawn_child(
        self, child: _Child, started: Started | Countdown, now: float | None = None
    ) -> None:
        child.running = True
        child.started_at = anyio.current_time() if now is None else now
        child.status = started
        # Beside the supervisor's tasks, not one of them: a supervisor's stop does not
        # cancel a child, it stops it gracefully (see supervise()).
        start_beside(self, f"child {child.service.name}", _run_child, child)

    def describe(self) -> str:
        return f"{super().describe()} strategy={self.strategy.value}"


def _reason(error: BaseException) -> str:
    return "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves(error))
