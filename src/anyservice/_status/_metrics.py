"""``GET /metrics``: the Prometheus text format, through ``prometheus_client``.

Almost every figure is read from the tree at scrape time (states, restart counts, timer
statistics, task-worker counts, the queue's runs by state), so nothing is collected
between scrapes. The two histograms (timer lateness, task-run duration) and the task-run
outcomes by task need every event: while at least one status server exports metrics,
:data:`anyservice._hooks` points at :class:`Observations`, which counts into fixed
buckets; with none, the hooks are ``None`` and nothing is kept.

Labels are service, class, timer and task names (and run states), never run ids, so the
number of series is bounded by the code, not by the traffic. A scrape's cost is its
lines (prometheus_client formats each with several escapes and checks), so a service
exports few: a service with one timer, four.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import anyio
import anyio.lowlevel

from .. import _hooks
from ._core_names import Service, ServiceState
from ._http import require
from ._snapshot import task_workers, walk

if TYPE_CHECKING:
    from ..taskqueue import TaskWorker

__all__ = ["METRICS_EXTRA_HINT", "Exposition", "Observations", "require_prometheus_client"]

METRICS_EXTRA_HINT = "pip install 'anyservice[metrics]'"

log = logging.getLogger("anyservice.status")

#: Lateness of a timer tick: sub-millisecond is the norm, seconds mean a blocked loop.
LATENESS_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
#: Duration of a task run: prometheus_client's defaults, stretched to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)
#: The longest a scrape waits for a broker's counts before leaving the queue depth out.
QUEUE_DEPTH_TIMEOUT = 2.0


def require_prometheus_client() -> None:
    """Check that prometheus_client can be imported (or raise ImportError with the extra)."""
    require("prometheus_client", what="metrics", hint=METRICS_EXTRA_HINT)


def metrics_available() -> bool:
    try:
        require_prometheus_client()
    except ImportError:
        return False
    return True


class _Histogram:
    """Counts per bucket (not cumulative) and the sum: an observation is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class Observations:
    """What the hooks saw, by service (weakly: a service dropped takes its figures along)."""

    _users = 0
    _current: Observations | None = None

    def __init__(self) -> None:
        #: By service class and timer name (see :func:`_timer_families`).
        self.lateness: dict[tuple[str, str], _Histogram] = {}
        self.durations: WeakKeyDictionary[Any, dict[str, _Histogram]] = WeakKeyDictionary()
        self.outcomes: WeakKeyDictionary[Any, dict[tuple[str, str], int]] = WeakKeyDictionary()

    @classmethod
    def start(cls) -> Observations:
        """Turn the hooks on (for one more status server) and return the shared store."""
        if cls._current is None:
            cls._current = cls()
            _hooks.timer_tick = cls._current.timer_tick
            _hooks.task_run = cls._current.task_run
        cls._users += 1
        return cls._current

    @classmethod
    def stop(cls) -> None:
        """One status server less; with none left, the hooks are off and the store dropped."""
        cls._users -= 1
        if cls._users <= 0:
            cls._users = 0
            cls._current = None
            _hooks.timer_tick = None
            _hooks.task_run = None

    def timer_tick(self, service: Any, timer: str, lateness: float) -> None:
        key = (type(service).__name__, timer)
        histogram = self.lateness.get(key)
        if histogram is None:
            histogram = self.lateness[key] = _Histogram(LATENESS_BUCKETS)
        histogram.observe(lateness)

    def task_run(self, worker: Any, task: str, outcome: str, seconds: float | None) -> None:
        counts = self.outcomes.get(worker)
        if counts is None:
            counts = self.outcomes[worker] = {}
        counts[task, outcome] = counts.get((task, outcome), 0) + 1
        if seconds is not None:
            by_task = self.durations.get(worker)
            if by_task is None:
                by_task = self.durations[worker] = {}
            histogram = by_task.get(task)
            if histogram is None:
                histogram = by_task[task] = _Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)


