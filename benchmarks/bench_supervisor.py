"""Supervisor: how long a crashed child is down before its replacement is RUNNING.

A ``Supervisor`` with one child (one-for-one, no backoff) is set beside the simplest restart
loop raw anyio allows: a task that runs the child in a task group, catches its error with
``except*`` and runs it again. On both sides a driver tells the child to crash, many times
per run, and each crash is timed from the line before ``raise`` to the replacement's start.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from _harness import (
    Config,
    Metrics,
    SampleFunction,
    Side,
    Table,
    compare,
    comparison_cells,
    fmt_time,
    now,
    percentile,
    require,
)

if TYPE_CHECKING:
    from anyservice import Service, Supervisor

NAME = "supervisor"
TITLE = "Supervisor: restart latency of a crashed child (one-for-one, no backoff)"

#: Scheduling passes the driver lets go by between a child being up again and the next crash:
#: the restart's tail (a few passes) finishes and both sides fall idle, so every crash
#: starts from the same quiet state. Passes rather than a sleep: a sleep lets the CPU idle,
#: and waking it up costs more, and varies more between runs, than the restart itself.
SETTLE_PASSES = 20
LIBRARY_LOGGER = "anyservice"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def crash_count(config: Config) -> int:
    """Timed crashes per run (one more is made first, as a warm-up)."""
    return 50 if config.quick else 200


class Cycle:
    """What the driver and a crashing child tell each other, and the clock readings taken.

    Each start of the child makes a fresh ``crash`` event before it reports being up, so the
    driver, which waits for ``up``, always sets the event the current child waits on.
    """

    def __init__(self) -> None:
        self.crash = anyio.Event()
        self.up = anyio.Event()
        self.crashed_at: list[float] = []
        self.up_at: list[float] = []
        #: When the child's own work (the body of its task) began, at each start.
        self.working_at: list[float] = []

    def child_up(self) -> None:
        self.up_at.append(now())
        self.up.set()


async def drive(cycle: Cycle, crashes: int) -> None:
    """Crash the child ``crashes`` times, each time once its replacement is up and idle."""
    for _ in range(crashes):
        await cycle.up.wait()
        cycle.up = anyio.Event()
        for _ in range(SETTLE_PASSES):
            await anyio.lowlevel.checkpoint()
        cycle.crash.set()
    await cycle.up.wait()


def restart_times(starts: list[float], crashed_at: list[float]) -> list[float]:
    """Seconds from each crash to the next start; the first crash (a warm-up) left out.

    Start 0 is the first one; start ``k + 1`` replaces the child that crashed ``k``-th.
    """
    if len(starts) != len(crashed_at) + 1:
        raise AssertionError(f"{len(crashed_at)} crashes but {len(starts)} starts")
    return [starts[k + 1] - crashed_at[k] for k in range(1, len(crashed_at))]


def summary(prefix: str, times: list[float]) -> Metrics:
    return {f"{prefix} p50": percentile(times, 50), f"{prefix} p99": percentile(times, 99)}


# --- the anyservice side (imported lazily: the library may not be there yet) -------------


@functools.cache
def _library() -> Callable[[Cycle], tuple[Supervisor, Service]]:
    """A factory of a one-for-one supervisor, no backoff, over one child that crashes when
    told."""
    from anyservice import Backoff, Service, Supervisor, task

    class Crasher(Service):
        told: anyio.Event

        def __init__(self, cycle: Cycle) -> None:
            super().__init__()
            self.cycle = cycle

        async def on_start(self) -> None:
            self.told = self.cycle.crash = anyio.Event()

        async def on_started(self) -> None:
            # The service turns RUNNING as soon as this returns, with no checkpoint between.
            self.cycle.child_up()

        @task
        async def work(self) -> None:
            self.cycle.working_at.append(now())
            await self.told.wait()
            self.cycle.crashed_at.append(now())
            raise RuntimeError("crash requested by the benchmark")

    def supervised(cycle: Cycle) -> tuple[Supervisor, Service]:
        child = Crasher(cycle)
        supervisor = Supervisor(
            child,
            strategy="one_for_one",
            # Never the limit: a run restarts a few hundred times within a second or two.
            max_restarts=1_000_000,
            within=1.0,
            backoff=Backoff(initial=0),
        )
        return supervisor, child

    return supervised


class FormatAndDrop(logging.Handler):
    """Formats each record as a file or stream handler would (traceback included), then drops
    it: the cost of logging a crash, without the I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)
        self.records += 1


