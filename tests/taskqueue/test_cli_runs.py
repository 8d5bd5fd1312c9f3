"""``anyservice serve`` and ``anyservice runs``: a real worker process, and the run commands.

The ``runs`` commands run in this process (``main([...])``) against a SQLite file or a
PostgreSQL schema whose runs were stored and run for real; ``serve`` is a real process
stopped with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from anyservice.__main__ import main
from anyservice.taskqueue import TaskQueue, TaskWorker

from . import cli_tasks
from . import test_cluster_brokers as cluster_brokers

ROOT = Path(__file__).resolve().parents[2]
PROMPTLY = 30.0


# A SQLite file, and a PostgreSQL schema.
url = cluster_brokers.shared_url


def stored_runs(url: str) -> dict[str, str]:
    """A COMPLETED, a FAILED and a SCHEDULED run in the file at ``url``; their ids."""

    async def store() -> dict[str, str]:
        async with TaskQueue(url) as queue:
            shout = queue.task(name="shout")(cli_tasks.shout.function)
            fail = queue.task(name="fail")(cli_tasks.fail.function)
            done, failed = await shout.delay("hi"), await fail.delay()
            async with TaskWorker(shout, fail):
                await done.wait(PROMPTLY)
                await failed.wait(PROMPTLY)
            waiting = await shout.delay("later")
            return {"done": done.id, "failed": failed.id, "waiting": waiting.id}

    return anyio.run(store)


def run_command(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_runs_list_shows_a_table_and_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = stored_runs(url)
    code, out, _ = run_command(capsys, "runs", "--queue", url, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATE", "ATTEMPTS", "CREATED", "FINISHED", "ERROR"]
    assert lines[1].split()[:3] == [ids["waiting"], "shout", "SCHEDULED"]
    assert "ValueError: on purpose" in out
    code, out, _ = run_command(
        capsys, "runs", "--queue", url, "--json", "list", "--state", "failed"
    )
    assert code == 0
    (failed,) = json.loads(out)
    assert (failed["id"], failed["state"], failed["error"]["type"]) == (
        ids["failed"],
        "FAILED",
        "ValueError",
    )
    code, out, _ = run_command(capsys, "runs", "--queue", url, "list", "--task", "nothing")
    assert (code, out) == (0, "no runs\n")


def test_runs_show_retry_cancel_and_purge(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = stored_runs(url)
    code, out, _ = run_command(capsys, "runs", "--queue", url, "show", ids["done"])
    assert code == 0
    assert "state             COMPLETED" in out
    code, out, _ = run_command(capsys, "runs", "--queue", url, "retry", ids["failed"])
    assert (code, out) == (0, f"retried run {ids['failed']} (fail): now SCHEDULED\n")
    code, out, _ = run_command(capsys, "runs", "--queue", url, "retry", ids["done"])
    assert code == 1
    assert "is not FAILED, CRASHED or CANCELLED: COMPLETED" in out
    code, out, _ = run_command(capsys, "runs", "--queue", url, "--json", "cancel", ids["waiting"])
    assert code == 0
    assert json.loads(out)["run"]["state"] == "CANCELLED"
    code, out, _ = run_command(capsys, "runs", "--queue", url, "purge", "--older-than", "0.001s")
    assert (code, out) == (0, "purged 2 runs\n")
    code, out, _ = run_command(capsys, "runs", "--queue", url, "--json", "list")
    assert [run["id"] for run in json.loads(out)] == [ids["failed"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs", "--queue", "redis://db/0", "list"], "--queue: unsupported scheme 'redis'"),
        (["runs", "--queue", "sqlite:///{dir}/none.db", "list"], "--queue: no database at"),
        (["runs", "--queue", "{url}", "show", "nope"], "no run 'nope' in"),
        (["runs", "--queue", "{url}", "cancel", "nope"], "no run 'nope' in"),
        (["serve", "tests.taskqueue.cli_tasks:not_a_task"], "is not a task"),
        (["serve", "tests.taskqueue.nowhere:task"], "cannot import module"),
        (
            ["serve", "tests.taskqueue.cli_tasks:shout", "--queue", "{url}", "--prefetch", "-1"],
            "prefetch must be an int >= 0, got -1",
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    stored_runs(url)
    args = [arg.format(url=url, dir=tmp_path) for arg in args]
    code, _, err = run_command(capsys, *args)
    assert code == 2
    assert err.startswith("anyservice: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_purge_needs_a_duration(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "runs", "--queue", url, "purge", "--older-than", "soon")
    assert code == 2
    assert "not a duration: 'soon'" in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_serve_runs_the_named_tasks_until_sigterm(url: str, backend: str) -> None:
    command = [
        sys.executable,
        "-m",
        "anyservice",
        "serve",
        "tests.taskqueue.cli_tasks:shout",
        "tests.taskqueue.cli_tasks:fail",
        "--queue",
        url,
        "--limit",
        "3",
        "--prefetch",
        "2",
        "--backend",
        backend,
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:

        async def submit_and_wait() -> str:
            async with TaskQueue(url) as queue:
                shout = queue.task(name="shout")(cli_tasks.shout.function)
                run = await shout.delay("served")
                result: str = await run.result(timeout=PROMPTLY)
                return result

        assert anyio.run(submit_and_wait) == "SERVED"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=PROMPTLY)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "serving fail, shout" in output
