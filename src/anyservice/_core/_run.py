"""One run of a service: its scopes, its background slots, and its start/serve/stop sequence.

A run is single-use (so are anyio's scopes): each start, and each restart, makes a new one.
From the outside in, a run opens:

- the run's task group, hosting its dependencies' runs and its own background tasks; its
  cancel scope is the *hard* scope. Only the run itself cancels it or sets its deadline:
  ``now + shutdown_timeout`` when a stop is requested or the service crashes; whatever is
  left then is cancelled. A task that raises cancels it too (that is anyio's doing);
- the *running* scope, around the start only, and only for a start that can await (one
  that runs no code of the user's never does). Only :meth:`Run.request_stop` cancels it,
  and only while STARTING: a stop cuts the start short. Once RUNNING, the run waits on its
  stop request (:meth:`Run.wait_stopping`), so nothing needs cancelling to end serving;
- one *slot* scope per background task, which runs in a task of its own, or, for a
  service whose one task no hook runs beside (no ``on_started``, no ``on_stop``), in the
  run's own task once RUNNING. Only the slot's release cancels it (at once if the task
  is idle, or when it leaves ``in_flight()``), or the task itself when it stops or
  restarts its own service from inside, so that it unwinds; the hard deadline cuts both
  short. A stop with no ``on_stop`` to run first releases the slots at once. A timer run
  in the run's own task enters its slot's scope only at its first tick: until then it
  idles on its owner's timer wheel, which a release wakes (see :func:`idle_until`).

A dependency whose only work is such a timer (no hooks, resources or dependencies) waits
for its first tick *bare*, before opening its task group (see :func:`_enter_bare`): nothing
of it runs meanwhile that needs one. So does a dependency with no work at all, for its
stop. A stop then ends it without one; a task given to it (``spawn()``, ``crash()``), a
resource or a runtime dependency, or the tick, opens it, and the run goes on as any other
from there.

The run's :class:`~anyservice._core._state.RunPhase` moves forward only: STARTING (the
dependencies, ``on_start``, resources, tasks, ``on_started``), RUNNING (reported to the
caller), STOPPING (``on_stop``, the tasks end, ``on_shutdown``), CRASHING (a task or a hook
raised: no more hooks run, the task group is being cancelled), CLOSED (the body is over; the
task group takes no new task and only waits for its own, so a late ``crash()`` is kept aside
and raised once the group has closed). A stop requested is the ``stop_requested`` flag, set once:
it may come in any phase, and the phase says what is left to undo.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, AsyncExitStack
from contextvars import ContextVar
from typing import Any, Protocol, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel

from .. import _hooks
from ._backend import Waiter, clock, current_task, new_waiter
from ._exceptions import only_cancellation
from ._host import Host
from ._specs import BackgroundSpec
from ._state import RunPhase, ServiceState
from ._wheel import Wheel

__all__ = [
    "ContextSource",
    "Countdown",
    "InFlight",
    "Owner",
    "Run",
    "Slot",
    "Started",
    "current_run",
    "idle_released",
    "idle_until",
    "live_resources",
    "open_task_group",
    "serving_scope",
    "start_beside",
    "start_is_observable",
    "started_dependencies",
    "unwind_unobservable",
]

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
    def _contexts(self) -> Sequence[ContextSource]: ...

    @property
    def _owner(self) -> Owner | None: ...

    @property
    def _overridden_hooks(self) -> frozenset[str]: ...

    @property
    def wait_for_shutdown(self) -> bool: ...

    _run: Run | None
    _loop: object
    _started_once: bool
    _pending_crash: BaseException | None
    crash_reason: BaseException | None
    restart_count: int

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None: ...

    def _run_coroutine(
        self, task_status: anyio.abc.TaskStatus[None]
    ) -> Coroutine[Any, Any, None]: ...

    def _dependencies_to_start(self) -> Sequence[Owner]: ...

    def _has_dependencies(self) -> bool: ...

    def _set_state(self, new: ServiceState) -> None: ...

    async def _wait_for_shutdown_flag(self) -> None: ...

    def _record_crash(self, exc: BaseException) -> None: ...

    def _log_lifecycle(self, message: str) -> None: ...

    def _request_stop(self, *, deadline: bool = True, sticky: bool = False) -> None: ...

    async def _stop(self, *, block: bool = True, timeout: float | None = None) -> bool: ...


def inside() -> tuple[Owner, ...]:
    """The services whose scope the calling task runs in, innermost last."""
    return _inside.get()


def current_slot() -> Slot | None:
    """The slot the calling task runs in, if it is a service's background task."""
    slot = _current_slot.get()
    services = _inside.get()
    if not services or (slot is not None and slot.run.service is services[-1]):
        return slot
    # Not a task of the innermost service's (a service run inside a task of another's
    # sees that one's slot): unless it is the one task that its run's own task runs,
    # which is not marked in the context (setting a context variable costs a copy of
    # the task's context, for every service).
    run = services[-1]._run
    return run.inline if run is not None else None


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
        await run.wait_stopping()
        return False
    return True


