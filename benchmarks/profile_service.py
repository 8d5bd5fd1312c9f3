"""What one service costs to start and stop: tasks, scopes, events, calls, bytes.

Not a benchmark with a baseline (``run.py`` does not run it): a count of what the library
does per service, to read beside the figures of ``bench_service.py``. It starts N services
with one ``@timer`` each under a parent, then under a ``Supervisor``, and N idle services
(no task at all) under a parent, then stops them, under ``cProfile`` (counts only: its
timings are distorted) and, separately, ``tracemalloc``::

    python benchmarks/profile_service.py              # both backends, N = 1 000
    python benchmarks/profile_service.py --backend trio -n 200 --shape idle
    python benchmarks/profile_service.py --cpu        # CPU-time ratios instead


Per service it prints the tasks spawned, cancel scopes entered and cancelled, events made,
event-loop passes (asyncio) and Python function calls of the start and of the stop, and
the bytes held while running, by where they were allocated; then the same for raw anyio,
a task group of N tasks each sleeping until a deadline (for the timer services) or for
ever (for the idle ones): what ``bench_service.py`` compares with.

With ``--cpu`` it times instead, by the CPU time of the process (``time.process_time()``,
which the other jobs of a shared machine move much less than the wall clock), the start
and the stop of N such services against raw anyio's task group, the fastest of
``--repeats`` runs of each, the sides alternating; and the bytes held per running
service. To compare two versions of the library, run it with each one's ``src`` first on
``PYTHONPATH``, one after the other.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import math
import pstats
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import anyio

N = 1_000


def _library() -> tuple[type[Any], type[Any]]:
    from anyservice import Service, timer

    class Ticker(Service):
        @timer(3600.0)
        async def tick(self) -> None:
            pass

    return Service, Ticker


@functools.cache
def _member(shape: str) -> type[Any]:
    """The class of the services measured: one ``@timer`` ("timer"), or nothing ("idle")."""
    service, ticker = _library()
    if shape == "timer":
        return ticker

    class Idle(service):  # type: ignore[misc,valid-type]  # a class made at run time
        pass

    return Idle


def _code_keys(backend: str) -> dict[str, list[Callable[..., Any]]]:
    """The functions whose calls are counted, by what a call of one means."""
    import anyio._core._synchronization as sync

    if backend == "trio":
        import trio

        runner = trio._core._run.Runner
        return {
            "tasks spawned": [runner.spawn_impl],
            "cancel scopes entered": [trio.CancelScope.__enter__],
            "cancel scopes cancelled": [trio.CancelScope.cancel],
            "events made": [sync.Event.__new__],
        }
    import asyncio

    from anyio._backends import _asyncio as backend_module

    return {
        "tasks spawned": [backend_module.TaskGroup._spawn],
        "cancel scopes entered": [backend_module.CancelScope.__enter__],
        "cancel scopes cancelled": [backend_module.CancelScope.cancel],
        "events made": [sync.Event.__new__],
        "event-loop passes": [asyncio.BaseEventLoop._run_once],  # type: ignore[attr-defined]
    }


def _counts(
    profile: cProfile.Profile,
    backend: str,
    size: int,
    keys: dict[str, list[Callable[..., Any]]] | None = None,
) -> dict[str, float]:
    """Calls of each of ``keys`` (by default :func:`_code_keys`) per item of ``size``."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    by_code = {(key[0], key[1], key[2]): value[1] for key, value in stats.items()}
    found: dict[str, float] = {}
    for label, functions in (_code_keys(backend) if keys is None else keys).items():
        total = 0
        for function in functions:
            code = function.__code__
            total += by_code.get((code.co_filename, code.co_firstlineno, code.co_name), 0)
        found[label] = total / size
    found["function calls"] = sum(value[1] for value in stats.values()) / size
    return found


async def _profile(
    size: int, backend: str, owner: str, shape: str
) -> tuple[dict[str, float], dict[str, float]]:
    root = _owned(size, owner, shape)
    start = cProfile.Profile()
    start.enable()
    await root.__aenter__()
    start.disable()
    stop = cProfile.Profile()
    stop.enable()
    await root.stop()
    await root.__aexit__(None, None, None)
    stop.disable()
    return _counts(start, backend, size), _counts(stop, backend, size)


