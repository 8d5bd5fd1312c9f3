"""Real processes on one database: a schedule served by 4 workers, a singleton of 3.

Each process is ``python -m tests.taskqueue.proc_cluster`` on the backend this test runs
on. The records they leave (``ticks.log``, ``holders.log``, the database) are what is
checked; every wait is bounded and every process is killed in a ``finally``. Each test
runs on a SQLite file and on a PostgreSQL schema.
"""

from __future__ import annotations

import itertools
import signal
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from anyservice.taskqueue import RunState

from . import test_cluster_brokers as cluster_brokers
from .proc_cluster import build_schedule
from .test_worker_processes import PROMPTLY, Setup, Worker, eventually, wait_for_file

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


class Cluster(Setup):
    """Processes of ``proc_cluster`` on one database file."""

    module = "tests.taskqueue.proc_cluster"

    def command(self, mode: str, *options: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            self.module,
            mode,
            f"--url={self.url}",
            f"--dir={self.dir}",
            f"--backend={self.backend}",
            *options,
        ]


shared_url = cluster_brokers.shared_url


@pytest.fixture
def cluster(tmp_path: Path, anyio_backend_name: str, shared_url: str) -> Cluster:
    return Cluster(tmp_path, anyio_backend_name, shared_url)


def read_lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


async def test_four_workers_run_an_every_second_schedule_once_per_tick(cluster: Cluster) -> None:
    async with AsyncExitStack() as stack:
        workers: list[Worker] = [
            await stack.enter_async_context(
                cluster.process(cluster.command("schedule", "--every=1", "--lease=2"))
            )
            for _ in range(4)
        ]
        for worker in workers:
            await worker.wait_until_serving()
        ticks_log = cluster.dir / "ticks.log"

        async def ticks_seen(count: int) -> bool:
            return len({line[0] for line in read_lines(ticks_log)}) >= count

        await eventually(lambda: ticks_seen(2), PROMPTLY)
        await anyio.sleep(2.5)
        workers[0].process.kill()  # SIGKILL, mid-way: the others go on storing ticks
        assert await workers[0].exit_code() == -signal.SIGKILL
        killed_at = time.time()
        await anyio.sleep(3)
        for worker in workers[1:]:
            worker.process.terminate()
        for worker in workers[1:]:
            assert await worker.exit_code() == 0, worker.output()

    lines = read_lines(cluster.dir / "ticks.log")
    runs_per_tick: dict[float, set[str]] = {}
    for tick, run_id, _ in lines:
        runs_per_tick.setdefault(float(tick), set()).add(run_id)
    ticks = sorted(runs_per_tick)
    # One run per tick (a run retried after its worker died is still that one run), ...
    assert all(len(runs) == 1 for runs in runs_per_tick.values()), runs_per_tick
    # ... none missing from the first to the last, before and after the kill ...
    assert ticks == [ticks[0] + k for k in range(len(ticks))]
    assert ticks[0] < killed_at - 1 < killed_at + 1 < ticks[-1]
    # ... and the database agrees.
    queue, _ = build_schedule(cluster.url, cluster.dir, 1.0)
    async with queue:
        counts = await queue.schedule_counts("tick")
    assert counts["skipped"] == 0
    assert counts["runs"] >= len(ticks)
    # Every process took part in storing and running.
    assert len(Counter(pid for _, _, pid in lines)) >= 2


def holder_spans(path: Path) -> list[tuple[int, float, float]]:
    """(pid, first, last) of each stretch of records by one process, in time order."""
    records = sorted((float(at), int(pid)) for pid, at in read_lines(path))
    spans: list[tuple[int, float, float]] = []
    for at, pid in records:
        if spans and spans[-1][0] == pid:
            spans[-1] = (pid, spans[-1][1], at)
        else:
            spans.append((pid, at, at))
    return spans


async def test_a_singleton_runs_on_one_of_three_processes_and_fails_over(
    cluster: Cluster,
) -> None:
    lease = 3.0
    holders = cluster.dir / "holders.log"
    async with AsyncExitStack() as stack:
        replicas: dict[int, Worker] = {}
        for _ in range(3):
            replica = await stack.enter_async_context(
                cluster.process(cluster.command("singleton", f"--lease={lease}", "--poll=0.1"))
            )
            replicas[replica.process.pid] = replica
        for replica in replicas.values():
            await replica.wait_until_serving()

        async def held_by_one_other_than(*pids: int) -> int | None:
            spans = holder_spans(holders)
            if spans and spans[-1][0] not in pids:
                return spans[-1][0]
            return None

        async def leader(*gone: int) -> int:
            found: list[int] = []

            async def check() -> bool:
                pid = await held_by_one_other_than(*gone)
                if pid is not None:
                    found.append(pid)
                return pid is not None

            await eventually(check, PROMPTLY)
            return found[-1]

        first = await leader()
        await anyio.sleep(1)
        replicas[first].process.kill()  # kill -9: no release, the lease must expire
        killed_at = time.time()
        assert await replicas[first].exit_code() == -signal.SIGKILL
        second = await leader(first)
        took_over_after_kill = holder_spans(holders)[-1][1] - killed_at

        await anyio.sleep(1)
        replicas[second].process.terminate()  # SIGTERM: stop and release at once
        terminated_at = time.time()
        third = await leader(first, second)
        took_over_after_term = holder_spans(holders)[-1][1] - terminated_at
        assert await replicas[second].exit_code() == 0, replicas[second].output()
        await anyio.sleep(0.5)
        replicas[third].process.terminate()
        assert await replicas[third].exit_code() == 0, replicas[third].output()

    spans = holder_spans(holders)
    # One process at a time: each held it for one stretch, and the stretches never overlap.
    assert [pid for pid, _, _ in spans] == [first, second, third]
    for (_, _, end), (_, start, _) in itertools.pairwise(spans):
        assert end < start
    # kill -9: taken over once the lease expired, within one lease (plus a look) of the kill.
    assert took_over_after_kill <= lease + 2.0, spans
    # SIGTERM: handed over at once, well before a lease would have expired.
    assert took_over_after_term < lease, spans


async def test_a_running_run_is_cancelled_on_the_process_that_runs_it(cluster: Cluster) -> None:
    # A lease of 60 s: its first heartbeat is 20 s away, so the notification stops it.
    async with cluster.queue, cluster.worker("--lease=60") as worker:
        await worker.wait_until_serving()
        run = await cluster.tasks["slow"].delay(3600)
        await wait_for_file(cluster.dir / f"{run.id}.started")
        assert await run.cancel(timeout=PROMPTLY / 2), worker.output()
        assert run.state is RunState.CANCELLED
        assert run.attempts == 1
        worker.process.terminate()
        assert await worker.exit_code() == 0, worker.output()
    assert "cancellation asked for: cancelling its body" in worker.output()