def idle_until(deadline: float) -> Awaitable[object]:
    """Idle until ``deadline`` (backend clock) in a background task, or until released.

    Await what it returns, then ask :func:`idle_released` whether the wait ended because
    the task was released (a stop) rather than due. Not a coroutine of its own: a timer
    holds its wait for as long as it idles, and a frame less is about 0.3 KiB less.

    The one task of a service that has an owner, run in its run's own task (a timer's),
    waits on its owner's timer wheel (:mod:`~anyservice._core._wheel`), which a release
    wakes early; any other task sleeps, and a release cancels it as usual.
    """
    slot = current_slot()
    if slot is None:
        return anyio.sleep_until(deadline)
    if slot.released:
        return anyio.lowlevel.checkpoint()  # released before it entered its scope
    wheel = _owner_wheel(slot.run) if slot is slot.run.inline else None
    delay = deadline - anyio.current_time()
    if wheel is None or delay <= 0:
        if slot.scope is not None:
            return anyio.sleep(max(delay, 0.0))
        return _sleep_in_own_scope(slot, max(delay, 0.0))
    woken = slot.waker = new_waiter(slot.run.service._loop)
    wheel.wake_at(deadline, woken)
    return woken.wait()


def idle_released() -> bool:
    """After the wait of :func:`idle_until`: True if it ended because the task is released."""
    slot = current_slot()
    if slot is None:
        return False
    waker, slot.waker = slot.waker, None
    if not slot.released:
        return False
    if waker is not None:
        wheel = _owner_wheel(slot.run)
        if wheel is not None:
            wheel.woken_early()
    return True


async def _sleep_in_own_scope(slot: Slot, delay: float) -> None:
    # Not in its scope yet (see serving_scope): one for this sleep alone, which a release
    # cancels.
    scope = slot.scope = anyio.CancelScope()
    try:
        with scope:
            await anyio.sleep(delay)
    finally:
        slot.scope = None


def serving_scope() -> AbstractContextManager[Any]:
    """The scope of the calling task's slot, for a task that enters it only once due.

    A spec whose task enters no scope while it idles on a timer wheel
    (``BackgroundSpec.enters_own_scope``: nothing there needs cancelling, a release wakes
    it) enters this before its first body, and stays in it: from there a release, a stop
    from inside or the end of the grace period cancels it as any slot's. A task already in
    its slot's scope gets a context that does nothing.
    """
    slot = current_slot()
    if slot is None or slot.scope is not None:
        return _NO_SCOPE
    scope = slot.scope = anyio.CancelScope()
    if slot.released:
        scope.cancel()
    return scope


#: What a task already in its scope enters instead (reusable, unlike a scope).
_NO_SCOPE = contextlib.nullcontext()


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
                slot.run.cut_short += (slot.name,)
            if slot.released and not slot.in_flight and slot.scope is not None:
                slot.scope.cancel()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.__exit__(exc_type, exc, tb)
        slot = self._slot
        if exc is None and slot is not None and slot.scope is not None and slot.scope.cancel_called:
            # The service is stopping and this was the last thing holding the task: unwind now
            # rather than at whatever the task awaits next.
            await anyio.lowlevel.checkpoint()


class Slot:
    """One background task of a running service, in its own cancel scope."""

    __slots__ = (
        "idle_runs_user_code",
        "in_flight",
        "name",
        "ready",
        "released",
        "run",
        "scope",
        "task",
        "waker",
    )

    def __init__(
        self, name: str, run: Run, *, idle_runs_user_code: bool = True, scoped: bool = True
    ) -> None:
        self.name = name
        self.run = run
        #: None until the task enters its scope, for one that does so itself once due
        #: (see :func:`serving_scope`): a scope is about 0.6 KiB held while it idles.
        self.scope: anyio.CancelScope | None = anyio.CancelScope() if scoped else None
        self.in_flight = 0
        self.released = False
        #: The backend's task (see ``_backend.current_task``), for its stack.
        self.task: object = None
        #: Set when the task reports ready, for a spec that makes the start wait for it.
        self.ready: anyio.Event | None = None
        #: False when, outside ``in_flight()``, the task runs only the library's code (a
        #: timer between ticks): cancelling it then cannot be observed.
        self.idle_runs_user_code = idle_runs_user_code
        #: Set while the task idles on a timer wheel (see :func:`idle_until`): a release
        #: sets it rather than cancelling the scope.
        self.waker: Waiter | None = None

    @property
    def observable(self) -> bool:
        """True if ending this task now could run code of the user's."""
        return bool(self.in_flight) or self.idle_runs_user_code

    def release(self) -> None:
        """The service is stopping: end now if idle, else when the in-flight work is done."""
        self.released = True
        if not self.in_flight:
            if self.waker is not None:
                self.waker.set()
            elif self.scope is not None:
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

    async def close(self, exc: BaseException | None) -> bool:
        """Release the resources, ``exc`` raised or not; True if one of them suppressed it."""
        if exc is None:
            return await self.__aexit__(None, None, None)
        return await self.__aexit__(type(exc), exc, exc.__traceback__)

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


