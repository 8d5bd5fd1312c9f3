"""The Service: a running service *is* an anyio task group with a cancel scope around it.

``Service`` is the public face: hooks, and public methods of a few lines each. One run's
scopes and its start/serve/stop sequence are a :class:`~anyservice._core._run.Run`; the
service's place in the tree is a :class:`~anyservice._core._tree.Tree`.

The machinery never calls a name a subclass may override by accident: the names it relies
on are reserved (a subclass that defines one gets a ``TypeError`` when the class is defined,
an instance attribute one at the assignment), and only the hooks are meant to be overridden.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import Any, ClassVar, Self

import anyio
import anyio.abc
import anyio.lowlevel

from .. import _hooks
from .._checks import Seconds, check_delay, check_optional_seconds, check_seconds
from .._schedule import TimerStats, check_interval
from ._backend import current_loop, task_coroutine
from ._compat import Compat
from ._diag import coroutine_stack, format_tree
from ._exceptions import first_real_error, is_logged, mark_logged, only_cancellation, real_leaves
from ._health import HealthMonitorSpec, run_healthcheck
from ._run import (
    ContextSource,
    InFlight,
    Resources,
    Run,
    current_slot,
    inside,
    live_resources,
    sleep_until,
)
from ._specs import BackgroundSpec, collect
from ._state import ALLOWED, Health, Pending, ServiceError, ServiceState, check_transition
from ._tree import Tree

__all__ = ["RESERVED", "Service", "adopt", "run_as_restart", "stop_service"]

_library_log = logging.getLogger("anyservice")

_HOOKS = ("on_first_start", "on_start", "on_started", "on_stop", "on_shutdown", "on_restart")
#: What a subclass may override: the hooks, what the tree dump shows, and mode's labels.
OVERRIDABLE = frozenset(
    {*_HOOKS, "healthcheck", "monitoring_task", "describe", "children", "label", "shortlabel"}
    | {"Diag"}
)


class _ServiceLog(logging.LoggerAdapter[logging.Logger]):
    """The library logger, with the service's name in each record and each line.

    Every service logs through the one ``anyservice`` logger (a logger per name would live
    as long as the process), with ``extra["service"]`` set, so a ``%(service)s`` format or
    a filter can tell them apart; the ``[name]`` prefix keeps lines readable under a format
    that does not show it. A caller's own ``extra`` is kept beside it.
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra: Any = self.extra
        given = kwargs.get("extra")
        kwargs["extra"] = extra if not given else {**given, **extra}
        return f"[{extra['service']}] {msg}", kwargs


def _log_lifecycle(service: Service, message: str) -> None:
    # Most services log nothing but their lifecycle, at a level that is usually off: the
    # adapter is not made for them.
    if _library_log.isEnabledFor(service.lifecycle_log_level):
        service.log.log(service.lifecycle_log_level, message)


def _run_coroutine(
    service: Service, task_status: anyio.abc.TaskStatus[None]
) -> Coroutine[Any, Any, None]:
    # What an owner runs a dependency with: straight into the run, so the task holds one
    # frame less for as long as the service runs, unless the class replaces run().
    if type(service).run is Service.run:
        return _run_service(service, task_status, restart=False)
    return service.run(task_status=task_status)


def _check_grace(value: object, what: str) -> float:
    # A stop must end: the grace period is finite, and 0 cancels work in flight at once.
    return check_seconds(value, what, allow_zero=True)


