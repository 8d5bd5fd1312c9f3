"""Markers that turn methods into a service's background work.

The decorators only attach a spec to the function; :class:`~anyservice.Service` collects
the specs when the class is defined and runs them in its scope when it starts. A spec knows
how to run itself for one service instance, so timers and cron jobs (and anything else that
runs for the life of a service) plug in beside plain tasks without the core knowing them.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar, overload

import anyio

from .._checks import Seconds, check_coroutine_function, check_count
from .._schedule import check_interval
from ._host import Host

__all__ = [
    "BackgroundSpec",
    "TaskSpec",
    "attach_spec",
    "check_name",
    "collect",
    "requirements",
    "task",
]

_SPEC_ATTRIBUTE = "__anyservice_spec__"
_REQUIREMENTS_ATTRIBUTE = "__anyservice_requirements__"

F = TypeVar("F", bound=Callable[..., Any])
AsyncMethod = Callable[[Any], Awaitable[None]]


class BackgroundSpec:
    """How one decorated method runs for the life of a service.

    Subclasses say how many copies run (:meth:`slot_names`) and what each copy does
    (:meth:`run`). Each copy runs in its own slot: cancelled at once when the service stops,
    unless it is inside ``service.in_flight()``, which gets the grace period.
    """

    kind = "task"
    #: True for work the start waits for: the service reports RUNNING only once each copy
    #: has called ``report_ready()`` (or ended).
    reports_ready = False
    #: False for work that runs no code of the user's while idle (a timer between ticks):
    #: cancelling it then cannot be observed, so its stop need not wait its turn.
    idle_runs_user_code = True
    #: True for a spec whose ``run`` enters its slot's scope itself, through
    #: ``serving_scope()``, once it is due (a timer: see ``idle_until``).
    enters_own_scope = False

    def __init__(self, function: AsyncMethod) -> None:
        self.function = function
        self.name: str = getattr(function, "__name__", repr(function))

    def slot_names(self) -> list[str]:
        return [self.name]

    def prepare_bare(self, service: Host, now: float) -> tuple[float, object] | None:
        """For a task that can wait for its first due time before its run opens a task group.

        ``now`` is the backend's clock, read for it.

        Returns that time (backend clock, later than now) and the state the task goes on
        from, for :meth:`resume_bare`; None for a task that cannot (the default). The run
        keeps the state while it waits: no callable is made for it.
        """
        return None

    def resume_bare(self, service: Host, state: object, due_now: bool) -> Coroutine[Any, Any, None]:
        """Run the task from the state :meth:`prepare_bare` gave, once its run needs it.

        ``due_now``: the due time has come (False: the run needs a task group earlier, and
        the task waits the rest itself).
        """
        raise NotImplementedError

    async def run(self, service: Host) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"


class TaskSpec(BackgroundSpec):
    """A ``@task``: a coroutine method that runs for the life of the service."""

    def __init__(
        self,
        function: AsyncMethod,
        *,
        workers: int = 1,
        periodic: bool = False,
        sleep_interval: Seconds | None = None,
    ) -> None:
        super().__init__(function)
        workers = check_count(workers, f"@task {self.name!r}: workers", minimum=1)
        if periodic:
            if sleep_interval is None:
                raise ValueError(f"@task {self.name!r}: periodic=True needs a sleep_interval")
            sleep_interval = check_interval(sleep_interval, f"@task {self.name!r} sleep_interval")
        elif sleep_interval is not None:
            raise ValueError(f"@task {self.name!r}: sleep_interval only applies with periodic=True")
        self.workers = workers
        self.periodic = periodic
        self.sleep_interval = sleep_interval

    def slot_names(self) -> list[str]:
        if self.workers == 1:
            return [self.name]
        return [f"{self.name}[{index}]" for index in range(self.workers)]

    async def run(self, service: Host) -> None:
        method = self.function.__get__(service)
        if not self.periodic:
            await method()
            return
        interval = self.sleep_interval
        assert interval is not None
        assert math.isfinite(interval)
        # core_service's periodic task: the body is work in flight, the sleep between is idle.
        while True:
            async with service.in_flight():
                await method()
            await anyio.sleep(interval)


@overload
def task(function: F, /) -> F: ...


@overload
def task(
    *, workers: int = 1, periodic: bool = False, sleep_interval: Seconds | None = None
) -> Callable[[F], F]: ...


def task(
    function: F | None = None,
    /,
    *,
    workers: int = 1,
    periodic: bool = False,
    sleep_interval: Seconds | None = None,
) -> F | Callable[[F], F]:
    """Run a coroutine method for the life of the service (mode's and core_service's ``@task``).

    ``workers=N`` runs N copies. ``periodic=True, sleep_interval=S`` runs the body again
    ``S`` seconds after each run ends (core_service's form; for a drift-free grid use
    ``@timer``). When the service stops, a task is cancelled at once unless it is inside
    ``async with self.in_flight():``. An exception in a task crashes the service.

    Raises:
        ValueError: for ``workers < 1`` or a missing or bad ``sleep_interval``.
        TypeError: if the decorated object is not a coroutine function.
    """

    def decorate(func: F) -> F:
        check_coroutine_function(func, "@task method")
        setattr(
            func,
            _SPEC_ATTRIBUTE,
            TaskSpec(func, workers=workers, periodic=periodic, sleep_interval=sleep_interval),
        )
        return func

    if function is not None:
        return decorate(function)
    return decorate


RequirementsMethod = Callable[[Any], Host | Iterable[Host]]


@overload
def requirements(function: RequirementsMethod, /) -> RequirementsMethod: ...


@overload
def requirements(*needs: str) -> Callable[[RequirementsMethod], RequirementsMethod]: ...


def requirements(
    *needs: RequirementsMethod | str,
) -> RequirementsMethod | Callable[[RequirementsMethod], RequirementsMethod]:
    """Declare dependencies with a method returning services (core_service's ``@requirements``).

    ``@requirements``, ``@requirements()`` and ``@requirements("db", "cache")``: the method
    returns a service or an iterable of services; it is called once, at the service's first
    start, and what it returns is added as dependencies after those added with
    ``add_dependency``. The names are other ``@requirements`` methods of the class whose
    services this method's must follow: methods are resolved in that dependency order (and
    otherwise in the order the class defines them), so ``db``'s services start first.

    Raises:
        TypeError: for a name that is not a str, or a decorated object that is not callable.
        ValueError: when the class is defined, for a name that is not a ``@requirements``
            method of the class, or names that make a cycle.
    """
    if len(needs) == 1 and callable(needs[0]):
        return _mark_requirements(needs[0], ())
    names: list[str] = []
    for name in needs:
        if not isinstance(name, str) or not name:
            raise TypeError(f"@requirements() takes method names (str), got {name!r}")
        names.append(name)

    def decorate(function: RequirementsMethod) -> RequirementsMethod:
        return _mark_requirements(function, tuple(names))

    return decorate


def _mark_requirements(function: object, needs: tuple[str, ...]) -> RequirementsMethod:
    if not callable(function):
        raise TypeError(f"@requirements needs a method, got {function!r}")
    setattr(function, _REQUIREMENTS_ATTRIBUTE, needs)
    return function


def order_requirements(owner: str, needs: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The requirement methods in dependency order: each after the methods it names.

    Raises:
        ValueError: for a name that is not one of the methods, or a cycle.
    """
    ordered: dict[str, None] = {}
    visiting: list[str] = []

    def visit(method: str) -> None:
        if method in ordered:
            return
        if method in visiting:
            cycle = " -> ".join([*visiting[visiting.index(method) :], method])
            raise ValueError(f"{owner}: @requirements make a cycle: {cycle}")
        visiting.append(method)
        for name in needs[method]:
            if name not in needs:
                raise ValueError(
                    f"{owner}.{method}: @requirements({name!r}) names no @requirements "
                    f"method of {owner}; known: {', '.join(needs) or '(none)'}"
                )
            visit(name)
        visiting.pop()
        ordered[method] = None

    for method in needs:
        visit(method)
    return tuple(ordered)