class Countdown:
    """One ``task_status`` for services started together: one wait for all of them.

    Each run tells its ``task_status`` at most once (:func:`_hand_over`), so counting the
    calls counts the services that are RUNNING (or whose start a stop cut short).
    """

    __slots__ = ("event", "remaining")

    def __init__(self) -> None:
        self.remaining = 0
        self.event: anyio.Event | None = None

    def started(self, value: object = None) -> None:
        self.remaining -= 1
        if not self.remaining and self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if self.remaining:
            self.event = anyio.Event()
            await self.event.wait()


#: The slots of a run that has given none of its tasks a slot of its own (most runs).
_NO_SLOTS: dict[Slot, None] = {}
#: The dependencies started by a run that has started none (most runs).
_NONE_STARTED: list[Owner] = []


def started_dependencies(run: Run) -> list[Owner]:
    """The list of the dependencies ``run`` started, to add to (made at the first)."""
    if run.started_dependencies is _NONE_STARTED:
        run.started_dependencies = []
    return run.started_dependencies


class Run:
    """The scopes and bookkeeping of one run of a service, and its sequence."""

    __slots__ = (
        "bare",
        "cut_short",
        "deferred",
        "handover",
        "inline",
        "inside",
        "phase",
        "resources",
        "restarted",
        "running_scope",
        "service",
        "slots",
        "slots_done",
        "started_dependencies",
        "stop_requested",
        "stopping",
        "takes_resources",
        "task",
        "task_group",
        "wheel",
    )

    def __init__(self, service: Owner) -> None:
        self.service = service
        self.phase = RunPhase.STARTING
        #: True if this run follows an earlier one of the service (a restart).
        self.restarted = False
        # A start that runs none of the user's code never awaits: nothing to cut short.
        self.running_scope: anyio.CancelScope | None = (
            anyio.CancelScope() if start_is_observable(service) else None
        )
        self.task_group: anyio.abc.TaskGroup | None = None
        #: Set once, by the first stop request: the one signal that serving should end.
        self.stop_requested = False
        #: Made for the first task that waits for a stop: a service whose one task runs in
        #: the run's own task ends that task at the stop, and then need not wait.
        self.stopping: anyio.Event | None = None
        # A dict as an ordered set, made at the first task given its own slot: until
        # then the one empty dict of every run, never written to (see spawn()).
        self.slots: dict[Slot, None] = _NO_SLOTS
        self.slots_done: anyio.Event | None = None
        #: The one empty list of every run until it starts a dependency (see
        #: :func:`started_dependencies`), never written to.
        self.started_dependencies: list[Owner] = _NONE_STARTED
        self.cut_short: tuple[str, ...] = ()
        self.task: object = None
        #: The services this run's tasks run inside, itself last; set when its task
        #: group opens (a bare run that never opens one needs none).
        self.inside: tuple[Owner, ...] = ()
        #: Made for the first resource entered (see :func:`live_resources`).
        self.resources: Resources | None = None
        #: True while resources may still be added: from the start until the tasks stop.
        self.takes_resources = False
        #: The caller's ``task_status``, told once that the service is RUNNING (or that
        #: its start was cut short), then let go (see :func:`_hand_over`).
        self.handover: anyio.abc.TaskStatus[None] | None = None
        #: The one background task that the run's own task runs once RUNNING, instead of
        #: a task of its own (see :func:`_start_background`).
        self.deferred: BackgroundSpec | None = None
        #: The slot of that task while the run's own task runs it.
        self.inline: Slot | None = None
        #: The timer wheel of the dependencies' timers, made when the first one idles.
        self.wheel: Wheel | None = None
        #: Set while, or if, the run waited for its one timer's first tick with no task
        #: group (see :func:`_enter_bare`).
        self.bare: _Bare | None = None

    # ------------------------------------------------------------ questions

    @property
    def hard_scope(self) -> anyio.CancelScope:
        """The task group's own scope, whose deadline is the stop deadline."""
        assert self.task_group is not None, "the run's task group is not open yet"
        return self.task_group.cancel_scope

    async def wait_stopping(self) -> None:
        """Return once a stop was requested (at once, after a checkpoint, if it was)."""
        if self.stop_requested:
            await anyio.lowlevel.checkpoint()
            return
        if self.stopping is None:
            self.stopping = anyio.Event()
        await self.stopping.wait()

    @property
    def takes_tasks(self) -> bool:
        """True while the task group may be given new tasks (a bare run opens one for them)."""
        group = self.task_group
        if group is None:
            return self.bare is not None and self.phase is not RunPhase.CLOSED
        return self.phase is not RunPhase.CLOSED and not group.cancel_scope.cancel_called

    def stop_is_observable(self) -> bool:
        """True if anything of this run can observe the order its stop comes in.

        Hooks, resources and dependencies run code at stop; so does a task that holds work
        in flight, or whose idle wait is the user's own code (its ``finally`` runs on
        cancellation). A timer between ticks holds none of that.
        """
        service = self.service
        return bool(
            self.started_dependencies
            or (self.resources is not None and self.resources.stack is not None)
            or "on_stop" in service._overridden_hooks
            or "on_shutdown" in service._overridden_hooks
            or any(slot.observable for slot in self.slots)
            or (self.inline is not None and self.inline.observable)
        )

    def stop_deadline(self) -> float:
        """When what is left of the run is cancelled: set by a stop or a crash."""
        deadline = self.hard_scope.deadline if self.task_group is not None else _bare_deadline(self)
        if deadline == math.inf:
            return anyio.current_time() + self.service.shutdown_timeout
        return deadline

    # ------------------------------------------------------------ the sequence

    async def execute(self, task_status: anyio.abc.TaskStatus[None], *, restart: bool) -> None:
        """Run start to stop in this task; ``restart``: it follows an earlier run.

        One frame for the run's scopes (the task group and the services it runs inside),
        not one per layer: a frame is held for as long as the service runs.

        Raises:
            BaseException: what crashed the run, as the task group raises it.
        """
        service = self.service
        self._begin(task_status, restart=restart)
        token = None
        try:
            # A bare run waits here, in this frame, and opens no task group unless it
            # needs one; nor does it mark the context before then: nothing of the user's
            # runs in its task meanwhile.
            waiting = _enter_bare(self) if _waits_bare(self) else None
            ended = False
            if waiting is not None:
                await waiting
                ended = _leave_bare(self)
            if not ended:
                self.inside = _inside_of(self)
                token = _inside.set(self.inside)
                async with anyio.create_task_group() as task_group:
                    self.task_group = task_group
                    if self.bare is not None:
                        _open_bare(self, task_group)
                    try:
                        await self._start_and_serve()
                    except BaseException as exc:
                        if not only_cancellation(exc):
                            self.note_crash()
                        raise
                    finally:
                        if self.started_dependencies:
                            await _stop_dependencies(self)
                        if self.wheel is not None:
                            # Every dependency was told to stop: none waits on it any more.
                            self.wheel.close()
                        # From here the task group only waits for its tasks: it takes no
                        # new ones (trio's nursery refuses them), so a late crash() is kept
                        # aside.
                        self.phase = RunPhase.CLOSED
            if service._pending_crash is not None:
                raise service._pending_crash
        except BaseException as exc:
            object.__setattr__(service, "_run", None)
            _give_up_bare(self)
            if only_cancellation(exc):
                # Cancelled from outside (an enclosing scope): a stop, not a crash.
                _finish_stopped(self, "stopped (cancelled from outside)")
            else:
                service._record_crash(exc)
            raise
        finally:
            if token is not None:
                _inside.reset(token)
        self._end()

    def _begin(self, task_status: anyio.abc.TaskStatus[None], *, restart: bool) -> None:
        service = self.service
        if restart and service._started_once:
            # The one place restarts are counted, whoever asked for the restart.
            service.restart_count += 1
            self.restarted = True
            if _hooks.service_restart is not None:
                _hooks.service_restart(service)
        # Past the service's __setattr__ (a check of the reserved names, a call per write):
        # none of the run's own names is reserved. Others written only if set.
        object.__setattr__(service, "_run", self)
        if service.crash_reason is not None:
            service.crash_reason = None
        if service._pending_crash is not None:
            service._pending_crash = None
        service._set_state(ServiceState.STARTING)
        service._log_lifecycle("starting")
        self.task = current_task()
        self.handover = task_status

    def _end(self) -> None:
        service = self.service
        object.__setattr__(service, "_run", None)
        # With no grace period at all, cancelling is the stop itself, not worth a warning.
        cancelled = self.task_group is not None and self.hard_scope.cancelled_caught
        if cancelled and (self.cut_short or service.shutdown_timeout > 0):
            service.log.warning(
                "did not stop within shutdown_timeout=%ss; cancelled what was left%s",
                service.shutdown_timeout,
                f" (in flight: {', '.join(self.cut_short)})" if self.cut_short else "",
            )
        _finish_stopped(self, "stopped")
        # tg.start() must not hang on a service whose start a stop cut short.
        _hand_over(self)

    async def _start_and_serve(self) -> None:
        # The resources' exit by hand rather than ``async with``: most runs hold none, and
        # then there is nothing to await on the way in or out.
        self.takes_resources = True
        hooks = self.service._overridden_hooks
        hooked = False
        try:
            # A bare run has started already (see _enter_bare).
            hooked = self.bare is not None or await self._start()
            # Started (or cut short): from here a stop only sets the event, so the scope can
            # go, and with it what anyio keeps for it while the service runs.
            self.running_scope = None
            inline = _inline_task(self)
            if inline is not None:
                # The one task, run here rather than in a frame of its own (see execute()).
                slot, body = inline
                try:
                    with slot.scope or _NO_SCOPE:
                        await body()
                except Exception as exc:
                    _inline_crashed(self, slot, exc)
                finally:
                    self.inline = None
                    self.slot_ended(slot)
            if inline is None or not self.stop_requested:
                # An event rather than sleep_forever(): no timer to schedule per service.
                await self.wait_stopping()
            # A stop was requested: the start was cut short, or serving ends.
            if self.phase is RunPhase.CRASHING:
                # The crash cancels this scope at the next checkpoint: no hooks to run.
                await anyio.lowlevel.checkpoint()
            served = self.phase is RunPhase.RUNNING
            self._advance(RunPhase.STOPPING)
            if hooked and "on_stop" in hooks:
                await _call_hook(self.service, "on_stop")
            if served and self.service.wait_for_shutdown:
                # mode's: the tasks go on until one says they are done (or the deadline).
                await self.service._wait_for_shutdown_flag()
            self.release_slots()
            if self.slots:
                await self.wait_slots_done()
            self.takes_resources = False
        except BaseException as exc:
            if not _holds_resources(self) or not await _close_resources(self, exc):
                raise
        else:
            if _holds_resources(self):
                await _close_resources(self, None)
        if hooked and "on_shutdown" in hooks:
            await _call_hook(self.service, "on_shutdown")

    async def _start(self) -> bool:
        """Start, in the running scope; returns whether ``on_start`` completed."""
        if self.running_scope is None:
            # A start that runs none of the user's code and waits for no task: nothing in
            # it awaits, so none of the awaits below is made.
            if not self.service._started_once:
                object.__setattr__(self.service, "_started_once", True)
            _start_background(self)
            _report_running(self)
            return True
        service = self.service
        hooked = False
        with self.running_scope:
            if self.restarted:
                await _call_hook(self.service, "on_restart")
            await _start_dependencies(self, service._dependencies_to_start())
            if not service._started_once:
                object.__setattr__(service, "_started_once", True)
                await _call_hook(self.service, "on_first_start")
            await _call_hook(self.service, "on_start")
            hooked = True
            for context in service._contexts:
                await _resources(self).enter(context)
            for slot in _start_background(self):
                await slot.ready.wait()  # type: ignore[union-attr]  # set by the spawn
            await _call_hook(self.service, "on_started")
            _report_running(self)
        return hooked

    def _advance(self, phase: RunPhase) -> None:
        if phase > self.phase:
            self.phase = phase

    # ------------------------------------------------------------ stop and crash

    def request_stop(self, *, deadline: bool = True) -> bool:
        """Begin the stop: cut a start short, end serving. False if already requested."""
        if self.stop_requested:
            return False
        if deadline:
            self.set_deadline()
        if "on_stop" not in self.service._overridden_hooks:
            # Nothing runs before the tasks end: they may end now. The run's own task may
            # be running one of them (a deferred one), and is free only once it has ended.
            self.release_slots()
        scope = self.running_scope
        if scope is not None and self.phase is RunPhase.STARTING:
            # Still starting: cut the start short. Once RUNNING, the run task only waits
            # for the event below, so cancelling (which costs anyio a retry loop) is moot.
            scope.cancel()
        self.stop_requested = True
        if self.stopping is not None:
            self.stopping.set()
        if self.bare is not None and self.inline is None:
            _wake_bare(self)  # a service with no task waits bare for its stop alone
        return True

    def set_deadline(self) -> None:
        deadline = anyio.current_time() + self.service.shutdown_timeout
        # min(): a second stop or a crash never pushes the deadline back.
        if self.task_group is None:
            _set_bare_deadline(self, deadline)
            return
        scope = self.hard_scope
        scope.deadline = min(scope.deadline, deadline)

    def note_crash(self) -> None:
        # A crash also gets the grace period for what it has to tear down (resources,
        # dependencies), and no more.
        self.set_deadline()
        self._advance(RunPhase.CRASHING)

    # ------------------------------------------------------------ slots

    def spawn(
        self,
        name: str,
        body: Callable[..., Awaitable[None]],
        *args: Any,
        idle_runs_user_code: bool = True,
    ) -> Slot:
        """Run ``body(*args)`` as a background task of this run, in its own slot."""
        slot = Slot(name, self, idle_runs_user_code=idle_runs_user_code)
        if self.slots is _NO_SLOTS:
            self.slots = {}
        self.slots[slot] = None
        if self.task_group is None:
            _queue_in_bare(self, slot, body, args)
        else:
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
        slot.task = current_task()
        try:
            assert slot.scope is not None  # a slot of its own task is always scoped
            with slot.scope:
                await body(*args)
        except Exception as exc:
            exc.add_note(f"anyservice: raised in {slot.name!r} of service {self.service.name!r}")
            self.note_crash()
            raise
        finally:
            self.slot_ended(slot)

    def slot_ended(self, slot: Slot) -> None:
        # A start that waits for this task must not wait for one that ended.
        slot.set_ready()
        self.slots.pop(slot, None)
        if not self.slots and self.slots_done is not None:
            self.slots_done.set()

    def release_slots(self) -> None:
        for slot in list(self.slots):
            slot.release()
        if self.inline is not None:
            self.inline.release()

    async def wait_slots_done(self) -> None:
        if self.slots:
            if self.slots_done is None:
                self.slots_done = anyio.Event()
            await self.slots_done.wait()


