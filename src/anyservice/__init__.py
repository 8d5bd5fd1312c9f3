"""anyservice: long-running async services on structured concurrency, for asyncio and trio.

A running service *is* an anyio task group with a cancel scope: start, stop, stop from
inside and crashes are scope operations with deadlines, never polled flags.
"""

from ._decorators import requirements as requirements
from ._decorators import task as task
from ._diag import Diag as Diag
from ._diag import transitions_to as transitions_to
from ._service import Service as Service
from ._state import ServiceError as ServiceError
from ._state import ServiceState as ServiceState

__all__ = [
    "Diag",
    "Service",
    "ServiceError",
    "ServiceState",
    "requirements",
    "task",
    "transitions_to",
]
