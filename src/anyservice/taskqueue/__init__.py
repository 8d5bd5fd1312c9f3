"""Durable task runs: Prefect's ``TaskWorker`` that loses nothing, on asyncio and trio.

```python
from anyservice.taskqueue import TaskQueue, serve

queue = TaskQueue()                     # an embedded SQLite file: sqlite:///anyservice.db

@queue.task(retries=2, retry_delay=1.0, timeout=30)
async def say(message: str) -> str:
    return message.upper()

run = await say.delay("hi")             # stored; a worker will run it
print(await run.result(timeout=10))     # "HI"

serve(say, limit=10)                    # elsewhere: a worker, until SIGTERM
```

Runs are claimed under a lease that the worker renews; a worker that dies loses nothing
(another takes its runs when the lease expires: at-least-once), and a stopping worker
lets its runs finish within the grace period and hands back the rest at once.
"""

from ._context import RunContext as RunContext
from ._context import current_run as current_run
from ._errors import BrokerBusyError as BrokerBusyError
from ._errors import BrokerError as BrokerError
from ._errors import StopTaskWorker as StopTaskWorker
from ._errors import TaskRunFailed as TaskRunFailed
from ._errors import TaskRunNotFound as TaskRunNotFound
from ._errors import TaskRunTimeout as TaskRunTimeout
from ._errors import TaskTimeoutError as TaskTimeoutError
from ._queue import AsyncTask as AsyncTask
from ._queue import SyncTask as SyncTask
from ._queue import Task as Task
from ._queue import TaskQueue as TaskQueue
from ._queue import TaskRun as TaskRun
from ._records import PayloadError as PayloadError
from ._records import RunError as RunError
from ._records import RunRecord as RunRecord
from ._records import RunState as RunState
from ._scheduler import Schedule as Schedule
from ._singleton import Singleton as Singleton
from ._ticks import MissedTicks as MissedTicks
from ._worker import TaskWorker as TaskWorker
from ._worker import serve as serve
from .brokers import DEFAULT_URL as DEFAULT_URL
from .brokers import Broker as Broker
from .brokers import MemoryBroker as MemoryBroker
from .brokers import SqliteBroker as SqliteBroker

# Importing the subpackage bound its name here; it is private, the names above are public.
del brokers  # type: ignore[name-defined]  # noqa: F821 - bound by the import system

__all__ = [
    "DEFAULT_URL",
    "AsyncTask",
    "Broker",
    "BrokerBusyError",
    "BrokerError",
    "MemoryBroker",
    "MissedTicks",
    "PayloadError",
    "RunContext",
    "RunError",
    "RunRecord",
    "RunState",
    "Schedule",
    "Singleton",
    "SqliteBroker",
    "StopTaskWorker",
    "SyncTask",
    "Task",
    "TaskQueue",
    "TaskRun",
    "TaskRunFailed",
    "TaskRunNotFound",
    "TaskRunTimeout",
    "TaskTimeoutError",
    "TaskWorker",
    "current_run",
    "serve",
]
