"""A task worker's own status server: Prefect's ``/status``, on asyncio and trio."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from anyservice import ServiceState
from anyservice.taskqueue import TaskQueue, TaskWorker

from ..http_client import PROMPTLY, http

pytestmark = pytest.mark.anyio


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:
        yield queue


def port_of(worker: TaskWorker) -> int:
    """The port a started worker's status server listens on."""
    port = worker.status_server_port
    assert isinstance(port, int)
    assert port > 0
    return port


async def test_status_serves_prefects_fields_on_a_free_port(queue: TaskQueue) -> None:
    started, gate = anyio.Event(), anyio.Event()

    @queue.task
    async def hold() -> None:
        started.set()
        await gate.wait()

    @queue.task
    async def other() -> None: ...

    async with TaskWorker(hold, other, limit=3, status_server_port=0) as worker:
        port = port_of(worker)
        assert port > 0
        run = await hold.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        status, headers, body = await http(port, "/status")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert {
            "client_id",
            "started_at",
            "stopping",
            "limit",
            "current",
            "available",
            "tasks",
            "finished",
            "in_flight",
        } <= set(body)
        assert body["client_id"] == worker.client_id
        assert (body["limit"], body["current"], body["available"]) == (3, 1, 2)
        assert body["tasks"] == ["hold", "other"]
        assert body["stopping"] is False
        assert body["in_flight"][run.id]["task"] == "hold"
        assert body["in_flight"][run.id]["attempt"] == 1
        gate.set()
        await run.wait(timeout=PROMPTLY)
        _, _, body = await http(port, "/status")
        assert body["finished"] == [run.id]
        assert body["in_flight"] == {}
        assert body["counts"]["completed"] == 1


async def test_healthz_answers_ok(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    async with TaskWorker(say, status_server_port=0) as worker:
        status, _, body = await http(port_of(worker), "/healthz")
    assert (status, body) == (200, {"status": "ok", "state": "RUNNING"})


async def test_unknown_paths_and_methods_are_refused(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    async with TaskWorker(say, status_server_port=0) as worker:
        port = port_of(worker)
        status, _, body = await http(port, "/nothing")
        assert status == 404
        assert "try /, /healthz, /readyz, /tree, /metrics, /status" in body["error"]
        status, headers, _ = await http(port, "/status", method="POST")
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        status, _, body = await http(port, "/status", method="HEAD")
        assert (status, body) == (200, None)


async def test_status_says_stopping_while_runs_drain_then_the_server_stops(
    queue: TaskQueue,
) -> None:
    started, gate = anyio.Event(), anyio.Event()

    @queue.task
    async def hold() -> None:
        started.set()
        await gate.wait()

    worker = TaskWorker(hold, status_server_port=0, shutdown_timeout=PROMPTLY)
    async with worker:
        port = port_of(worker)
        run = await hold.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        await worker.stop(block=False)
        status, _, body = await http(port, "/status")
        assert (status, body["stopping"], body["state"]) == (200, True, "STOPPING")
        assert list(body["in_flight"]) == [run.id]
        gate.set()
        assert await worker.stop()
    with pytest.raises(OSError, match="connection attempts failed"):
        await http(port, "/status")


async def test_a_taken_port_fails_the_start_with_a_clear_error(queue: TaskQueue) -> None:
    @queue.task
    async def say() -> None: ...

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = TaskWorker(say, status_server_port=port)
        with pytest.raises(ExceptionGroup) as caught:
            async with worker:
                pass
    (error,) = caught.value.exceptions
    assert isinstance(error, OSError)
    assert f"cannot serve status on 127.0.0.1:{port}" in str(error)
    assert worker.state is ServiceState.CRASHED


async def test_without_hypercorn_a_status_server_is_a_clear_error(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    @queue.task
    async def say() -> None: ...

    for name in [name for name in sys.modules if name.split(".")[0] == "hypercorn"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "hypercorn", None)
    monkeypatch.setitem(sys.modules, "hypercorn.config", None)
    with pytest.raises(ImportError, match=r"needs hypercorn.*pip install 'anyservice\[http\]'"):
        TaskWorker(say, status_server_port=0)
    TaskWorker(say)  # no status server, no hypercorn needed


async def test_the_status_server_ends_at_the_stop_deadline_with_a_stuck_run(
    queue: TaskQueue,
) -> None:
    started = anyio.Event()

    @queue.task
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    worker = TaskWorker(endless, status_server_port=0, shutdown_timeout=0.1)
    async with worker:
        port = port_of(worker)
        await endless.delay()
        with anyio.fail_after(PROMPTLY):
            await started.wait()
        assert await worker.stop()
    assert worker.counts["handed_back"] == 1
    with pytest.raises(OSError, match="connection attempts failed"):
        await http(port, "/status")
