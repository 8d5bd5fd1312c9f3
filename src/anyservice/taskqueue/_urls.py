"""Making a broker from a URL, as ``TaskQueue(url)`` does.

* ``sqlite:///anyservice.db``: a file relative to the current directory (three slashes),
* ``sqlite:////var/lib/app/runs.db``: an absolute path (four slashes),
* ``memory://``: runs kept in this process only,
* ``postgresql://user:password@host:5432/db`` (or ``postgres://``): a PostgreSQL database,
  for workers on many hosts (needs the ``anyservice[postgres]`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ._broker import Broker
from ._memory import MemoryBroker
from ._sqlite import SqliteBroker

__all__ = ["DEFAULT_URL", "SUPPORTED_SCHEMES", "broker_from_url"]

#: Where runs are stored when no URL is given.
DEFAULT_URL = "sqlite:///anyservice.db"
SUPPORTED_SCHEMES = ("sqlite", "memory", "postgresql", "postgres")


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
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    supported = ", ".join(SUPPORTED_SCHEMES)
    # The URL itself is not repeated in these messages: a database URL may hold a password.
    if not separator:
        raise ValueError(
            f"broker URL has no scheme; supported: {supported} "
            "(e.g. 'sqlite:///anyservice.db' or 'memory://')"
        )
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}; supported: {supported}")
    if scheme in ("postgresql", "postgres"):
        return _postgres_broker(url, clock)
    if scheme == "memory":
        if rest:
            raise ValueError(
                f"a memory broker URL takes no path or options: use 'memory://', not {url!r}"
            )
        return MemoryBroker(clock=clock)
    # sqlite:///path: the host part between "//" and the third "/" must be empty.
    if not rest.startswith("/") or len(rest) == 1:
        raise ValueError(
            f"SQLite broker URL {url!r} needs a file path: 'sqlite:///relative.db' or "
            "'sqlite:////absolute/path.db'"
        )
    path = rest[1:]
    if "?" in path:
        raise ValueError(f"SQLite broker URL {url!r}: query options are not supported")
    if path == ":memory:":
        raise ValueError(
            f"SQLite broker URL {url!r}: an in-memory SQLite database cannot be shared by "
            "workers; use 'memory://' for an in-process broker"
        )
    return SqliteBroker(path, clock=clock)


def _postgres_broker(url: str, clock: Callable[[], float]) -> Broker:
    try:
        from .brokers._postgres import PostgresBroker
    except ImportError as exc:
        raise ImportError(
            f"a PostgreSQL broker needs psycopg and psycopg-pool ({exc}): "
            "pip install 'anyservice[postgres]'"
        ) from exc
    return PostgresBroker(url, clock=clock)
