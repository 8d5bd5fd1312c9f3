"""Timers on the real clock: drift and jitter of ``@timer``, and stopping idle timers.

A drift-free timer keeps tick ``k`` on the grid ``t0 + k * interval``: its lateness (how
long after its grid point a tick starts) does not grow with ``k``. The baseline is the
simplest drift-free loop anyio allows, ``await anyio.sleep_until(t0 + k * interval)``; on trio
trio-util's ``periodic()``, which re-anchors on every wake-up and so drifts, is shown too.
"""

from __future__ import annotations

import functools
import math
import sys
import traceback
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio

from _harness import (
    Config,
    Countdown,
    Metrics,
    SampleFunction,
    Table,
    Unavailable,
    compare,
    comparison_cells,
    describe,
    fmt_count,
    fmt_ratio,
    fmt_time,
    now,
    percentile,
    ratio,
    require,
    run_once,
    verdict,
)

NAME = "timers"
TITLE = "Timers: drift and jitter on the real clock, stop latency of idle timers"

#: Lateness ratios are computed on max(value, FLOOR): below it, the figures are noise.
FLOOR = 50e-6
LATENESS_TARGET = 1.2
#: Below this many ticks p99 is the worst tick or nearly: one hiccup of the machine.
P99_MIN_TICKS = 100
LOOP_STOP_TARGET = 1e-3
BODY = 0.003
IDLE_TIMERS = 1_000
#: Time given to a just-started service or task group to reach its idle waits.
SETTLE = 0.02


def tick_plans(config: Config) -> list[tuple[float, int]]:
    """(interval, ticks) pairs: 10 s of ticking each in a full run, 2 s in a quick one."""
    if config.quick:
        return [(0.01, 200), (0.1, 20)]
    return [(0.01, 1_000), (0.1, 100)]


# --- the anyservice side (imported lazily: timers land after the core) ------------------


@functools.cache
def _timer_api() -> tuple[type[Any], Any]:
    from anyservice import Service, timer

    return Service, timer


@functools.cache
def _loop_api() -> tuple[type[Any], Any]:
    from anyservice import LoopService, ServiceState

    return LoopService, ServiceState


@dataclass
class LibraryLateness:
    """What the library's own ``timer_stats`` said, over the ticks recorded before."""

    ticks: int
    total: float
    worst: float


def _ticker(
    interval: float, body: float, times: list[float], needed: int, seen: list[LibraryLateness]
) -> tuple[Any, anyio.Event, anyio.Event]:
    """A service with one ``@timer(interval)`` that records when each tick starts.

    When the last needed tick starts, the timer's statistics (``timer_stats``, if the
    library keeps them) cover exactly the ticks recorded before it: they go to ``seen``.
    """
    service, timer = _timer_api()
    first, enough = anyio.Event(), anyio.Event()

    class Ticker(service):  # type: ignore[misc, valid-type]
        @timer(interval)  # type: ignore[untyped-decorator]  # the lazy import is untyped
        async def tick(self) -> None:
            times.append(anyio.current_time())
            first.set()
            if len(times) == needed:
                stats = getattr(self, "timer_stats", {}).get("tick")
                if stats is not None:
                    seen.append(
                        LibraryLateness(stats.ticks, stats.total_lateness, stats.worst_lateness)
                    )
                enough.set()
            if body:
                await anyio.sleep(body)

    return Ticker(name=f"ticker-{interval:g}s"), first, enough


# --- tick series and their statistics -----------------------------------------------------


