"""What one service with a timer costs to start and stop: tasks, scopes, events, bytes.

Not a benchmark with a baseline (``run.py`` does not run it): a count of what the library
does per service, to read beside the figures of ``bench_service.py``. It starts N services
with one ``@timer`` each under a parent, then stops them, under ``cProfile`` (counts only:
its timings are distorted) and, separately, ``tracemalloc``::

    python benchmarks/profile_service.py              # both backends, N = 1 000
    python benchmarks/profile_service.py --backend trio -n 200

Per service it prints the tasks spawned, cancel scopes entered and cancelled, events made,
event-loop passes (asyncio) and Python function calls of the start and of the stop, and
the bytes held while running, by where they were allocated; then the same for raw anyio,
a task group of N tasks each sleeping until a deadline (what ``bench_service.py``
compares with).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
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


def _counts(profile: cProfile.Profile, backend: str, size: int) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    by_code = {(key[0], key[1], key[2]): value[1] for key, value in stats.items()}
    found: dict[str, float] = {}
    for label, functions in _code_keys(backend).items():
        total = 0
        for function in functions:
            code = function.__code__
            total += by_code.get((code.co_filename, code.co_firstlineno, code.co_name), 0)
        found[label] = total / size
    found["function calls"] = sum(value[1] for value in stats.values()) / size
    return found


async def _profile(size: int, backend: str) -> tuple[dict[str, float], dict[str, float]]:
    service, ticker = _library()
    parent = service(name="parent")
    for _ in range(size):
        parent.add_dependency(ticker())
    start = cProfile.Profile()
    start.enable()
    await parent.__aenter__()
    start.disable()
    stop = cProfile.Profile()
    stop.enable()
    await parent.stop()
    await parent.__aexit__(None, None, None)
    stop.disable()
    return _counts(start, backend, size), _counts(stop, backend, size)


async def _profile_tasks(size: int, backend: str) -> tuple[dict[str, float], dict[str, float]]:
    deadline = anyio.current_time() + 3600.0

    async def sleeper() -> None:
        await anyio.sleep_until(deadline)

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


async def _memory_tasks(size: int) -> dict[str, float]:
    deadline = anyio.current_time() + 3600.0

    async def sleeper() -> None:
        await anyio.sleep_until(deadline)

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


async def _memory(size: int) -> dict[str, float]:
    service, ticker = _library()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    parent = service(name="parent")
    for _ in range(size):
        parent.add_dependency(ticker())
    async with parent:
        gc.collect()
        after = tracemalloc.take_snapshot()
        await parent.stop()
    tracemalloc.stop()
    return _held(after, before, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=("asyncio", "trio"))
    parser.add_argument("-n", type=int, default=N, help=f"services (default {N})")
    options = parser.parse_args()
    for backend in options.backend or ("asyncio", "trio"):
        for title, profile, memory in (
            (f"per service with a timer ({options.n} under one parent)", _profile, _memory),
            (f"per task sleeping until a deadline ({options.n})", _profile_tasks, _memory_tasks),
        ):
            start, stop = anyio.run(profile, options.n, backend, backend=backend)
            print(f"\n{backend}, {title}")
            print(f"  {'':24} {'start':>8} {'stop':>8}")
            for label in start:
                print(f"  {label:24} {start[label]:8.2f} {stop[label]:8.2f}")
            held = anyio.run(memory, options.n, backend=backend)
            print(
                "  bytes held while running: " + ", ".join(f"{k} {v:.0f}" for k, v in held.items())
            )


if __name__ == "__main__":
    main()
