"""``GET /metrics``: Prometheus' text format through prometheus_client, on asyncio and trio.

Real server, so real time: a test waits (polling within a bound) for what it then scrapes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from anyservice import Service, ServiceState, StatusServer, Supervisor, _hooks, timer
from anyservice.taskqueue import TaskQueue, TaskWorker

from .status_helpers import PROMPTLY, BreaksOnce, request, until

pytestmark = pytest.mark.anyio


async def scrape(server: StatusServer) -> dict[str, list[Sample]]:
    """The samples of one scrape, by metric family name."""
    status, headers, body = await request(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    return {family.name: family.samples for family in text_string_to_metric_families(body.decode())}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples if s.name == name and s.labels == labels]
    return found


def ticks_of(service: Service) -> int:
    # No statistics before the timer has started: the children may still be starting.
    stats = service.timer_stats.get("tick")
    return 0 if stats is None else stats.ticks


class Ticker(Service):
    @timer(0.01)
    async def tick(self) -> None: ...


async def test_services_and_timers_are_exported_by_name() -> None:
    flaky = BreaksOnce("flaky")
    flaky.now.set()
    tree = Supervisor(Ticker(name="ticker"), flaky, name="top")
    async with StatusServer(tree, metrics=True) as server, tree:
        ticker = tree.children()[0]
        await until(lambda: ticks_of(ticker) >= 3 and flaky.restart_count == 1)
        await until(lambda: flaky.state is ServiceState.RUNNING)
        families = await scrape(server)
    up = families["anyservice_service_up"]
    assert {s.labels["service"]: s.value for s in up} == {"top": 1, "ticker": 1, "flaky": 1}
    restarts = families["anyservice_service_restarts"]
    assert value(restarts, "anyservice_service_restarts_total", service="flaky") == 1
    assert value(restarts, "anyservice_service_restarts_total", service="ticker") == 0
    labels = {"service": "ticker", "timer": "tick"}
    lateness = families["anyservice_timer_lateness_seconds"]
    by_class = {"kind": "Ticker", "timer": "tick"}
    assert {(s.labels["kind"], s.labels["timer"]) for s in lateness} == {("Ticker", "tick")}
    # Every tick was observed (the server, so the metrics, started before the tree).
    count = value(lateness, "anyservice_timer_lateness_seconds_count", **by_class)
    assert 3 <= count <= ticks_of(ticker)
    inf = value(lateness, "anyservice_timer_lateness_seconds_bucket", **by_class, le="+Inf")
    assert inf == count
    # Real time on a shared machine: how many overran is not for a test to say.
    assert [sample.labels for sample in families["anyservice_timer_overruns"]] == [labels]
    assert [sample.labels for sample in families["anyservice_timer_missed_ticks"]] == [labels]


async def test_timer_lateness_is_one_histogram_per_class_and_timer() -> None:
    tickers = [Ticker(name=f"ticker-{index}") for index in range(3)]
    tree = Service(name="top")
    for ticker in tickers:
        tree.add_dependency(ticker)
    async with StatusServer(tree, metrics=True) as server, tree:
        await until(lambda: all(ticks_of(ticker) >= 2 for ticker in tickers))
        families = await scrape(server)
        ticks = sum(ticks_of(ticker) for ticker in tickers)
    lateness = families["anyservice_timer_lateness_seconds"]
    assert {(s.labels["kind"], s.labels["timer"]) for s in lateness} == {("Ticker", "tick")}
    count = value(lateness, "anyservice_timer_lateness_seconds_count", kind="Ticker", timer="tick")
    # Each ticker's ticks are in the one histogram; read after the scrape, the sum is more.
    assert 6 <= count <= ticks
    overruns = families["anyservice_timer_overruns"]
    assert sorted(s.labels["service"] for s in overruns) == [t.name for t in tickers]


async def test_a_scrape_after_a_change_exports_the_new_figures() -> None:
    # A family whose rows are those of the last scrape is answered from the text formatted
    # then: a restart, a stop and a new health check must each reach the next scrape.
    flaky = BreaksOnce("flaky")
    steady = Ticker(name="steady")
    tree = Supervisor(flaky, steady, name="top")
    async with StatusServer(tree, metrics=True) as server, tree:
        await until(lambda: all(s.state is ServiceState.RUNNING for s in (flaky, steady)))
        before = await scrape(server)
        flaky.now.set()
        await until(lambda: flaky.restart_count == 1 and flaky.state is ServiceState.RUNNING)
        after_restart = await scrape(server)
        await steady.stop()
        after_stop = await scrape(server)
    restarts = "anyservice_service_restarts"
    assert value(before[restarts], f"{restarts}_total", service="flaky") == 0
    assert value(after_restart[restarts], f"{restarts}_total", service="flaky") == 1
    up = "anyservice_service_up"
    assert value(after_restart[up], up, service="steady") == 1
    assert value(after_stop[up], up, service="steady") == 0
    # What did not change is still there, as it was.
    assert after_stop[restarts] == after_restart[restarts]


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:
        yield queue


async def test_task_runs_are_counted_by_task_and_state_and_the_queue_by_state(
    queue: TaskQueue,
) -> None:
    gate = anyio.Event()

    @queue.task
    async def ok() -> None: ...

    @queue.task
    async def broken() -> None:
        raise ValueError("no")

    @queue.task
    async def held() -> None:
        await gate.wait()

    # prefetch=0: the second held run stays SCHEDULED (claimed ahead, it would be held).
    worker = TaskWorker(ok, broken, held, limit=1, prefetch=0, name="worker")
    async with StatusServer(worker, metrics=True) as server, worker:
        runs = [await ok.delay() for _ in range(3)]
        runs.append(await broken.delay())
        for run in runs:
            await run.wait(timeout=PROMPTLY)
        first = await held.delay()
        await held.delay()  # waits behind the first: limit=1
        await until(lambda: list(worker.status()["in_flight"]) == [first.id])
        families = await scrape(server)
        gate.set()
        await first.wait(timeout=PROMPTLY)
    runs_total = families["anyservice_task_runs"]
    assert value(runs_total, "anyservice_task_runs_total", task="ok", state="completed") == 3
    assert value(runs_total, "anyservice_task_runs_total", task="broken", state="failed") == 1
    duration = families["anyservice_task_run_duration_seconds"]
    assert value(duration, "anyservice_task_run_duration_seconds_count", task="ok") == 3
    depth = families["anyservice_task_queue_depth"]
    assert value(depth, "anyservice_task_queue_depth", state="completed") == 3
    assert value(depth, "anyservice_task_queue_depth", state="failed") == 1
    assert value(depth, "anyservice_task_queue_depth", state="running") == 1
    assert value(depth, "anyservice_task_queue_depth", state="scheduled") == 1
    in_flight = families["anyservice_task_runs_in_flight"]
    assert value(in_flight, "anyservice_task_runs_in_flight", service="worker") == 1
    lost = families["anyservice_lease_lost"]
    assert value(lost, "anyservice_lease_lost_total", service="worker") == 0
    # Bounded cardinality: no label is a run id.
    run_ids = {run.id for run in runs} | {first.id}
    labels = {v for samples in families.values() for s in samples for v in s.labels.values()}
    assert not labels & run_ids


async def test_with_metrics_off_nothing_is_collected_and_metrics_is_a_404() -> None:
    async with Ticker() as ticker, StatusServer(ticker, metrics=False) as server:
        await until(lambda: ticks_of(ticker) >= 2)
        assert _hooks.timer_tick is None
        assert _hooks.task_run is None
        status, _, body = await request(server.port, "/metrics")
    assert (status, body) == (404, b'{\n  "error": "metrics are off for this status server"\n}\n')


async def test_the_hooks_are_on_while_a_server_exports_metrics_and_off_after() -> None:
    ticker = Ticker()
    async with StatusServer(ticker, metrics=True) as one:
        async with StatusServer(ticker, metrics=True):
            await until(lambda: _hooks.timer_tick is not None)
        assert _hooks.timer_tick is not None
        status, _, _ = await request(one.port, "/metrics")
        assert status == 200
    await until(lambda: _hooks.timer_tick is None)
    assert _hooks.task_run is None