@dataclass
class Ticks:
    """How far each measured tick started from where it should have.

    ``lateness`` is against the tick's due time as the loop itself sees it; ``offsets``
    against the ideal grid t0 + k * interval. For a loop on that grid they are the same.
    """

    lateness: list[float]
    offsets: list[float]
    skipped: int = 0
    #: Uncertainty on t0, when t0 had to be estimated, and how it was.
    anchor_error: float = 0.0
    anchored_by: str = "known"

    @property
    def drift(self) -> float:
        """The last tick's start minus its point on the ideal grid."""
        return self.offsets[-1]

    @property
    def trend(self) -> float:
        """How far off the grid the run moved from its first tick to its last, by a
        least-squares line through the offsets: the drift without one tick's jitter."""
        count = len(self.offsets)
        if count < 2:
            return 0.0
        mean_k = (count - 1) / 2
        mean_offset = sum(self.offsets) / count
        covariance = sum((k - mean_k) * (o - mean_offset) for k, o in enumerate(self.offsets))
        variance = sum((k - mean_k) ** 2 for k in range(count))
        return covariance / variance * (count - 1)

    @property
    def drift_bounded(self) -> bool:
        """Whether the run's trend off the grid stays within one tick's worst lateness."""
        return abs(self.trend) <= max(max(self.lateness), FLOOR)

    def p(self, q: float) -> float:
        return percentile(self.lateness, q)


def on_known_grid(times: list[float], t0: float, interval: float) -> Ticks:
    """Ticks 1..n of a loop whose record ``k`` is due at ``t0 + k * interval`` (record 0 is
    the warm-up tick and is left out)."""
    lateness = [times[k] - (t0 + k * interval) for k in range(1, len(times))]
    return Ticks(lateness=lateness, offsets=lateness)


def on_estimated_grid(
    times: list[float], entered: float, interval: float, library: LibraryLateness | None
) -> Ticks:
    """Ticks 1..n of ``@timer``, whose grid origin t0 is the library's.

    A record's grid index is ``floor((time - entered) / interval)``, ``entered`` being the
    clock just before ``async with``: right as long as a tick starts less than one interval
    (minus the start time) late, which the skip policy makes so. This also tells whether
    the first tick fires at t0 or one interval later, and counts dropped grid points.

    t0 comes from the library's own lateness statistics when it keeps them: their total
    over the first ``library.ticks`` records is the sum of ``start - (t0 + k * interval)``,
    which gives t0 up to the few microseconds between the library's clock reading and the
    body's; the anchor error is the disagreement with what the worst lateness gives.
    Without them t0 is bracketed, ``entered <= t0 <= times[j] - k_j * interval`` (no tick
    starts early), and the middle of the bracket is used, its half-width the anchor error.
    """
    indices = [math.floor((t - entered) / interval) for t in times]
    offsets = [t - k * interval for t, k in zip(times, indices, strict=True)]
    if library is not None and 0 < library.ticks <= len(times):
        covered = offsets[: library.ticks]
        t0 = sum(covered) / len(covered) - library.total / library.ticks
        anchor_error = abs(max(covered) - library.worst - t0)
        anchored_by = "statistics"
    else:
        high = min(offsets)
        low = min(entered, high)
        t0, anchor_error = (low + high) / 2, (high - low) / 2
        anchored_by = "bracket"
    lateness = [times[j] - (t0 + indices[j] * interval) for j in range(1, len(times))]
    skipped = indices[-1] - indices[0] - (len(times) - 1)
    return Ticks(
        lateness=lateness,
        offsets=lateness,
        skipped=skipped,
        anchor_error=anchor_error,
        anchored_by=anchored_by,
    )


def on_own_schedule(times: list[float], interval: float) -> Ticks:
    """Ticks of ``periodic()``: each due one interval after the previous one started.

    Its lateness is against that moving due time; its drift against the grid of its first
    tick, which is where the accumulated lateness shows.
    """
    lateness = [times[k] - (times[k - 1] + interval) for k in range(1, len(times))]
    offsets = [times[k] - (times[0] + k * interval) for k in range(1, len(times))]
    return Ticks(lateness=lateness, offsets=offsets)


# --- one run of the tick loops --------------------------------------------------------------


