"""The cost of metrics: per timer tick and per task run, on vs off; the scrape of a big tree.

"On" is a status server exporting metrics, "off" the same server with ``metrics=False``,
both in the same run, alternating: the difference is what collecting costs (the timer and
task-run hooks; everything else is read at scrape time). The scrape is timed with 1 000
services (each with a timer) and a task worker over a SQLite queue of 10 000 finished
runs; its baseline is prometheus_client itself exposing the same series from its own
metric objects.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from _harness import (
    Config,
    Metrics,
    SampleFunction,
    Table,
    compare,
    fmt_count,
    fmt_ratio,
    fmt_time,
    median,
    now,
    ratio,
    require,
    run_once,
    verdict,
)

NAME = "metrics"
TITLE = "Metrics: cost per timer tick and per task run, on vs off; /metrics scrape time"

TICK_TARGET = 10e-6  # added per tick
RUN_TARGET = 1.05  # on / off per task run
SCRAPE_TARGET = 50e-3
SERVICES = 1_000
FINISHED_RUNS = 10_000
#: A timer this fast is always due: with the burst policy it ticks back to back, so the
#: time per tick is the cost of the tick machinery itself.
BURST_INTERVAL = 1e-5


def ticks_for(config: Config) -> int:
    return 5_000 if config.quick else 20_000


def runs_for(config: Config) -> int:
    return 1_000 if config.quick else 3_000


@functools.cache
def _api() -> Any:
    import anyservice
    import anyservice.taskqueue

    return anyservice


def tick_sample(config: Config, metrics: bool) -> Callable[[], SampleFunction]:
    def build() -> SampleFunction:
        anyservice = require(_api, config)
        ticks = ticks_for(config)

        class Burst(anyservice.Service):
            def __init__(self) -> None:
                super().__init__()
                self.count = 0
                self.done = anyio.Event()

            @anyservice.timer(BURST_INTERVAL, policy="burst")
            async def tick(self) -> None:
                self.count += 1
                if self.count == ticks:
                    self.done.set()

        async def sample() -> Metrics:
            service = Burst()
            async with anyservice.StatusServer(service, metrics=metrics):
                started = now()
                async with service:
                    await service.done.wait()
                    elapsed = now() - started
            return {"tick": elapsed / ticks}

        return sample

    return build


def run_sample(config: Config, metrics: bool) -> Callable[[], SampleFunction]:
    def build() -> SampleFunction:
        anyservice = require(_api, config)
        taskqueue = anyservice.taskqueue
        runs = runs_for(config)

        async def sample() -> Metrics:
            async with taskqueue.TaskQueue("memory://") as queue:

                @queue.task
                async def noop() -> None: ...

                submitted = [await noop.delay() for _ in range(runs)]
                worker = taskqueue.TaskWorker(noop, limit=10)
                async with anyservice.StatusServer(worker, metrics=metrics):
                    started = now()
                    async with worker:
                        for run in submitted:
                            await run.wait()
                        elapsed = now() - started
            return {"run": elapsed / runs}

        return sample

    return build


def on_off_cells(
    on: Any, off: Any, metric: str, *, added_target: float | None, ratio_target: float | None
) -> list[str]:
    if on.problem is not None:
        return [on.problem, fmt_time(off.median(metric)), "—", "—", "—", "—"]
    value, base = on.median(metric), off.median(metric)
    added = value - base
    value_ratio = ratio(value, base)
    if added_target is not None:
        met = added <= added_target
        target = f"<= {fmt_time(added_target)} added"
    else:
        assert ratio_target is not None
        met = value_ratio <= ratio_target
        target = f"<= {ratio_target:g}x"
    return [
        fmt_time(value),
        fmt_time(base),
        fmt_time(added),
        fmt_ratio(value_ratio),
        target,
        verdict(met),
    ]


# --- the hooks alone ----------------------------------------------------------------------

HOOK_CALLS = 100_000


def hook_sample(config: Config, hook: str) -> Callable[[], SampleFunction]:
    """Calls of one hook of a live metrics store, as the timer or the worker makes them."""

    def build() -> SampleFunction:
        anyservice = require(_api, config)

        async def sample() -> Metrics:
            from anyservice._status._metrics import Observations

            service = anyservice.Service(name="subject")
            observations = Observations.start()
            try:
                call = observations.timer_tick if hook == "tick" else observations.task_run
                return {"call": _time_calls(call, service, hook)}
            finally:
                Observations.stop()

        return sample

    return build


def noop_hook_sample(hook: str) -> SampleFunction:
    """The same calls of a function that does nothing: the cost of calling at all."""

    async def sample() -> Metrics:
        def nothing(*args: object) -> None: ...

        return {"call": _time_calls(nothing, object(), hook)}

    return sample


def _time_calls(call: Callable[..., None], service: object, hook: str) -> float:
    started = now()
    if hook == "tick":
        for _ in range(HOOK_CALLS):
            call(service, "tick", 0.0003)
    else:
        for _ in range(HOOK_CALLS):
            call(service, "task", "completed", 0.02)
    return (now() - started) / HOOK_CALLS


# --- the scrape --------------------------------------------------------------------------


async def fill(url: str, runs: int) -> None:
    """A SQLite queue with ``runs`` completed runs of a no-op task."""
    anyservice = _api()
    taskqueue = anyservice.taskqueue
    async with taskqueue.TaskQueue(url) as queue:

        @queue.task
        async def noop() -> None: ...

        submitted = [await noop.delay() for _ in range(runs)]
        async with taskqueue.TaskWorker(noop, limit=100):
            for run in submitted:
                await run.wait()


def scrape_sample(url: str, scrapes: int) -> SampleFunction:
    """The first scrape of a status server's exposition, and the scrapes after it."""

    async def sample() -> Metrics:
        anyservice = _api()
        from anyservice._status._metrics import Exposition, Observations

        class Ticking(anyservice.Service):
            @anyservice.timer(0.5)
            async def tick(self) -> None: ...

        async with anyservice.taskqueue.TaskQueue(url) as queue:

            @queue.task
            async def noop() -> None: ...

            root = anyservice.Service(name="root")
            for index in range(SERVICES - 2):
                root.add_dependency(Ticking(name=f"service-{index}"))
            root.add_dependency(anyservice.taskqueue.TaskWorker(noop, name="worker"))
            observations = Observations.start()
            try:
                async with root:
                    await anyio.sleep(1.1)  # every timer has ticked: histograms to export
                    first, later = [], []
                    for _ in range(scrapes):
                        # A server's first scrape formats every family; the ones after
                        # it, only those whose rows changed (here: the lateness
                        # histogram, as the timers go on ticking).
                        exposition = Exposition(root, observations)
                        for times in (first, later, later):
                            started = now()
                            body, _ = await exposition.render()
                            times.append(now() - started)
            finally:
                Observations.stop()
        assert b'anyservice_task_queue_depth{state="completed"} 10000.0' in body
        return {"first": median(first), "later": median(later), "bytes": len(body)}

    return sample