async def _call_hook(service: Owner, hook: str) -> None:
    if hook not in service._overridden_hooks:
        return  # nothing to await, and thousands of idle services add up
    try:
        await getattr(service, hook)()
    except Exception as exc:
        exc.add_note(f"anyservice: raised in {hook}() of service {service.name!r}")
        raise


def _finish_stopped(run: Run, message: str) -> None:
    service = run.service
    if service.state in (ServiceState.STARTING, ServiceState.RUNNING):
        service._set_state(ServiceState.STOPPING)
    service._set_state(ServiceState.STOPPED)
    service._log_lifecycle(message)


def _hand_over(run: Run) -> None:
    """Tell the caller's ``task_status`` that the service is RUNNING, once."""
    status, run.handover = run.handover, None
    if status is not None:
        status.started()


def live_resources(run: Run | None) -> Resources | None:
    """The resources of ``run`` while they may be added to (made at the first), else None."""
    if run is None or not run.takes_resources:
        return None
    return _resources(run)


def _resources(run: Run) -> Resources:
    if run.resources is None:
        run.resources = Resources(run)
    return run.resources


def _holds_resources(run: Run) -> bool:
    return run.resources is not None and run.resources.stack is not None


async def _close_resources(run: Run, exc: BaseException | None) -> bool:
    assert run.resources is not None
    return await run.resources.close(exc)