@contextmanager
def library_logging(sink: logging.Handler | None) -> Iterator[None]:
    """The ``anyservice`` logger at CRITICAL (``sink`` None: nothing it logs here gets past
    the level check), or at WARNING into ``sink`` only; restored afterwards."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    level, propagate = logger.level, logger.propagate
    if sink is None:
        logger.setLevel(logging.CRITICAL)
    else:
        logger.setLevel(logging.WARNING)
        logger.addHandler(sink)
        logger.propagate = False
    try:
        yield
    finally:
        if sink is not None:
            logger.removeHandler(sink)
        logger.setLevel(level)
        logger.propagate = propagate


def supervisor_restarts(config: Config, crashes: int, logged: bool) -> Callable[[], SampleFunction]:
    def build() -> SampleFunction:
        supervised = require(_library, config)

        async def sample() -> Metrics:
            cycle = Cycle()
            supervisor, child = supervised(cycle)
            sink = FormatAndDrop() if logged else None
            with library_logging(sink):
                async with supervisor:
                    await drive(cycle, crashes + 1)
                    if child.restart_count != crashes + 1 or not child.started:
                        raise AssertionError(
                            f"after {crashes + 1} crashes: {child!r}, "
                            f"restart_count={child.restart_count}"
                        )
            metrics = {
                **summary("running", restart_times(cycle.up_at, cycle.crashed_at)),
                **summary("working", restart_times(cycle.working_at, cycle.crashed_at)),
            }
            if sink is not None:
                metrics["log records per crash"] = sink.records / (crashes + 1)
            return metrics

        return sample

    return build


# --- the raw anyio baseline ----------------------------------------------------------------


def restart_loop(crashes: int) -> SampleFunction:
    """A task that runs the child in a task group and, when it raises, runs it again."""

    async def sample() -> Metrics:
        cycle = Cycle()

        async def child() -> None:
            cycle.child_up()
            told = cycle.crash = anyio.Event()
            await told.wait()
            cycle.crashed_at.append(now())
            raise RuntimeError("crash requested by the benchmark")

        async def restart_forever() -> None:
            while True:
                try:
                    async with anyio.create_task_group() as group:
                        group.start_soon(child)
                except* RuntimeError:
                    pass

        async with anyio.create_task_group() as group:
            group.start_soon(restart_forever)
            await drive(cycle, crashes + 1)
            group.cancel_scope.cancel()
        # The child's first line is both when it is up and when its work begins.
        times = restart_times(cycle.up_at, cycle.crashed_at)
        return {**summary("running", times), **summary("working", times)}

    return sample


# --- the report ----------------------------------------------------------------------------


def cells(subject: Side, baseline: Side, metric: str) -> list[str]:
    """``anyservice | baseline | ratio`` for one metric (no target: the issue sets none)."""
    return comparison_cells(subject, baseline, metric, fmt=fmt_time, target=None)[:3]


def run(config: Config) -> list[Table]:
    table = Table(
        "Restart latency: from a child's `raise` to its replacement running",
        [
            "backend",
            "until",
            "anyservice logging",
            "anyservice p50",
            "baseline p50",
            "p50 ratio",
            "anyservice p99",
            "baseline p99",
            "p99 ratio",
        ],
    )
    crashes = crash_count(config)
    repeats = config.repeats()
    logging_costs: list[str] = []
    records_per_crash: set[float] = set()

    for backend in config.backends:
        quiet, quiet_base = compare(
            backend,
            supervisor_restarts(config, crashes, False),
            restart_loop(crashes),
            repeats=repeats,
        )
        logged, logged_base = compare(
            backend,
            supervisor_restarts(config, crashes, True),
            restart_loop(crashes),
            repeats=repeats,
        )
        rows = [
            ("RUNNING (`on_started`)", "off (CRITICAL)", quiet, quiet_base, "running"),
            ("`@task` body's first line", "off (CRITICAL)", quiet, quiet_base, "working"),
            ("RUNNING (`on_started`)", "WARNING, formatted", logged, logged_base, "running"),
        ]
        for until, log_level, subject, baseline, metric in rows:
            table.add_row(
                backend,
                until,
                log_level,
                *cells(subject, baseline, f"{metric} p50"),
                *cells(subject, baseline, f"{metric} p99"),
            )
        quiet_p50, logged_p50 = quiet.median("running p50"), logged.median("running p50")
        if quiet_p50 is not None and logged_p50 is not None:
            logging_costs.append(f"{backend} {fmt_time(logged_p50 - quiet_p50)}")
        records_per_crash.update(logged.samples.get("log records per crash", []))

    table.notes += [
        f"Each run: one Supervisor (`strategy='one_for_one'`, `backoff=Backoff(initial=0)`, "
        "`max_restarts=1_000_000`, `within=1.0`) over one child Service whose `@task` waits "
        f"for an Event and raises RuntimeError; {crashes} timed crashes, after one more that "
        "is a warm-up. The driver crashes the child again once its replacement is up, after "
        f"letting {SETTLE_PASSES} scheduling passes go by (`anyio.lowlevel.checkpoint()`, not "
        "timed) so that each restart has fully finished. Not a sleep: with a 1 ms sleep "
        "instead (a separate check on this machine) the CPU idles before each crash, and "
        "both sides measured 40-70 µs slower, with per-run medians up to 2x apart.",
        "Time: from `time.perf_counter()` read on the line before `raise` to the replacement "
        "being RUNNING (read first thing in its `on_started`, after which the library sets "
        "RUNNING with no checkpoint in between), or to the first line of its `@task` body "
        "(scheduled by the start, it runs just after). The child's restart_count is checked "
        "afterwards.",
        "Baseline: a task running `async with anyio.create_task_group() as tg: "
        "tg.start_soon(child)` in a `while True` that catches the child's error with "
        "`except* RuntimeError`; the child reads the clock on its first line, then waits to "
        "be told to crash. Same driver, same settling.",
        f"p50 and p99 are over the crashes of one run; the table gives the median of those "
        f"over {repeats} runs after one discarded warm-up pair, each run in a fresh "
        "`anyio.run`, anyservice and baseline alternating. No target is set: the ratio is "
        "given for reference."
        + (" With 50 crashes a run's p99 is nearly its worst restart." if config.quick else ""),
        "Logging: per crash the child logs `crashed` at ERROR with its traceback and the "
        "supervisor a WARNING `restarting`. `off`: the `anyservice` logger at CRITICAL for the "
        "run (restored after), so those calls stop at the level check; formatting tracebacks "
        "to nowhere would otherwise be timed. `WARNING, formatted`: the default level, into "
        "a handler that formats each record (traceback and timestamp included, as a file "
        "handler would) and drops it, the logger not propagating; the baseline logs nothing. "
        "Log records per crash: "
        + (", ".join(f"{n:g}" for n in sorted(records_per_crash)) or "—")
        + "; added p50 per crash: "
        + ("; ".join(logging_costs) or "—")
        + ".",
    ]
    return [table]
