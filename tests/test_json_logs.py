"""``JsonFormatter`` and the task-run fields of log records, on asyncio and trio."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anyservice import JsonFormatter
from anyservice.taskqueue import TaskQueue, TaskWorker

pytestmark = pytest.mark.anyio

PROMPTLY = 10.0


class Lines(logging.Handler):
    """Keeps each record as the JSON object the formatter made of it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.objects: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        assert "\n" not in line
        self.objects.append(json.loads(line))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.setLevel(level)
    logger.removeHandler(handler)


def test_a_record_is_one_object_with_the_fields_of_extra(lines: Lines) -> None:
    log = logging.getLogger("app")
    try:
        raise KeyError("gone")
    except KeyError:
        log.error("lost %d rows", 3, exc_info=True, extra={"service": "db", "where": Path("/x")})
    (line,) = lines.objects
    assert line["level"] == "ERROR"
    assert line["logger"] == "app"
    assert line["message"] == "lost 3 rows"
    assert line["service"] == "db"
    assert line["where"] == repr(Path("/x"))
    assert line["exception"].startswith("Traceback")
    assert "KeyError: 'gone'" in line["exception"]
    assert line["time"].endswith("+00:00")


async def test_records_of_a_task_run_carry_the_task_the_run_and_the_attempt(
    tmp_path: Path, lines: Lines
) -> None:
    async with TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}") as queue:

        @queue.task
        async def greet(name: str) -> None:
            logging.getLogger("app.greet").info("hello %s", name)

        @queue.task
        async def broken() -> None:
            raise ValueError("no")

        async with TaskWorker(greet, broken, name="worker"):
            greeting = await greet.delay("you")
            await greeting.wait(timeout=PROMPTLY)
            failure = await broken.delay()
            await failure.wait(timeout=PROMPTLY)
    (hello,) = [line for line in lines.objects if line["message"] == "hello you"]
    assert (hello["task"], hello["run_id"], hello["attempt"]) == ("greet", greeting.id, 1)
    (failed,) = [line for line in lines.objects if line.get("run_id") == failure.id]
    assert failed["level"] == "ERROR"
    assert (failed["service"], failed["task"], failed["attempt"]) == ("worker", "broken", 1)
    assert "ValueError: no" in failed["exception"]
    outside = [line for line in lines.objects if "serving" in line["message"]]
    assert outside
    assert "run_id" not in outside[0]