def _start_background(run: Run) -> list[Slot]:
    """Start the background tasks; returns the slots whose task the start waits for."""
    service = run.service
    specs = service._background_specs
    if _serves_inline(service):
        # One task, which the start does not wait for, and no hook between the start of
        # the tasks and their end (on_started, on_stop): the run's own task, which has
        # nothing else to do until a stop, runs it once RUNNING. A task less per service.
        run.deferred = specs[0]
        return []
    waits: list[Slot] = []
    for spec in specs:
        for slot_name in spec.slot_names():
            slot = run.spawn(
                slot_name, spec.run, service, idle_runs_user_code=spec.idle_runs_user_code
            )
            if spec.reports_ready:
                slot.ready = anyio.Event()
                waits.append(slot)
    return waits


def _report_running(run: Run) -> None:
    """The start is done: RUNNING, unless a stop came meanwhile."""
    if not run.stop_requested:
        run._advance(RunPhase.RUNNING)
        service = run.service
        service._set_state(ServiceState.RUNNING)
        service._log_lifecycle("started")
        _hand_over(run)


class _Bare:
    """What a run keeps while it waits bare, with no task group, for its timer's first tick.

    Its tasks queued meanwhile (``spawn()``, ``crash()``, ``add_future()``, start when the
    task group opens, which they ask for), the deadline a stop or a crash set, and the
    state its timer goes on from (its spec's ``prepare_bare``), from its first due time or
    earlier, in the task group. A service with no task at all waits so too, for its stop.
    """

    __slots__ = ("deadline", "due", "opened", "queued", "state", "waker")

    def __init__(self, state: object, waker: Waiter) -> None:
        #: The timer's state; None for a service with no task.
        self.state = state
        #: Set to end the wait: by the wheel when due, by a stop, by a task queued.
        self.waker: Waiter | None = waker
        #: True once the timer's first tick is due (the wheel woke it).
        self.due = False
        self.deadline = math.inf
        self.queued: list[tuple[Slot, Callable[..., Awaitable[None]], tuple[Any, ...]]] | None = (
            None
        )
        #: Set when the task group opens, for a caller that needs it (a runtime dependency).
        self.opened: anyio.Event | None = None


