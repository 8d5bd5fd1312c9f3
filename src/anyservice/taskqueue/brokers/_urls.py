"""Making a broker from a URL, as ``TaskQueue(url)`` does.

* ``sqlite:///anyservice.db``: a file relative to the current directory (three slashes),
* ``sqlite:////var/lib/app/runs.db``: an absolute path (four slashes),
* ``memory://``: runs kept in this process only,
* ``postgresql://user:password@host:5432/db`` (or ``postgres://``): a PostgreSQL database,
  for workers on many hosts (needs the ``anyservice[postgres]`` extra).

A scheme is one entry of ``_SCHEMES``: the module of this package and the broker class
in it, imported only when a URL names the scheme (so a broker's driver is only needed
by those who use it). The class parses the rest of the URL in its ``from_url``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from ._base import BaseBroker, Broker

__all__ = ["DEFAULT_URL", "SUPPORTED_SCHEMES", "broker_from_url"]

#: Where runs are stored when no URL is given.
DEFAULT_URL = "sqlite:///anyservice.db"

_SCHEMES: dict[str, tuple[str, str]] = {
    "sqlite": ("._sqlite", "SqliteBroker"),
    "memory": ("._memory", "MemoryBroker"),
    "postgresql": ("._postgres", "PostgresBroker"),
    "postgres": ("._postgres", "PostgresBroker"),
}
SUPPORTED_SCHEMES = tuple(_SCHEMES)


def broker_from_url(url: str, *, clock: Callable[[], float] = time.time) -> Broker:
    """Make the broker a URL names. The broker is not opened yet.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, ``memory://`` or
            ``postgresql://user:password@host:port/db?schema=...``.
        clock: Wall-clock time in epoch seconds, for tests that move time.

    Raises:
        ValueError: The scheme is not supported, or the URL has no usable path.
        ImportError: A PostgreSQL URL without the ``anyservice[postgres]`` extra installed.
    """
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    supported = ", ".join(SUPPORTED_SCHEMES)
    # The URL itself is not repeated in these messages: a database URL may hold a password.
    if not separator:
        raise ValueError(
            f"broker URL has no scheme; supported: {supported} "
            "(e.g. 'sqlite:///anyservice.db' or 'memory://')"
        )
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}; supported: {supported}")
    module, name = _SCHEMES[scheme]
    broker_class: type[BaseBroker] = getattr(importlib.import_module(module, __package__), name)
    return broker_class.from_url(url, clock=clock)
