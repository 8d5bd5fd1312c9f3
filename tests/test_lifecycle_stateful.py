"""Random sequences of start, stop, crash, restart and runtime dependencies, on both backends.

A Hypothesis state machine drives a small pool of services, and the dependencies it adds to
them at runtime, through a blocking portal: each example keeps one event loop running in a
thread, and every rule is one bounded call into it. After every step the machine checks that
nothing hangs, that no task is left over, and that every service's state agrees with its
run(), its hooks and its resources. The loop runs on the real clock: it waits for this
thread between steps, so a virtual clock would jump.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from anyservice import Service, ServiceError, ServiceState, task

T = TypeVar("T")

#: How long a service may take to reach the state a finished operation promises: a
#: crashed or stopped tree unwinds its dependencies one after another, each in a few
#: scheduling rounds, and on a loaded machine a round can take tens of milliseconds. A
#: bound on a hang, not on speed: the waits end as soon as the state is reached.
SETTLE_TIMEOUT = 5.0
#: Bound on one rule, one invariant check or the teardown: a hang fails the example. A
#: rule may wait for a stop and then for its run to settle, each up to SETTLE_TIMEOUT.
STEP_TIMEOUT = 3 * SETTLE_TIMEOUT

STARTING = ServiceState.STARTING
RUNNING = ServiceState.RUNNING
STOPPED = ServiceState.STOPPED
CRASHED = ServiceState.CRASHED
INIT = ServiceState.INIT


class Kind(enum.Enum):
    """How a service's one background task behaves, and so how its stops go."""

    #: Always idle: a stop ends it at once.
    IDLE = "idle"
    #: Short bursts of work in flight: a stop lets the burst finish, well within the grace.
    BUSY = "busy"
    #: Work in flight longer than the grace period: every stop hits the hard deadline.
    STUBBORN = "stubborn"

    @property
    def shutdown_timeout(self) -> float:
        # Ample for a burst of a few ms even on a loaded machine: an idle or busy service
        # must never reach its deadline, so its hooks stay balanced.
        return 0.05 if self is Kind.STUBBORN else 0.5


IN_FLIGHT_SECONDS = {Kind.BUSY: 0.005, Kind.STUBBORN: 0.3}
IDLE_SECONDS = {Kind.BUSY: 0.01, Kind.STUBBORN: 0.005}
POOL_KINDS = (Kind.IDLE, Kind.BUSY, Kind.STUBBORN)


class Worker(Service, overrides=("run",)):
    """A service that counts its hooks, its resource's enters and exits, and its runs."""

    def __init__(self, name: str, kind: Kind) -> None:
        super().__init__(name=name, shutdown_timeout=kind.shutdown_timeout)
        self.kind = kind
        self.hooks: Counter[str] = Counter()
        self.resource_enters = 0
        self.resource_exits = 0
        #: run() calls in progress: the truth the state is checked against.
        self.runs_active = 0

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.runs_active += 1
        try:
            await super().run(task_status=task_status)
        finally:
            self.runs_active -= 1

    @contextlib.asynccontextmanager
    async def resource(self) -> AsyncIterator[None]:
        # A checkpoint, so that a stop or crash can land while the resource is being entered.
        await anyio.lowlevel.checkpoint()
        self.resource_enters += 1
        try:
            yield
        finally:
            self.resource_exits += 1

    async def on_first_start(self) -> None:
        self.hooks["first_start"] += 1

    async def on_start(self) -> None:
        self.hooks["start"] += 1

    async def on_started(self) -> None:
        self.hooks["started"] += 1
        await anyio.lowlevel.checkpoint()

    async def on_stop(self) -> None:
        self.hooks["stop"] += 1

    async def on_shutdown(self) -> None:
        self.hooks["shutdown"] += 1

    @task
    async def work(self) -> None:
        if self.kind is Kind.IDLE:
            await anyio.sleep_forever()
        while True:
            async with self.in_flight():
                await anyio.sleep(IN_FLIGHT_SECONDS[self.kind])
            await anyio.sleep(IDLE_SECONDS[self.kind])


