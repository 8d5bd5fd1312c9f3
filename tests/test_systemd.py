"""systemd's notify protocol, against a real Unix datagram socket, on asyncio and trio."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from anyservice import Service, Supervisor, task
from anyservice._status._systemd import SystemdNotifier

pytestmark = pytest.mark.anyio

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Bounds on a process that works; they only matter when something is broken.
PROMPTLY = 15.0


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    """systemd's end: a bound datagram socket (its path is short, as AF_UNIX needs)."""
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(directory, "notify"))
        sock.setblocking(False)
        with sock:
            yield sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


class Worker(Service):
    @task
    async def work(self) -> None:
        await anyio.sleep_forever()


@pytest.mark.virtual_time
async def test_ready_once_running_stopping_at_the_stop_and_the_watchdog_every_half_period(
    notify_socket: socket.socket,
) -> None:
    tree = Supervisor(Worker(name="a"), Worker(name="b"), name="app")
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "20000000"}
    )
    assert notifier is not None
    assert notifier.watchdog_interval == 10.0
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(notifier.run, tree)
        await anyio.sleep(1)
        assert received(notify_socket) == [
            "WATCHDOG=1",
            "STATUS=app INIT: 0 of 3 services running, 0 restarts",
        ]
        async with tree:
            await anyio.sleep(1)
            ready = received(notify_socket)
            assert ready[0] == "READY=1\nSTATUS=app RUNNING: 3 of 3 services running, 0 restarts"
            await anyio.sleep(30)
            pings = received(notify_socket)
            assert pings.count("WATCHDOG=1") == 3
        await anyio.sleep(1)
        stopped = received(notify_socket)
        assert stopped[0].startswith("STOPPING=1\nSTATUS=app STOPPING: ")
        assert stopped[-1] == "STATUS=app STOPPED: 0 of 3 services running, 0 restarts"
        task_group.cancel_scope.cancel()


def test_the_environment_says_where_and_whether_there_is_a_watchdog() -> None:
    assert SystemdNotifier.from_environment({}) is None
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": ""}) is None
    abstract = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@systemd/notify"})
    assert abstract is not None
    assert abstract.address == "\0systemd/notify"
    assert abstract.watchdog_interval is None
    other_pid = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert other_pid is not None
    assert other_pid.watchdog_interval is None
    ours = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert ours is not None
    assert ours.watchdog_interval == 0.5
    for notifier in (abstract, other_pid, ours):
        notifier.close()


def test_a_socket_nobody_listens_on_is_logged_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = SystemdNotifier("/nonexistent/notify")
    notifier.notify("READY=1")
    notifier.notify("STOPPING=1")
    notifier.close()
    warnings = [record for record in caplog.records if "cannot notify systemd" in record.message]
    assert len(warnings) == 1


def wait_for(sock: socket.socket, wanted: str) -> list[str]:
    """The datagrams up to one that contains ``wanted`` (within a bound)."""
    sock.settimeout(PROMPTLY)
    messages = []
    while True:
        message = sock.recv(4096).decode()
        messages.append(message)
        if wanted in message:
            return messages


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyservice_run_under_systemd_says_ready_then_stopping(
    notify_socket: socket.socket, backend: str
) -> None:
    environment = {
        **os.environ,
        "NOTIFY_SOCKET": notify_socket.getsockname(),
        "WATCHDOG_USEC": "200000",
    }
    command = [sys.executable, "-m", "anyservice", "run", "tests.cli_targets:Graceful"]
    process = subprocess.Popen(
        [*command, "--backend", backend],
        cwd=PROJECT_ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = wait_for(notify_socket, "READY=1")
        assert "STATUS=Graceful RUNNING: 1 of 1 services running, 0 restarts" in ready[-1]
        # The watchdog pings while the loop answers: twice is at least one period apart.
        pings = wait_for(notify_socket, "WATCHDOG=1")
        pings += wait_for(notify_socket, "WATCHDOG=1")
        process.send_signal(signal.SIGTERM)
        stopping = wait_for(notify_socket, "STOPPING=1")
        assert stopping[-1].startswith("STOPPING=1\nSTATUS=Graceful STOPPING")
        _, stderr = process.communicate(timeout=PROMPTLY)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
