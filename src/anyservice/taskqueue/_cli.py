"""The task queue's commands: ``anyservice serve`` and ``anyservice runs``.

``anyservice serve myapp.tasks:say myapp.tasks:yell --limit 10 --status-port 8080`` runs a
worker for those tasks (Prefect's ``task serve``). ``anyservice runs`` inspects and
steers the stored runs: ``list``, ``show ID``, ``retry ID``, ``cancel ID`` and ``purge
--older-than 7d``, as a table by default or ``--json`` for scripts. A bad URL, a target
that is not a task or an unknown run id is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, cast

import anyio

from ._errors import BrokerError
from ._queue import Task, TaskQueue, TaskRun
from ._records import RunRecord, RunState
from .brokers import DEFAULT_URL, broker_from_url

__all__ = ["add_commands"]

EXIT_USAGE = 2
#: The queue URL when ``--queue`` is not given.
QUEUE_VARIABLE = "ANYSERVICE_QUEUE"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


_RUNS_EPILOG = """\
actions:
  list [--state STATE] [--task TASK] [--limit N]   the latest runs, newest first
  show ID                                          everything about one run
  retry ID                                         run a finished run again
  cancel ID [--wait DURATION]                      cancel a run, even a RUNNING one
  purge --older-than DURATION                      delete runs that finished long ago

DURATION is 45s, 15m, 12h, 7d or 2w. Exit codes: 0 done, 1 retry or cancel did not apply
to the run's state, 2 a bad URL, a missing database or an unknown run id.
"""


class CommandError(Exception):
    """What went wrong, in the one line the user sees (exit code 2)."""


def duration(text: str) -> float:
    """Seconds in ``"45"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"`` or ``"2w"``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 45s, 15m, 12h, 7d, 2w)")
    return float(match[1]) * _UNITS[match[2] or "s"]


def add_commands(
    commands: Any, load_object: Callable[[str], object], target_error: type[Exception]
) -> None:
    """Add ``serve`` and ``runs`` to the ``anyservice`` command's subparsers.

    ``load_object`` imports what a ``package.module:attribute`` target names, raising
    ``target_error`` with a one-line message (the ``anyservice`` command's own loader).
    """
    queue_help = f"the queue's URL (default: ${QUEUE_VARIABLE}, else {DEFAULT_URL})"
    _add_serve(commands, queue_help, load_object, target_error)
    _add_runs(commands, queue_help)


def _add_serve(
    commands: Any,
    queue_help: str,
    load_object: Callable[[str], object],
    target_error: type[Exception],
) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a worker for tasks (TASK: package.module:task) until SIGTERM",
        description="Serve tasks until SIGINT or SIGTERM, as TaskWorker does (Prefect's "
        "task serve). Each TASK is package.module:attribute naming a @queue.task.",
    )
    serve.add_argument("tasks", nargs="+", metavar="TASK")
    serve.add_argument("--limit", type=int, default=10, help="most runs at once (default: 10)")
    serve.add_argument("--status-port", type=int, default=None, help="serve /status on this port")
    serve.add_argument(
        "--queue", default=None, metavar="URL", help=queue_help + " (default: the tasks' own queue)"
    )
    serve.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    serve.add_argument("--lease", type=float, default=30.0, help="lease seconds (default: 30)")
    serve.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="most runs claimed ahead of --limit (default: as many as --limit, up to 100 a claim)",
    )
    serve.set_defaults(handler=_serve, load_object=load_object, target_error=target_error)


