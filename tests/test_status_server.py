"""The status server of any tree: /healthz, /readyz, /tree, /status, on asyncio and trio.

Real hypercorn on a real socket, so real time: every wait polls a condition within a
bound. What the answers are made of is read through public properties, tested on virtual
time in ``test_status_snapshot.py``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import anyservice
from anyservice import (
    Service,
    ServiceState,
    StatusServer,
    Supervisor,
    UnhealthyError,
    task,
    timer,
    transitions_to,
)
from anyservice.taskqueue import TaskQueue, TaskWorker

from .http_client import PROMPTLY, http, request, until

pytestmark = pytest.mark.anyio


class Ticker(Service):
    @timer(0.01)
    async def tick(self) -> None: ...


class Flagged(Service):
    @task
    async def flush_forever(self) -> None:
        await self.flush()

    @transitions_to("FLUSHING")
    async def flush(self) -> None:
        await anyio.sleep_forever()


class Breaks(Service):
    """Crashes once (and so is restarted by its supervisor) when told to."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.now = anyio.Event()
        self.broken = False

    @task
    async def wait_for_it(self) -> None:
        await self.now.wait()
        if not self.broken:
            self.broken = True
            raise RuntimeError("told to break")


class Sick(Service):
    monitoring_interval = 0.01
    healthy = True

    async def healthcheck(self) -> None:
        if not self.healthy:
            raise UnhealthyError("the disk is full")


async def test_port_0_picks_a_free_port_readable_from_the_server() -> None:
    async with Ticker() as service, StatusServer(service, port=0) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/"
        status, _, body = await http(server.port, "/healthz")
    assert (status, body) == (200, {"status": "ok", "state": "RUNNING"})


async def test_the_tree_shows_states_restarts_flags_timers_and_children() -> None:
    breaks = Breaks("breaks")
    tree = Supervisor(Ticker(name="ticker"), Flagged(name="flagged"), breaks, name="top")
    async with tree, StatusServer(tree) as server:
        await until(lambda: "FLUSHING" in tree.children()[1].diag.flags)
        breaks.now.set()
        await until(lambda: breaks.restart_count == 1 and breaks.state is ServiceState.RUNNING)
        await until(lambda: tree.children()[0].timer_stats["tick"].ticks >= 2)
        status, headers, body = await http(server.port, "/tree")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert (body["name"], body["kind"], body["state"]) == ("top", "Supervisor", "RUNNING")
    ticker, flagged, broken = body["children"]
    assert [child["name"] for child in body["children"]] == ["ticker", "flagged", "breaks"]
    assert all(child["state"] == "RUNNING" for child in body["children"])
    assert ticker["timers"]["tick"]["ticks"] >= 2
    assert ticker["timers"]["tick"]["interval"] == 0.01
    assert set(ticker["timers"]["tick"]) >= {"overruns", "missed", "worst_lateness"}
    assert flagged["flags"] == ["FLUSHING"]
    assert (broken["restarts"], ticker["restarts"]) == (1, 0)
    assert broken["health"] is None
    assert broken["children"] == []


async def test_readyz_is_503_with_the_reasons_until_every_service_is_running_and_healthy() -> None:
    sick = Sick(name="sick")

    async def run_until_it_crashes() -> None:
        with pytest.raises(ExceptionGroup):
            await sick.run()

    async with StatusServer(sick) as server, anyio.create_task_group() as task_group:
        task_group.start_soon(run_until_it_crashes)
        await until(lambda: sick.last_health is not None)
        status, _, body = await http(server.port, "/readyz")
        assert (status, body) == (200, {"ready": True})
        sick.healthy = False
        # A failed check crashes the service (core_service's monitoring): not ready, not alive.
        await until(lambda: sick.state is ServiceState.CRASHED)
        status, _, body = await http(server.port, "/readyz")
        assert status == 503
        assert body == {"ready": False, "reasons": ["sick is CRASHED"]}
        status, _, body = await http(server.port, "/healthz")
        assert status == 503
        assert body["status"] == "unhealthy"
        assert "sick crashed: UnhealthyError: sick is unhealthy: the disk is full" in body["reason"]


