"""The names users bring from mode, Prefect and core_service, built on the core's own.

``Service`` inherits them from :class:`Compat`; they are reserved like the rest of its
machinery (a subclass that shadows one gets a ``TypeError``), but for the hooks and the
labels, which are meant to be overridden. Each is a few lines over what ``Service`` and its
run already know; where one behaves differently from its anchor on purpose, its docstring
says so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import AsyncExitStack, ExitStack
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.abc

from .._checks import check_seconds
from .._schedule import MissedTickPolicy, TimerStats
from ._backend import call_in_loop
from ._diag import Diag
from ._health import monitor_health
from ._itertimer import itertimer
from ._run import Resources, Run, inside, live_resources
from ._state import Pending, ServiceError, ServiceState
from ._wait import WaitResult, WaitResults, race

if TYPE_CHECKING:
    from ._tree import Tree

__all__ = ["Compat", "check_wait_timeout"]

_ACTIVE_STATES = (ServiceState.STARTING, ServiceState.RUNNING)


def check_wait_timeout(timeout: object, what: str) -> float | None:
    """``timeout=`` of the wait family: None, or a duration >= 0 (mode's ``Seconds``)."""
    if timeout is None:
        return None
    return check_seconds(timeout, f"{what}: timeout", allow_zero=True)


class Compat:
    """mode's, Prefect's and core_service's names for what a Service does."""

    if TYPE_CHECKING:
        name: str
        diag: Diag
        crash_reason: BaseException | None
        _state: ServiceState
        _state_changed: anyio.Event | None
        _run: Run | None
        _pending: Pending
        _tree: Tree

        @property
        def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

        @property
        def should_stop(self) -> bool: ...

        @property
        def dependencies(self) -> tuple[Compat, ...]: ...

        @property
        def _owner(self) -> Compat | None: ...

        @property
        def timer_stats(self) -> dict[str, TimerStats]: ...

        def tracebacks(self) -> dict[str, str]: ...

        async def _sleep_until(self, deadline: float) -> bool: ...

        async def run(
            self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        ) -> None: ...

        async def add_runtime_dependency(self, service: Any) -> Any: ...

        async def wait_for(self, *states: ServiceState) -> ServiceState: ...

        def _request_stop(self, *, deadline: bool = True, sticky: bool = False) -> None: ...

    #: mode's: a class that sets ``abstract = True`` cannot be instantiated, only its
    #: subclasses (which are not abstract unless they say so too).
    abstract: ClassVar[bool] = False
    #: mode's: the class of ``self.diag``; set it to a ``Diag`` subclass of your own.
    Diag: ClassVar[type[Diag]] = Diag
    #: mode's: with True, a stop waits after ``on_stop`` (within ``shutdown_timeout``)
    #: until ``set_shutdown()`` is called, before it ends the background tasks.
    wait_for_shutdown: ClassVar[bool] = False

    # Class-level defaults: an instance pays for these only once it uses them.
    _loop: object = None
    _shutdown_set: bool = False
    _shutdown_event: anyio.Event | None = None
    _exit_stacks: tuple[Resources, ExitStack, AsyncExitStack] | None = None

    # ------------------------------------------------------------ hooks

    async def on_restart(self) -> None:
        """Called on a restart, before the new start (mode's); not on the first start."""

    async def monitoring_task(self) -> None:
        """The health monitor's loop, run for the life of the service (core_service's).

        By default it calls ``check_health()`` every ``monitoring_interval`` seconds and
        crashes the service on a failure; it runs when ``healthcheck()`` is overridden.
        Override it to monitor differently: it then runs whether or not ``healthcheck()``
        is, and like any task, an exception in it crashes the service.
        """
        await monitor_health(self)  # type: ignore[arg-type]  # a Service is a Host

    @property
    def label(self) -> str:
        """A label for graphs and dumps (mode's): the class name, with the name if other."""
        kind = type(self).__name__
        return kind if self.name == kind else f"{kind}: {self.name}"

    @property
    def shortlabel(self) -> str:
        """A short label for log lines (mode's): the service's name."""
        return self.name

    # ------------------------------------------------------------ questions

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """The same logger as ``log``, under Prefect's (and mode's) name."""
        return self.log

    @property
    def crashed(self) -> bool:
        """True while the service is CRASHED (mode's)."""
        return self._state is ServiceState.CRASHED

    @property
    def running(self) -> bool:
        """True while the service is RUNNING (core_service's; the same as ``started``)."""
        return self._state is ServiceState.RUNNING

    def human_tracebacks(self) -> str:
        """The stacks of ``tracebacks()`` as one readable text (mode's)."""
        return "\n".join(f"{task}:\n{stack}" for task, stack in self.tracebacks().items())

    # ------------------------------------------------------------ the wait family

    async def wait(self, *awaitables: object, timeout: float | None = None) -> WaitResult:
        """Wait for the first of ``awaitables`` (or events) to finish, or a stop (mode's).

        With none, wait until a stop is requested. The others still running are
        cancelled. Unlike mode, a timeout raises ``TimeoutError`` (mode returns a result
        that cannot be told from a stop).

        Returns:
            ``WaitResult(result, stopped)``: the first one's result, or ``(None, True)``
            if the service was asked to stop (or crashed) first.

        Raises:
            TypeError: for something neither awaitable nor an event, or a bad timeout.
            TimeoutError: if ``timeout`` seconds passed first.
            Exception: what the awaitable raised.
        """
        results, stopped = await self._race_first(awaitables, timeout, "wait()")
        if results:
            return WaitResult(results[min(results)], False)
        return WaitResult(None, stopped)

    async def wait_many(
        self, awaitables: Iterable[object], *, timeout: float | None = None
    ) -> WaitResult:
        """Wait until every one of ``awaitables`` has finished, or a stop (mode's).

        Returns:
            ``WaitResult(results, stopped)``: their results in the order given, or
            ``(None, True)`` if the service was asked to stop first.

        Raises:
            As for ``wait()``.
        """
        items = list(awaitables)
        what = f"{self.name}: wait_many()"
        seconds = check_wait_timeout(timeout, what)
        if not items:
            return WaitResult([], False)
        results, stopped = await race(
            items, self.wait_until_stopped, every=True, timeout=seconds, what=what
        )
        if len(results) == len(items):
            return WaitResult([results[index] for index in range(len(items))], False)
        return WaitResult(None, stopped)

    async def wait_first(self, *awaitables: object, timeout: float | None = None) -> WaitResults:
        """Wait for the first of ``awaitables`` to finish, or a stop; say which (mode's).

        Returns:
            ``WaitResults(done, results, stopped)``: those that finished (more than one if
            they finished together) and their results.

        Raises:
            As for ``wait()``.
        """
        results, stopped = await self._race_first(awaitables, timeout, "wait_first()")
        order = sorted(results)
        return WaitResults(
            [awaitables[index] for index in order], [results[index] for index in order], stopped
        )

    async def _race_first(
        self, awaitables: tuple[object, ...], timeout: float | None, method: str
    ) -> tuple[dict[int, Any], bool]:
        what = f"{self.name}: {method}"
        seconds = check_wait_timeout(timeout, what)
        return await race(
            awaitables, self.wait_until_stopped, every=False, timeout=seconds, what=what
        )

    async def wait_for_stopped(self, *awaitables: object, timeout: float | None = None) -> bool:
        """``(await self.wait(*awaitables, timeout=timeout)).stopped`` (mode's)."""
        return (await self.wait(*awaitables, timeout=timeout)).stopped

    async def wait_until_stopped(self) -> None:
        """Return once the service is asked to stop, or has stopped or crashed (mode's)."""
        while not self.should_stop and self._state is not ServiceState.CRASHED:
            await self.wait_for(*(set(ServiceState) - {self._state}))  # any change

    # ------------------------------------------------------------ shutdown flag

    def set_shutdown(self) -> None:
        """Tell a stop that waits for it (``wait_for_shutdown = True``) to go on (mode's).

        Cleared at each start; before the stop, it is kept until the stop comes.
        """
        self._shutdown_set = True
        event = self._shutdown_event
        if event is not None:
            event.set()

    async def _wait_for_shutdown_flag(self) -> None:
        if not self._shutdown_set:
            self._shutdown_event = anyio.Event()
            try:
                await self._shutdown_event.wait()
            finally:
                self._shutdown_event = None

    # ------------------------------------------------------------ starting

    async def maybe_start(self, task_group: anyio.abc.TaskGroup | None = None) -> bool:
        """Start the service unless it is already running; True if it was started (mode's).

        Returns once RUNNING. The run is hosted by ``task_group`` if given; otherwise by
        the service's owner, if it is a dependency of a running service; otherwise, called
        from inside a running service, it becomes a runtime dependency of that service.

        Raises:
            ServiceError: with no task group and no running service to host the run.
        """
        if self._state.is_active:
            return False
        if task_group is not None:
            await task_group.start(self.run, name=f"anyservice {self.name}")
            return True
        owner = self._owner
        if owner is not None:
            if owner._state not in _ACTIVE_STATES:
                raise ServiceError(
                    f"{self.name}: maybe_start() of a dependency needs its owner "
                    f"{owner.name!r} running (it is {owner._state.name}); start the owner"
                )
            await owner._tree.start_runtime(self)  # type: ignore[arg-type]  # a Node
            return True
        around = inside()
        if not around:
            raise ServiceError(
                f"{self.name}: maybe_start() needs a task group to run the service in "
                f"(maybe_start(task_group)), or to be called from inside a running service"
            )
        host: Any = around[-1]
        await host.add_runtime_dependency(self)
        return True

    def service_reset(self) -> None:
        """Make a stopped or crashed service INIT again (mode's), its dependencies too.

        Clears the crash reason, a stop kept for the next run and the shutdown flag, so
        that ``should_stop`` is False until the next stop. ``on_first_start`` is not run
        again, and ``restart_count`` is kept.

        Raises:
            ServiceError: if the service is running.
        """
        if self._state.is_active or self._run is not None:
            raise ServiceError(
                f"{self.name}: service_reset() needs a stopped service, not {self._state.name}"
            )
        for dependency in self.dependencies:
            dependency.service_reset()
        self.crash_reason = None
        self._pending = Pending.NOTHING
        self._shutdown_set = False
        # Deliberately not a transition: a reset is not a step of the lifecycle.
        self._state = ServiceState.INIT
        event, self._state_changed = self._state_changed, None
        if event is not None:
            event.set()

    # ------------------------------------------------------------ resources

    @property
    def exit_stack(self) -> ExitStack:
        """An ``ExitStack`` of the running service, closed when it stops (mode's).

        Each run has its own, closed with the run's other resources, in reverse order.

        Raises:
            ServiceError: if the service is not starting or running.
        """
        return self._stacks()[0]

    @property
    def async_exit_stack(self) -> AsyncExitStack:
        """An ``AsyncExitStack`` of the running service, closed when it stops (mode's).

        Raises:
            ServiceError: if the service is not starting or running.
        """
        return self._stacks()[1]

    def _stacks(self) -> tuple[ExitStack, AsyncExitStack]:
        run = self._run
        resources = live_resources(run)
        if resources is None:
            raise ServiceError(
                f"{self.name}: exit_stack and async_exit_stack belong to a running service "
                f"(it is {self._state.name}); before start, use add_context()"
            )
        stacks = self._exit_stacks
        if stacks is None or stacks[0] is not resources:
            sync_stack = ExitStack()
            async_stack = AsyncExitStack()
            resources.enter_sync(sync_stack)
            resources.push_async(async_stack)
            stacks = self._exit_stacks = (resources, sync_stack, async_stack)
        return stacks[1], stacks[2]

    # ------------------------------------------------------------ timers

    def itertimer(
        self,
        interval: float,
        *,
        policy: MissedTickPolicy | str = MissedTickPolicy.SKIP,
        exec_first: bool = False,
        name: str | None = None,
    ) -> AsyncIterator[float]:
        """``async for lateness in self.itertimer(5):`` — a drift-free timer inside a task.

        Ticks on the grid ``t0 + k * interval`` with the same missed-tick policies as
        ``@timer`` and yields each tick's lateness; ends when the service stops (mode's
        ``itertimer``). With ``name`` (mode's), its statistics are in ``timer_stats[name]``.

        Raises:
            TypeError, ValueError: for a bad interval or policy (at the first iteration).
        """
        return itertimer(self, interval, policy=policy, exec_first=exec_first, name=name)

    # ------------------------------------------------------------ diagnostics

    async def transition_with(self, flag: str, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` with ``flag`` set on ``self.diag`` meanwhile (mode's)."""
        self.diag.set_flag(flag)
        try:
            return await awaitable
        finally:
            self.diag.unset_flag(flag)

    # ------------------------------------------------------------ stopping

    def request_stop(self) -> None:
        """Ask the service to stop and return at once, from synchronous code (Prefect's).

        Safe from a signal handler, a callback, or another thread: while the service runs,
        the request is handed to its event loop, which begins the stop at its next turn
        (what ``stop(block=False)`` does at once). Before the service ever ran, the stop is
        kept for its first run, as with ``stop()`` (call it from the event loop's thread
        then).
        """
        loop = self._loop
        if loop is None or not call_in_loop(loop, self._request_stop_sticky):
            self._request_stop_sticky()

    def _request_stop_sticky(self) -> None:
        self._request_stop(sticky=True)