def _add_runs(commands: Any, queue_help: str) -> None:
    runs = commands.add_parser(
        "runs",
        help="list, show, retry, cancel or purge stored task runs",
        description="Inspect and steer the runs stored in a queue.",
        epilog=_RUNS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs.add_argument("--queue", default=None, metavar="URL", help=queue_help)
    runs.add_argument("--json", action="store_true", help="print JSON, for scripts")
    actions = runs.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the latest runs, newest first")
    listing.add_argument("--state", type=str.upper, choices=[state.value for state in RunState])
    listing.add_argument("--task", default=None)
    listing.add_argument("--limit", type=int, default=20)
    for name, text in (
        ("show", "everything about one run"),
        ("retry", "run a FAILED, CRASHED or CANCELLED run again"),
        ("cancel", "cancel a run, even a RUNNING one"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("run_id", metavar="ID")
        if name == "cancel":
            action.add_argument(
                "--wait",
                type=duration,
                default=duration("60s"),
                metavar="DURATION",
                help="how long to wait for a RUNNING run to end (default: 60s)",
            )
    purge = actions.add_parser("purge", help="delete runs that finished long ago")
    purge.add_argument("--older-than", type=duration, required=True, metavar="DURATION")
    runs.set_defaults(handler=_runs)


def _fail(message: str) -> int:
    print(f"anyservice: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- serve ---------------------------------------------------------------------------------


def _load_task(args: argparse.Namespace, target: str) -> Task[Any, Any]:
    try:
        found = args.load_object(target)
    except args.target_error as error:
        raise CommandError(str(error)) from None
    if not isinstance(found, Task):
        raise CommandError(f"{target} is not a task (decorate a function with @queue.task)")
    return found


def _serve(args: argparse.Namespace) -> int:
    from ._worker import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    try:
        tasks = [_load_task(args, target) for target in args.tasks]
        if args.queue is not None:
            _use_url(tasks, args.queue)
        # Not inside an event loop: serve() blocks and gives the exit code.
        code: int = serve(
            *tasks,
            limit=args.limit,
            status_server_port=args.status_port,
            backend=cast(Literal["asyncio", "trio"], args.backend),
            lease_seconds=args.lease,
            prefetch=args.prefetch,
        )
        return code
    except (CommandError, TypeError, ValueError) as error:
        return _fail(str(error))


def _use_url(tasks: list[Task[Any, Any]], url: str) -> None:
    queues = {id(task.queue): task.queue for task in tasks}
    try:
        broker = broker_from_url(url)
    except ValueError as error:
        raise CommandError(f"--queue: {error}") from None
    for queue in queues.values():
        # The command line chooses the storage, before anything opened it.
        queue._broker = broker


# --- runs ----------------------------------------------------------------------------------


def _queue_for(url: str | None) -> TaskQueue:
    url = url or os.environ.get(QUEUE_VARIABLE) or DEFAULT_URL
    try:
        broker = broker_from_url(url)
    except ValueError as error:
        raise CommandError(f"--queue: {error}") from None
    path = getattr(broker, "path", None)
    if isinstance(path, str) and not os.path.exists(path):
        raise CommandError(f"--queue: no database at {path!r}")
    return TaskQueue(broker=broker)


def _runs(args: argparse.Namespace) -> int:
    try:
        queue = _queue_for(args.queue)
        handler = _ACTIONS[args.action]
        return int(anyio.run(handler, queue, args))
    except CommandError as error:
        return _fail(str(error))
    except BrokerError as error:
        return _fail(f"the broker cannot be used: {error}")


async def _get(queue: TaskQueue, run_id: str) -> TaskRun[Any]:
    record = await queue.broker.get(run_id)
    if record is None:
        raise CommandError(f"no run {run_id!r} in {queue.url!r}")
    return TaskRun(queue, record)


async def _list(queue: TaskQueue, args: argparse.Namespace) -> int:
    async with queue:
        runs = await queue.runs(state=args.state, task=args.task, limit=max(args.limit, 1))
    records = [run.record for run in runs]
    if args.json:
        _print_json([_as_json(record) for record in records])
    else:
        _print_table(records)
    return 0


async def _show(queue: TaskQueue, args: argparse.Namespace) -> int:
    async with queue:
        record = (await _get(queue, args.run_id)).record
    if args.json:
        _print_json(_as_json(record))
        return 0
    for name, value in _as_json(record).items():
        if name == "error" and value:
            print(f"{'error':<17} {value['type']}: {value['message']}")
            if value["traceback"]:
                print(value["traceback"].rstrip())
        else:
            print(f"{name:<17} {'' if value is None else value}")
    return 0


async def _retry(queue: TaskQueue, args: argparse.Namespace) -> int:
    async with queue:
        run = await _get(queue, args.run_id)
        retried = await run.retry()
    return _report(
        args, run, done=retried, verb="retried", refused="is not FAILED, CRASHED or CANCELLED"
    )


async def _cancel(queue: TaskQueue, args: argparse.Namespace) -> int:
    async with queue:
        run = await _get(queue, args.run_id)
        cancelled = await run.cancel(timeout=args.wait)
    return _report(args, run, done=cancelled, verb="cancelled", refused="had finished")


async def _purge(queue: TaskQueue, args: argparse.Namespace) -> int:
    async with queue:
        count = await queue.purge(older_than=args.older_than)
    if args.json:
        _print_json({"purged": count})
    else:
        print(f"purged {count} run{'' if count == 1 else 's'}")
    return 0


_ACTIONS: dict[str, Callable[[TaskQueue, argparse.Namespace], Any]] = {
    "list": _list,
    "show": _show,
    "retry": _retry,
    "cancel": _cancel,
    "purge": _purge,
}


def _report(
    args: argparse.Namespace, run: TaskRun[Any], *, done: bool, verb: str, refused: str
) -> int:
    if args.json:
        _print_json({verb: done, "run": _as_json(run.record)})
    elif done:
        print(f"{verb} run {run.id} ({run.task}): now {run.state.value}")
    else:
        print(f"run {run.id} ({run.task}) {refused}: {run.state.value}")
    return 0 if done else 1


# --- output --------------------------------------------------------------------------------


def _when(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _as_json(record: RunRecord) -> dict[str, Any]:
    data = dataclasses.asdict(record)
    data["state"] = record.state.value
    for name in ("created_at", "scheduled_at", "started_at", "finished_at", "lease_expires_at"):
        data[name] = _when(data[name])
    return data


def _print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    print()


def _print_table(records: list[RunRecord]) -> None:
    if not records:
        print("no runs")
        return
    header = ("ID", "TASK", "STATE", "ATTEMPTS", "CREATED", "FINISHED", "ERROR")
    rows = [
        (
            record.id,
            record.task,
            record.state.value,
            str(record.attempts),
            _when(record.created_at) or "",
            _when(record.finished_at) or "",
            "" if record.error is None else f"{record.error.type}: {record.error.message}"[:60],
        )
        for record in records
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
