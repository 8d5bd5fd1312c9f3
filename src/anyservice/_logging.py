"""``JsonFormatter``: one JSON object per log line, with the fields of ``extra``.

A log aggregator (Loki, Elasticsearch, CloudWatch) reads fields, not prose: what a record
carries in ``extra`` (the service, and for task runs the task, run id and attempt) becomes
a key of the object. A record logged while a task run executes (the task's own logging
included) gets ``task``, ``run_id`` and ``attempt`` from the run's context when it does
not carry them itself.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter"]

#: The attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return repr(value)


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of JSON.

    Keys: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, every field the
    record got through ``extra`` (``service``, ``task``, ``run_id``, ``attempt``, ...), and
    ``exception`` / ``stack`` (formatted) when the record has them. Values that are not
    JSON are given as their ``repr``.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = _jsonable(value)
        if "run_id" not in data:
            # Only a process that runs task runs has imported the module of their context.
            context_module = sys.modules.get("anyservice.taskqueue._context")
            run = None if context_module is None else context_module.current_run()
            if run is not None:
                data.update(task=run.task, run_id=run.run_id, attempt=run.attempt)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False)