async def sleep_until_loop(t0: float, interval: float, ticks: int, body: float) -> list[float]:
    """The baseline: ticks 0..ticks, tick k at ``t0 + k * interval``."""
    times: list[float] = []
    for k in range(ticks + 1):
        await anyio.sleep_until(t0 + k * interval)
        times.append(anyio.current_time())
        if body:
            await anyio.sleep(body)
    return times


async def periodic_loop(interval: float, ticks: int, body: float) -> list[float]:
    from trio_util import periodic

    times: list[float] = []
    async with aclosing(periodic(interval)) as beats:
        async for _elapsed, _delta in beats:
            times.append(anyio.current_time())
            if len(times) > ticks:
                break
            if body:
                await anyio.sleep(body)
    return times


def timer_and_baseline(
    interval: float, ticks: int, body: float, with_timer: bool
) -> Callable[[], Awaitable[dict[str, Ticks]]]:
    """``@timer`` and the sleep_until loop, ticking side by side in one event loop.

    The loop's grid is offset by half an interval from the timer's, so their wake-ups (and
    bodies: 3 ms < half of 10 ms) never coincide, while both see the same machine noise.
    """

    async def sample() -> dict[str, Ticks]:
        if not with_timer:
            t0 = anyio.current_time() + interval / 2
            return {
                "raw": on_known_grid(
                    await sleep_until_loop(t0, interval, ticks, body), t0, interval
                )
            }
        timer_times: list[float] = []
        seen: list[LibraryLateness] = []
        service, first, enough = _ticker(interval, body, timer_times, ticks + 1, seen)
        entered = anyio.current_time()
        async with service:
            await first.wait()
            t0 = timer_times[0] + interval / 2
            raw_times = await sleep_until_loop(t0, interval, ticks, body)
            await enough.wait()
        return {
            "timer": on_estimated_grid(
                timer_times[: ticks + 1], entered, interval, seen[0] if seen else None
            ),
            "raw": on_known_grid(raw_times, t0, interval),
        }

    return sample


def periodic_alone(interval: float, ticks: int, body: float) -> Callable[[], Awaitable[Ticks]]:
    async def sample() -> Ticks:
        return on_own_schedule(await periodic_loop(interval, ticks, body), interval)

    return sample


# --- stop latency ----------------------------------------------------------------------------


def loop_service_stop(config: Config) -> SampleFunction:
    loop_service, state = require(_loop_api, config)

    class Idle(loop_service):  # type: ignore[misc, valid-type]
        loop_seconds = 60

        async def run_once(self) -> None:
            pass

    async def sample() -> Metrics:
        service = Idle(name="idle-loop")
        async with anyio.create_task_group() as group:
            await group.start(service.run)
            await anyio.sleep(SETTLE)
            stopping = now()
            await service.stop()
            stopped = now()
        if service.state is not state.STOPPED:
            raise AssertionError(f"{service!r} is {service.state!r} after stop()")
        return {"stop": stopped - stopping}

    return sample


def many_timers_stop(config: Config, count: int) -> SampleFunction:
    service, timer = require(_timer_api, config)
    namespace: dict[str, Any] = {}
    for index in range(count):

        async def tick(self: Any) -> None:
            pass

        tick.__name__ = f"tick_{index}"
        tick.__qualname__ = f"ManyTimers.tick_{index}"
        namespace[tick.__name__] = timer(60)(tick)
    many = type("ManyTimers", (service,), namespace)

    async def sample() -> Metrics:
        instance = many(name=f"{count}-timers")
        async with instance:
            await anyio.sleep(SETTLE)
            stopping = now()
            await instance.stop()
            stopped = now()
        return {"stop": stopped - stopping}

    return sample


def sleeping_tasks_stop(count: int) -> SampleFunction:
    """The baseline: a task group of ``count`` tasks in ``sleep_until`` a minute ahead."""

    async def sample() -> Metrics:
        ready = Countdown(count)

        async def sleeper() -> None:
            ready.arrive()
            await anyio.sleep_until(anyio.current_time() + 60)

        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(sleeper)
            await ready.wait()
            await anyio.sleep(SETTLE)
            stopping = now()
            group.cancel_scope.cancel()
        stopped = now()
        return {"stop": stopped - stopping}

    return sample