def _waits_bare(run: Run) -> bool:
    """True if ``run`` may wait for its first tick (or its stop) before opening a task group.

    A service whose start runs none of the user's code (no hooks at all, dependencies or
    resources) and whose one task is a timer run in the run's own task, or which has no
    task at all: until the tick (or the stop) nothing of it runs but that wait, which
    needs no task group.
    """
    service = run.service
    return (
        run.running_scope is None
        and _class_waits_bare(type(service))
        and not service.wait_for_shutdown
        and not run.stop_requested
    )


@functools.cache
def _class_waits_bare(cls: Any) -> bool:
    if cls._overridden_hooks:
        return False
    return not cls._background_specs or (
        _class_serves_inline(cls) and cls._background_specs[0].enters_own_scope
    )


def _enter_bare(run: Run) -> Awaitable[object] | None:
    """Start ``run`` bare; returns what its task waits on, or None to open a task group.

    None if it cannot wait bare: its owner is not running its own task group (a timer
    also needs its owner's wheel), or its timer is due at once.
    """
    service = run.service
    specs = service._background_specs
    wheel = None
    if specs:
        wheel = _owner_wheel(run)
        if wheel is None:
            return None
        prepared = specs[0].prepare_bare(service, clock(service._loop)())
        if prepared is None:
            return None
        due, state = prepared
    else:
        owner = service._owner
        owner_run = owner._run if owner is not None else None
        if owner_run is None or owner_run.task_group is None or not owner_run.takes_tasks:
            return None
        state = None
    woken = new_waiter(service._loop)
    run.bare = _Bare(state, woken)
    if not service._started_once:
        object.__setattr__(service, "_started_once", True)
    if wheel is not None:
        slot = run.inline = _inline_slot(run, specs[0])
        slot.waker = woken
        wheel.wake_at(due, woken)
    run.takes_resources = True
    _report_running(run)
    return woken.wait()


