"""The Service: a running service *is* an anyio task group with a cancel scope around it.

Each run of a service opens two nested scopes, from the outside in:

- the service's task group, hosting its dependencies' runs and its own background tasks;
  its cancel scope is the *hard* scope, whose deadline is set to ``now + shutdown_timeout``
  when a stop is requested or the service crashes: whatever is left then is cancelled;
- the *running* scope, around starting: a stop request during the start cancels it,
  which cuts the start short. Once RUNNING the service waits on its stopping event, which
  a stop sets; either way the stop sequence then begins.

Every background task runs in its own *slot* scope. At stop, idle slots are cancelled at once;
a slot inside ``in_flight()`` is cancelled only when it leaves that block, or at the hard
deadline. Nothing polls a flag.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, AsyncExitStack
from contextvars import ContextVar
from types import TracebackType
from typing import Any, ClassVar, Self, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel

from . import _decorators
from ._diag import Diag, coroutine_stack, format_tree
from ._health import Health, HealthMonitorSpec, run_healthcheck
from ._schedule import MissedTickPolicy, check_interval
from ._state import ServiceError, ServiceState, check_transition
from ._timers import TimerStats, itertimer

__all__ = ["Service"]

_library_log = logging.getLogger("anyservice")

#: The services whose scope the current task runs in, innermost last.
_inside: ContextVar[tuple[Service, ...]] = ContextVar("anyservice_inside", default=())
#: The slot the current task runs in, if it is a service's background task.
_current_slot: ContextVar[_Slot | None] = ContextVar("anyservice_slot", default=None)

ContextSource: TypeAlias = (
    AbstractAsyncContextManager[Any]
    | AbstractContextManager[Any]
    | Callable[[], AbstractAsyncContextManager[Any] | AbstractContextManager[Any]]
)

# Marks an exception already logged as a crash: a crash travels up through every service
# above the one that crashed, and is logged with its traceback only once, where it happened.
_LOGGED = "__anyservice_logged__"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _only_cancellation(exc: BaseException) -> bool:
    cancelled = anyio.get_cancelled_exc_class()
    return all(isinstance(leaf, cancelled) for leaf in _leaves(exc))


def _first_real_error(exc: BaseException) -> BaseException:
    """The error a user wants to see: the single non-cancellation leaf, or the group."""
    cancelled = anyio.get_cancelled_exc_class()
    real = [leaf for leaf in _leaves(exc) if not isinstance(leaf, cancelled)]
    return real[0] if len(real) == 1 else exc


def _check_timeout(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {value!r}")
    return seconds


class _InFlight:
    """``in_flight()``: work that a stop lets finish within the grace period."""

    __slots__ = ("_slot",)

    def __init__(self, slot: _Slot | None) -> None:
        self._slot = slot

    def __enter__(self) -> None:
        if self._slot is not None:
            self._slot.in_flight += 1

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        slot = self._slot
        if slot is not None:
            slot.in_flight -= 1
            if (
                exc_type is not None
                and slot.released
                and issubclass(exc_type, anyio.get_cancelled_exc_class())
                and slot.name not in slot.run.cut_short
            ):
                slot.run.cut_short.append(slot.name)
            if slot.released and not slot.in_flight:
                slot.scope.cancel()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.__exit__(exc_type, exc, tb)
        if exc is None and self._slot is not None and self._slot.scope.cancel_called:
            # The service is stopping and this was the last thing holding the task: unwind now
            # rather than at whatever the task awaits next.
            await anyio.lowlevel.checkpoint()


class _Slot:
    """One background task of a running service, in its own cancel scope."""

    __slots__ = ("in_flight", "name", "released", "run", "scope", "task")

    def __init__(self, name: str, run: _Run) -> None:
        self.name = name
        self.run = run
        self.scope = anyio.CancelScope()
        self.in_flight = 0
        self.released = False
        self.task: anyio.TaskInfo | None = None

    def release(self) -> None:
        """The service is stopping: end now if idle, else when the in-flight work is done."""
        self.released = True
        if not self.in_flight:
            self.scope.cancel()


class _Run:
    """The scopes and bookkeeping of one run of a service (scopes are single-use)."""

    __slots__ = (
        "body_done",
        "crashing",
        "cut_short",
        "deadline_set",
        "has_resources",
        "inside",
        "on_start_done",
        "reported_started",
        "running_scope",
        "slots",
        "slots_done",
        "started_dependencies",
        "stop_requested",
        "stopping",
        "task",
        "task_group",
    )

    def __init__(self) -> None:
        self.running_scope: anyio.CancelScope | None = anyio.CancelScope()
        self.task_group: anyio.abc.TaskGroup | None = None
        self.stopping = anyio.Event()
        self.stop_requested = False
        self.crashing = False
        self.body_done = False
        self.deadline_set = False
        self.on_start_done = False
        self.has_resources = False
        # A dict as an ordered set: an empty one is a third of the size of an empty set.
        self.slots: dict[_Slot, None] = {}
        self.slots_done: anyio.Event | None = None
        self.started_dependencies: list[Service] = []
        self.cut_short: list[str] = []
        self.task: anyio.TaskInfo | None = None
        self.inside: tuple[Service, ...] = ()
        self.reported_started = False

    async def wait_slots_done(self) -> None:
        if self.slots:
            if self.slots_done is None:
                self.slots_done = anyio.Event()
            await self.slots_done.wait()

    @property
    def hard_scope(self) -> anyio.CancelScope:
        """The task group's own scope, whose deadline is the stop deadline."""
        assert self.task_group is not None, "the run's task group is not open yet"
        return self.task_group.cancel_scope


