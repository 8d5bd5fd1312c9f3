"""anyservice: long-running async services on structured concurrency, for asyncio and trio.

A running service *is* an anyio task group with a cancel scope: start, stop, stop from
inside and crashes are scope operations with deadlines, never polled flags.
"""

from ._blocking import BlockingDetector as BlockingDetector
from ._decorators import requirements as requirements
from ._decorators import task as task
from ._diag import Diag as Diag
from ._diag import transitions_to as transitions_to
from ._health import Health as Health
from ._health import UnhealthyError as UnhealthyError
from ._logging import JsonFormatter as JsonFormatter
from ._loop_service import LoopService as LoopService
from ._loop_service import run_services as run_services
from ._restart import Backoff as Backoff
from ._runner import run as run
from ._schedule import CronSchedule as CronSchedule
from ._schedule import IntervalSchedule as IntervalSchedule
from ._schedule import MissedTickPolicy as MissedTickPolicy
from ._service import Service as Service
from ._state import ServiceError as ServiceError
from ._state import ServiceState as ServiceState
from ._status import StatusServer as StatusServer
from ._supervisor import RestartType as RestartType
from ._supervisor import Strategy as Strategy
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorError as SupervisorError
from ._timers import TimerStats as TimerStats
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
    "crontab",
    "requirements",
    "run",
    "run_services",
    "task",
    "timer",
    "transitions_to",
]
