"""Task runs on SQLite: no-op runs per second, and how soon a submitted run starts.

The limit to compare with is the same pipeline without storage: a raw anyio memory object
stream from a producer to ``limit`` consumer tasks. Every run of the task queue, by
contrast, is an INSERT, a claim under a lease (a write transaction) and a recorded result,
in a real SQLite file, across threads and maybe processes.

Worker processes are this file run as a script: ``python bench_taskqueue.py --worker URL
BACKEND LIMIT`` serves the benchmark's tasks with ``serve()``.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from _harness import (
    Config,
    Metrics,
    SampleFunction,
    Side,
    Table,
    compare,
    fmt_count,
    fmt_time,
    now,
    percentile,
    ratio,
    require,
    verdict,
)

NAME = "taskqueue"
TITLE = "Task queue: no-op runs per second and submit-to-start latency, on SQLite"

THROUGHPUT_TARGET = 1_000.0  # runs/s through one worker
LATENCY_TARGET = 10e-3  # p50 submit-to-start
#: Pause between two latency probes, so that each finds the worker idle.
PROBE_GAP = 0.002
#: Time given to a process to start and import the library, on a slow machine.
STARTUP = 60.0


def runs_for(config: Config) -> int:
    return 1_000 if config.quick else 4_000


def probes_for(config: Config) -> int:
    return 100 if config.quick else 300


#: A fresh, empty broker for one sample: a context manager that gives its URL.
Database = Callable[[], AbstractContextManager[str]]


@contextmanager
def sqlite_database() -> Iterator[str]:
    """A fresh SQLite file in a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        yield f"sqlite:///{Path(directory) / 'runs.db'}"


# --- the anyservice side (imported lazily) -----------------------------------------------


@functools.cache
def _library() -> Any:
    import anyservice.taskqueue

    return anyservice.taskqueue


def define_tasks(url: str) -> tuple[Any, Any, Any]:
    """The queue and the two benchmark tasks, the same in the benchmark and its workers."""
    taskqueue = _library()
    queue = taskqueue.TaskQueue(url)

    @queue.task
    async def noop() -> None:
        return None

    @queue.task
    async def stamp() -> float:
        """When the run started, on the wall clock (comparable between processes)."""
        return time.time()

    return queue, noop, stamp


@asynccontextmanager
async def worker_processes(url: str, backend: str, limit: int, count: int) -> AsyncIterator[None]:
    """``count`` worker processes serving the benchmark tasks, ready on entry, killed on exit."""
    async with AsyncExitStack() as stack:
        logs: list[Path] = []
        processes: list[anyio.abc.Process] = []
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for index in range(count):
            log = directory / f"worker-{index}.log"
            logs.append(log)
            with _open_for_writing(log) as output:
                command = [sys.executable, __file__, "--worker", url, backend, str(limit)]
                process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
            stack.push_async_callback(_kill, process)
            processes.append(process)
        with anyio.fail_after(STARTUP):
            for process, log in zip(processes, logs, strict=True):
                while "] started" not in await anyio.Path(log).read_text():
                    if process.returncode is not None:
                        raise RuntimeError(f"worker exited:\n{await anyio.Path(log).read_text()}")
                    await anyio.sleep(0.02)
        yield


def _open_for_writing(path: Path) -> Any:
    return open(path, "wb")