def _sleep(shape: str, deadline: float) -> Any:
    """What a raw task waits on: until a deadline (a timer's), or for ever (an idle one's)."""
    if shape == "timer":
        return anyio.sleep_until(deadline)
    return anyio.sleep_forever()


async def _profile_tasks(
    size: int, backend: str, shape: str
) -> tuple[dict[str, float], dict[str, float]]:
    deadline = anyio.current_time() + 3600.0

    async def sleeper() -> None:
        await _sleep(shape, deadline)

    start = cProfile.Profile()
    group = anyio.create_task_group()
    start.enable()
    await group.__aenter__()
    for _ in range(size):
        group.start_soon(sleeper)
    await anyio.lowlevel.checkpoint()
    start.disable()
    stop = cProfile.Profile()
    stop.enable()
    group.cancel_scope.cancel()
    await group.__aexit__(None, None, None)
    stop.disable()
    return _counts(start, backend, size), _counts(stop, backend, size)


async def _memory_tasks(size: int, shape: str = "timer") -> dict[str, float]:
    deadline = anyio.current_time() + 3600.0

    async def sleeper() -> None:
        await _sleep(shape, deadline)

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    async with anyio.create_task_group() as group:
        for _ in range(size):
            group.start_soon(sleeper)
        await anyio.lowlevel.checkpoint()
        gc.collect()
        after = tracemalloc.take_snapshot()
        group.cancel_scope.cancel()
    tracemalloc.stop()
    return _held(after, before, size)


def _held(after: tracemalloc.Snapshot, before: tracemalloc.Snapshot, size: int) -> dict[str, float]:
    held: dict[str, float] = {}
    for stat in after.compare_to(before, "filename"):
        where = _where(stat.traceback[0].filename)
        held[where] = held.get(where, 0.0) + stat.size_diff / size
    held["total"] = sum(held.values())
    return held


def _where(filename: str) -> str:
    for part in ("anyservice", "anyio", "trio", "asyncio"):
        if f"/{part}/" in filename:
            return part
    return "other"


async def _memory(size: int, owner: str = "parent", shape: str = "timer") -> dict[str, float]:
    member = _member(shape)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    root = _owned(size, owner, shape, member)
    async with root:
        gc.collect()
        after = tracemalloc.take_snapshot()
        await root.stop()
    tracemalloc.stop()
    return _held(after, before, size)


def _owned(size: int, owner: str, shape: str = "timer", member: type[Any] | None = None) -> Any:
    """A parent (``owner="parent"``) or a Supervisor over ``size`` services of ``shape``."""
    from anyservice import Supervisor

    service, _ = _library()
    member = _member(shape) if member is None else member
    members = [member() for _ in range(size)]
    if owner == "supervisor":
        return Supervisor(*members, name="supervisor")
    parent = service(name="parent")
    for member in members:
        parent.add_dependency(member)
    return parent


async def _cpu_services(size: int, owner: str, shape: str = "timer") -> tuple[float, float]:
    """CPU seconds to start ``size`` services until RUNNING, and to stop them."""
    root = _owned(size, owner, shape)
    began = time.process_time()
    await root.__aenter__()
    running = time.process_time()
    await root.stop()
    await root.__aexit__(None, None, None)
    return running - began, time.process_time() - running


async def _cpu_tasks(size: int, shape: str = "timer") -> tuple[float, float]:
    """CPU seconds to start ``size`` tasks until each sleeps (until a deadline), and to cancel."""
    left = size
    ready = anyio.Event()

    async def sleeper() -> None:
        nonlocal left
        left -= 1
        if not left:
            ready.set()
        await _sleep(shape, anyio.current_time() + 3600.0)

    began = time.process_time()
    async with anyio.create_task_group() as group:
        for _ in range(size):
            group.start_soon(sleeper)
        await ready.wait()
        running = time.process_time()
        group.cancel_scope.cancel()
    return running - began, time.process_time() - running