def _leave_bare(run: Run) -> bool:
    """After the wait of :func:`_enter_bare`: True if the run is over, with nothing to end.

    False to go on in a task group: the tick is due, or a task or a resource needs one.
    """
    bare = run.bare
    assert bare is not None
    bare.waker = None
    slot = run.inline
    if slot is None:
        stopped = run.stop_requested
    else:
        slot.waker = None
        stopped = slot.released
        # Woken by the wheel, or by a stop or something that needs the task group.
        bare.due = not stopped and not bare.queued and bare.opened is None
        if not bare.due:
            _woken_early(run)
    if (
        not stopped
        or bare.queued
        or bare.opened is not None
        or (run.resources is not None and run.resources.stack is not None)
    ):
        return False
    if slot is not None:
        run.inline = None
        run.slot_ended(slot)
    run.takes_resources = False
    run.phase = RunPhase.CLOSED
    return True


def _give_up_bare(run: Run) -> None:
    # The run ends with an error (cancelled while bare, say): whoever waits for its task
    # group gets none.
    if run.bare is not None and run.bare.opened is not None:
        run.bare.opened.set()


def _woken_early(run: Run) -> None:
    owner = run.service._owner
    owner_run = owner._run if owner is not None else None
    if owner_run is not None and owner_run.wheel is not None:
        owner_run.wheel.woken_early()


def _inside_of(run: Run) -> tuple[Owner, ...]:
    """The services ``run``'s tasks run inside: its owner's (or the caller's), then itself."""
    owner = run.service._owner
    owner_run = owner._run if owner is not None else None
    return (*(owner_run.inside if owner_run is not None else _inside.get()), run.service)


def _inline_task(run: Run) -> tuple[Slot, Callable[[], Awaitable[None]]] | None:
    """The slot and body of the one task the run's own task runs, if it runs one."""
    bare = run.bare
    if bare is not None:
        if run.inline is None:
            return None  # a service with no task
        spec = run.service._background_specs[0]
        return run.inline, functools.partial(spec.resume_bare, run.service, bare.state, bare.due)
    deferred, run.deferred = run.deferred, None
    if deferred is None:
        return None
    slot = run.inline = _inline_slot(run, deferred)
    return slot, functools.partial(deferred.run, run.service)


def _open_bare(run: Run, task_group: anyio.abc.TaskGroup) -> None:
    """The task group of a run that waited bare is open: what waited for it goes on."""
    bare = run.bare
    assert bare is not None
    if bare.deadline != math.inf:
        task_group.cancel_scope.deadline = bare.deadline
    queued, bare.queued = bare.queued or (), None
    for slot, body, args in queued:
        task_group.start_soon(
            run._run_slot, slot, body, args, name=f"{run.service.name}.{slot.name}"
        )
    if bare.opened is not None:
        bare.opened.set()


def _wake_bare(run: Run) -> None:
    # Wakes the wait of _enter_bare: the run then ends, or goes on in a task group.
    bare = run.bare
    if bare is not None and bare.waker is not None:
        bare.waker.set()


def _queue_in_bare(
    run: Run, slot: Slot, body: Callable[..., Awaitable[None]], args: tuple[Any, ...]
) -> None:
    bare = run.bare
    assert bare is not None, "a run with no task group takes tasks only while bare"
    if bare.queued is None:
        bare.queued = []
    bare.queued.append((slot, body, args))
    _wake_bare(run)


def _set_bare_deadline(run: Run, deadline: float) -> None:
    bare = run.bare
    if bare is not None:
        bare.deadline = min(bare.deadline, deadline)


def _bare_deadline(run: Run) -> float:
    return run.bare.deadline if run.bare is not None else math.inf


async def open_task_group(run: Run) -> anyio.abc.TaskGroup:
    """The run's task group; a run waiting bare is asked to open it, and waited for.

    Raises:
        RuntimeError: if the run ends before it opens one.
    """
    if run.task_group is None and run.bare is not None:
        if run.bare.opened is None:
            run.bare.opened = anyio.Event()
        _wake_bare(run)
        await run.bare.opened.wait()
    if run.task_group is None:
        raise RuntimeError(f"{run.service.name}: its run takes no new tasks")
    return run.task_group


async def _stop_dependencies(run: Run) -> None:
    """Stop the dependencies in reverse order, where the order can be observed.

    A dependency whose stop can observe it (see :meth:`Run.stop_is_observable`) is waited
    for before the ones started before it are stopped. The others only unwind: they are
    told to stop and their tasks released at once, so that none of them can begin work
    in flight meanwhile, and the task group's exit waits for all of them together,
    within this service's own deadline.
    """
    started = run.started_dependencies
    while started:
        dependency = started.pop()
        if dependency._run is None:
            continue
        if not unwind_unobservable(dependency):
            await dependency._stop()


def _owner_wheel(run: Run) -> Wheel | None:
    """The timer wheel of the run that owns ``run``, if it takes new tasks."""
    owner = run.service._owner
    owner_run = owner._run if owner is not None else None
    if owner_run is None:
        return None
    wheel = owner_run.wheel
    if wheel is None:
        if owner_run.task_group is None or not owner_run.takes_tasks:
            return None
        wheel = owner_run.wheel = Wheel()
        assert owner_run.task_group is not None
        owner_run.task_group.start_soon(wheel.run, name=f"{owner_run.service.name} (timer wheel)")
    return None if wheel.closed else wheel