async def test_readyz_names_a_child_that_is_not_running() -> None:
    parent = Service(name="parent")
    child = parent.add_dependency(Flagged(name="child"))
    server = StatusServer(parent)
    async with server:
        status, _, body = await http(server.port, "/readyz")
        assert (status, body["reasons"]) == (503, ["parent is INIT", "child is INIT"])
        async with parent:
            status, _, body = await http(server.port, "/readyz")
            assert status == 200
            await child.stop()
            status, _, body = await http(server.port, "/readyz")
            assert (status, body["reasons"]) == (503, ["child is STOPPED"])


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:
        yield queue


async def test_a_tree_with_a_task_worker_shows_its_counts_and_serves_its_status(
    queue: TaskQueue,
) -> None:
    @queue.task
    async def say(word: str) -> str:
        return word

    worker = TaskWorker(say, limit=4, name="worker")
    app = Service(name="app")
    app.add_dependency(worker)
    async with app, StatusServer(app) as server:
        await (await say.delay("hi")).wait(timeout=PROMPTLY)
        _, _, tree = await http(server.port, "/tree")
        status, _, prefect = await http(server.port, "/status")
    (node,) = tree["children"]
    assert node["task_worker"]["counts"]["completed"] == 1
    assert (node["task_worker"]["limit"], node["task_worker"]["tasks"]) == (4, ["say"])
    assert status == 200
    assert prefect["client_id"] == worker.client_id
    assert prefect["counts"]["completed"] == 1


async def test_status_is_a_404_without_a_task_worker() -> None:
    async with Ticker() as service, StatusServer(service) as server:
        status, _, body = await http(server.port, "/status")
    assert (status, body) == (404, {"error": "Ticker runs no task worker"})


async def test_head_answers_without_a_body_and_other_methods_are_refused() -> None:
    async with Ticker() as service, StatusServer(service) as server:
        status, headers, body = await request(server.port, "/tree", method="HEAD")
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) > 0
        status, headers, _ = await request(server.port, "/readyz", method="DELETE")
        assert (status, headers["allow"]) == (405, "GET, HEAD")


async def test_the_server_stops_with_its_context_and_frees_the_port() -> None:
    async with Ticker() as service:
        async with StatusServer(service) as server:
            port = server.port
        with pytest.raises(OSError, match="connection attempts failed"):
            await http(port, "/healthz")


async def test_a_taken_port_is_a_clear_error_naming_the_service_and_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"Ticker: cannot serve status on 127.0.0.1:{port}"):
            async with StatusServer(Ticker(), port=port):
                pass


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"port": "80"}, TypeError, "status port must be an int, got '80'"),
        ({"port": True}, TypeError, "status port must be an int, got True"),
        ({"port": 70000}, ValueError, r"within 0\.\.65535 \(0 picks a free port\), got 70000"),
        ({"host": 123}, TypeError, "status host must be a str"),
        ({"host": ""}, ValueError, "status host must not be empty"),
        ({"metrics": "yes"}, TypeError, "metrics must be True, False or None, got 'yes'"),
    ],
)
def test_bad_arguments_are_refused_at_the_call(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        StatusServer(Ticker(), **kwargs)


def test_a_status_server_needs_a_service() -> None:
    with pytest.raises(TypeError, match="StatusServer\\(\\) needs a Service, got 42"):
        StatusServer(42)  # type: ignore[arg-type]


def test_run_refuses_bad_status_arguments_before_running() -> None:
    with pytest.raises(TypeError, match="status port must be an int"):
        anyservice.run(Ticker(), status_port="8000")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="status host must be a str"):
        anyservice.run(Ticker(), status_port=0, status_host=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metrics=True needs a status server"):
        anyservice.run(Ticker(), metrics=True)