@dataclass(eq=False)
class Ownership:
    """One ``await tg.start(service.run)`` by the test, and how it ended."""

    service: Worker
    start_returned: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


async def own(ownership: Ownership) -> None:
    """Run a service as users do, keeping what it raised instead of letting it out."""
    try:
        async with anyio.create_task_group() as task_group:
            await task_group.start(ownership.service.run)
            ownership.start_returned.set()
    except Exception as exc:
        ownership.error = exc
    finally:
        ownership.start_returned.set()
        ownership.done.set()


def task_names() -> list[str]:
    return sorted(str(info.name) for info in anyio.get_running_tasks())


def leaves(exc: BaseException | None) -> list[BaseException]:
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def tree(service: Service) -> Iterator[Service]:
    """The service and all its dependencies, depth first."""
    yield service
    for dependency in service.dependencies:
        yield from tree(dependency)


def workers(service: Service) -> Iterator[Worker]:
    for member in tree(service):
        assert isinstance(member, Worker)
        yield member


async def checkpoints(count: int) -> None:
    for _ in range(count):
        await anyio.lowlevel.checkpoint()


async def eventually(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` holds within SETTLE_TIMEOUT."""
    with anyio.move_on_after(SETTLE_TIMEOUT):
        # Polling: the conditions span several services, counters and owners, and no one
        # event says when they all hold; the wait is bounded.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.001)
        return True
    return False


async def pause(delay: int) -> None:
    """Up to 5 checkpoints, or up to 75 ms: long enough to pass a stubborn service's deadline."""
    if delay <= 5:
        await checkpoints(delay)
    else:
        await anyio.sleep((delay - 5) * 0.015)


pool_index = st.integers(min_value=0, max_value=len(POOL_KINDS) - 1)
dependency_kind = st.sampled_from([Kind.IDLE, Kind.BUSY])
checkpoint_count = st.integers(min_value=0, max_value=6)


class LoopThread:
    """An event loop in a daemon thread, and a portal into it.

    Like ``anyio.from_thread.start_blocking_portal``, except that closing it is bounded too:
    if a task ignores cancellation, closing fails with a message instead of joining the
    thread forever (the daemon thread is abandoned).
    """

    def __init__(self, backend: str) -> None:
        ready: Future[anyio.from_thread.BlockingPortal] = Future()
        self.error: BaseException | None = None

        async def serve() -> None:
            async with anyio.from_thread.BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        def main() -> None:
            try:
                anyio.run(serve, backend=backend)
            except BaseException as exc:
                self.error = exc
                if not ready.done():
                    ready.set_exception(exc)

        self.thread = threading.Thread(target=main, name=f"{backend} loop", daemon=True)
        self.thread.start()
        self.portal = ready.result(timeout=STEP_TIMEOUT)

    def close(self) -> None:
        """Cancel whatever is left and stop the loop, within STEP_TIMEOUT."""
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.portal.start_task_soon(self.portal.stop, True)
        self.thread.join(STEP_TIMEOUT)
        assert not self.thread.is_alive(), (
            f"the event loop did not stop {STEP_TIMEOUT}s after its tasks were cancelled: "
            "a task ignores cancellation"
        )
        if self.error is not None:
            raise self.error


class LifecycleMachine(RuleBasedStateMachine):
    #: Set by a subclass for each backend.
    backend: str
    dependencies = Bundle[Worker]("dependencies")

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.loop = LoopThread(self.backend)
        self.portal = self.loop.portal
        self.names = itertools.count()
        try:
            home: tuple[Future[None], anyio.abc.TaskGroup] = self.portal.start_task(self.home)
            self.home_future, self.home_group = home
            self.pool = [
                self.in_loop(functools.partial(self.new_worker, kind)) for kind in POOL_KINDS
            ]
            self.baseline_tasks = self.in_loop(self.count_tasks)
        except BaseException:
            self.loop.close()
            raise
        self.everyone: list[Worker] = list(self.pool)
        #: The parent each dependency was added to; None once removed.
        self.parent: dict[Worker, Worker | None] = {}
        #: The latest ownership of each pool service.
        self.ownerships: dict[Worker, Ownership] = {}
        #: Services stopped while INIT: their next start returns at once (documented).
        self.stop_before_start: set[Worker] = set()
        #: Services asked to stop with block=False whose stop was not yet seen to end.
        self.stop_pending: set[Worker] = set()
        #: Services whose hooks lost balance by design: a crash (on_stop/on_shutdown are not
        #: called) or a hard deadline (what was left, hooks included, is cancelled).
        self.unbalanced: set[Worker] = set()
        #: The pool's states as last seen after a step, to steer rules towards useful targets.
        self.states = [service.state for service in self.pool]

    # ------------------------------------------------------------ plumbing

    async def home(self, *, task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup]) -> None:
        """The task group every ownership runs in, open for the whole example."""
        self.closing = anyio.Event()
        async with anyio.create_task_group() as task_group:
            task_status.started(task_group)
            await self.closing.wait()

    def in_loop(self, function: Callable[[], Awaitable[T]], timeout: float = STEP_TIMEOUT) -> T:
        async def bounded() -> T:
            try:
                with anyio.fail_after(timeout):
                    return await function()
            except TimeoutError:
                raise AssertionError(
                    f"did not finish within {timeout}s (hang?); services:\n{self.dump()}"
                ) from None

        try:
            return self.portal.call(bounded)
        except BaseException:
            self.failed = True
            raise

    def dump(self) -> str:
        return "\n".join(service.dump_tree() for service in self.pool)

    async def count_tasks(self) -> int:
        return len(anyio.get_running_tasks())

    async def new_worker(self, kind: Kind) -> Worker:
        worker = Worker(f"{kind.value}{next(self.names)}", kind)
        assert await worker.add_async_context(worker.resource) is None
        return worker

    def spawn_owner(self, service: Worker) -> Ownership:
        ownership = Ownership(service)
        self.ownerships[service] = ownership
        self.home_group.start_soon(own, ownership, name=f"owner of {service.name}")
        return ownership

    def top(self, service: Worker) -> Worker:
        while (parent := self.parent.get(service)) is not None:
            service = parent
        return service

    def ancestors(self, service: Worker) -> list[Worker]:
        found = []
        while (parent := self.parent.get(service)) is not None:
            found.append(parent)
            service = parent
        return found

    async def settle(self, service: Worker, why: str) -> None:
        """Wait (bounded) until ``service`` is no longer active and its run() has returned."""
        ownership = self.ownerships.get(service)
        settled = await eventually(
            lambda: (
                not service.state.is_active
                and not service.runs_active
                and (ownership is None or ownership.done.is_set())
            )
        )
        assert settled, (
            f"{why}: {service.name} still {service.state.name} "
            f"(runs active: {service.runs_active}) after {SETTLE_TIMEOUT}s;\n{self.dump()}"
        )

    # ------------------------------------------------------------- operations

    async def start(self, service: Worker) -> None:
        if service.runs_active:
            with pytest.raises(ServiceError, match="already running"):
                await service.run()
            return
        returns_at_once = service in self.stop_before_start
        self.stop_before_start.discard(service)
        self.stop_pending.discard(service)
        ownership = self.spawn_owner(service)
        await ownership.start_returned.wait()
        if returns_at_once:
            await ownership.done.wait()
            assert ownership.error is None
            assert service.state.is_final
            return
        assert ownership.error is None, ownership.error
        assert service.state is RUNNING, self.dump()
        assert service.crash_reason is None
        for member in tree(service):
            assert member.state is RUNNING, self.dump()

    async def stop(self, service: Worker, block: bool) -> None:
        was_active = service.state.is_active
        if service.state is INIT or not service.runs_active:
            # A stop while no run is in progress is kept for the next run.
            self.stop_before_start.add(service)
        stopped = await service.stop(block=block)
        if not block:
            assert stopped is not was_active
            if was_active:
                self.stop_pending.add(service)
            return
        assert stopped is True
        assert service.state.is_final
        if was_active:
            assert service.state is STOPPED
            await self.settle(service, "stop() returned True")
            ownership = self.ownerships.get(service)
            assert ownership is None or ownership.error is None, ownership
        for member in tree(service):
            assert member.state.is_final, self.dump()

    async def crash(self, service: Worker, reason: Exception | None = None) -> None:
        reason = reason or RuntimeError(f"boom in {service.name}")
        was_active = service.state.is_active
        top = self.top(service)
        if was_active:
            self.unbalanced.update(workers(top))
        await service.crash(reason)
        if not was_active:
            assert service.state is CRASHED
            assert service.crash_reason is reason
            return
        await self.settle(top, "crash()")
        for crashed in [service, *self.ancestors(service)]:
            assert crashed.state is CRASHED, self.dump()
            assert crashed.crash_reason is reason, crashed.crash_reason
        ownership = self.ownerships[top]
        assert any(leaf is reason for leaf in leaves(ownership.error)), ownership.error
        for member in tree(top):
            assert member.state.is_final, self.dump()

    async def restart(self, service: Worker) -> None:
        if service.state is not RUNNING:
            with pytest.raises(ServiceError, match="needs a RUNNING service"):
                await service.restart()
            return
        restarts, starts = service.restart_count, service.hooks["start"]
        stopping_above = [
            ancestor
            for ancestor in self.ancestors(service)
            if ancestor in self.stop_pending or ancestor.state is not RUNNING
        ]
        try:
            await service.restart()
        except ServiceError as exc:
            # An ancestor's stop reached it between its two runs: a stop wins over a restart.
            assert "restart interrupted" in str(exc), exc  # noqa: PT017 - may or may not raise
            assert stopping_above, self.dump()
            await self.settle(service, "restart() interrupted by a stop above")
            assert service.state is STOPPED
            return
        self.stop_pending.discard(service)
        assert service.state is RUNNING
        assert service.restart_count == restarts + 1
        assert service.hooks["start"] == starts + 1
        assert service.hooks["first_start"] == 1
        for member in tree(service):
            assert member.state is RUNNING, self.dump()

    async def add_dependency(self, parent: Worker, kind: Kind) -> Worker:
        dependency = await self.new_worker(kind)
        if parent.state not in (STARTING, RUNNING):
            with pytest.raises(ServiceError, match="needs a STARTING or RUNNING service"):
                await parent.add_runtime_dependency(dependency)
            assert dependency not in parent.dependencies
            assert dependency.state is INIT
            # Still returned, unattached: what the bundles hold must not depend on timing,
            # or Hypothesis cannot replay a case.
            self.parent[dependency] = None
            self.everyone.append(dependency)
            return dependency
        assert await parent.add_runtime_dependency(dependency) is dependency
        assert dependency.state is RUNNING
        assert dependency in parent.dependencies
        self.parent[dependency] = parent
        self.everyone.append(dependency)
        return dependency

    async def remove_dependency(self, dependency: Worker) -> None:
        parent = self.parent[dependency]
        if parent is None:
            return
        await parent.remove_dependency(dependency)
        self.parent[dependency] = None
        assert dependency not in parent.dependencies
        for member in tree(dependency):
            assert member.state.is_final, self.dump()

    async def race_start_and_stop(self, service: Worker, delay: int) -> None:
        """tg.start_soon(service.run), then stop(): the stop is never lost."""
        if service.runs_active:
            return
        self.stop_before_start.discard(service)
        self.spawn_owner(service)
        await checkpoints(delay)
        assert await service.stop(timeout=SETTLE_TIMEOUT) is True, "stop() lost"
        await self.settle(service, f"stop() {delay} checkpoints after start_soon(run)")
        assert service.state.is_final
        assert self.ownerships[service].error is None
        # Whether the stop landed before the run began (consumed by it) or after the run
        # had already ended (kept for the next run) depends on timing: read which.
        if service._stop_before_start:
            self.stop_before_start.add(service)

    async def race_start_and_crash(self, service: Worker, delay: int) -> None:
        """tg.start_soon(service.run), then crash(): the crash ends the run it lands in."""
        if service.runs_active:
            return
        returns_at_once = service in self.stop_before_start
        self.stop_before_start.discard(service)
        self.stop_pending.discard(service)
        ownership = self.spawn_owner(service)
        await checkpoints(delay)
        landed_in_run = service.state.is_active
        await self.crash(service, RuntimeError(f"boom in starting {service.name}"))
        if landed_in_run:
            return
        # The crash was recorded before the run began: the run starts as usual.
        await ownership.start_returned.wait()
        if returns_at_once:
            await self.settle(service, "run() after stop() while INIT")
            assert service.state is CRASHED
        else:
            assert service.state is RUNNING, self.dump()
            assert service.crash_reason is None

    async def race_stop_and_crash(self, service: Worker, delay: int) -> None:
        """stop(block=False), then crash(): the crash is never lost, whatever the stop did."""
        if service.state is not RUNNING:
            return
        await service.stop(block=False)
        await pause(delay)
        await self.crash(service, RuntimeError(f"boom in stopping {service.name}"))

    async def race_restart_and_stop(self, service: Worker, delay: int) -> None:
        """restart() in a task, then stop(): the later stop wins, the service ends STOPPED."""
        if service.state is not RUNNING:
            return

        async def restart() -> None:
            with contextlib.suppress(ServiceError):
                await service.restart()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(restart)
            await checkpoints(delay)
            assert await service.stop(timeout=SETTLE_TIMEOUT) is True, "stop() lost"
        await self.settle(service, f"stop() {delay} checkpoints after restart()")
        assert service.state is STOPPED
        assert self.ownerships[service].error is None

    async def race_stop_and_remove(self, dependency: Worker, delay: int) -> None:
        """The parent stops while one of its dependencies is being removed."""
        parent = self.parent[dependency]
        # Only a top-level parent: stopping a dependency on its own is not in the model.
        if parent is None or parent.state is not RUNNING or self.parent.get(parent) is not None:
            return
        await parent.stop(block=False)
        self.stop_pending.add(parent)
        await checkpoints(delay)
        await parent.remove_dependency(dependency)
        self.parent[dependency] = None
        assert dependency not in parent.dependencies
        for member in tree(dependency):
            assert member.state.is_final, self.dump()

    # ------------------------------------------------------------------ rules

    def pick(self, data: st.DataObject, preferred: Callable[[ServiceState], bool]) -> Worker:
        """A pool service, half the time one whose last seen state the rule is meant for."""
        eligible = [index for index, state in enumerate(self.states) if preferred(state)]
        # The same draw whatever the states, so that a replay draws the same data.
        choice = data.draw(st.integers(0, 2 * len(self.pool) - 1), label="choice")
        if choice < len(self.pool):
            return self.pool[choice]
        choice -= len(self.pool)
        return self.pool[eligible[choice % len(eligible)] if eligible else choice]

    @rule(data=st.data())
    def start_service(self, data: st.DataObject) -> None:
        service = self.pick(data, lambda state: not state.is_active)
        self.in_loop(lambda: self.start(service))

    @rule(data=st.data())
    def stop_service(self, data: st.DataObject) -> None:
        service = self.pick(data, lambda state: state.is_active)
        self.in_loop(lambda: self.stop(service, block=True))

    @rule(data=st.data())
    def stop_service_without_waiting(self, data: st.DataObject) -> None:
        service = self.pick(data, lambda state: state.is_active)
        self.in_loop(lambda: self.stop(service, block=False))

    @rule(data=st.data())
    def crash_service(self, data: st.DataObject) -> None:
        service = self.pick(data, lambda state: state.is_active)
        self.in_loop(lambda: self.crash(service))

    @rule(data=st.data())
    def restart_service(self, data: st.DataObject) -> None:
        service = self.pick(data, lambda state: state is RUNNING)
        self.in_loop(lambda: self.restart(service))

    @rule(target=dependencies, data=st.data(), kind=dependency_kind)
    def add_dependency_to_service(self, data: st.DataObject, kind: Kind) -> MultipleResults[Worker]:
        service = self.pick(data, lambda state: state is RUNNING)
        added = self.in_loop(lambda: self.add_dependency(service, kind))
        return multiple(added)

    @rule(target=dependencies, parent=dependencies, kind=dependency_kind)
    def add_dependency_to_dependency(self, parent: Worker, kind: Kind) -> MultipleResults[Worker]:
        added = self.in_loop(lambda: self.add_dependency(parent, kind))
        return multiple(added)

    @rule(dependency=dependencies)
    def remove_dependency_of_its_parent(self, dependency: Worker) -> None:
        self.in_loop(lambda: self.remove_dependency(dependency))

    @rule(dependency=dependencies)
    def crash_dependency(self, dependency: Worker) -> None:
        self.in_loop(lambda: self.crash(dependency))

    @rule(dependency=dependencies)
    def restart_dependency(self, dependency: Worker) -> None:
        self.in_loop(lambda: self.restart(dependency))

    @rule(data=st.data(), delay=checkpoint_count)
    def start_and_stop_concurrently(self, data: st.DataObject, delay: int) -> None:
        service = self.pick(data, lambda state: not state.is_active)
        self.in_loop(lambda: self.race_start_and_stop(service, delay))

    @rule(data=st.data(), delay=checkpoint_count)
    def start_and_crash_concurrently(self, data: st.DataObject, delay: int) -> None:
        service = self.pick(data, lambda state: not state.is_active)
        self.in_loop(lambda: self.race_start_and_crash(service, delay))

    @rule(data=st.data(), delay=st.integers(min_value=0, max_value=10))
    def stop_and_crash_concurrently(self, data: st.DataObject, delay: int) -> None:
        service = self.pick(data, lambda state: state is RUNNING)
        self.in_loop(lambda: self.race_stop_and_crash(service, delay))

    @rule(data=st.data(), delay=checkpoint_count)
    def restart_and_stop_concurrently(self, data: st.DataObject, delay: int) -> None:
        service = self.pick(data, lambda state: state is RUNNING)
        self.in_loop(lambda: self.race_restart_and_stop(service, delay))

    @rule(dependency=dependencies, delay=checkpoint_count)
    def stop_parent_while_removing_dependency(self, dependency: Worker, delay: int) -> None:
        self.in_loop(lambda: self.race_stop_and_remove(dependency, delay))

    # ------------------------------------------------------------- invariants

    @invariant()
    def services_are_consistent(self) -> None:
        self.in_loop(self.check_consistency)

    async def check_consistency(self) -> None:
        # Wait (bounded) for what a finished step has set in motion: a service reported
        # STOPPED is still unwinding its run(), a stop without waiting is in progress.
        await eventually(self.consistent)
        for service in self.pool:
            if service.kind is Kind.STUBBORN and service.state is not INIT:
                self.unbalanced.update(workers(service))
        for service in self.everyone:
            self.check_service(service)
        self.states = [service.state for service in self.pool]
        if all(
            not service.state.is_active or service.state is RUNNING for service in self.everyone
        ):
            expected = self.baseline_tasks + sum(
                1 + self.expected_tasks(service)
                for service, ownership in self.ownerships.items()
                if not ownership.done.is_set()
            )
            tasks = await self.count_tasks()
            assert tasks == expected, (
                f"{tasks} tasks running, expected {expected}: {task_names()}\n{self.dump()}"
            )

    def consistent(self) -> bool:
        for service in self.everyone:
            if service in self.stop_pending and service.state is RUNNING:
                return False
            if service.state.is_active != bool(service.runs_active):
                return False
            ownership = self.ownerships.get(service)
            if ownership is not None and ownership.done.is_set() == bool(service.runs_active):
                return False
        return True

    def expected_tasks(self, service: Service) -> int:
        """Tasks a running service holds: its run, its background task, its dependencies'."""
        if service.state is not RUNNING:
            return 0
        return 2 + sum(self.expected_tasks(dependency) for dependency in service.dependencies)

    def check_service(self, service: Worker) -> None:
        state, hooks = service.state, service.hooks
        where = f"{service.name} {state.name} hooks={dict(hooks)}\n{self.dump()}"
        assert service.runs_active in (0, 1), where
        assert state.is_active == bool(service.runs_active), f"state vs run(): {where}"
        ownership = self.ownerships.get(service)
        if ownership is not None:
            assert ownership.done.is_set() != bool(service.runs_active), f"owner: {where}"

        held = service.resource_enters - service.resource_exits
        if state.is_active and state is not RUNNING:
            assert held in (0, 1), f"resource held {held}: {where}"
        else:
            assert held == (1 if state is RUNNING else 0), f"resource held {held}: {where}"

        assert hooks["first_start"] == (1 if hooks["start"] else 0), where
        assert hooks["started"] <= hooks["start"], where
        assert hooks["shutdown"] <= hooks["stop"] <= hooks["start"], where
        if state is RUNNING:
            assert hooks["start"] - hooks["stop"] >= 1, where
            assert hooks["started"] >= 1, where
            assert service.crash_reason is None, where
        if service not in self.unbalanced and not state.is_active:
            assert hooks["start"] == hooks["stop"] == hooks["shutdown"], f"hooks: {where}"
        if service not in self.unbalanced and state is RUNNING:
            assert hooks["start"] == hooks["stop"] + 1, f"hooks: {where}"
            assert hooks["stop"] == hooks["shutdown"], f"hooks: {where}"
        if state is CRASHED:
            assert service.crash_reason is not None, where

        if service in self.stop_pending:
            assert state is not RUNNING, f"stop(block=False) lost: {where}"
            if state.is_final:
                self.stop_pending.discard(service)

        for dependency in service.dependencies:
            assert isinstance(dependency, Worker)
            assert self.parent.get(dependency) is service, where
            if not state.is_active:
                assert not dependency.state.is_active, f"{dependency.name} outlives: {where}"
            if state is RUNNING and all(
                not member.state.is_active or member.state is RUNNING for member in tree(service)
            ):
                assert dependency.state is RUNNING, f"{dependency.name}: {where}"

    # --------------------------------------------------------------- teardown

    def teardown(self) -> None:
        try:
            if not self.failed:
                self.in_loop(self.stop_everything)
                self.portal.call(self.closing.set)
                self.home_future.result(timeout=STEP_TIMEOUT)
        finally:
            # Whatever happened, never leave the loop running.
            self.loop.close()

    async def stop_everything(self) -> None:
        for service in self.pool:
            if service.state.is_active:
                assert await service.stop() is True, service.dump_tree()
        for service in self.pool:
            await self.settle(service, "teardown")
        for service in self.everyone:
            assert service.state in (INIT, STOPPED, CRASHED), service.dump_tree()
            assert not service.runs_active, service.dump_tree()
            assert service.resource_enters == service.resource_exits, service.dump_tree()
            assert service.tracebacks() == {}, service.dump_tree()
            self.check_service(service)
        tasks = await self.count_tasks()
        assert tasks == self.baseline_tasks, task_names()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_random_lifecycles_never_hang_leak_or_lose_consistency(backend: str) -> None:
    backend_name = backend

    class Lifecycle(LifecycleMachine):
        backend = backend_name

    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=60,
            stateful_step_count=20,
            deadline=None,
            database=None,
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