def start_beside(
    service: Owner, name: str, body: Callable[..., Coroutine[Any, Any, None]], *args: Any
) -> None:
    """Run ``body(*args)`` in the task group of ``service``'s run, in no slot of its own.

    Unlike a background task, a stop does not end it (whoever starts it ends it); the stop
    deadline, or a crash, cancels it with the rest. A supervisor runs its children so.

    Raises:
        RuntimeError: if the run's task group is closed, or not open yet.
    """
    run = service._run
    if run is None or run.task_group is None or run.phase is RunPhase.CLOSED:
        raise RuntimeError(f"{service.name}: its run takes no new tasks")
    run.task_group.start_soon(body, *args, name=f"{service.name}.{name}")


def unwind_unobservable(service: Owner) -> bool:
    """Tell ``service`` to stop if nothing of its stop can observe when; True if it was told.

    Its tasks are released at once, so that none of them can begin work in flight; it
    unwinds on its own, and whoever owns it waits for it later, together with the others.
    """
    run = service._run
    if run is None or run.stop_is_observable():
        return False
    # With no on_stop (or its stop would be observable), the request releases the tasks.
    service._request_stop(deadline=False)
    return True


def start_is_observable(service: Owner) -> bool:
    """True if the start of ``service`` runs code of the user's, or waits for a task."""
    return bool(service._has_dependencies() or service._contexts) or _class_start_is_observable(
        type(service)
    )


@functools.cache
def _class_start_is_observable(cls: Any) -> bool:
    # What the class decides (hooks and specs, fixed when it is defined), asked once per
    # class rather than twice per service started.
    return not _START_HOOKS.isdisjoint(cls._overridden_hooks) or any(
        spec.reports_ready for spec in cls._background_specs
    )


_START_HOOKS = frozenset({"on_first_start", "on_restart", "on_start", "on_started"})


def _serves_inline(service: Owner) -> bool:
    """True if the run's own task can run the service's one background task itself."""
    return _class_serves_inline(type(service))


@functools.cache
def _class_serves_inline(cls: Any) -> bool:
    # Fixed when the class is defined, like _class_start_is_observable.
    specs = cls._background_specs
    return (
        len(specs) == 1
        and not specs[0].reports_ready
        and len(specs[0].slot_names()) == 1
        and _INLINE_BLOCKERS.isdisjoint(cls._overridden_hooks)
    )


#: Hooks that run while the tasks run: the run's own task must be free for them.
_INLINE_BLOCKERS = frozenset({"on_started", "on_stop"})


async def _reraise(error: Exception) -> None:
    raise error


async def _start_dependencies(run: Run, dependencies: Sequence[Owner]) -> None:
    """Start the dependencies in order, each RUNNING before the next where it shows.

    A dependency whose start runs none of the user's code (no start hooks, resources,
    dependencies of its own, or task the start waits for) cannot tell whether the one
    before it is RUNNING yet: a run of such dependencies starts together, with one wait
    for all of them, before the next dependency that can tell.
    """
    together = Countdown()
    for dependency in dependencies:
        if start_is_observable(dependency):
            await together.wait()
            together = Countdown()
            started = Started()
            _spawn_dependency(run, dependency, started)
            await started.wait()
        else:
            together.remaining += 1
            _spawn_dependency(run, dependency, together)
    await together.wait()


def _spawn_dependency(run: Run, dependency: Owner, status: anyio.abc.TaskStatus[None]) -> None:
    # start_soon and an event rather than task_group.start(): the same wait for RUNNING,
    # at a fraction of the cost of start()'s hand-over on trio. A crash of the dependency
    # reaches this service through the task group, which cancels the wait.
    started_dependencies(run).append(dependency)
    assert run.task_group is not None
    run.task_group.start_soon(
        dependency._run_coroutine, status, name=f"{dependency.name} (of {run.service.name})"
    )


def _inline_slot(run: Run, spec: BackgroundSpec) -> Slot:
    """The slot of ``spec``'s one task, which the run's own task runs (see _serves_inline)."""
    slot = Slot(
        spec.name,
        run,
        idle_runs_user_code=spec.idle_runs_user_code,
        scoped=not spec.enters_own_scope,
    )
    slot.task = run.task
    # Not in run.slots (one entry there costs a dict table per service): the run's own
    # task waits for no one by ending it, and the run releases it as run.inline.
    if run.stop_requested:
        slot.release()
    return slot


def _inline_crashed(run: Run, slot: Slot, error: Exception) -> None:
    error.add_note(f"anyservice: raised in {slot.name!r} of service {run.service.name!r}")
    run.note_crash()
    # Raised by a task of the group, as it would have been with a task of its own: the
    # group is cancelled, the tree below unwinds within the deadline, and the error leaves
    # the run in the same exception group.
    assert run.task_group is not None
    run.task_group.start_soon(_reraise, error, name=f"{run.service.name}.{slot.name}")