class _Resources:
    """The resources of a run: released even when the run is being cancelled (a crash).

    Release is shielded from the cancellation that a crash brings, but not from the stop
    deadline: a resource that takes longer than the grace period to close is cancelled.
    The exit stack is made on the first resource: most services hold none.
    """

    __slots__ = ("run", "stack")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.stack: AsyncExitStack | None = None

    def _stack(self) -> AsyncExitStack:
        if self.stack is None:
            self.stack = AsyncExitStack()
            self.run.has_resources = True
        return self.stack

    async def enter_async_context(self, manager: AbstractAsyncContextManager[Any]) -> Any:
        return await self._stack().enter_async_context(manager)

    def enter_context(self, manager: AbstractContextManager[Any]) -> Any:
        return self._stack().enter_context(manager)

    async def __aenter__(self) -> _Resources:
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack = self.stack
        if stack is None:
            return False
        if self.run.slots:
            # Cancelled (a crash, the deadline, or from outside): the tasks are unwinding
            # and may still use the resources in their cleanup. Tasks stop first, always;
            # this waits no longer than the task group's exit would have anyway.
            with anyio.CancelScope(shield=True):
                await self.run.wait_slots_done()
        suppressed = False
        with anyio.CancelScope(shield=True, deadline=self.run.hard_scope.deadline):
            suppressed = bool(await stack.__aexit__(*exc_info))
        return suppressed