async def _memory_owned(size: int, owner: str, shape: str = "timer") -> float:
    member = _member(shape)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    root = _owned(size, owner, shape, member)
    async with root:
        gc.collect()
        after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return _held(after, before, size)["total"]


#: What --cpu compares, by shape: the owners of the services, beside raw tasks.
_CPU_SIDES = {"timer": ("parent", "supervisor"), "idle": ("parent",)}


def cpu_ratios(backend: str, size: int, repeats: int, shape: str = "timer") -> None:
    """Print the CPU-time and memory ratios of N services of ``shape`` to raw anyio's tasks."""
    owners = _CPU_SIDES[shape]
    fastest: dict[str, list[float]] = {}
    for _ in range(repeats):
        for side in ("raw", *owners):
            gc.collect()
            if side == "raw":
                times = anyio.run(_cpu_tasks, size, shape, backend=backend)
            else:
                times = anyio.run(_cpu_services, size, side, shape, backend=backend)
            best = fastest.setdefault(side, [math.inf, math.inf])
            best[:] = [min(old, new) for old, new in zip(best, times, strict=True)]
    held: dict[str, float] = {}
    for _ in range(2):
        # Twice, alternating, keeping the second: the first run of a side also counts what
        # the backend allocates once (trio's, notably), which a warm one does not.
        held["raw"] = anyio.run(_memory_tasks, size, shape, backend=backend)["total"]
        for owner in owners:
            held[owner] = anyio.run(_memory_owned, size, owner, shape, backend=backend)
    raw_bytes = held["raw"]
    (raw_start, raw_stop) = fastest["raw"]
    what = "with a timer" if shape == "timer" else "idle (no task)"
    print(
        f"\n{backend}, {size} services {what}, CPU time (fastest of {repeats}) "
        f"and bytes held, as ratios to raw anyio's tasks "
        f"({raw_start * 1e3:.1f} ms / {raw_stop * 1e3:.1f} ms / {raw_bytes:.0f} B)"
    )
    for owner in owners:
        start, stop = fastest[owner]
        print(
            f"  {owner:10} start {start / raw_start:.2f}x  stop {stop / raw_stop:.2f}x  "
            f"memory {held[owner] / raw_bytes:.2f}x ({held[owner]:.0f} B)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=("asyncio", "trio"))
    parser.add_argument("-n", type=int, default=N, help=f"services (default {N})")
    parser.add_argument("--cpu", action="store_true", help="time by CPU time instead")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each (--cpu)")
    parser.add_argument(
        "--shape",
        action="append",
        choices=tuple(_CPU_SIDES),
        help="services with one @timer, or idle ones with no task (default: both)",
    )
    options = parser.parse_args()
    shapes = options.shape or tuple(_CPU_SIDES)
    if options.cpu:
        for backend in options.backend or ("asyncio", "trio"):
            for shape in shapes:
                cpu_ratios(backend, options.n, options.repeats, shape)
        return
    for backend in options.backend or ("asyncio", "trio"):
        for shape in shapes:
            what = "with a timer" if shape == "timer" else "idle (no task)"
            for owner in _CPU_SIDES[shape]:
                _print_profile(
                    backend,
                    f"per service {what} ({options.n} under one {owner})",
                    anyio.run(_profile, options.n, backend, owner, shape, backend=backend),
                    anyio.run(_memory, options.n, owner, shape, backend=backend),
                )
            sleep = "until a deadline" if shape == "timer" else "for ever"
            _print_profile(
                backend,
                f"per task sleeping {sleep} ({options.n})",
                anyio.run(_profile_tasks, options.n, backend, shape, backend=backend),
                anyio.run(_memory_tasks, options.n, shape, backend=backend),
            )


def _print_profile(
    backend: str,
    title: str,
    counts: tuple[dict[str, float], dict[str, float]],
    held: dict[str, float],
) -> None:
    start, stop = counts
    print(f"\n{backend}, {title}")
    print(f"  {'':24} {'start':>8} {'stop':>8}")
    for label in start:
        print(f"  {label:24} {start[label]:8.2f} {stop[label]:8.2f}")
    print("  bytes held while running: " + ", ".join(f"{k} {v:.0f}" for k, v in held.items()))


if __name__ == "__main__":
    main()
