"""One run of a service: its scopes, its background slots, and its start/serve/stop sequence.

A run is single-use (so are anyio's scopes): each start, and each restart, makes a new one.
From the outside in, a run opens:

- the run's task group, hosting its dependencies' runs and its own background tasks; its
  cancel scope is the *hard* scope. Only the run itself cancels it or sets its deadline:
  ``now + shutdown_timeout`` when a stop is requested or the service crashes; whatever is
  left then is cancelled. A task that raises cancels it too (that is anyio's doing);
- the *running* scope, around the start only. Only :meth:`Run.request_stop` cancels it,
  and only while STARTING: a stop cuts the start short. Once RUNNING, the run waits on its
  ``stopping`` event, which a stop sets, so nothing needs cancelling to end serving;
- one *slot* scope per background task. Only the slot's release cancels it (at once if the
  task is idle, or when it leaves ``in_flight()``), or the task itself when it stops or
  restarts its own service from inside, so that it unwinds; the hard deadline cuts both
  short.

The run's :class:`~anyservice._core._state.RunPhase` moves forward only: STARTING (the
dependencies, ``on_start``, resources, tasks, ``on_started``), RUNNING (reported to the
caller), STOPPING (``on_stop``, the tasks end, ``on_shutdown``), CRASHING (a task or a hook
raised: no more hooks run, the task group is being cancelled), CLOSED (the body is over; the
task group takes no new task and only waits for its own, so a late ``crash()`` is kept aside
and raised once the group has closed). A stop requested is the ``stopping`` event, set once:
it may come in any phase, and the phase says what is left to undo.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, AsyncExitStack
from contextvars import ContextVar
from typing import Any, Protocol, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel

from ._exceptions import only_cancellation
from ._host import Host
from ._specs import BackgroundSpec
from ._state import RunPhase, ServiceState

__all__ = ["ContextSource", "InFlight", "Owner", "Run", "Slot", "Started", "current_run"]

ContextSource: TypeAlias = (
    AbstractAsyncContextManager[Any]
    | AbstractContextManager[Any]
    | Callable[[], AbstractAsyncContextManager[Any] | AbstractContextManager[Any]]
)

#: The services whose scope the current task runs in, innermost last.
_inside: ContextVar[tuple[Owner, ...]] = ContextVar("anyservice_inside", default=())
#: The slot the current task runs in, if it is a service's background task.
_current_slot: ContextVar[Slot | None] = ContextVar("anyservice_slot", default=None)


class Owner(Host, Protocol):
    """What a run needs from the service it runs (the concrete one is ``Service``)."""

    @property
    def shutdown_timeout(self) -> float: ...

    @property
    def lifecycle_log_level(self) -> int: ...

    @property
    def state(self) -> ServiceState: ...

    @property
    def _background_specs(self) -> tuple[BackgroundSpec, ...]: ...

    @property
    def _contexts(self) -> list[ContextSource]: ...

    @property
    def _owner(self) -> Owner | None: ...

    @property
    def _overridden_hooks(self) -> frozenset[str]: ...

    @property
    def wait_for_shutdown(self) -> bool: ...

    _run: Run | None
    _started_once: bool
    _pending_crash: BaseException | None
    crash_reason: BaseException | None
    restart_count: int

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None: ...

    def _dependencies_to_start(self) -> Sequence[Owner]: ...

    def _set_state(self, new: ServiceState) -> None: ...

    async def _wait_for_shutdown_flag(self) -> None: ...

    def _record_crash(self, exc: BaseException) -> None: ...

    def _request_stop(self, *, deadline: bool = True, sticky: bool = False) -> None: ...

    async def _stop(self, *, block: bool = True, timeout: float | None = None) -> bool: ...


def inside() -> tuple[Owner, ...]:
    """The services whose scope the calling task runs in, innermost last."""
    return _inside.get()


def current_slot() -> Slot | None:
    return _current_slot.get()


def current_run() -> Run | None:
    """The run whose background task (or hook) the calling task is, if any."""
    services = _inside.get()
    return services[-1]._run if services else None


def report_ready() -> None:
    """Tell the run that the calling background task is ready (see ``BackgroundSpec``)."""
    slot = _current_slot.get()
    if slot is not None:
        slot.set_ready()


async def sleep_until(run: Run | None, deadline: float) -> bool:
    """Sleep until ``deadline``, or until ``run`` is asked to stop; False if it was."""
    if run is None:
        await anyio.sleep_until(deadline)
        return True
    with anyio.move_on_at(deadline):
        await run.stopping.wait()
        return False
    return True


class InFlight:
    """``in_flight()``: work that a stop lets finish within the grace period."""

    __slots__ = ("_slot",)

    def __init__(self, slot: Slot | None) -> None:
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


class Slot:
    """One background task of a running service, in its own cancel scope."""

    __slots__ = ("in_flight", "name", "ready", "released", "run", "scope", "task")

    def __init__(self, name: str, run: Run) -> None:
        self.name = name
        self.run = run
        self.scope = anyio.CancelScope()
        self.in_flight = 0
        self.released = False
        self.task: anyio.TaskInfo | None = None
        #: Set when the task reports ready, for a spec that makes the start wait for it.
        self.ready: anyio.Event | None = None

    def release(self) -> None:
        """The service is stopping: end now if idle, else when the in-flight work is done."""
        self.released = True
        if not self.in_flight:
            self.scope.cancel()

    def set_ready(self) -> None:
        if self.ready is not None:
            self.ready.set()


class Resources:
    """The resources of a run: released even when the run is being cancelled (a crash).

    Release is shielded from the cancellation that a crash brings, but not from the stop
    deadline: a resource that takes longer than the grace period to close is cancelled.
    The exit stack is made on the first resource: most services hold none.
    """

    __slots__ = ("run", "stack")

    def __init__(self, run: Run) -> None:
        self.run = run
        self.stack: AsyncExitStack | None = None

    def _stack(self) -> AsyncExitStack:
        if self.stack is None:
            self.stack = AsyncExitStack()
        return self.stack

    async def enter(self, context: ContextSource) -> Any:
        """Enter ``context`` (a context manager, sync or async, or a factory of one)."""
        manager: Any = context
        if not hasattr(manager, "__aenter__") and not hasattr(manager, "__enter__"):
            manager = manager()
        if hasattr(manager, "__aenter__"):
            return await self._stack().enter_async_context(manager)
        if hasattr(manager, "__enter__"):
            return self._stack().enter_context(manager)
        raise TypeError(f"not a context manager: {manager!r}")

    def enter_sync(self, manager: AbstractContextManager[Any]) -> Any:
        return self._stack().enter_context(manager)

    def push_async(self, stack: AsyncExitStack) -> None:
        """Close ``stack`` with the other resources (it needs no entering)."""
        self._stack().push_async_exit(stack.__aexit__)

    async def __aenter__(self) -> Resources:
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


class Started:
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


class _Handover:
    """The caller's ``task_status``, told at most once that the service is RUNNING."""

    __slots__ = ("task_status",)

    def __init__(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.task_status: anyio.abc.TaskStatus[None] | None = task_status

    def started(self) -> None:
        status, self.task_status = self.task_status, None
        if status is not None:
            status.started()


class Run:
    """The scopes and bookkeeping of one run of a service, and its sequence."""

    __slots__ = (
        "cut_short",
        "inside",
        "live_resources",
        "phase",
        "resources",
        "restarted",
        "running_scope",
        "service",
        "slots",
        "slots_done",
        "started_dependencies",
        "stopping",
        "task",
        "task_group",
    )

    def __init__(self, service: Owner) -> None:
        self.service = service
        self.phase = RunPhase.STARTING
        #: True if this run follows an earlier one of the service (a restart).
        self.restarted = False
        self.running_scope: anyio.CancelScope | None = anyio.CancelScope()
        self.task_group: anyio.abc.TaskGroup | None = None
        #: Set once, by the first stop request: the one signal that serving should end.
        self.stopping = anyio.Event()
        # A dict as an ordered set: an empty one is a third of the size of an empty set.
        self.slots: dict[Slot, None] = {}
        self.slots_done: anyio.Event | None = None
        self.started_dependencies: list[Owner] = []
        self.cut_short: list[str] = []
        self.task: anyio.TaskInfo | None = None
        self.inside: tuple[Owner, ...] = ()
        self.resources = Resources(self)
        #: The resources while they may still be added to: from the start until the tasks
        #: have stopped.
        self.live_resources: Resources | None = None

    # ------------------------------------------------------------ questions

    @property
    def hard_scope(self) -> anyio.CancelScope:
        """The task group's own scope, whose deadline is the stop deadline."""
        assert self.task_group is not None, "the run's task group is not open yet"
        return self.task_group.cancel_scope

    @property
    def stop_requested(self) -> bool:
        return self.stopping.is_set()

    @property
    def takes_tasks(self) -> bool:
        """True while the task group may be given new tasks."""
        return (
            self.task_group is not None
            and self.phase is not RunPhase.CLOSED
            and not self.task_group.cancel_scope.cancel_called
        )

    def has_stop_work(self) -> bool:
        """True if anything of this run can observe the order its stop comes in."""
        service = self.service
        return bool(
            self.slots
            or self.started_dependencies
            or self.resources.stack is not None
            or "on_stop" in service._overridden_hooks
            or "on_shutdown" in service._overridden_hooks
        )

    def stop_deadline(self) -> float:
        """When what is left of the run is cancelled: set by a stop or a crash."""
        if self.task_group is None or self.hard_scope.deadline == float("inf"):
            return anyio.current_time() + self.service.shutdown_timeout
        return self.hard_scope.deadline

    # ------------------------------------------------------------ the sequence

    async def execute(self, task_status: anyio.abc.TaskStatus[None], *, restart: bool) -> None:
        """Run start to stop in this task; ``restart``: it follows an earlier run.

        Raises:
            BaseException: what crashed the run, as the task group raises it.
        """
        service = self.service
        if restart and service._started_once:
            # The one place restarts are counted, whoever asked for the restart.
            service.restart_count += 1
            self.restarted = True
        service._run = self
        service.crash_reason = None
        service._pending_crash = None
        service._set_state(ServiceState.STARTING)
        service.log.log(service.lifecycle_log_level, "starting")
        handover = _Handover(task_status)
        try:
            await self._run_scoped(handover)
            if service._pending_crash is not None:
                raise service._pending_crash
        except BaseException as exc:
            service._run = None
            if only_cancellation(exc):
                # Cancelled from outside (an enclosing scope): a stop, not a crash.
                self._finish_stopped("stopped (cancelled from outside)")
            else:
                service._record_crash(exc)
            raise
        service._run = None
        # With no grace period at all, cancelling is the stop itself, not worth a warning.
        if self.hard_scope.cancelled_caught and (self.cut_short or service.shutdown_timeout > 0):
            service.log.warning(
                "did not stop within shutdown_timeout=%ss; cancelled what was left%s",
                service.shutdown_timeout,
                f" (in flight: {', '.join(self.cut_short)})" if self.cut_short else "",
            )
        self._finish_stopped("stopped")
        # tg.start() must not hang on a service whose start a stop cut short.
        handover.started()

    def _finish_stopped(self, message: str) -> None:
        service = self.service
        if service.state in (ServiceState.STARTING, ServiceState.RUNNING):
            service._set_state(ServiceState.STOPPING)
        service._set_state(ServiceState.STOPPED)
        service.log.log(service.lifecycle_log_level, message)

    async def _run_scoped(self, handover: _Handover) -> None:
        service = self.service
        self.task = anyio.get_current_task()
        owner = service._owner
        owner_run = owner._run if owner is not None else None
        self.inside = (*(owner_run.inside if owner_run is not None else _inside.get()), service)
        token = _inside.set(self.inside)
        try:
            async with anyio.create_task_group() as task_group:
                self.task_group = task_group
                try:
                    await self._start_and_serve(handover)
                except BaseException as exc:
                    if not only_cancellation(exc):
                        self.note_crash()
                    raise
                finally:
                    await self._stop_dependencies()
                    # From here the task group only waits for its tasks: it takes no new
                    # ones (trio's nursery refuses them), so a late crash() is kept aside.
                    self.phase = RunPhase.CLOSED
        finally:
            _inside.reset(token)

    async def _start_and_serve(self, handover: _Handover) -> None:
        async with self.resources as resources:
            self.live_resources = resources
            hooked = await self._start(handover)
            # Started (or cut short): from here a stop only sets the event, so the scope can
            # go, and with it what anyio keeps for it while the service runs.
            self.running_scope = None
            # An event rather than sleep_forever(): no timer to schedule per service.
            await self.stopping.wait()
            # A stop was requested: the start was cut short, or serving ends.
            if self.phase is RunPhase.CRASHING:
                # The crash cancels this scope at the next checkpoint: no hooks to run.
                await anyio.lowlevel.checkpoint()
            served = self.phase is RunPhase.RUNNING
            self._advance(RunPhase.STOPPING)
            if hooked:
                await self._call_hook("on_stop")
            if served and self.service.wait_for_shutdown:
                # mode's: the tasks go on until one says they are done (or the deadline).
                await self.service._wait_for_shutdown_flag()
            await self._stop_slots()
            self.live_resources = None
        if hooked:
            await self._call_hook("on_shutdown")

    async def _start(self, handover: _Handover) -> bool:
        """Start, in the running scope; returns whether ``on_start`` completed."""
        service = self.service
        hooked = False
        assert self.running_scope is not None
        with self.running_scope:
            if self.restarted:
                await self._call_hook("on_restart")
            for dependency in service._dependencies_to_start():
                await self._start_dependency(dependency)
            if not service._started_once:
                service._started_once = True
                await self._call_hook("on_first_start")
            await self._call_hook("on_start")
            hooked = True
            for context in service._contexts:
                await self.resources.enter(context)
            await self._start_background()
            await self._call_hook("on_started")
            if not self.stop_requested:
                self._advance(RunPhase.RUNNING)
                service._set_state(ServiceState.RUNNING)
                service.log.log(service.lifecycle_log_level, "started")
                handover.started()
        return hooked

    async def _start_background(self) -> None:
        waits: list[Slot] = []
        for spec in self.service._background_specs:
            for slot_name in spec.slot_names():
                slot = self.spawn(slot_name, spec.run, self.service)
                if spec.reports_ready:
                    slot.ready = anyio.Event()
                    waits.append(slot)
        for slot in waits:
            await slot.ready.wait()  # type: ignore[union-attr]  # set just above

    async def _start_dependency(self, dependency: Owner) -> None:
        # start_soon and an event rather than task_group.start(): the same wait for RUNNING,
        # at a fraction of the cost of start()'s hand-over on trio. A crash of the dependency
        # reaches this service through the task group, which cancels this wait.
        started = Started()
        self.started_dependencies.append(dependency)
        assert self.task_group is not None
        self.task_group.start_soon(
            functools.partial(dependency.run, task_status=started),
            name=f"{dependency.name} (of {self.service.name})",
        )
        await started.wait()

    async def _call_hook(self, hook: str) -> None:
        service = self.service
        if hook not in service._overridden_hooks:
            return  # nothing to await, and thousands of idle services add up
        try:
            await getattr(service, hook)()
        except Exception as exc:
            exc.add_note(f"anyservice: raised in {hook}() of service {service.name!r}")
            raise

    def _advance(self, phase: RunPhase) -> None:
        if phase > self.phase:
            self.phase = phase

    # ------------------------------------------------------------ stop and crash

    def request_stop(self, *, deadline: bool = True) -> bool:
        """Begin the stop: cut a start short, end serving. False if already requested."""
        if self.stopping.is_set():
            return False
        if deadline:
            self.set_deadline()
        scope = self.running_scope
        if scope is not None and self.phase is RunPhase.STARTING:
            # Still starting: cut the start short. Once RUNNING, the run task only waits
            # for the event below, so cancelling (which costs anyio a retry loop) is moot.
            scope.cancel()
        self.stopping.set()
        return True

    def set_deadline(self) -> None:
        scope = self.hard_scope
        # min(): a second stop or a crash never pushes the deadline back.
        scope.deadline = min(scope.deadline, anyio.current_time() + self.service.shutdown_timeout)

    def note_crash(self) -> None:
        # A crash also gets the grace period for what it has to tear down (resources,
        # dependencies), and no more.
        self.set_deadline()
        self._advance(RunPhase.CRASHING)

    async def _stop_dependencies(self) -> None:
        started = self.started_dependencies
        while started:
            dependency = started.pop()
            dependency_run = dependency._run
            if dependency_run is not None and dependency_run.has_stop_work():
                await dependency._stop()
            elif dependency_run is not None:
                # Nothing of it can observe the order (no hooks, tasks, resources or
                # dependencies): let it unwind with the others instead of waiting for it
                # alone; the task group's exit waits for all of them, within this
                # service's own deadline.
                dependency._request_stop(deadline=False)

    # ------------------------------------------------------------ slots

    def spawn(self, name: str, body: Callable[..., Awaitable[None]], *args: Any) -> Slot:
        """Run ``body(*args)`` as a background task of this run, in its own slot."""
        slot = Slot(name, self)
        self.slots[slot] = None
        assert self.task_group is not None
        self.task_group.start_soon(
            self._run_slot, slot, body, args, name=f"{self.service.name}.{name}"
        )
        if self.stop_requested:
            slot.release()
        return slot

    async def _run_slot(
        self, slot: Slot, body: Callable[..., Awaitable[None]], args: tuple[Any, ...]
    ) -> None:
        _inside.set(self.inside)
        _current_slot.set(slot)
        slot.task = anyio.get_current_task()
        try:
            with slot.scope:
                await body(*args)
        except Exception as exc:
            exc.add_note(f"anyservice: raised in {slot.name!r} of service {self.service.name!r}")
            self.note_crash()
            raise
        finally:
            # A start that waits for this task must not wait for one that ended.
            slot.set_ready()
            self.slots.pop(slot, None)
            if not self.slots and self.slots_done is not None:
                self.slots_done.set()

    async def _stop_slots(self) -> None:
        for slot in list(self.slots):
            slot.release()
        await self.wait_slots_done()

    async def wait_slots_done(self) -> None:
        if self.slots:
            if self.slots_done is None:
                self.slots_done = anyio.Event()
            await self.slots_done.wait()
