"""The core's names that the status package reads, imported in this one place.

The status package reads services through their public properties only; these are the
types it needs for that, so that a move of the core changes this file alone.
"""

from .._service import Service as Service
from .._state import ServiceState as ServiceState
from .._timers import TimerStats as TimerStats

__all__ = ["Service", "ServiceState", "TimerStats"]