class Service(Compat):
    """A long-running async service whose running instance is an anyio task group.

    Subclass it, override the hooks you need (``on_first_start``, ``on_start``,
    ``on_started``, ``on_stop``, ``on_shutdown``, ``healthcheck``), and mark methods with
    ``@task``, ``@timer`` or ``@crontab``. Then ``async with service:`` (returns once
    RUNNING, stops gracefully on exit), ``await tg.start(service.run)``, or
    ``anyservice.run(service)``.

    Names follow mode's ``Service`` where users come from it: ``add_dependency``,
    ``on_started``, ``crash_reason``, ``crash()``, ``add_future``, ``should_stop``; the rest
    of mode's, Prefect's and core_service's (``wait()``, ``request_stop()``...) from ``Compat``.

    The other public methods and properties are the service's machinery: a subclass that
    defines one (``run``, ``stop``, ``sleep``, ``spawn``, ``log``, ``state``, ...) gets a
    ``TypeError`` when the class is defined, and ``self.log = ...`` one at the assignment.
    To replace one on purpose (wrapping ``run()``, say), name it in the class keyword
    ``overrides``: ``class Worker(Service, overrides=("run",))``.

    Attributes:
        name: The class name unless given; in every log line and error.
        shutdown_timeout: Grace period of a stop, in seconds (class attribute or argument;
            a number, a ``timedelta`` or a numeric string, finite: a stop must end).
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

    _background_specs: ClassVar[tuple[BackgroundSpec, ...]] = ()
    _requirement_methods: ClassVar[tuple[str, ...]] = ()
    _overridden_hooks: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, *, overrides: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _prepare_subclass(cls, overrides)

    def __init__(self, *, name: str | None = None, shutdown_timeout: Seconds | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"a service name must be a non-empty str, got {name!r}")
        self.name: str = name or type(self).__name__
        # Also checks a value assigned to the instance before super().__init__().
        self.shutdown_timeout = _check_grace(
            self.shutdown_timeout if shutdown_timeout is None else shutdown_timeout,
            f"{self.name}: shutdown_timeout",
        )
        self._log: _ServiceLog | None = None  # made at the first line logged
        self.diag = self.Diag(self.name)
        self.crash_reason: BaseException | None = None
        self.restart_count = 0
        #: Statistics of each ``@timer`` / ``@crontab``, by method name, while it runs.
        self.timer_stats: dict[str, TimerStats] = {}
        #: The result of the last health check, if one ran.
        self.last_health: Health | None = None
        self._state = ServiceState.INIT
        self._state_changed: anyio.Event | None = None
        self._tree = Tree(self, _requirements_of(self) if self._requirement_methods else None)
        # A tuple until the first resource is registered: most services hold none.
        self._contexts: Sequence[ContextSource] = ()
        self._started_once = False
        self._pending = Pending.NOTHING
        self._pending_crash: BaseException | None = None
        self._run: Run | None = None
        self._owner_group: anyio.abc.TaskGroup | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RESERVED:
            _refuse_attribute(self, name)
        object.__setattr__(self, name, value)

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

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """The service's logger (mode's ``log``, core_service's ``log``).

        Records go to the ``anyservice`` logger with ``record.service`` set to the
        service's name (so ``%(service)s`` works in a format); each line starts with
        ``[name]``.
        """
        if self._log is None:
            self._log = _ServiceLog(_library_log, {"service": self.name})
        return self._log

    _log_lifecycle = _log_lifecycle
    _run_coroutine = _run_coroutine

    @property
    def state(self) -> ServiceState:
        return self._state

    @property
    def should_stop(self) -> bool:
        """True once a stop was requested (mode's idiom: ``while not self.should_stop:``)."""
        run = self._run
        if run is not None:
            return run.stop_requested
        return self._state is not ServiceState.INIT or self._pending is Pending.STOP

    @property
    def started(self) -> bool:
        """True while the service is RUNNING."""
        return self._state is ServiceState.RUNNING

    @property
    def _stop_before_start(self) -> bool:
        return self._pending is Pending.STOP

    @property
    def stop_deadline(self) -> float:
        """When a stop of the running service cancels what is left (backend clock).

        Set by a stop request or a crash; before either, ``now + shutdown_timeout``.
        """
        run = self._run
        if run is None:
            return anyio.current_time() + self.shutdown_timeout
        return run.stop_deadline()

    @property
    def dependencies(self) -> tuple[Service, ...]:
        return tuple(self._tree.dependencies)  # type: ignore[arg-type]  # nodes are Services

    def children(self) -> tuple[Service, ...]:
        """The services below this one in the tree: its dependencies (and a supervisor's
        children)."""
        return self.dependencies

    def _set_state(self, new: ServiceState) -> None:
        if new not in ALLOWED[self._state]:
            check_transition(self.name, self._state, new)  # raises, naming both
        # Not a reserved name: past __setattr__'s check, on every change of every service.
        object.__setattr__(self, "_state", new)
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
        return _describe(self)

    def dump_tree(self) -> str:
        """A readable dump of this service and its dependencies: name, state, children."""
        return format_tree(self)

    def add_dependency(self, service: Service) -> Service:
        """Add a dependency: started (RUNNING) before this service, stopped after it.

        Call it before the service starts (typically in ``__init__``); returns ``service``.

        Raises:
            ServiceError: if this service is running (use ``add_runtime_dependency``).
            ValueError: if ``service`` is this service, already a dependency of a service,
                or would make a cycle.
        """
        self._tree.add(service)
        return service

    async def add_runtime_dependency(self, service: Service) -> Service:
        """Add a dependency to a running service: started at once, returns once RUNNING.

        Raises:
            ServiceError: if this service is not running.
            ValueError: as for ``add_dependency``.
        """
        await self._tree.add_runtime(service)
        return service

    async def remove_dependency(self, service: Service) -> None:
        """Stop ``service`` (if it runs) and remove it from the dependencies.

        Raises:
            ValueError: if ``service`` is not a dependency of this service.
        """
        await self._tree.remove(service)

    @property
    def _owner(self) -> Service | None:
        return self._tree.owner  # type: ignore[return-value]  # nodes are Services

    def _dependencies_to_start(self) -> list[Service]:
        return self._tree.to_start()  # type: ignore[return-value]  # nodes are Services

    def _has_dependencies(self) -> bool:
        """True if a start would start dependencies (``@requirements`` counted unresolved)."""
        tree = self._tree
        return bool(tree.dependencies) or tree.requirements is not None

    def add_context(self, context: ContextSource) -> Any:
        """Register or enter a (sync or async) context manager as a resource of the service.

        Before start: entered at each start (after ``on_start``) and released at each stop;
        pass a zero-argument factory to get a fresh context manager per start. While starting
        or running (e.g. in ``on_start``): entered now, its value returned, released when
        this run stops. Resources are released exactly once, in reverse order, on a stop, a
        crash or a restart.
        """
        return _add_context(self, context)

    async def add_async_context(self, context: ContextSource) -> Any:
        """Like ``add_context`` but awaitable: while running, enters now and returns the value."""
        if self._run is None:
            return _register_context(self, context)
        return await _live_resources(self).enter(context)

    async def __aenter__(self) -> Self:
        self._owner_group = await _enter(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        group, self._owner_group = self._owner_group, None
        assert group is not None, "__aexit__ without __aenter__"
        return await _exit(self, group, exc_type, exc, tb)

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
        await _run_service(self, task_status, restart=False)

    def in_flight(self) -> InFlight:
        """Mark work in flight: a stop lets it finish within the grace period.

        ``async with self.in_flight(): await handle(message)`` in a ``@task`` makes a stop
        wait (up to ``shutdown_timeout``) for the message in hand, then end the task.
        Outside a background task of a service it does nothing.
        """
        return InFlight(current_slot())

    def add_future(self, awaitable: Awaitable[Any], *, name: str | None = None) -> None:
        """Run ``awaitable`` in the service's scope; it stops with the service (mode's).

        An exception in it crashes the service.

        Raises:
            ServiceError: if the service is not starting or running.
        """
        _add_future(self, awaitable, name)

    def spawn(self, function: Callable[[], Awaitable[Any]], *, name: str | None = None) -> None:
        """Start ``function()`` as an extra task in the service's scope; it stops with it.

        Raises:
            ServiceError: if the service is not starting or running.
        """
        _spawn_extra(self, function, str(name or getattr(function, "__name__", "task")))

    async def sleep(self, seconds: Seconds) -> None:
        """Sleep ``seconds`` (mode's ``Seconds``; negative: no wait) or until a stop comes.

        Raises:
            TypeError, ValueError: for a ``seconds`` that is not a duration, or NaN.
        """
        delay = check_delay(seconds, f"{self.name}: sleep() seconds")
        await self._sleep_until(anyio.current_time() + delay)

    async def _sleep_until(self, deadline: float) -> bool:
        """Sleep until ``deadline``; False if a stop came first."""
        return await sleep_until(self._run, deadline)

    def _request_stop(self, *, deadline: bool = True, sticky: bool = False) -> None:
        """The one way a stop begins, whoever asks for it (``stop()``, ``async with``, ...)."""
        _request_stop(self, deadline=deadline, sticky=sticky)

    async def stop(self, block: bool = True, *, timeout: Seconds | None = None) -> bool:
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

        ``block`` may be given by position, as Prefect's ``stop(block)`` takes it.

        Raises:
            TypeError, ValueError: for a ``timeout`` (mode's ``Seconds``; ``inf`` waits for
                as long as the stop takes) that is not a duration, negative or NaN.
        """
        return await self._stop(block=block, timeout=timeout, sticky=True)

    async def _stop(
        self, *, block: bool = True, timeout: Seconds | None = None, sticky: bool = False
    ) -> bool:
        """Request a stop and, with ``block``, wait for it (what policies call)."""
        return await _stop(self, block=block, timeout=timeout, sticky=sticky)

    async def restart(self) -> None:
        """Stop, then start again in fresh scopes; ``on_first_start`` is not re-run.

        Returns once RUNNING again. Called from inside the service, it requests the restart
        and the calling task unwinds like ``stop()``.

        Raises:
            ServiceError: if the service is not running, or the new start crashed.
        """
        await _restart(self)

    async def crash(self, reason: BaseException) -> None:
        """Crash the service on purpose with ``reason`` (mode's ``crash``).

        The exception leaves ``run()`` / ``async with`` as if a task had raised it.
        """
        await _crash(self, reason)

    def _record_crash(self, exc: BaseException) -> None:
        _record_crash(self, exc)

    def tracebacks(self) -> dict[str, str]:
        """The current stack of each of the service's tasks, by task name, both backends."""
        return _tracebacks(self)

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
        return _AwaitableService(awaitable, name=name)


Tree.node_type = Service
_HEALTH_MONITOR = HealthMonitorSpec()

#: The names a subclass may not define, nor an instance attribute take, unless declared in
#: ``overrides``: every public method and property of Service that is not a hook.
RESERVED = frozenset(
    name
    for klass in Service.__mro__[:-1]
    for name, value in vars(klass).items()
    if not name.startswith("_")
    and name not in OVERRIDABLE
    and (isinstance(value, property | classmethod | staticmethod) or callable(value))
)


def _prepare_subclass(cls: type[Service], overrides: Iterable[str]) -> None:
    _check_shadowing(cls, overrides)
    cls._background_specs, cls._requirement_methods = collect(cls)
    if "abstract" not in cls.__dict__:
        cls.abstract = False  # only the class that says so is abstract, not its subclasses
    elif cls.abstract:
        cls.__new__ = _refuse_abstract  # type: ignore[method-assign,assignment]  # a staticmethod-like __new__
    if cls.healthcheck is not Service.healthcheck or (
        cls.monitoring_task is not Service.monitoring_task
    ):
        # Kept as floats, so that a timedelta or "10" class attribute works as a number.
        cls.monitoring_interval = check_interval(
            cls.monitoring_interval, f"{cls.__name__}.monitoring_interval"
        )
        cls.healthcheck_timeout = check_interval(
            cls.healthcheck_timeout, f"{cls.__name__}.healthcheck_timeout"
        )
        cls._background_specs = (*cls._background_specs, _HEALTH_MONITOR)
    if "shutdown_timeout" in cls.__dict__:
        cls.shutdown_timeout = _check_grace(
            cls.shutdown_timeout, f"{cls.__name__}.shutdown_timeout"
        )
    # Hooks not overridden are not awaited: thousands of idle services add up.
    cls._overridden_hooks = frozenset(
        hook for hook in _HOOKS if getattr(cls, hook) is not getattr(Service, hook)
    )


def _refuse_abstract(cls: type[Service], *args: Any, **kwargs: Any) -> Service:
    # Installed only on a class that says ``abstract = True``; its subclasses inherit it
    # but are not abstract unless they say so too.
    if cls.__dict__.get("abstract", False):
        raise TypeError(
            f"{cls.__name__} is abstract (abstract = True): instantiate a subclass of it"
        )
    return object.__new__(cls)


async def _enter(service: Service) -> anyio.abc.TaskGroup:
    """``async with service``: run it in a task group of its own; returns once RUNNING."""
    group = anyio.create_task_group()
    await group.__aenter__()
    try:
        await group.start(service.run, name=f"anyservice {service.name}")
    except BaseException as exc:
        if only_cancellation(exc):
            await group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        # The run is over, so the group holds nothing: raise the start's error as run()
        # raised it, not wrapped once more by this group.
        await group.__aexit__(None, None, None)
        raise
    return group


async def _exit(
    service: Service,
    group: anyio.abc.TaskGroup,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> bool:
    """Leaving ``async with service``: stop it gracefully and wait for its run to end."""
    service._request_stop()
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


def _spawn_extra(service: Service, body: Callable[[], Awaitable[Any]], name: str) -> None:
    run = service._run
    if (
        run is None
        or (run.task_group is None and run.bare is None)
        or service._state not in (ServiceState.STARTING, ServiceState.RUNNING)
    ):
        raise ServiceError(f"{service.name}: can only add tasks while STARTING or RUNNING")
    run.spawn(name, body)


def _describe(service: Service) -> str:
    parts = [f"{service.name} [{service._state.name}]"]
    if service.restart_count:
        parts.append(f"restarts={service.restart_count}")
    if service.last_health is not None:
        parts.append(f"health={service.last_health.describe()}")
    if service.diag.flags:
        parts.append("flags=" + ",".join(sorted(service.diag.flags)))
    if service._state is ServiceState.CRASHED and service.crash_reason is not None:
        parts.append(f"crash={type(service.crash_reason).__name__}: {service.crash_reason}")
    return " ".join(parts)


def _add_future(service: Service, awaitable: Awaitable[Any], name: str | None) -> None:
    if not isinstance(awaitable, Awaitable):
        raise TypeError(f"{service.name}: add_future() needs an awaitable, got {awaitable!r}")

    async def await_it() -> None:
        await awaitable

    _spawn_extra(service, await_it, str(name or getattr(awaitable, "__qualname__", "future")))


def _refuse_attribute(service: Service, name: str) -> None:
    raise TypeError(
        f"{type(service).__name__}: 'self.{name} = ...' would hide Service.{name}, "
        f"which the service relies on; store it under another name "
        f"(e.g. 'self.{name}_' or 'self.my_{name}')"
    )


def _requirements_of(service: Service) -> Callable[[], list[Service]]:
    def requirements() -> list[Service]:
        found: list[Service] = []
        for method in service._requirement_methods:
            given = getattr(service, method)()
            found.extend([given] if isinstance(given, Service) else given)
        return found

    return requirements


def _check_shadowing(cls: type, overrides: Iterable[str]) -> None:
    allowed = frozenset((overrides,) if isinstance(overrides, str) else overrides)
    unknown = allowed - RESERVED
    if unknown:
        raise ValueError(
            f"{cls.__name__}: overrides= names what Service does not reserve: "
            f"{', '.join(sorted(unknown))}; only these need it: {', '.join(sorted(RESERVED))}"
        )
    for name in cls.__dict__:
        if name in RESERVED and name not in allowed:
            raise TypeError(
                f"{cls.__name__}.{name} hides Service.{name}, which the service machinery "
                f"relies on; rename it (e.g. '{name}_'), or, to replace it on purpose, "
                f"declare 'class {cls.__name__}(..., overrides=({name!r},))'"
            )


async def _unwind_caller() -> None:
    """End the calling task of the service at this checkpoint (a hook just returns)."""
    slot = current_slot()
    if slot is not None and slot.scope is not None:
        slot.scope.cancel()
        await anyio.lowlevel.checkpoint()


async def stop_service(service: Service) -> bool:
    """Stop ``service`` and wait until it is STOPPED, for a policy that runs it.

    Unlike ``stop()``, a stop that finds it not running is not kept for its next run: a
    policy restarts what it stopped.
    """
    return await service._stop()


def adopt(owner: Service, service: Service, what: str) -> None:
    """Make ``owner`` the owner of ``service`` in the tree (a supervisor's child, say).

    Raises:
        TypeError: if ``service`` is not a Service.
        ValueError: if it is ``owner``, belongs to another service, or would make a cycle.
    """
    owner._tree.adopt(service, what)


def run_as_restart(
    service: Service,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ended: Callable[[BaseException | None], object] | None = None,
) -> Coroutine[Any, Any, None]:
    """``service.run()`` for a policy that restarts it: counted in ``restart_count``.

    The run's coroutine itself, to await: no frame of its own, held as long as it runs.
    With ``ended``, the run's end is told to it rather than raised: ``ended(None)`` once
    it returns, ``ended(error)`` once it raised an ``Exception`` (which the coroutine then
    does not raise), ``ended(exc)`` for anything else (a cancellation), which it then
    raises. A policy that would catch these around the run needs no frame of its own.
    """
    return _run_service(service, task_status, restart=True, ended=ended)


async def _run_service(
    service: Service,
    task_status: anyio.abc.TaskStatus[None],
    *,
    restart: bool,
    ended: Callable[[BaseException | None], object] | None = None,
) -> None:
    error: BaseException | None = None
    try:
        if not hasattr(service, "_state"):
            raise ServiceError(f"{type(service).__name__}.__init__ did not call super().__init__()")
        if service._state.is_active or service._run is not None:
            raise ServiceError(f"{service.name} is already running ({service._state.name})")
        if service._pending is Pending.STOP:
            service._pending = Pending.NOTHING
            task_status.started()
            return
        if service._contexts:
            _check_resources_reusable(service)
        owner = service._tree.owner
        # A dependency runs in its owner's loop: only the root of a tree asks which it is.
        # Not a reserved name: written past __setattr__'s check of them.
        object.__setattr__(
            service,
            "_loop",
            owner._loop if owner is not None and owner._run is not None else current_loop(),
        )
        while True:
            await Run(service).execute(task_status, restart=restart)
            task_status = anyio.TASK_STATUS_IGNORED
            if service._pending is not Pending.RESTART:
                return
            service._pending = Pending.NOTHING
            restart = True
    except BaseException as exc:
        if ended is None:
            raise
        error = exc
        if not isinstance(exc, Exception):
            raise
    finally:
        if ended is not None:
            ended(error)


def _add_context(service: Service, context: ContextSource) -> Any:
    if service._run is None:
        return _register_context(service, context)
    resources = _live_resources(service)
    manager: Any = context
    if not hasattr(manager, "__enter__") and callable(manager):
        manager = manager()
    if not hasattr(manager, "__enter__"):
        raise TypeError(
            f"{service.name}: add_context() enters sync context managers while running; "
            f"use 'await add_async_context(...)' for {manager!r}"
        )
    return resources.enter_sync(manager)


def _live_resources(service: Service) -> Resources:
    resources = live_resources(service._run)
    if resources is None:
        raise ServiceError(
            f"{service.name}: resources can be added before start, or from on_start() on "
            f"while running, not while {service._state.name}"
        )
    return resources


def _register_context(service: Service, context: ContextSource) -> None:
    if not (
        isinstance(context, AbstractAsyncContextManager | AbstractContextManager)
        or hasattr(context, "__aenter__")
        or hasattr(context, "__enter__")
        or callable(context)
    ):
        raise TypeError(f"{service.name}: not a context manager or a factory of one: {context!r}")
    if hasattr(context, "__aenter__") or hasattr(context, "__enter__"):
        context = _EnteredOnce(service.name, context)
    service._contexts = [*service._contexts, context]


class _EnteredOnce:
    """A context manager given as an instance: it serves the first start only.

    Most context managers (every ``@contextmanager`` one) cannot be entered twice; a
    second start gets an error that says which resource, and how to get one per start.
    """

    __slots__ = ("manager", "service_name", "used")

    def __init__(self, service_name: str, manager: Any) -> None:
        self.service_name = service_name
        self.manager = manager
        self.used = False

    def __call__(self) -> Any:
        if self.used:
            raise ServiceError(
                f"{self.service_name}: the resource {self.manager!r} was given to "
                f"add_context() as a context manager, which serves one start only; this "
                f"service starts again, so pass a factory that makes a fresh one each time "
                f"(add_context(make_it), or add_context(lambda: ...))"
            )
        self.used = True
        return self.manager


def _check_resources_reusable(service: Service) -> None:
    for context in service._contexts:
        if isinstance(context, _EnteredOnce) and context.used:
            context()  # raises, naming the resource


def _request_stop(service: Service, *, deadline: bool = True, sticky: bool = False) -> None:
    """The one way a stop begins, whoever asks for it (``stop()``, ``async with``, ...)."""
    # A stop always wins over a pending restart.
    restarting = service._pending is Pending.RESTART
    if restarting:
        service._pending = Pending.NOTHING
    run = service._run
    if run is None:
        if service._state is ServiceState.INIT:
            service._pending = Pending.STOP
            service._set_state(ServiceState.STOPPED)
        elif sticky and not restarting:
            # A run may be queued (task_group.start_soon(service.run)) but not begun:
            # the stop is kept for it, so that it ends at once instead of starting.
            service._pending = Pending.STOP
        return
    if run.request_stop(deadline=deadline) and service._state is not ServiceState.STOPPING:
        service._set_state(ServiceState.STOPPING)
        service._log_lifecycle("stopping")


async def _stop(
    service: Service, *, block: bool = True, timeout: Seconds | None = None, sticky: bool = False
) -> bool:
    """Request a stop and, with ``block``, wait for it (what policies call)."""
    # How long the caller waits, not the stop's own deadline: inf may wait for ever.
    wait_for = check_optional_seconds(
        timeout, f"{service.name}: stop(timeout=)", allow_zero=True, allow_infinite=True
    )
    service._request_stop(sticky=sticky)
    if service in inside():
        await _unwind_caller()
        return service._state.is_final
    if not block:
        return service._state.is_final
    if service._state.is_final and service._run is None:
        return True
    wait = service.shutdown_timeout + 1.0 if wait_for is None else wait_for
    with anyio.move_on_after(wait):
        await service.wait_for(ServiceState.STOPPED, ServiceState.CRASHED)
        return True
    _log_stuck(service, wait)
    return False


def _log_stuck(service: Service, waited: float) -> None:
    stacks = service.tracebacks()
    service.log.error(
        "still not stopped after %ss (state %s); stuck tasks:\n%s",
        waited,
        service._state.name,
        "\n".join(f"--- {name}\n{stack}" for name, stack in stacks.items()) or "(none)",
    )


async def _restart(service: Service) -> None:
    if service._state is not ServiceState.RUNNING:
        raise ServiceError(
            f"{service.name}: restart() needs a RUNNING service, not {service._state.name}"
        )
    before = service.restart_count
    service._request_stop()
    service._pending = Pending.RESTART
    if service in inside():
        await _unwind_caller()
        return
    while True:
        state = service.state
        if service.restart_count > before and state is ServiceState.RUNNING:
            return
        if state is ServiceState.CRASHED:
            raise ServiceError(f"{service.name}: restart failed") from service.crash_reason
        if state is ServiceState.STOPPED and service._pending is not Pending.RESTART:
            raise ServiceError(f"{service.name}: restart interrupted: the service was stopped")
        await service.wait_for(*(set(ServiceState) - {state}))  # any change


async def _crash(service: Service, reason: BaseException) -> None:
    if not isinstance(reason, BaseException):
        raise TypeError(f"{service.name}: crash() needs an exception, got {reason!r}")
    run = service._run
    if run is None:
        if service._state is ServiceState.CRASHED:
            service.crash_reason = reason  # already crashed: the newer reason stands
        else:
            service._record_crash(reason)
        return

    async def raise_it() -> None:
        raise reason

    if run.takes_tasks:
        run.spawn("crash()", raise_it)
        if service in inside():
            # The crash cancels the whole scope, the caller included.
            await anyio.sleep_forever()
    else:
        service._pending_crash = reason


def _record_crash(service: Service, exc: BaseException) -> None:
    reason = first_real_error(exc)
    service.crash_reason = reason
    service._set_state(ServiceState.CRASHED)
    if _hooks.service_crash is not None:
        _hooks.service_crash(service, reason)
    fresh = [leaf for leaf in real_leaves(exc) if not is_logged(leaf)]
    if fresh:
        for leaf in fresh:
            mark_logged(leaf)
        service.log.error("crashed: %r", reason, exc_info=reason)
    else:
        service.log.error("crashed: %r (logged above)", reason)


def _tracebacks(service: Service) -> dict[str, str]:
    stacks: dict[str, str] = {}
    run = service._run
    if run is None:
        return stacks
    if run.task is not None:
        stacks[f"{service.name} (main)"] = "".join(
            coroutine_stack(task_coroutine(run.task)).format()
        )
    for slot in [*run.slots, *([run.inline] if run.inline is not None else [])]:
        if slot.task is not None:
            stacks[f"{service.name}.{slot.name}"] = "".join(
                coroutine_stack(task_coroutine(slot.task)).format()
            )
    for child in service.children():
        stacks.update(child.tracebacks())
    return stacks


class _AwaitableService(Service):
    def __init__(
        self, awaitable: Awaitable[Any] | Callable[[], Awaitable[Any]], *, name: str | None
    ) -> None:
        if not (isinstance(awaitable, Awaitable) or callable(awaitable)):
            raise TypeError(
                f"from_awaitable() needs an awaitable or a coroutine function, got {awaitable!r}"
            )
        label = getattr(awaitable, "__qualname__", None) or getattr(awaitable, "__name__", None)
        super().__init__(name=name or label or "AwaitableService")
        self._awaitable = awaitable

    async def on_started(self) -> None:
        self.spawn(self._await_then_stop, name="awaitable")

    async def _await_then_stop(self) -> None:
        source = self._awaitable
        await (source if isinstance(source, Awaitable) else source())
        await self._stop(sticky=True)
