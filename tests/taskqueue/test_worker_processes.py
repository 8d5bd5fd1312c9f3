"""Real worker processes on one broker: kill -9, SIGTERM, and a stress of 2 000 runs.

Each test runs on a SQLite file and on a PostgreSQL database. Each worker is
``python -m tests.taskqueue.proc_tasks``, which calls ``serve()`` on the backend this test
runs on, in a working directory of its own: the workers share nothing but the broker URL,
as on separate machines (the tasks report what they did in the test's directory). Every
wait is bounded, and every process is killed in a ``finally`` whatever happens.
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc
import pytest

from anyservice.taskqueue import RunState, Task, TaskQueue
from tests._postgres import postgres_schema

from .proc_tasks import build

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

ROOT = Path(__file__).resolve().parents[2]
#: Bound on starting a Python process that imports the library, on a slow machine.
STARTUP = 30.0
PROMPTLY = 20.0


def _log_file(path: Path) -> BinaryIO:
    """A worker's log file (opened outside the async code that hands it to the process)."""
    return open(path, "wb")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - another process writes what is checked
            await anyio.sleep(0.02)


class Worker:
    """A worker process and the file its log goes to."""

    def __init__(self, process: anyio.abc.Process, log: Path) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        """Everything the process logged so far (read once it ended, or for a message)."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def logged(self, text: str) -> bool:
        assert self.process.returncode is None, f"worker exited:\n{self.output()}"
        return text in await anyio.Path(self.log).read_text(encoding="utf-8", errors="replace")

    async def wait_until_serving(self) -> None:
        await eventually(functools.partial(self.logged, "] started"), STARTUP)

    async def exit_code(self) -> int:
        with anyio.fail_after(PROMPTLY):
            return await self.process.wait()


class Setup:
    """One test's database file, its tasks, and the worker processes it starts."""

    def __init__(self, tmp_path: Path, backend: str, url: str) -> None:
        self.dir = tmp_path
        self.backend = backend
        self.url = url
        self.queue: TaskQueue
        self.tasks: dict[str, Task[Any, Any]]
        self.queue, self.tasks = build(self.url, tmp_path)
        self.count = 0

    def worker(self, *options: str) -> AbstractAsyncContextManager[Worker]:
        return self.process(
            [
                sys.executable,
                "-m",
                "tests.taskqueue.proc_tasks",
                f"--url={self.url}",
                f"--dir={self.dir}",
                f"--backend={self.backend}",
                *options,
            ]
        )

    @asynccontextmanager
    async def process(self, command: list[str]) -> AsyncIterator[Worker]:
        """Run ``command`` from the repository's root, its output going to a log file."""
        self.count += 1
        log = self.dir / f"worker-{self.count}.log"
        home = self.dir / f"worker-{self.count}"
        home.mkdir()
        # The repository for ``tests.``, ahead of whatever path the caller gave.
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        with _log_file(log) as output:
            process = await anyio.open_process(
                command, cwd=home, env=environment, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            yield Worker(process, log)
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(PROMPTLY, shield=True):
                await process.wait()
            await process.aclose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def setup(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend_name: str
) -> AsyncIterator[Setup]:
    if request.param == "sqlite":
        setup = Setup(tmp_path, anyio_backend_name, f"sqlite:///{tmp_path / 'runs.db'}")
        async with setup.queue:
            yield setup
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        setup = Setup(tmp_path, anyio_backend_name, url)
        async with setup.queue:
            yield setup


async def wait_for_file(path: Path) -> str:
    """The contents of a file another process writes, once there are some."""
    file = anyio.Path(path)

    async def written() -> bool:
        return await file.exists() and bool(await file.read_text())

    await eventually(written, PROMPTLY)
    return await file.read_text()


async def test_a_run_on_a_killed_worker_completes_on_another(setup: Setup) -> None:
    async with setup.worker("--lease=1") as first, setup.worker("--lease=1") as second:
        await first.wait_until_serving()
        await second.wait_until_serving()
        run = await setup.tasks["hang_first"].delay()
        pid = int(await wait_for_file(setup.dir / f"{run.id}.hanging"))
        victim, survivor = (first, second) if pid == first.process.pid else (second, first)
        assert victim.process.pid == pid

        victim.process.kill()  # SIGKILL: no handing back, no last words
        assert await victim.exit_code() == -signal.SIGKILL

        assert await run.result(timeout=PROMPTLY) == 2, survivor.output()
        assert (run.state, run.attempts) == (RunState.COMPLETED, 2)
        survivor.process.terminate()
        assert await survivor.exit_code() == 0, survivor.output()


async def test_a_killed_workers_run_is_taken_over_long_before_its_lease_expires(
    setup: Setup,
) -> None:
    lease = 60.0  # far past every wait below: only knowing the worker died can be this quick
    async with (
        setup.worker(f"--lease={lease}") as first,
        setup.worker(f"--lease={lease}") as second,
    ):
        await first.wait_until_serving()
        await second.wait_until_serving()
        run = await setup.tasks["hang_first"].delay()
        pid = int(await wait_for_file(setup.dir / f"{run.id}.hanging"))
        victim, survivor = (first, second) if pid == first.process.pid else (second, first)

        victim.process.kill()
        assert await victim.exit_code() == -signal.SIGKILL

        assert await run.result(timeout=PROMPTLY) == 2, survivor.output()
        survivor.process.terminate()
        assert await survivor.exit_code() == 0, survivor.output()


async def test_runs_a_killed_worker_claimed_ahead_complete_on_another(setup: Setup) -> None:
    async with setup.worker("--lease=1", "--limit=1", "--prefetch=2") as victim:
        await victim.wait_until_serving()
        hanging = await setup.tasks["hang_first"].delay()
        await wait_for_file(setup.dir / f"{hanging.id}.hanging")
        # Its one slot taken, the worker claims these two ahead: leased, queued, not run.
        ahead = [await setup.tasks["record"].delay(number) for number in (1, 2)]

        async def claimed_ahead() -> bool:
            records = [await setup.queue.broker.get(run.id) for run in ahead]
            return all(
                record is not None and record.state is RunState.RUNNING for record in records
            )

        await eventually(claimed_ahead, PROMPTLY)
        victim.process.kill()
        assert await victim.exit_code() == -signal.SIGKILL
    assert not (setup.dir / f"{victim.process.pid}.runs").exists(), "a run claimed ahead ran"

    async with setup.worker("--lease=1") as survivor:
        assert await hanging.result(timeout=PROMPTLY) == 2, survivor.output()
        assert [await run.result(timeout=PROMPTLY) for run in ahead] == [1, 2]
        # Claimed twice (ahead by the killed worker, then here), run once.
        assert [run.attempts for run in ahead] == [2, 2]
        survivor.process.terminate()
        assert await survivor.exit_code() == 0, survivor.output()


async def test_sigterm_lets_the_run_in_flight_finish_and_exits_0(setup: Setup) -> None:
    async with setup.worker() as worker:
        await worker.wait_until_serving()
        run = await setup.tasks["slow"].delay(0.5)
        await wait_for_file(setup.dir / f"{run.id}.started")

        worker.process.terminate()
        assert await worker.exit_code() == 0, worker.output()

    assert await run.refresh() is RunState.COMPLETED, worker.output()
    assert (run.attempts, await run.result()) == (1, "done")
    assert "received SIGTERM: stopping TaskWorker gracefully" in worker.output()


async def test_a_second_sigterm_hands_the_run_in_flight_back_at_once(setup: Setup) -> None:
    async with setup.worker("--shutdown-timeout=60") as worker:
        await worker.wait_until_serving()
        run = await setup.tasks["slow"].delay(3600)
        await wait_for_file(setup.dir / f"{run.id}.started")

        worker.process.terminate()
        await eventually(functools.partial(worker.logged, "received SIGTERM"), PROMPTLY)
        worker.process.terminate()
        # Stopped at once, as a shell reports a process that SIGTERM ended: 128 + 15.
        assert await worker.exit_code() == 128 + signal.SIGTERM, worker.output()

    record = await setup.queue.broker.get(run.id)
    assert record is not None
    assert (record.state, record.attempts, record.lease_owner) == (RunState.SCHEDULED, 0, None)


async def test_two_processes_complete_2000_runs_exactly_once(setup: Setup) -> None:
    async with setup.worker() as first, setup.worker() as second:
        await first.wait_until_serving()
        await second.wait_until_serving()
        record = setup.tasks["record"]
        runs = [await record.delay(number) for number in range(2000)]
        for run in runs:
            await run.wait(timeout=PROMPTLY)
        for worker in (first, second):
            worker.process.terminate()
            assert await worker.exit_code() == 0, worker.output()

    assert {run.state for run in runs} == {RunState.COMPLETED}
    assert {run.attempts for run in runs} == {1}
    counts = await setup.queue.counts()
    assert counts[RunState.COMPLETED] == 2000
    assert sum(counts.values()) == 2000

    ran_by: dict[int, list[str]] = {}
    for path in setup.dir.glob("*.runs"):
        ran_by[int(path.stem)] = path.read_text().split()
    executions = Counter(run_id for ids in ran_by.values() for run_id in ids)
    assert set(executions) == {run.id for run in runs}  # none lost
    assert set(executions.values()) == {1}  # none run twice
    assert set(ran_by) == {first.process.pid, second.process.pid}  # both did some
    assert os.getpid() not in ran_by


async def test_two_processes_never_run_more_of_a_task_than_its_concurrency(setup: Setup) -> None:
    limited = setup.tasks["limited"]
    assert limited.concurrency == 2
    async with setup.worker() as first, setup.worker() as second:
        await first.wait_until_serving()
        await second.wait_until_serving()
        runs = await limited.map([0.05] * 50)
        for run in runs:
            await run.wait(timeout=PROMPTLY)
        for worker in (first, second):
            worker.process.terminate()
            assert await worker.exit_code() == 0, worker.output()

    assert {run.state for run in runs} == {RunState.COMPLETED}
    spans = [(setup.dir / f"{run.id}.span").read_text().split() for run in runs]
    # Every start and end, in time order; an end before a start at the same instant.
    events = sorted(
        [(float(start), 1) for start, _, _ in spans] + [(float(end), -1) for _, end, _ in spans]
    )
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2, spans


def _completed_rows(url: str) -> dict[str, tuple[int, str]]:
    """The attempt and result of each run committed so far, read as another process would."""
    query = "SELECT id, attempts, result FROM anyservice_runs WHERE state = 'COMPLETED'"
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return {run_id: (attempts, result) for run_id, attempts, result in conn.execute(query)}
    import psycopg  # a test dependency, for the PostgreSQL runs only

    server, _, options = url.partition("?")
    schema = dict(option.split("=", 1) for option in options.split("&"))["schema"]
    with psycopg.connect(server, options=f"-csearch_path={schema}") as conn:
        return {run_id: (attempts, result) for run_id, attempts, result in conn.execute(query)}


@pytest.mark.parametrize("limit", [10, 100])
async def test_kill_9_during_group_commits_loses_no_acknowledged_result(
    setup: Setup, limit: int
) -> None:
    # The worker stores each batch of results in the transaction of its next claim, so
    # the kill lands in such a combined transaction (or between two).
    total = 5000
    record = setup.tasks["record"]
    runs = await record.map(range(total))
    async with setup.worker("--lease=1", f"--limit={limit}") as victim:
        await victim.wait_until_serving()

        async def some_completed() -> bool:
            return (await setup.queue.counts())[RunState.COMPLETED] >= 300

        await eventually(some_completed, PROMPTLY)
        # What any result() could have returned by now; the kill follows at once, while
        # the worker is committing results in groups.
        acknowledged = await anyio.to_thread.run_sync(_completed_rows, setup.url)
        victim.process.kill()
        assert await victim.exit_code() == -signal.SIGKILL
    assert len(acknowledged) < total, "every run finished before the kill: nothing was tested"

    async with setup.worker("--lease=1", "--limit=100") as survivor:
        await survivor.wait_until_serving()
        for run in runs:
            await run.wait(timeout=PROMPTLY)
        survivor.process.terminate()
        assert await survivor.exit_code() == 0, survivor.output()

    assert {run.state for run in runs} == {RunState.COMPLETED}
    by_id = {run.id: run for run in runs}
    for run_id, (attempts, result) in acknowledged.items():
        run = by_id[run_id]
        # Kept as acknowledged, never claimed again. (A 1 s lease may lapse on a loaded
        # machine before a run is recorded: at least once, a run may have run twice
        # before its result was acknowledged, never after.)
        assert (run.attempts, run.record.result) == (attempts, result)
        assert await run.result() == int(result)
    executions = Counter(
        run_id for path in setup.dir.glob("*.runs") for run_id in path.read_text().split()
    )
    assert set(executions) == set(by_id)  # none lost
    # Each execution was a claim of its own, and no claim came after the acknowledgement.
    for run_id, (attempts, _) in acknowledged.items():
        assert 1 <= executions[run_id] <= attempts