def plain_scrape_sample(scrapes: int) -> SampleFunction:
    """prometheus_client's own objects holding the same series, exposed the same way."""

    async def sample() -> Metrics:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

        from anyservice._status._metrics import LATENESS_BUCKETS

        registry = CollectorRegistry()
        up = Gauge("up", "", ["service"], registry=registry)
        restarts = Counter("restarts", "", ["service"], registry=registry)
        overruns = Counter("overruns", "", ["service", "timer"], registry=registry)
        missed = Counter("missed", "", ["service", "timer"], registry=registry)
        lateness = Histogram(
            "lateness", "", ["kind", "timer"], buckets=LATENESS_BUCKETS, registry=registry
        )
        for index in range(SERVICES):
            name = f"service-{index}"
            up.labels(name).set(1)
            restarts.labels(name)
            for counter in (overruns, missed):
                counter.labels(name, "tick").inc()
            lateness.labels("Ticking", "tick").observe(0.0001)
        times = []
        for _ in range(scrapes):
            started = now()
            body = generate_latest(registry)
            times.append(now() - started)
        return {"scrape": median(times), "bytes": len(body)}

    return sample


def run(config: Config) -> list[Table]:
    logging.getLogger("anyservice").setLevel(logging.ERROR)
    repeats = config.repeats(full=7, quick=3)
    ticks = Table(
        f"Per timer tick ({fmt_count(ticks_for(config))} back-to-back ticks): metrics on vs off",
        ["backend", "on", "off", "added", "ratio", "target", "met?"],
    )
    runs = Table(
        f"Per task run ({fmt_count(runs_for(config))} no-op runs, memory broker): "
        "metrics on vs off",
        ["backend", "on", "off", "added", "ratio", "target", "met?"],
    )
    scrape = Table(
        f"`/metrics` scrape, {fmt_count(SERVICES)} services and {fmt_count(FINISHED_RUNS)} "
        "finished runs on SQLite, vs prometheus_client exposing the same series",
        ["backend", "scrape", "anyservice", "baseline", "ratio", "size", "target", "met?"],
    )
    for backend in config.backends:
        on, off = compare(
            backend,
            tick_sample(config, True),
            run_once_off(tick_sample(config, False)),
            repeats=repeats,
        )
        ticks.add_row(
            backend, *on_off_cells(on, off, "tick", added_target=TICK_TARGET, ratio_target=None)
        )
    hooks = Table(
        f"The hooks alone ({fmt_count(HOOK_CALLS)} calls): one observation vs calling a no-op",
        ["backend", "hook", "anyservice", "baseline", "added", "target", "met?"],
    )
    for backend in config.backends:
        for hook, target in (("tick", TICK_TARGET), ("run", None)):
            subject, baseline = compare(
                backend, hook_sample(config, hook), noop_hook_sample(hook), repeats=repeats
            )
            if subject.problem is not None:
                hooks.add_row(backend, hook, subject.problem, "—", "—", "—", "—")
                continue
            value, base = subject.median("call"), baseline.median("call")
            assert value is not None
            assert base is not None
            hooks.add_row(
                backend,
                "timer tick" if hook == "tick" else "task run",
                fmt_time(value),
                fmt_time(base),
                fmt_time(value - base),
                f"<= {fmt_time(target)} added" if target is not None else "—",
                verdict(value - base <= target) if target is not None else "—",
            )
    for backend in config.backends:
        on, off = compare(
            backend,
            run_sample(config, True),
            run_once_off(run_sample(config, False)),
            repeats=repeats,
        )
        runs.add_row(
            backend, *on_off_cells(on, off, "run", added_target=None, ratio_target=RUN_TARGET)
        )
    scrapes = config.repeats(full=15, quick=5)
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'runs.db'}"
        try:
            require(_api, config)
            run_once("asyncio", lambda: fill(url, FINISHED_RUNS), timeout=600.0)
            ready = True
        except Exception as exc:  # the subject cannot run; the baseline still can
            ready = False
            problem = f"skipped: {exc}"
        for backend in config.backends:
            baseline = run_once(backend, plain_scrape_sample(scrapes))
            if not ready:
                scrape.add_row(
                    backend, "—", problem, fmt_time(baseline["scrape"]), "—", "—", "—", "—"
                )
                continue
            subject = run_once(backend, scrape_sample(url, scrapes), timeout=600.0)
            for which, label in (("first", "first"), ("later", "the next ones")):
                scrape.add_row(
                    backend,
                    label,
                    fmt_time(subject[which]),
                    fmt_time(baseline["scrape"]),
                    fmt_ratio(ratio(subject[which], baseline["scrape"])),
                    f"{subject['bytes'] / 1024:.0f} KiB",
                    f"<= {fmt_time(SCRAPE_TARGET)}",
                    verdict(subject[which] <= SCRAPE_TARGET),
                )
    ticks.notes += [
        'A `@timer(1e-05, policy="burst")` is always due, so it ticks back to back: the time '
        "per tick is the tick machinery's own. Both sides run an idle status server in the "
        "same loop; only `metrics=` differs.",
    ]
    runs.notes += [
        "The memory broker, so that the run's own cost (no disk) is as small as it gets and "
        "the hook's share as large as it gets; on SQLite the share is smaller still.",
    ]
    scrape.notes += [
        f"One running tree (built once per backend: 1 000 services are not started per "
        f"scrape), {scrapes} fresh expositions of it, each scraped three times: the median of "
        "the first scrapes, and of the two after each. The first formats every family; a "
        "later one formats again only the families whose rows changed since the scrape "
        "before (here the lateness histogram: the timers go on ticking) and answers the "
        "others with the text formatted then. Every scrape includes reading "
        "every service's state and timer statistics and the broker's grouped count of runs by "
        "state; the baseline only formats prometheus_client's own objects holding the same "
        "services and timers.",
        "The text is formatted one family at a time in the event loop, which runs the "
        "tree's timers between families (formatting in a worker thread, as before, shared "
        "the GIL with the busy loop and took several times longer, most on trio).",
        "About 4 000 lines: per service `up`, restarts, and its timer's overruns and missed "
        "ticks; the lateness histogram is one per service class and timer. Before, with a "
        "lateness histogram and a ticks counter per service, the same tree was about 19 000 "
        "lines and 1.6 MiB, and scraped in 1.2 s (asyncio) and 4.4 s (trio) here.",
    ]
    hooks.notes += [
        "What metrics add to each tick and each run outcome, without the rest of the tick or "
        "run around it: on a shared, busy machine the on/off tables above move by more than "
        "this from one run to the next.",
    ]
    return [ticks, hooks, runs, scrape]


def run_once_off(build: Callable[[], SampleFunction]) -> SampleFunction:
    """The "off" side as compare() wants a baseline: an already built sample function."""
    return build()