# --- the report ----------------------------------------------------------------------------


def _drift_cells(ticks: Ticks) -> list[str]:
    return [
        fmt_time(ticks.p(50)),
        fmt_time(ticks.p(99)),
        fmt_time(max(ticks.lateness)),
        fmt_time(ticks.drift),
        fmt_time(ticks.trend),
        "yes" if ticks.drift_bounded else "**no**",
    ]


def run(config: Config) -> list[Table]:
    drift = Table(
        "Drift and lateness on the real clock (one run; percentiles over its ticks)",
        [
            "backend",
            "interval x ticks",
            "body",
            "loop",
            "p50 late",
            "p99 late",
            "max late",
            "drift",
            "trend",
            "bounded?",
            "p50 ratio",
            "p99 ratio",
            "met?",
        ],
    )
    stop = Table(
        "Stop latency of idle timers: `await svc.stop()` vs cancelling sleeping tasks",
        ["backend", "case", "anyservice", "baseline", "ratio", "target", "met?"],
    )

    timer_problem: str | None = None
    try:
        require(_timer_api, config)
    except Unavailable as exc:
        timer_problem = f"skipped: {exc}"
    anchor_errors: list[float] = []
    anchored_by: set[str] = set()
    skipped_ticks = 0

    for backend in config.backends:
        # Warm-up: imports, first event loop, first timer; not reported. A failure of the
        # timer shows (with its traceback) in the measured runs below.
        try:
            run_once(backend, timer_and_baseline(0.01, 20, 0.0, with_timer=timer_problem is None))
        except Exception:
            run_once(backend, timer_and_baseline(0.01, 20, 0.0, with_timer=False))
        for interval, count in tick_plans(config):
            for body in (0.0, BODY):
                label = [
                    backend,
                    f"{fmt_time(interval)} x {fmt_count(count)}",
                    fmt_time(body) if body else "none",
                ]
                problem = timer_problem
                try:
                    found = run_once(
                        backend,
                        timer_and_baseline(interval, count, body, with_timer=problem is None),
                        timeout=interval * count * 3 + 30,
                    )
                except Exception as exc:
                    traceback.print_exc(file=sys.stderr)
                    problem = f"error: {describe(exc)}"
                    found = run_once(
                        backend, timer_and_baseline(interval, count, body, with_timer=False)
                    )
                raw = found["raw"]
                if problem is None:
                    mine = found["timer"]
                    anchor_errors.append(mine.anchor_error)
                    anchored_by.add(mine.anchored_by)
                    skipped_ticks += mine.skipped
                    p50 = ratio(mine.p(50), raw.p(50), FLOOR)
                    p99 = ratio(mine.p(99), raw.p(99), FLOOR)
                    met = mine.drift_bounded and p50 <= LATENESS_TARGET
                    if count >= P99_MIN_TICKS:
                        met = met and p99 <= LATENESS_TARGET
                    drift.add_row(
                        *label,
                        "anyservice @timer",
                        *_drift_cells(mine),
                        fmt_ratio(p50),
                        fmt_ratio(p99),
                        verdict(met),
                    )
                else:
                    drift.add_row(*label, "anyservice @timer", problem, *["—"] * 8)
                drift.add_row(*label, "sleep_until loop (baseline)", *_drift_cells(raw), *["—"] * 3)
                if backend == "trio":
                    beats = run_once(backend, periodic_alone(interval, count, body))
                    drift.add_row(
                        *label,
                        "trio-util periodic",
                        *_drift_cells(beats),
                        fmt_ratio(ratio(beats.p(50), raw.p(50), FLOOR)),
                        fmt_ratio(ratio(beats.p(99), raw.p(99), FLOOR)),
                        "—",
                    )

    repeats = config.repeats()
    for backend in config.backends:
        cases = [
            ("LoopService, idle", lambda: loop_service_stop(config), 1),
            (
                f"{fmt_count(IDLE_TIMERS)} idle @timer(60)",
                lambda: many_timers_stop(config, IDLE_TIMERS),
                IDLE_TIMERS,
            ),
        ]
        for case, subject, tasks in cases:
            service_side, tasks_side = compare(
                backend, subject, sleeping_tasks_stop(tasks), repeats=repeats
            )
            cells = comparison_cells(service_side, tasks_side, "stop", fmt=fmt_time, target=None)
            if tasks == 1:
                value = service_side.median("stop")
                cells[3] = f"<= {fmt_time(LOOP_STOP_TARGET)}"
                cells[4] = verdict(None if value is None else value <= LOOP_STOP_TARGET)
            stop.add_row(backend, case, *cells)

    drift.notes += [
        "Lateness = when a tick started minus when it was due; p50/p99 by linear interpolation "
        "between closest ranks; drift = the last tick's start minus its point on the ideal "
        "grid t0 + k * interval (a signed time).",
        "`@timer` and the `sleep_until(t0 + k * interval)` loop tick side by side in the same "
        "event loop, the loop's grid offset by half an interval so their wake-ups and 3 ms "
        "bodies never coincide: both see the same machine noise. One run per row (the first "
        "tick of each loop is a warm-up and is left out), after a discarded warm-up run.",
        "`@timer`'s t0 is the library's: it is recovered from the timer's own statistics "
        "(`timer_stats['tick'].total_lateness` over the ticks recorded), or, without them, "
        "taken in the middle of [clock before `async with`, earliest start - k * interval]. "
        "Largest anchor uncertainty seen: "
        + (fmt_time(max(anchor_errors)) if anchor_errors else "—")
        + f" (t0 via {' and '.join(sorted(anchored_by)) or '—'}). Grid points dropped by "
        f"the skip policy: {skipped_ticks}.",
        "trio-util `periodic()` (trio only, run on its own) re-anchors on each wake-up: its "
        "lateness is against its own moving due time, its drift against the grid of its "
        "first tick, so its drift grows with the number of ticks.",
        f"Ratios are against the sleep_until loop, each figure raised to at least "
        f"{fmt_time(FLOOR)} first (below that, lateness is scheduler noise).",
        "trend: how far the run moved off the grid from its first tick to its last, read "
        "from a least-squares line through every tick's offset from the grid (the drift "
        "without the last tick's jitter). bounded?: |trend| <= the loop's worst lateness "
        f"(or {fmt_time(FLOOR)}): the drift does not grow with the number of ticks.",
        f"met?: bounded, and p50 and p99 ratios <= {LATENESS_TARGET}x; p99 is judged only "
        f"with {P99_MIN_TICKS} ticks or more (with 20 it is the worst tick, which one "
        "hiccup of a shared machine decides). p99 and max come from one run: on a noisy "
        "machine, read them as an order of magnitude.",
    ]
    stop.notes += [
        f"Medians of {repeats} runs after one discarded warm-up pair, each in a fresh "
        "`anyio.run`, alternating anyservice and baseline.",
        "LoopService: `loop_seconds = 60`, started with `tg.start(svc.run)`, given "
        f"{fmt_time(SETTLE)} to reach its idle wait, then `await svc.stop()` is timed. Target: "
        f"median <= {fmt_time(LOOP_STOP_TARGET)}.",
        f"{fmt_count(IDLE_TIMERS)} timers: one Service class built with `type()` holding "
        f"{fmt_count(IDLE_TIMERS)} `@timer(60)` methods, entered with `async with`, then "
        "`await svc.stop()` is timed. No target: shown for scale.",
        "Baseline: a task group of 1 (or 1 000) tasks in `anyio.sleep_until(now + 60)`; "
        "the time is from `tg.cancel_scope.cancel()` to the exit of `async with`.",
    ]
    return [drift, stop]