class _Started:
    """A ``task_status`` that sets an event when the service reports RUNNING."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: anyio.Event | None = anyio.Event()

    def started(self, value: object = None) -> None:
        # The run keeps its task_status for its whole life: let the event go once used.
        event, self.event = self.event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        """Return once ``started()`` was called."""
        event = self.event
        if event is not None:
            await event.wait()


class _ServiceLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the service's name, whatever the handler's format."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['service']}] {msg}", kwargs  # type: ignore[index]


class Service:
    """A long-running async service whose running instance is an anyio task group.

    Subclass it, override the hooks you need (``on_first_start``, ``on_start``,
    ``on_started``, ``on_stop``, ``on_shutdown``), and mark methods with ``@task``,
    ``@timer`` or ``@crontab``. Then ``async with service:`` (returns once RUNNING, stops
    gracefully on exit), ``await tg.start(service.run)``, or ``anyservice.run(service)``.

    Names follow mode's ``Service`` where users come from it: ``add_dependency``,
    ``on_started``, ``crash_reason``, ``crash()``, ``add_future``, ``should_stop``.

    Attributes:
        name: The class name unless given; in every log line and error.
        shutdown_timeout: Grace period of a stop, in seconds (class attribute or argument).
        crash_reason: The exception that crashed the service, if it crashed.
        restart_count: How many times the service was restarted.
        diag: mode's diagnostic flags.
    """

    shutdown_timeout: float = 30.0
    #: Seconds between two health checks, for a service that overrides ``healthcheck()``.
    monitoring_interval: float = 10.0
    #: A health check that takes longer than this counts as failed.
    healthcheck_timeout: float = 5.0
    #: Level of the "starting/started/stopping/stopped" log lines.
    lifecycle_log_level: ClassVar[int] = logging.INFO

    _background_specs: ClassVar[tuple[_decorators.BackgroundSpec, ...]] = ()
    _requirement_methods: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._background_specs, cls._requirement_methods = _decorators.collect(cls)
        if cls.healthcheck is not Service.healthcheck:
            check_interval(cls.monitoring_interval, f"{cls.__name__}.monitoring_interval")
            check_interval(cls.healthcheck_timeout, f"{cls.__name__}.healthcheck_timeout")
            cls._background_specs = (*cls._background_specs, _HEALTH_MONITOR)
        if not isinstance(cls.__dict__.get("shutdown_timeout", 0.0), int | float):
            raise TypeError(f"{cls.__name__}.shutdown_timeout must be a number of seconds")

    def __init__(self, *, name: str | None = None, shutdown_timeout: float | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"a service name must be a non-empty str, got {name!r}")
        self.name: str = name or type(self).__name__
        if shutdown_timeout is not None:
            self.shutdown_timeout = _check_timeout(
                shutdown_timeout, f"{self.name}: shutdown_timeout"
            )
        else:
            _check_timeout(self.shutdown_timeout, f"{self.name}: shutdown_timeout")
        self.log = _ServiceLog(_library_log.getChild(self.name), {"service": self.name})
        self.diag = Diag(self.name)
        self.crash_reason: BaseException | None = None
        self.restart_count = 0
        #: Statistics of each ``@timer`` / ``@crontab``, by method name, while it runs.
        self.timer_stats: dict[str, TimerStats] = {}
        #: The result of the last health check, if one ran.
        self.last_health: Health | None = None
        self._state = ServiceState.INIT
        self._state_changed: anyio.Event | None = None
        self._dependencies: list[Service] = []
        self._owner: Service | None = None
        self._contexts: list[ContextSource] = []
        self._requirements_resolved = False
        self._started_once = False
        self._stop_before_start = False
        self._restart_requested = False
        self._pending_crash: BaseException | None = None
        self._run: _Run | None = None
        self._owner_group: anyio.abc.TaskGroup | None = None

    # ----------------------------------------------------------------- hooks

    async def on_first_start(self) -> None:
        """Called before ``on_start`` on the first start only (not on restarts)."""

    async def on_start(self) -> None:
        """Called when starting, after the dependencies are RUNNING."""

    async def on_started(self) -> None:
        """Called once the resources are entered and the background tasks started."""

    async def on_stop(self) -> None:
        """Called first when stopping, before the background tasks stop."""

    async def on_shutdown(self) -> None:
        """Called last when stopping: tasks stopped, resources released; dependencies still up."""

    async def healthcheck(self) -> None:
        """Raise (an ``UnhealthyError`` or anything else) to report the service unhealthy.

        Override it to get monitoring: it is called every ``monitoring_interval`` seconds
        while the service runs, bounded by ``healthcheck_timeout``, and a failure crashes the
        service with that reason, so a supervisor above restarts it (core_service's).
        """

    async def check_health(self) -> Health:
        """Run the health check now; returns the result (also kept in ``last_health``).

        A failing or hanging check gives an unhealthy result; it does not raise.
        """
        health = await run_healthcheck(self)
        self.last_health = health
        return health

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> ServiceState:
        return self._state

    @property
    def should_stop(self) -> bool:
        """True once a stop was requested (mode's idiom: ``while not self.should_stop:``)."""
        run = self._run
        if run is not None:
            return run.stop_requested
        return self._state is not ServiceState.INIT or self._stop_before_start

    @property
    def started(self) -> bool:
        """True while the service is RUNNING."""
        return self._state is ServiceState.RUNNING

    @property
    def dependencies(self) -> tuple[Service, ...]:
        return tuple(self._dependencies)

    def children(self) -> tuple[Service, ...]:
        """The services below this one in the tree: its dependencies (and a supervisor's
        children)."""
        return tuple(self._dependencies)

    def _set_state(self, new: ServiceState) -> None:
        check_transition(self.name, self._state, new)
        self._state = new
        event = self._state_changed
        if event is not None:
            self._state_changed = None
            event.set()

    async def wait_for(self, *states: ServiceState) -> ServiceState:
        """Wait until the service is in one of ``states`` and return that state.

        Bound it with ``anyio.fail_after``: a service that never gets there is waited for
        forever.
        """
        if not states:
            raise ValueError("wait_for() needs at least one state")
        while self._state not in states:
            if self._state_changed is None:
                self._state_changed = anyio.Event()
            await self._state_changed.wait()
        return self._state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._state.name}>"

    def describe(self) -> str:
        """One line for the tree dump: name, state, and what else the service wants shown."""
        parts = [f"{self.name} [{self._state.name}]"]
        if self.restart_count:
            parts.append(f"restarts={self.restart_count}")
        if self.last_health is not None:
            parts.append(f"health={self.last_health.describe()}")
        if self.diag.flags:
            parts.append("flags=" + ",".join(sorted(self.diag.flags)))
        if self._state is ServiceState.CRASHED and self.crash_reason is not None:
            parts.append(f"crash={type(self.crash_reason).__name__}: {self.crash_reason}")
        return " ".join(parts)

    def dump_tree(self) -> str:
        """A readable dump of this service and its dependencies: name, state, children."""
        return format_tree(self)

    # ------------------------------------------------------------ dependencies

    def add_dependency(self, service: Service) -> Service:
        """Add a dependency: started (RUNNING) before this service, stopped after it.

        Call it before the service starts (typically in ``__init__``); returns ``service``.

        Raises:
            ServiceError: if this service is running (use ``add_runtime_dependency``).
            ValueError: if ``service`` is this service, already a dependency of a service,
                or would make a cycle.
        """
        if self._state.is_active:
            raise ServiceError(
                f"{self.name}: add_dependency() is for services that are not running; "
                f"use 'await add_runtime_dependency(...)' while {self._state.name}"
            )
        self._adopt(service)
        self._dependencies.append(service)
        return service

    async def add_runtime_dependency(self, service: Service) -> Service:
        """Add a dependency to a running service: started at once, returns once RUNNING.

        Raises:
            ServiceError: if this service is not running.
            ValueError: as for ``add_dependency``.
        """
        run = self._run
        if self._state is not ServiceState.RUNNING or run is None or run.task_group is None:
            raise ServiceError(
                f"{self.name}: add_runtime_dependency() needs a RUNNING service "
                f"(it is {self._state.name}); use add_dependency() before start"
            )
        self._adopt(service)
        self._dependencies.append(service)
        try:
            await run.task_group.start(service.run, name=f"{service.name} (of {self.name})")
        except BaseException:
            self._disown(service)
            raise
        run.started_dependencies.append(service)
        return service

    async def remove_dependency(self, service: Service) -> None:
        """Stop ``service`` (if it runs) and remove it from the dependencies.

        Raises:
            ValueError: if ``service`` is not a dependency of this service.
        """
        if service not in self._dependencies:
            raise ValueError(f"{self.name}: {service.name!r} is not one of its dependencies")
        run = self._run
        if run is not None and service in run.started_dependencies:
            # Taken off the list first: a stop of this service meanwhile must not stop it
            # a second time, nor miss it.
            run.started_dependencies.remove(service)
        if service._run is not None:
            await service._stop()
        if service in self._dependencies:
            self._disown(service)

    def _adopt(self, service: Service, what: str = "dependency") -> None:
        """Make this service the owner of ``service`` in the tree."""
        if not isinstance(service, Service):
            raise TypeError(f"{self.name}: a {what} must be a Service, got {service!r}")
        if service is self:
            raise ValueError(f"{self.name}: a service cannot depend on itself")
        if service._owner is not None:
            raise ValueError(
                f"{self.name}: {service.name!r} already belongs to {service._owner.name!r}"
            )
        ancestor: Service | None = self
        while ancestor is not None:
            if ancestor is service:
                raise ValueError(f"{self.name}: depending on {service.name!r} makes a cycle")
            ancestor = ancestor._owner
        service._owner = self

    def _disown(self, service: Service) -> None:
        self._dependencies.remove(service)
        service._owner = None

    def _resolve_requirements(self) -> None:
        if self._requirements_resolved:
            return
        self._requirements_resolved = True
        for attribute in self._requirement_methods:
            for service in getattr(self, attribute)():
                self._adopt(service)
                self._dependencies.append(service)

    # --------------------------------------------------------------- resources

    def add_context(self, context: ContextSource) -> Any:
        """Register or enter a (sync or async) context manager as a resource of the service.

        Before start: entered at each start (after ``on_start``) and released at each stop;
        pass a zero-argument factory to get a fresh context manager per start. While starting
        or running (e.g. in ``on_start``): entered now, its value returned, released when
        this run stops. Resources are released exactly once, in reverse order, on a stop, a
        crash or a restart.
        """
        if self._run is None:
            return self._register_context(context)
        stack = self._live_resources()
        manager: Any = context
        if not hasattr(manager, "__enter__") and callable(manager):
            manager = manager()
        if not hasattr(manager, "__enter__"):
            raise TypeError(
                f"{self.name}: add_context() enters sync context managers while running; "
                f"use 'await add_async_context(...)' for {manager!r}"
            )
        return stack.enter_context(manager)

    async def add_async_context(self, context: ContextSource) -> Any:
        """Like ``add_context`` but awaitable: while running, enters now and returns the value."""
        run = self._run
        if run is None:
            return self._register_context(context)
        return await self._enter_context(self._live_resources(), context)

    def _live_resources(self) -> _Resources:
        stack = self._resources
        if stack is None:
            raise ServiceError(
                f"{self.name}: resources can be added before start, or from on_start() on "
                f"while running, not while {self._state.name}"
            )
        return stack

    def _register_context(self, context: ContextSource) -> None:
        if not (
            isinstance(context, AbstractAsyncContextManager | AbstractContextManager)
            or hasattr(context, "__aenter__")
            or hasattr(context, "__enter__")
            or callable(context)
        ):
            raise TypeError(f"{self.name}: not a context manager or a factory of one: {context!r}")
        self._contexts.append(context)

    _resources: _Resources | None = None

    @staticmethod
    async def _enter_context(stack: _Resources, context: ContextSource) -> Any:
        manager: Any = context
        if not hasattr(manager, "__aenter__") and not hasattr(manager, "__enter__"):
            manager = manager()
        if hasattr(manager, "__aenter__"):
            return await stack.enter_async_context(manager)
        if hasattr(manager, "__enter__"):
            return stack.enter_context(manager)
        raise TypeError(f"not a context manager: {manager!r}")

    # ------------------------------------------------------------ running

    async def __aenter__(self) -> Self:
        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(self.run, name=f"anyservice {self.name}")
        except BaseException as exc:
            if _only_cancellation(exc):
                await group.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            # The run is over, so the group holds nothing: raise the start's error as run()
            # raised it, not wrapped once more by this group.
            await group.__aexit__(None, None, None)
            raise
        self._owner_group = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        group = self._owner_group
        self._owner_group = None
        assert group is not None, "__aexit__ without __aenter__"
        self._request_stop()
        try:
            if exc is None or isinstance(exc, Exception):
                # The service stops gracefully; the block's own error, if any, leaves unwrapped.
                await group.__aexit__(None, None, None)
                return False
            return bool(await group.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group_error:
            # The owner group only wraps what run() raised: raise that, not a group of it.
            inner = group_error.exceptions
            if len(inner) == 1 and isinstance(inner[0], BaseExceptionGroup):
                raise inner[0] from group_error.__cause__
            raise

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until stopped: start, report RUNNING through ``task_status``, serve, stop.

        Works with ``await task_group.start(service.run)``, which returns once RUNNING.
        Returns when the service is STOPPED (a stop requested before start returns at once
        with nothing started).

        Raises:
            ServiceError: if the service is already running or was not initialised.
            BaseExceptionGroup: what crashed the service, as anyio's task group raises it.
        """
        if not hasattr(self, "_state"):
            raise ServiceError(f"{type(self).__name__}.__init__ did not call super().__init__()")
        if self._state.is_active or self._run is not None:
            raise ServiceError(f"{self.name} is already running ({self._state.name})")
        if self._stop_before_start:
            self._stop_before_start = False
            task_status.started()
            return
        while True:
            await self._run_once(task_status)
            task_status = anyio.TASK_STATUS_IGNORED
            if not self._restart_requested:
                return
            self._restart_requested = False
            self.restart_count += 1

    async def _run_once(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        run = _Run()
        self._run = run
        run.task = anyio.get_current_task()
        owner_run = self._owner._run if self._owner is not None else None
        run.inside = (*(owner_run.inside if owner_run is not None else _inside.get()), self)
        self.crash_reason = None
        self._pending_crash = None
        self._set_state(ServiceState.STARTING)
        self.log.log(self.lifecycle_log_level, "starting")
        token = _inside.set(run.inside)
        try:
            async with anyio.create_task_group() as task_group:
                run.task_group = task_group
                try:
                    await self._start_and_serve(run, task_status)
                except BaseException as exc:
                    if not _only_cancellation(exc):
                        self._note_crash(run)
                    raise
                finally:
                    await self._stop_dependencies(run)
                    # From here the task group only waits for its tasks: it takes no new
                    # ones (trio's nursery refuses them), so a late crash() is kept aside.
                    run.body_done = True
            if self._pending_crash is not None:
                raise self._pending_crash
        except BaseException as exc:
            self._resources = None
            self._run = None
            if _only_cancellation(exc):
                # Cancelled from outside (an enclosing scope): a stop, not a crash.
                self._finish_stopped("stopped (cancelled from outside)")
            else:
                self._record_crash(exc)
            raise
        finally:
            _inside.reset(token)
        self._resources = None
        self._run = None
        # With no grace period at all, cancelling is the stop itself, not worth a warning.
        if run.hard_scope.cancelled_caught and (run.cut_short or self.shutdown_timeout > 0):
            self.log.warning(
                "did not stop within shutdown_timeout=%ss; cancelled what was left%s",
                self.shutdown_timeout,
                f" (in flight: {', '.join(run.cut_short)})" if run.cut_short else "",
            )
        self._finish_stopped("stopped")
        if not run.reported_started:
            # tg.start() must not hang on a service whose start a stop cut short.
            task_status.started()

    def _finish_stopped(self, message: str) -> None:
        if self._state in (ServiceState.STARTING, ServiceState.RUNNING):
            self._set_state(ServiceState.STOPPING)
        self._set_state(ServiceState.STOPPED)
        self.log.log(self.lifecycle_log_level, message)

    async def _start_and_serve(self, run: _Run, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_group = run.task_group
        assert task_group is not None
        running_scope = run.running_scope
        assert running_scope is not None
        async with _Resources(run) as resources:
            self._resources = resources
            with running_scope:
                self._resolve_requirements()
                for dependency in list(self._dependencies):
                    await self._start_dependency(run, dependency)
                if not self._started_once:
                    self._started_once = True
                    await self._call_hook("on_first_start")
                await self._call_hook("on_start")
                run.on_start_done = True
                for context in self._contexts:
                    await self._enter_context(resources, context)
                for spec in self._background_specs:
                    for slot_name in spec.slot_names():
                        self._spawn_slot(run, slot_name, spec.run, self)
                await self._call_hook("on_started")
                if not run.stop_requested:
                    self._set_state(ServiceState.RUNNING)
                    self.log.log(self.lifecycle_log_level, "started")
                    run.reported_started = True
                    task_status.started()
            # Started (or cut short): from here a stop only sets the event, so the scope can
            # go, and with it what anyio keeps for it while the service runs.
            run.running_scope = None
            # An event rather than sleep_forever(): no timer to schedule per service.
            await run.stopping.wait()
            # A stop was requested: the start was cut short, or serving ends.
            if run.crashing:
                # The crash cancels this scope at the next checkpoint: no hooks to run.
                await anyio.lowlevel.checkpoint()
            if run.on_start_done:
                await self._call_hook("on_stop")
            await self._stop_slots(run)
            self._resources = None
        if run.on_start_done:
            await self._call_hook("on_shutdown")

    async def _start_dependency(self, run: _Run, dependency: Service) -> None:
        # start_soon and an event rather than task_group.start(): the same wait for RUNNING,
        # at a fraction of the cost of start()'s hand-over on trio. A crash of the dependency
        # reaches this service through the task group, which cancels this wait.
        started = _Started()
        run.started_dependencies.append(dependency)
        assert run.task_group is not None
        run.task_group.start_soon(
            functools.partial(dependency.run, task_status=started),
            name=f"{dependency.name} (of {self.name})",
        )
        await started.wait()

    async def _call_hook(self, hook: str) -> None:
        method = getattr(self, hook)
        if getattr(method, "__func__", None) is getattr(Service, hook):
            return  # not overridden: nothing to await, and thousands of idle services add up
        try:
            await method()
        except Exception as exc:
            exc.add_note(f"anyservice: raised in {hook}() of service {self.name!r}")
            raise

    # -------------------------------------------------------------- slots

    def _spawn_slot(
        self,
        run: _Run,
        name: str,
        body: Callable[..., Awaitable[None]],
        *args: Any,
    ) -> _Slot:
        slot = _Slot(name, run)
        run.slots[slot] = None
        assert run.task_group is not None
        run.task_group.start_soon(self._run_slot, slot, body, args, name=f"{self.name}.{name}")
        if run.stop_requested:
            slot.release()
        return slot

    async def _run_slot(
        self, slot: _Slot, body: Callable[..., Awaitable[None]], args: tuple[Any, ...]
    ) -> None:
        run = slot.run
        _inside.set(run.inside)
        _current_slot.set(slot)
        slot.task = anyio.get_current_task()
        try:
            with slot.scope:
                await body(*args, slot)
        except Exception as exc:
            exc.add_note(f"anyservice: raised in {slot.name!r} of service {self.name!r}")
            self._note_crash(run)
            raise
        finally:
            run.slots.pop(slot, None)
            if not run.slots and run.slots_done is not None:
                run.slots_done.set()

    async def _stop_slots(self, run: _Run) -> None:
        for slot in list(run.slots):
            slot.release()
        await run.wait_slots_done()

    def in_flight(self) -> _InFlight:
        """Mark work in flight: a stop lets it finish within the grace period.

        ``async with self.in_flight(): await handle(message)`` in a ``@task`` makes a stop
        wait (up to ``shutdown_timeout``) for the message in hand, then end the task.
        Outside a background task of a service it does nothing.
        """
        return _InFlight(_current_slot.get())

    def add_future(self, awaitable: Awaitable[Any], *, name: str | None = None) -> None:
        """Run ``awaitable`` in the service's scope; it stops with the service (mode's).

        An exception in it crashes the service.

        Raises:
            ServiceError: if the service is not starting or running.
        """
        if not isinstance(awaitable, Awaitable):
            raise TypeError(f"{self.name}: add_future() needs an awaitable, got {awaitable!r}")

        async def await_it(slot: _Slot) -> None:
            await awaitable

        self._spawn_extra(await_it, str(name or getattr(awaitable, "__qualname__", "future")))

    def spawn(self, function: Callable[[], Awaitable[Any]], *, name: str | None = None) -> None:
        """Start ``function()`` as an extra task in the service's scope; it stops with it.

        Raises:
            ServiceError: if the service is not starting or running.
        """

        async def call_it(slot: _Slot) -> None:
            await function()

        self._spawn_extra(call_it, str(name or getattr(function, "__name__", "task")))

    def _spawn_extra(self, body: Callable[[_Slot], Awaitable[None]], name: str) -> None:
        run = self._run
        if (
            run is None
            or run.task_group is None
            or self._state
            not in (
                ServiceState.STARTING,
                ServiceState.RUNNING,
            )
        ):
            raise ServiceError(f"{self.name}: can only add tasks while STARTING or RUNNING")
        self._spawn_slot(run, name, body)

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds``, or until a stop is requested, whichever comes first."""
        await self._sleep_until(anyio.current_time() + seconds)

    async def _sleep_until(self, deadline: float) -> bool:
        """Sleep until ``deadline``; False if a stop came first."""
        run = self._run
        if run is None:
            await anyio.sleep_until(deadline)
            return True
        with anyio.move_on_at(deadline):
            await run.stopping.wait()
            return False
        return True

    def itertimer(
        self,
        interval: float,
        *,
        policy: MissedTickPolicy | str = MissedTickPolicy.SKIP,
        exec_first: bool = False,
    ) -> AsyncIterator[float]:
        """``async for lateness in self.itertimer(5):`` — a drift-free timer inside a task.

        Ticks on the grid ``t0 + k * interval`` with the same missed-tick policies as
        ``@timer`` and yields each tick's lateness; ends when the service stops (mode's
        ``itertimer``).

        Raises:
            TypeError, ValueError: for a bad interval or policy (at the first iteration).
        """
        return itertimer(self, interval, policy=policy, exec_first=exec_first)

    # ----------------------------------------------------------------- stop

    def _request_stop(self, *, deadline: bool = True, sticky: bool = False) -> None:
        # A stop always wins over a pending restart.
        restarting, self._restart_requested = self._restart_requested, False
        run = self._run
        if run is None:
            if self._state is ServiceState.INIT:
                self._stop_before_start = True
                self._set_state(ServiceState.STOPPED)
            elif sticky and not restarting:
                # A run may be queued (task_group.start_soon(service.run)) but not begun:
                # the stop is kept for it, so that it ends at once instead of starting.
                self._stop_before_start = True
            return
        if run.stop_requested:
            return
        run.stop_requested = True
        if deadline:
            self._set_deadline(run)
        scope = run.running_scope
        if scope is not None and self._state is not ServiceState.RUNNING:
            # Still starting: cut the start short. Once RUNNING, the run task only waits
            # for the event below, so cancelling (which costs anyio a retry loop) is moot.
            scope.cancel()
        run.stopping.set()
        if self._state is not ServiceState.STOPPING:
            self._set_state(ServiceState.STOPPING)
            self.log.log(self.lifecycle_log_level, "stopping")

    def _set_deadline(self, run: _Run) -> None:
        if run.deadline_set:
            return
        run.deadline_set = True
        run.hard_scope.deadline = min(
            run.hard_scope.deadline, anyio.current_time() + self.shutdown_timeout
        )

    def _note_crash(self, run: _Run) -> None:
        # A crash also gets the grace period for what it has to tear down (resources,
        # dependencies), and no more.
        self._set_deadline(run)
        run.crashing = True

    async def stop(self, *, block: bool = True, timeout: float | None = None) -> bool:
        """Stop the service gracefully; return whether it is stopped.

        The service's idle tasks end at once; work in flight gets ``shutdown_timeout``;
        what is left then is cancelled. With ``block=True`` (the default) wait until STOPPED
        (or CRASHED), for at most ``timeout`` seconds (default: ``shutdown_timeout`` plus
        one second); if it did not stop in time, log the stuck tasks with their stacks and
        return False.

        Called from inside the service (one of its tasks or hooks, or a dependency's), it
        never waits for itself: it requests the stop and the calling task unwinds at its
        next checkpoint (a hook returns at once). Called while the service is not running,
        the stop is kept for its next run, which then ends at once without starting
        anything: so ``task_group.start_soon(service.run)`` followed by ``stop()`` never
        leaves it running.

        Raises:
            ValueError: for a negative or NaN ``timeout``.
        """
        return await self._stop(block=block, timeout=timeout, sticky=True)

    async def _stop(
        self, *, block: bool = True, timeout: float | None = None, sticky: bool = False
    ) -> bool:
        if timeout is not None:
            timeout = _check_timeout(timeout, f"{self.name}: stop(timeout=)")
        self._request_stop(sticky=sticky)
        if self in _inside.get():
            await self._unwind_caller()
            return self._state.is_final
        if not block:
            return self._state.is_final
        if self._state.is_final and self._run is None:
            return True
        wait = self.shutdown_timeout + 1.0 if timeout is None else timeout
        with anyio.move_on_after(wait):
            await self.wait_for(ServiceState.STOPPED, ServiceState.CRASHED)
            return True
        self._log_stuck(wait)
        return False

    @staticmethod
    async def _unwind_caller() -> None:
        """End the calling task of the service at this checkpoint (a hook just returns)."""
        slot = _current_slot.get()
        if slot is not None:
            slot.scope.cancel()
            await anyio.lowlevel.checkpoint()

    async def _stop_dependencies(self, run: _Run) -> None:
        started = run.started_dependencies
        while started:
            dependency = started.pop()
            if dependency._has_stop_work():
                await dependency._stop()
            else:
                # Nothing of it can observe the order (no hooks, tasks, resources or
                # dependencies): let it unwind with the others instead of waiting for it
                # alone; the task group's exit waits for all of them, within this
                # service's own deadline.
                dependency._request_stop(deadline=False)

    def _has_stop_work(self) -> bool:
        run = self._run
        if run is None:
            return False
        cls = type(self)
        return bool(
            run.slots
            or run.started_dependencies
            or run.has_resources
            or cls.on_stop is not Service.on_stop
            or cls.on_shutdown is not Service.on_shutdown
        )

    def _log_stuck(self, waited: float) -> None:
        stacks = self.tracebacks()
        self.log.error(
            "still not stopped after %ss (state %s); stuck tasks:\n%s",
            waited,
            self._state.name,
            "\n".join(f"--- {name}\n{stack}" for name, stack in stacks.items()) or "(none)",
        )

    async def restart(self) -> None:
        """Stop, then start again in fresh scopes; ``on_first_start`` is not re-run.

        Returns once RUNNING again. Called from inside the service, it requests the restart
        and the calling task unwinds like ``stop()``.

        Raises:
            ServiceError: if the service is not running, or the new start crashed.
        """
        if self._state is not ServiceState.RUNNING:
            raise ServiceError(
                f"{self.name}: restart() needs a RUNNING service, not {self._state.name}"
            )
        before = self.restart_count
        self._request_stop()
        self._restart_requested = True
        if self in _inside.get():
            await self._unwind_caller()
            return
        while True:
            state = self.state
            if self.restart_count > before and state is ServiceState.RUNNING:
                return
            if state is ServiceState.CRASHED:
                raise ServiceError(f"{self.name}: restart failed") from self.crash_reason
            if state is ServiceState.STOPPED and not self._restart_requested:
                raise ServiceError(f"{self.name}: restart interrupted: the service was stopped")
            await self.wait_for(*(set(ServiceState) - {state}))  # any change

    # ---------------------------------------------------------------- crash

    async def crash(self, reason: BaseException) -> None:
        """Crash the service on purpose with ``reason`` (mode's ``crash``).

        The exception leaves ``run()`` / ``async with`` as if a task had raised it.
        """
        if not isinstance(reason, BaseException):
            raise TypeError(f"{self.name}: crash() needs an exception, got {reason!r}")
        run = self._run
        if run is None:
            if self._state is ServiceState.CRASHED:
                self.crash_reason = reason  # already crashed: the newer reason stands
            else:
                self._record_crash(reason)
            return

        async def raise_it(slot: _Slot) -> None:
            raise reason

        if (
            run.task_group is not None
            and not run.body_done
            and not run.task_group.cancel_scope.cancel_called
        ):
            self._spawn_slot(run, "crash()", raise_it)
            if self in _inside.get():
                # The crash cancels the whole scope, the caller included.
                await anyio.sleep_forever()
        else:
            self._pending_crash = reason

    def _record_crash(self, exc: BaseException) -> None:
        reason = _first_real_error(exc)
        self.crash_reason = reason
        self._set_state(ServiceState.CRASHED)
        leaves = [
            leaf for leaf in _leaves(exc) if not isinstance(leaf, anyio.get_cancelled_exc_class())
        ]
        fresh = [leaf for leaf in leaves if not getattr(leaf, _LOGGED, False)]
        if fresh:
            for leaf in fresh:
                setattr(leaf, _LOGGED, True)
            self.log.error("crashed: %r", reason, exc_info=reason)
        else:
            self.log.error("crashed: %r (logged above)", reason)

    # ------------------------------------------------------------ diagnostics

    def tracebacks(self) -> dict[str, str]:
        """The current stack of each of the service's tasks, by task name, both backends."""
        stacks: dict[str, str] = {}
        run = self._run
        if run is None:
            return stacks
        if run.task is not None:
            stacks[f"{self.name} (main)"] = "".join(coroutine_stack(run.task.coro).format())
        for slot in list(run.slots):
            if slot.task is not None:
                stacks[f"{self.name}.{slot.name}"] = "".join(
                    coroutine_stack(slot.task.coro).format()
                )
        for child in self.children():
            stacks.update(child.tracebacks())
        return stacks

    # ------------------------------------------------------------ conveniences

    @classmethod
    def from_awaitable(
        cls,
        awaitable: Awaitable[Any] | Callable[[], Awaitable[Any]],
        *,
        name: str | None = None,
    ) -> Service:
        """A service that runs ``awaitable`` and stops when it completes (mode's).

        Pass a coroutine function (called at each start) for a service that may restart.
        """
        if not (isinstance(awaitable, Awaitable) or callable(awaitable)):
            raise TypeError(
                f"from_awaitable() needs an awaitable or a coroutine function, got {awaitable!r}"
            )
        return _AwaitableService(awaitable, name=name)


_HEALTH_MONITOR = HealthMonitorSpec()


class _AwaitableService(Service):
    def __init__(
        self, awaitable: Awaitable[Any] | Callable[[], Awaitable[Any]], *, name: str | None
    ) -> None:
        label = getattr(awaitable, "__qualname__", None) or getattr(awaitable, "__name__", None)
        super().__init__(name=name or label or "AwaitableService")
        self._awaitable = awaitable

    async def on_started(self) -> None:
        self.spawn(self._await_then_stop, name="awaitable")

    async def _await_then_stop(self) -> None:
        source = self._awaitable
        await (source if isinstance(source, Awaitable) else source())
        await self.stop()