def check_name(name: object, what: str) -> None:
    """Raise unless ``name`` is None or a non-empty str.

    Raises:
        TypeError: if it is not a str.
        ValueError: if it is empty.
    """
    if name is None:
        return
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {name!r}")
    if not name:
        raise ValueError(f"{what} must not be empty")


def attach_spec(func: F, spec: BackgroundSpec) -> F:
    """Mark ``func`` with ``spec`` (used by ``@timer`` and ``@crontab``)."""
    setattr(func, _SPEC_ATTRIBUTE, spec)
    return func


def collect(namespace_owner: type) -> tuple[tuple[BackgroundSpec, ...], tuple[str, ...]]:
    """The background specs and requirement methods of a class, base classes first.

    A subclass that redefines a name without a decorator removes the base's spec.
    """
    specs: dict[str, BackgroundSpec] = {}
    requirement_methods: dict[str, tuple[str, ...]] = {}
    for klass in reversed(namespace_owner.__mro__):
        for attribute, value in vars(klass).items():
            spec = getattr(value, _SPEC_ATTRIBUTE, None)
            if isinstance(spec, BackgroundSpec):
                specs[attribute] = spec
            else:
                specs.pop(attribute, None)
            needs = getattr(value, _REQUIREMENTS_ATTRIBUTE, None)
            if isinstance(needs, tuple):
                requirement_methods[attribute] = needs
            else:
                requirement_methods.pop(attribute, None)
    return tuple(specs.values()), order_requirements(namespace_owner.__name__, requirement_methods)