async def _kill(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        process.kill()
    with anyio.move_on_after(10, shield=True):
        await process.wait()
    await process.aclose()


def throughput(
    config: Config,
    processes: int,
    limit: int,
    database: Database = sqlite_database,
    *,
    runs: int | None = None,
    submit_rate: float = 2_000.0,
    submitters: int = 1,
) -> Callable[[], SampleFunction]:
    """No-op runs per second through one in-process worker, or ``processes`` processes.

    The runs are submitted first, all due at one moment ``t0`` a little later, while the
    workers wait; the figure is runs / (time the last one was recorded COMPLETED - t0).
    ``t0`` leaves time to submit the runs at ``submit_rate`` runs/s, from ``submitters``
    concurrent tasks.
    """

    def build() -> SampleFunction:
        taskqueue = require(_library, config)
        count = runs_for(config) if runs is None else runs

        async def sample() -> Metrics:
            with database() as url:
                queue, noop, _ = define_tasks(url)
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(queue)
                    if processes:
                        await stack.enter_async_context(
                            worker_processes(url, anyio_backend(), limit, processes)
                        )
                    else:
                        await stack.enter_async_context(taskqueue.TaskWorker(noop, limit=limit))
                    payload = noop.encode((), {})
                    due = time.time() + 0.5 + count / submit_rate

                    async def submit(share: int) -> None:
                        for _ in range(share):
                            await queue.broker.submit("noop", payload, scheduled_at=due)

                    async with anyio.create_task_group() as group:
                        for index in range(submitters):
                            group.start_soon(
                                submit, count // submitters + (index < count % submitters)
                            )
                    if time.time() >= due:
                        raise RuntimeError("submitting took longer than planned; runs started")
                    await anyio.sleep(due - time.time())
                    finished = await _all_completed(queue, count, taskqueue.RunState.COMPLETED)
            return {"runs/s": count / (finished - due)}

        return sample

    return build


async def _all_completed(queue: Any, runs: int, completed: Any) -> float:
    """The wall-clock time once every run is COMPLETED (checked every few milliseconds)."""
    with anyio.fail_after(120):
        while (await queue.counts())[completed] < runs:  # noqa: ASYNC110 - rows, no event
            await anyio.sleep(0.005)
    return time.time()


def anyio_backend() -> str:
    import sniffio

    return sniffio.current_async_library()


def latency(
    config: Config, in_process: bool, database: Database = sqlite_database
) -> Callable[[], SampleFunction]:
    """Submit-to-start latency: ``await stamp.delay()`` to the task's first line, one at a time.

    The task returns ``time.time()`` as it starts; the latency is that minus the time just
    before ``delay()``. Wall-clock times, so the worker may be another process.
    """

    def build() -> SampleFunction:
        taskqueue = require(_library, config)
        probes = probes_for(config)

        async def sample() -> Metrics:
            with database() as url:
                queue, _, stamp = define_tasks(url)
                delays: list[float] = []
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(queue)
                    if in_process:
                        await stack.enter_async_context(taskqueue.TaskWorker(stamp))
                    else:
                        await stack.enter_async_context(
                            worker_processes(url, anyio_backend(), 10, 1)
                        )
                    for _ in range(probes):
                        submitted = time.time()
                        run = await stamp.delay()
                        started = await run.result(timeout=30)
                        delays.append(started - submitted)
                        await anyio.sleep(PROBE_GAP)
            return {"p50": percentile(delays, 50), "p99": percentile(delays, 99)}

        return sample

    return build


# --- the raw anyio baselines ---------------------------------------------------------------


def pipeline_throughput(runs: int, limit: int) -> SampleFunction:
    """``runs`` items through a memory object stream to ``limit`` consumers calling a no-op."""

    async def noop() -> None:
        return None

    async def sample() -> Metrics:
        send, receive = anyio.create_memory_object_stream[int](runs)
        for index in range(runs):
            send.send_nowait(index)
        send.close()

        async def consume() -> None:
            async for _ in receive:
                await noop()

        started = now()
        async with anyio.create_task_group() as group:
            for _ in range(limit):
                group.start_soon(consume)
        elapsed = now() - started
        receive.close()
        return {"runs/s": runs / elapsed}

    return sample


def pipeline_latency(probes: int) -> SampleFunction:
    """Send a timestamp into a memory object stream; the consumer notes when it got it."""

    async def sample() -> Metrics:
        send, receive = anyio.create_memory_object_stream[float]()
        delays: list[float] = []
        got = anyio.Event()

        async def consume() -> None:
            nonlocal got
            async for sent in receive:
                delays.append(now() - sent)
                got.set()

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            for _ in range(probes):
                got = anyio.Event()
                await send.send(now())
                await got.wait()
                await anyio.sleep(PROBE_GAP)
            send.close()
        receive.close()
        return {"p50": percentile(delays, 50), "p99": percentile(delays, 99)}

    return sample


# --- the report ----------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{fmt_count(round(value))} runs/s"


def throughput_cells(subject: Side, baseline: Side, target: float | None) -> list[str]:
    base = baseline.median("runs/s")
    target_cell = f">= {fmt_count(round(target))} runs/s" if target is not None else "—"
    if subject.problem is not None:
        return [subject.problem, _rate(base), "—", target_cell, "—"]
    value = subject.median("runs/s")
    assert value is not None
    assert base is not None
    met = value >= target if target is not None else None
    # Time per run, anyservice / baseline, as in the other tables (lower is better).
    per_run = f"{ratio(base, value):,.0f}x".replace(",", " ")
    return [_rate(value), _rate(base), per_run, target_cell, verdict(met)]


def latency_cells(subject: Side, baseline: Side) -> list[str]:
    base50, base99 = baseline.median("p50"), baseline.median("p99")
    target_cell = f"p50 <= {fmt_time(LATENCY_TARGET)}"
    if subject.problem is not None:
        return [subject.problem, "—", fmt_time(base50), fmt_time(base99), target_cell, "—"]
    p50, p99 = subject.median("p50"), subject.median("p99")
    assert p50 is not None
    return [
        fmt_time(p50),
        fmt_time(p99),
        fmt_time(base50),
        fmt_time(base99),
        target_cell,
        verdict(p50 <= LATENCY_TARGET),
    ]


def run(config: Config) -> list[Table]:
    runs, probes = runs_for(config), probes_for(config)
    repeats = config.repeats(full=5, quick=2)
    rates = Table(
        f"No-op runs per second on SQLite ({fmt_count(runs)} runs) vs a memory-stream pipeline",
        ["backend", "workers", "limit", "anyservice", "baseline", "ratio", "target", "met?"],
    )
    latencies = Table(
        "Submit-to-start latency on SQLite: `await task.delay()` to the task's first line",
        ["backend", "worker", "p50", "p99", "baseline p50", "baseline p99", "target", "met?"],
    )
    setups = [
        ("1 in-process", 0, 10, THROUGHPUT_TARGET),
        ("1 in-process", 0, 100, THROUGHPUT_TARGET),
        ("2 processes", 2, 100, None),
    ]
    for backend in config.backends:
        for label, processes, limit, target in setups:
            subject, baseline = compare(
                backend,
                throughput(config, processes, limit),
                pipeline_throughput(runs, limit),
                repeats=repeats,
            )
            rates.add_row(backend, label, limit, *throughput_cells(subject, baseline, target))
        for label, in_process in (("in-process", True), ("another process", False)):
            subject, baseline = compare(
                backend, latency(config, in_process), pipeline_latency(probes), repeats=repeats
            )
            latencies.add_row(backend, label, *latency_cells(subject, baseline))

    rates.notes += [
        f"Medians of {repeats} runs after one discarded warm-up pair, each in a fresh "
        "`anyio.run`, anyservice and baseline alternating.",
        f"anyservice: {fmt_count(runs)} runs of an `async def noop()` task are submitted to "
        "a fresh SQLite file (WAL) while the worker(s) wait, all due at one moment t0; the "
        "figure is runs / (time every run is recorded COMPLETED - t0), polled every 5 ms. "
        "Each run is an INSERT, a claim in a write transaction (up to `limit` runs per "
        "claim), and its recorded result.",
        "'2 processes': two `serve(..., limit=100)` processes of this backend on the same "
        "file (started and serving before t0); they contend for SQLite's one write lock.",
        "Baseline: the same number of items pushed through an anyio memory object stream to "
        "`limit` consumer tasks each awaiting a no-op: what the event loop alone can do.",
        f"Target: >= {fmt_count(round(THROUGHPUT_TARGET))} runs/s through one worker. The ratio "
        "is the time per run, anyservice / baseline: the price of durability, for scale only.",
    ]
    latencies.notes += [
        f"{probes} probes per run, one at a time, {PROBE_GAP * 1e3:g} ms apart, so each "
        "finds the worker idle; the task returns `time.time()` as it starts, and the latency "
        "is that minus the time just before `delay()`. Percentiles per run, then medians of "
        f"{repeats} runs.",
        "in-process: the worker (limit 10) shares the submitter's event loop and file, and "
        "is woken at once; another process: one `serve()` process, which notices other "
        "processes' commits by polling SQLite's `data_version` every 5 ms.",
        "Baseline: a timestamp sent into an anyio memory object stream, latency measured "
        "when the consumer task receives it.",
        f"Target: p50 <= {fmt_time(LATENCY_TARGET)}.",
    ]
    return [rates, latencies]


# --- a worker process ------------------------------------------------------------------------


def worker_main(url: str, backend: str, limit: int) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    _, noop, stamp = define_tasks(url)
    code: int = _library().serve(noop, stamp, limit=limit, backend=backend)
    return code


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit("usage: bench_taskqueue.py --worker URL BACKEND LIMIT (run.py runs the benchmark)")
