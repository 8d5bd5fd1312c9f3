"""The scoped service: what the rest of the package may use of it.

The core imports anyio and the pure modules (``_schedule``) only; the policies beside it
(timers, LoopService, Supervisor, the runner, the task queue) use the names below and
nothing else of it.
"""

from ._diag import Diag as Diag
from ._diag import transitions_to as transitions_to
from ._exceptions import LOGGED as LOGGED
from ._exceptions import first_real_error as first_real_error
from ._exceptions import is_logged as is_logged
from ._exceptions import leaves as leaves
from ._exceptions import only_cancellation as only_cancellation
from ._exceptions import real_leaves as real_leaves
from ._host import Host as Host
from ._run import Countdown as Countdown
from ._run import Started as Started
from ._run import idle_released as idle_released
from ._run import idle_until as idle_until
from ._run import report_ready as report_ready
from ._run import serving_scope as serving_scope
from ._run import start_beside as start_beside
from ._run import start_is_observable as start_is_observable
from ._run import unwind_unobservable as unwind_unobservable
from ._service import Service as Service
from ._service import adopt as adopt
from ._service import run_as_restart as run_as_restart
from ._service import stop_service as stop_service
from ._specs import BackgroundSpec as BackgroundSpec
from ._specs import TaskSpec as TaskSpec
from ._specs import attach_spec as attach_spec
from ._specs import check_name as check_name
from ._specs import requirements as requirements
from ._specs import task as task
from ._state import Health as Health
from ._state import ServiceError as ServiceError
from ._state import ServiceState as ServiceState
from ._state import UnhealthyError as UnhealthyError
from ._wait import WaitResult as WaitResult
from ._wait import WaitResults as WaitResults
