"""The core's names that the status package reads, imported in this one place.

The status package reads services through their public properties only; these are the
types it needs for that, so that a move of the core changes this file alone.
"""

from .._core import Service as Service
from .._core import ServiceState as ServiceState
from .._schedule import TimerStats as TimerStats

__all__ = ["Service", "ServiceState", "TimerStats"]
