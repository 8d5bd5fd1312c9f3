"""anyservice: long-running async services on structured concurrency, for asyncio and trio.

A running service *is* an anyio task group with a cancel scope: start, stop, stop from
inside and crashes are scope operations with deadlines, never polled flags.
"""

# Imported for what it does: with OpenTelemetry installed, restarts and crashes become
# span events from the first service on (see _tracing).
from . import _tracing  # noqa: F401
from ._blocking import BlockingDetector as BlockingDetector
from ._core import Diag as Diag
from ._core import Health as Health
from ._core import Service as Service
from ._core import ServiceError as ServiceError
from ._core import ServiceState as ServiceState
from ._core import UnhealthyError as UnhealthyError
from ._core import WaitResult as WaitResult
from ._core import WaitResults as WaitResults
from ._core import requirements as requirements
from ._core import task as task
from ._core import transitions_to as transitions_to
from ._logging import JsonFormatter as JsonFormatter
from ._loop_service import LoopService as LoopService
from ._loop_service import run_services as run_services
from ._restart import Backoff as Backoff
from ._runner import run as run
from ._schedule import CronSchedule as CronSchedule
from ._schedule import IntervalSchedule as IntervalSchedule
from ._schedule import MissedTickPolicy as MissedTickPolicy
from ._schedule import TimerStats as TimerStats
from ._status import StatusServer as StatusServer
from ._supervisor import RestartType as RestartType
from ._supervisor import Strategy as Strategy
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorError as SupervisorError
from ._timers import crontab as crontab
from ._timers import timer as timer

__all__ = [
    "Backoff",
    "BlockingDetector",
    "CronSchedule",
    "Diag",
    "Health",
    "IntervalSchedule",
    "JsonFormatter",
    "LoopService",
    "MissedTickPolicy",
    "RestartType",
    "Service",
    "ServiceError",
    "ServiceState",
    "StatusServer",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "TimerStats",
    "UnhealthyError",
    "WaitResult",
    "WaitResults",
    "crontab",
    "requirements",
    "run",
    "run_services",
    "task",
    "timer",
    "transitions_to",
]
