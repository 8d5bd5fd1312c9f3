"""The Service core: what a service costs to stop, to start and to keep in memory.

Each anyservice figure is set beside the same thing done with raw anyio: an idle service is
compared with a task sleeping in ``anyio.sleep_forever()``, a parent with dependencies with a
task group holding tasks, a tree of services with nested task groups of the same shape. A
service with one ``@timer`` (the shape users build) is compared with a task sleeping until a
deadline, under one parent and under a ``Supervisor``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from _harness import (
    Config,
    Countdown,
    HeldMemory,
    Metrics,
    SampleFunction,
    Side,
    Table,
    compare,
    comparison_cells,
    fmt_bytes,
    fmt_count,
    fmt_time,
    now,
    require,
)

NAME = "service"
TITLE = "Service core: stop latency, start cost and memory of services"

STOP_SIZES = (1, 100, 1_000, 10_000)
START_SIZES = (1_000, 10_000)
#: The stop target applies at this size; smaller trees are dominated by fixed costs.
STOP_TARGET_SIZE = 1_000
TARGET = 1.5
FANOUT = 10
#: Services with one timer each, under one parent or one supervisor.
TIMER_SIZE = 1_000
#: Long enough that no tick falls inside a run: what is measured is the idle timer.
TIMER_INTERVAL = 3600.0


def children(index: int, size: int) -> range:
    """The children of node ``index`` in a complete ``FANOUT``-ary tree of ``size`` nodes.

    Nodes are numbered breadth first from the root 0, so the tree has exactly ``size``
    nodes and depth ``ceil(log10(size))`` or so.
    """
    first = FANOUT * index + 1
    return range(min(first, size), min(first + FANOUT, size))


# --- the anyservice side (imported lazily: the library may not be there yet) -------------


@functools.cache
def _library() -> tuple[type[Any], Any]:
    from anyservice import Service, ServiceState

    class Idle(Service):  # no tasks, no timers: idle until stopped
        pass

    return Idle, ServiceState


@functools.cache
def _timer_library() -> tuple[type[Any], type[Any]]:
    from anyservice import Service, Supervisor, timer

    class Ticker(Service):  # one timer, as users write them
        @timer(TIMER_INTERVAL)
        async def tick(self) -> None:
            pass

    return Ticker, Supervisor


def _timer_services(owner: str, size: int) -> tuple[Any, list[Any]]:
    """A parent (``owner="parent"``) or a Supervisor over ``size`` services with a timer."""
    ticker, supervisor = _timer_library()
    members = [ticker() for _ in range(size)]
    if owner == "supervisor":
        root = supervisor(*members, name="supervisor")
    else:
        root = _library()[0](name="parent")
        for child in members:
            root.add_dependency(child)
    return root, [root, *members]


def _services(shape: str, size: int) -> tuple[Any, list[Any]]:
    """The root service and every service of a ``shape`` ("flat" or "tree") of ``size``."""
    idle, _ = _library()
    # Left with the default name (the class name): a service's logger is named after it,
    # and loggers live for the life of the process (see the notes).
    if shape == "flat":
        parent = idle(name="parent")
        members = [idle() for _ in range(size)]
        for child in members:
            parent.add_dependency(child)
        return parent, [parent, *members]
    nodes = [idle() for _ in range(size)]
    for index, node in enumerate(nodes):
        for child in children(index, size):
            node.add_dependency(nodes[child])
    return nodes[0], nodes


def _check_states(services: list[Any], expected: str) -> None:
    _, state = _library()
    wrong = [s for s in services if s.state is not getattr(state, expected)]
    if wrong:
        raise AssertionError(
            f"{len(wrong)} of {len(services)} services are not {expected}, "
            f"e.g. {wrong[0]!r} is {wrong[0].state!r}"
        )


Services = Callable[[], tuple[Any, list[Any]]]


def lifecycle(
    config: Config, library: Callable[[], Any], services: Services
) -> Callable[[], SampleFunction]:
    """Time ``async with root`` until all RUNNING and ``await root.stop()`` until all STOPPED."""

    def build() -> SampleFunction:
        require(library, config)

        async def sample() -> Metrics:
            root, members = services()
            started = now()
            async with root:
                running = now()
                _check_states(members, "RUNNING")
                stopping = now()
                await root.stop()
                stopped = now()
            _check_states(members, "STOPPED")
            return {"start": running - started, "stop": stopped - stopping}

        return sample

    return build


def held_memory(
    config: Config, library: Callable[[], Any], services: Services, size: int
) -> Callable[[], SampleFunction]:
    """Bytes held per service once every service is RUNNING."""

    def build() -> SampleFunction:
        require(library, config)

        async def sample() -> Metrics:
            with HeldMemory() as memory:
                root, members = services()
                async with root:
                    held = memory.held()
                    _check_states(members, "RUNNING")
                    await root.stop()
            return {"bytes": held / size}

        return sample

    return build


def service_lifecycle(config: Config, shape: str, size: int) -> Callable[[], SampleFunction]:
    return lifecycle(config, _library, functools.partial(_services, shape, size))


def service_memory(config: Config, size: int) -> Callable[[], SampleFunction]:
    return held_memory(config, _library, functools.partial(_services, "flat", size), size)


def timer_lifecycle(config: Config, owner: str, size: int) -> Callable[[], SampleFunction]:
    return lifecycle(config, _timer_library, functools.partial(_timer_services, owner, size))


def timer_memory(config: Config, owner: str, size: int) -> Callable[[], SampleFunction]:
    services = functools.partial(_timer_services, owner, size)
    return held_memory(config, _timer_library, services, size)


# --- the raw anyio baselines ---------------------------------------------------------------


def _sleep(until: float | None) -> Awaitable[None]:
    """Sleep forever (an idle service), or ``until`` seconds from now (an idle timer).

    Returns the backend's coroutine itself: a coroutine of its own here would add a frame
    to every baseline task.
    """
    if until is None:
        return anyio.sleep_forever()
    return anyio.sleep_until(anyio.current_time() + until)


def tasks_lifecycle(shape: str, size: int, until: float | None = None) -> SampleFunction:
    """A task group of ``size`` sleeping tasks, or nested task groups shaped like the tree.

    The task group opened here plays the parent (flat) or the root (tree): the tree has
    ``size - 1`` tasks besides it, the flat shape ``size``, as the services do. Each task
    sleeps forever, or ``until`` seconds (a timer's wait for its next tick).
    """

    async def sample() -> Metrics:
        if shape == "flat":
            tasks, top = size, range(size)
        else:
            tasks, top = size - 1, children(0, size)
        ready = Countdown(tasks)

        async def sleeper() -> None:
            ready.arrive()
            await _sleep(until)

        async def node(index: int) -> None:
            async with anyio.create_task_group() as group:
                for child in children(index, size):
                    group.start_soon(node, child)
                ready.arrive()
                await anyio.sleep_forever()

        started = now()
        async with anyio.create_task_group() as group:
            for index in top:
                if shape == "flat":
                    group.start_soon(sleeper)
                else:
                    group.start_soon(node, index)
            await ready.wait()
            running = now()
            stopping = now()
            group.cancel_scope.cancel()
        stopped = now()
        return {"start": running - started, "stop": stopped - stopping}

    return sample


def tasks_memory(size: int, until: float | None = None) -> SampleFunction:
    async def sample() -> Metrics:
        with HeldMemory() as memory:
            ready = Countdown(size)

            async def sleeper() -> None:
                ready.arrive()
                await _sleep(until)

            async with anyio.create_task_group() as group:
                for _ in range(size):
                    group.start_soon(sleeper)
                await ready.wait()
                held = memory.held()
                group.cancel_scope.cancel()
        return {"bytes": held / size}

    return sample


# --- the report ----------------------------------------------------------------------------


def plan(config: Config, size: int) -> dict[str, int]:
    """Repeats and warm-ups for one size: the 10 000 runs take seconds, so fewer of them.

    They need no warm-up of their own: the smaller sizes have just run in the same process.
    """
    if size >= 10_000:
        return {"repeats": 1 if config.quick else 3, "warmup": 0}
    return {"repeats": config.repeats(), "warmup": 1}


def memory_repeats(config: Config, size: int) -> int:
    """tracemalloc figures barely move between runs (and 10 000 services take long)."""
    if config.quick:
        return 1 if size < 10_000 else 0
    return 3 if size < 10_000 else 1


def runs(count: int) -> str:
    return {0: "not measured", 1: "1 run"}.get(count, f"{count} runs")


def run(config: Config) -> list[Table]:

    stop_tables = {
        shape: Table(
            f"Stop latency, {label}: `await root.stop()` vs cancelling the task group(s)",
            ["backend", "services", "anyservice", "baseline", "ratio", "target", "met?"],
        )
        for shape, label in (
            ("flat", "flat (N dependencies of one parent)"),
            ("tree", f"tree (N services, up to {FANOUT} dependencies each)"),
        )
    }
    start = Table(
        "Start cost per idle service: `async with parent` until RUNNING, / N",
        ["backend", "services", "anyservice", "baseline", "ratio", "target", "met?"],
    )
    memory = Table(
        "Memory held per idle running service (tracemalloc)",
        ["backend", "services", "anyservice", "baseline", "ratio", "target", "met?"],
    )
    starts: list[tuple[str, int, Side, Side]] = []
    for shape, table in stop_tables.items():
        for backend in config.backends:
            for size in STOP_SIZES:
                subject, baseline = compare(
                    backend,
                    service_lifecycle(config, shape, size),
                    tasks_lifecycle(shape, size),
                    **plan(config, size),
                )
                table.add_row(
                    backend,
                    fmt_count(size),
                    *comparison_cells(
                        subject,
                        baseline,
                        "stop",
                        fmt=fmt_time,
                        target=TARGET if size == STOP_TARGET_SIZE else None,
                    ),
                )
                if shape == "flat" and size in START_SIZES:
                    starts.append((backend, size, subject, baseline))

    for backend, size, subject, baseline in starts:
        for side in (subject, baseline):
            side.samples["start per service"] = [t / size for t in side.samples.get("start", [])]
        start.add_row(
            backend,
            fmt_count(size),
            *comparison_cells(subject, baseline, "start per service", fmt=fmt_time, target=TARGET),
        )

    for backend in config.backends:
        for size in START_SIZES:
            if not memory_repeats(config, size):
                continue
            subject, baseline = compare(
                backend,
                service_memory(config, size),
                tasks_memory(size),
                repeats=memory_repeats(config, size),
                warmup=0,
            )
            memory.add_row(
                backend,
                fmt_count(size),
                *comparison_cells(subject, baseline, "bytes", fmt=fmt_bytes, target=TARGET),
            )

    timer_tables = timer_rows(config)

    flat, tree = stop_tables["flat"], stop_tables["tree"]
    flat.notes += [
        f"Medians of {plan(config, 1)['repeats']} runs after one discarded warm-up pair "
        f"(10 000 services: {plan(config, 10_000)['repeats']} runs, no warm-up: the smaller "
        "sizes ran just before), each run in a fresh `anyio.run`, anyservice and baseline "
        "alternating. The garbage collector stays enabled (its passes are part of the cost).",
        "anyservice: one parent with N idle dependencies; the time is from just before "
        "`await parent.stop()` to its return (every service is then asserted STOPPED, "
        "outside the timing). An idle dependency (no hooks, tasks or resources) waits for "
        "its stop with no task group of its own, and they stop together.",
        "Baseline: a task group holding N tasks in `anyio.sleep_forever()`, all started; the "
        "time is from `tg.cancel_scope.cancel()` to the exit of `async with`.",
        f"Target: <= {TARGET}x the baseline at {fmt_count(STOP_TARGET_SIZE)} services.",
    ]
    tree.notes += [
        f"N services in all: a complete {FANOUT}-ary tree filled breadth first (1 000 "
        "services: 1 + 10 + 100 + 889), each node's children added as its dependencies.",
        "Baseline: the same shape of nested task groups (each node a task that opens a task "
        "group for its children, then sleeps), cancelled at the root.",
        f"Target: <= {TARGET}x the baseline at {fmt_count(STOP_TARGET_SIZE)} services.",
        'Services keep their default name (the class name): named `name=f"child-{i}"`, '
        "each would also create a logger that `logging` keeps for the life of the process.",
    ]
    start.notes += [
        "From the flat runs above: time from entering `async with parent` (services built "
        "and dependencies added beforehand) to the first line inside it, divided by N.",
        "Baseline: `tg.start_soon` of N sleeping tasks, until every task has run up to its "
        "sleep (each ticks a counter; the last sets an Event), divided by N.",
        f"Target: <= {TARGET}x.",
    ]
    memory.notes += [
        "tracemalloc: bytes allocated since just before the services (or tasks) were built "
        "and still held once all are running, after a `gc.collect()`, divided by N. "
        f"Median of {runs(memory_repeats(config, 1_000))} (10 000 services: "
        f"{runs(memory_repeats(config, 10_000))}); not timed (tracemalloc is slow).",
        f"Target: <= {TARGET}x the bytes of a bare sleeping task.",
    ]
    return [flat, tree, start, memory, *timer_tables]


def timer_rows(config: Config) -> list[Table]:
    """N services with one ``@timer`` each, under a parent and under a Supervisor."""
    columns = ["backend", "owner", "anyservice", "baseline", "ratio", "target", "met?"]
    n = fmt_count(TIMER_SIZE)
    start = Table(f"{n} services with a timer: start until all RUNNING", columns)
    stop = Table(f"{n} services with a timer: stop until all STOPPED", columns)
    memory = Table(f"{n} services with a timer: memory held per running service", columns)
    for backend in config.backends:
        for owner in ("parent", "supervisor"):
            subject, baseline = compare(
                backend,
                timer_lifecycle(config, owner, TIMER_SIZE),
                tasks_lifecycle("flat", TIMER_SIZE, until=TIMER_INTERVAL),
                **plan(config, TIMER_SIZE),
            )
            for table, metric in ((start, "start"), (stop, "stop")):
                table.add_row(
                    backend,
                    owner,
                    *comparison_cells(subject, baseline, metric, fmt=fmt_time, target=TARGET),
                )
            subject, baseline = compare(
                backend,
                timer_memory(config, owner, TIMER_SIZE),
                tasks_memory(TIMER_SIZE, until=TIMER_INTERVAL),
                repeats=memory_repeats(config, TIMER_SIZE),
                warmup=0,
            )
            memory.add_row(
                backend,
                owner,
                *comparison_cells(subject, baseline, "bytes", fmt=fmt_bytes, target=TARGET),
            )
    shape = (
        f"anyservice: {n} services of a class with one `@timer({TIMER_INTERVAL:g})` (no tick "
        "falls inside a run), the dependencies of one parent service or the children of one "
        "`Supervisor`. Baseline: a task group of "
        f"{n} tasks each in `anyio.sleep_until(deadline)`."
    )
    start.notes += [
        shape,
        "From entering `async with` until the first line inside it (every service RUNNING), "
        "against `tg.start_soon` of the tasks until each has reached its sleep.",
        f"Target: <= {TARGET}x.",
    ]
    stop.notes += [
        "From just before `await root.stop()` to its return (every service is then asserted "
        "STOPPED), against `tg.cancel_scope.cancel()` until the task group exits. Neither "
        "the parent nor the supervisor can be seen stopping its timer services in any "
        "order, so both stop them together; each idle timer waits on its owner's timer "
        "wheel, which a stop wakes instead of cancelling it, and until its first tick its "
        "service holds no task group of its own.",
        f"Target: <= {TARGET}x.",
    ]
    memory.notes += [
        "tracemalloc: bytes allocated since just before the services (or tasks) were built "
        "and still held once all are running, after a `gc.collect()`, divided by N.",
        f"Target: <= {TARGET}x the bytes of a task sleeping until a deadline.",
    ]
    return [start, stop, memory]