async def queue_depths(workers: Iterable[TaskWorker]) -> dict[str, int] | None:
    """Runs by state over the workers' queues, from their brokers; ``None`` if none answered.

    One grouped count per queue (an index covers the state), bounded in time.
    """
    depths: dict[str, int] | None = None
    seen: set[int] = set()
    for worker in workers:
        queue = worker.queue
        if id(queue) in seen or worker.state not in (ServiceState.RUNNING, ServiceState.STOPPING):
            continue
        seen.add(id(queue))
        counts = None
        with anyio.move_on_after(QUEUE_DEPTH_TIMEOUT):
            try:
                counts = await queue.broker.counts()
            # A scrape reports what it can: a broker that fails now is the worker's to
            # report (its /healthz says so), not a reason to fail every other figure.
            except Exception as exc:
                log.debug("queue depth of %s left out: %r", queue.url, exc)
        if counts is None:
            continue
        depths = depths or {}
        for state, number in counts.items():
            # Lower case, as the states of anyservice_task_runs_total.
            label = str(state).lower()
            depths[label] = depths.get(label, 0) + number
    return depths


@dataclass(frozen=True, slots=True)
class _Series:
    """A counter or gauge family as a scrape read it: labels' values and a value per row.

    Rows are plain tuples, cheap to read and to compare: a family whose rows (and name,
    help and labels) are those of the last scrape is not formatted again.
    """

    name: str
    documentation: str
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    rows: Sequence[tuple[tuple[str, ...], float]]

    def family(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.samples import Sample

        counter = self.kind == "counter"
        kind = CounterMetricFamily if counter else GaugeMetricFamily
        family = kind(self.name, self.documentation, labels=self.labels)
        sample_name = f"{self.name}_total" if counter else self.name
        labels = self.labels
        # Samples made here rather than by add_metric(), which checks and copies each.
        family.samples = [
            Sample(sample_name, dict(zip(labels, values, strict=True)), value)
            for values, value in self.rows
        ]
        return family


def _families(
    services: list[Service],
    workers: list[TaskWorker],
    observations: Observations,
    depths: dict[str, int] | None,
) -> list[Any]:
    """What one scrape exports: a :class:`_Series` per counter or gauge, histogram families."""
    families = [*_service_series(services), *_timer_families(services, observations)]
    if workers:
        families += _task_families(workers, observations)
    if depths is not None:
        families.append(
            _Series(
                "anyservice_task_queue_depth",
                "Runs in the task queue by state, read from the broker at scrape time.",
                "gauge",
                ("state",),
                [((state,), number) for state, number in sorted(depths.items())],
            )
        )
    return families


def _service_series(services: list[Service]) -> list[_Series]:
    running = ServiceState.RUNNING
    up, healthy, restarts = [], [], []
    for service in services:
        name = (service.name,)
        up.append((name, 1.0 if service.state is running else 0.0))
        health = service.last_health
        if health is not None:
            healthy.append((name, 1.0 if health.healthy else 0.0))
        restarts.append((name, service.restart_count))
    by_service = ("service",)
    return [
        _Series(
            "anyservice_service_up",
            "1 while the service is RUNNING, else 0.",
            "gauge",
            by_service,
            up,
        ),
        _Series(
            "anyservice_service_healthy",
            "The last health check: 1 passed, 0 failed (only services that ran one).",
            "gauge",
            by_service,
            healthy,
        ),
        _Series(
            "anyservice_service_restarts",
            "Restarts of the service.",
            "counter",
            by_service,
            restarts,
        ),
    ]


def _timer_families(services: list[Service], observations: Observations) -> list[Any]:
    from prometheus_client.core import HistogramMetricFamily

    overruns, missed = [], []
    for service in services:
        name = service.name
        for timer, stats in service.timer_stats.items():
            labels = (name, timer)
            overruns.append((labels, stats.overruns))
            missed.append((labels, stats.missed))
    # By class and timer, not by service: how late a tick starts is the event loop's
    # business, shared by every service on it, and one histogram per service would be
    # most of a large tree's scrape. Which service falls behind, its overruns and
    # missed ticks say (and /tree, with each timer's worst lateness).
    lateness = HistogramMetricFamily(
        "anyservice_timer_lateness_seconds",
        "How late timer ticks started after they were due, by service class and timer.",
        labels=["kind", "timer"],
    )
    for (kind, timer), histogram in sorted(observations.lateness.items()):
        lateness.add_metric([kind, timer], histogram.cumulative(), histogram.sum)
    by_timer = ("service", "timer")
    return [
        lateness,
        _Series(
            "anyservice_timer_overruns",
            "Timer bodies still running when the next tick was due.",
            "counter",
            by_timer,
            overruns,
        ),
        _Series(
            "anyservice_timer_missed_ticks",
            "Timer ticks dropped by the missed-tick policy.",
            "counter",
            by_timer,
            missed,
        ),
    ]


def _task_families(workers: list[TaskWorker], observations: Observations) -> list[Any]:
    from prometheus_client.core import HistogramMetricFamily

    duration = HistogramMetricFamily(
        "anyservice_task_run_duration_seconds",
        "How long task-run attempts took, from claim to outcome.",
        labels=["task"],
    )
    outcomes: dict[tuple[str, str], int] = {}
    durations: dict[str, list[_Histogram]] = {}
    in_flight, lost = [], []
    for worker in workers:
        in_flight.append(((worker.name,), worker.status()["current"]))
        lost.append(((worker.name,), worker.counts["lost"]))
        for key, number in (observations.outcomes.get(worker) or {}).items():
            outcomes[key] = outcomes.get(key, 0) + number
        for task, histogram in (observations.durations.get(worker) or {}).items():
            durations.setdefault(task, []).append(histogram)
    for task, histograms in sorted(durations.items()):
        merged = _merge(histograms)
        duration.add_metric([task], merged.cumulative(), merged.sum)
    return [
        _Series(
            "anyservice_task_runs",
            "Task-run outcomes (completed, failed, retried, cancelled, handed_back, lost, "
            "not_recorded).",
            "counter",
            ("task", "state"),
            sorted(outcomes.items()),
        ),
        duration,
        _Series(
            "anyservice_task_runs_in_flight",
            "Runs the worker holds now.",
            "gauge",
            ("service",),
            in_flight,
        ),
        _Series(
            "anyservice_lease_lost",
            "Runs whose lease passed to another worker while this one held them.",
            "counter",
            ("service",),
            lost,
        ),
    ]


def _merge(histograms: list[_Histogram]) -> _Histogram:
    merged = _Histogram(histograms[0].bounds)
    for histogram in histograms:
        merged.counts = [a + b for a, b in zip(merged.counts, histogram.counts, strict=True)]
        merged.sum += histogram.sum
    return merged


class _Families:
    """A collector that yields families already built."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterable[Any]:
        return self._families


class Exposition:
    """``GET /metrics`` for the tree under ``root``, one per status server.

    The figures are read from the tree at each scrape, all at one moment. A family whose
    rows are those of the last scrape is answered with the text formatted then: in a
    steady tree most are (a state, a restart count or an overrun changes now and then,
    and the family it is in is formatted again in full), so a scrape mostly reads.
    """

    def __init__(self, root: Service, observations: Observations) -> None:
        self._root = root
        self._observations = observations
        self._formatted: dict[str, tuple[_Series, bytes]] = {}

    async def render(self) -> tuple[bytes, str]:
        """The body and content type of one scrape."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        services = list(walk(self._root))
        workers = task_workers(services)
        depths = await queue_depths(workers)
        parts = []
        # prometheus_client formats one family at a time, in the event loop, which runs
        # its other tasks in between: a scrape holds the loop for at most one family
        # (one line per service), where a thread would share the GIL with a busy loop
        # and take several times as long.
        for family in _families(services, workers, self._observations, depths):
            if isinstance(family, _Series):
                formatted = self._formatted.get(family.name)
                if formatted is not None and formatted[0] == family:
                    parts.append(formatted[1])
                    continue
                text = _format(family.family())
                self._formatted[family.name] = (family, text)
            else:
                text = _format(family)
            parts.append(text)
            await anyio.lowlevel.checkpoint()
        return b"".join(parts), CONTENT_TYPE_LATEST


def _format(family: Any) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(_Families([family]))
