"""The brokers: where task runs are stored, over one base class (see ``_base.py``)."""

from ._base import BaseBroker, Broker, Claimed
from ._memory import MemoryBroker
from ._notifier import ChangeNotifier
from ._sqlite import SqliteBroker
from ._urls import DEFAULT_URL, SUPPORTED_SCHEMES, broker_from_url

__all__ = [
    "DEFAULT_URL",
    "SUPPORTED_SCHEMES",
    "BaseBroker",
    "Broker",
    "ChangeNotifier",
    "Claimed",
    "MemoryBroker",
    "SqliteBroker",
    "broker_from_url",
]
