"""``StatusServer``: hypercorn serving the status app of one tree, on asyncio and trio."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from . import _http
from ._app import StatusApp
from ._core_names import Service
from ._metrics import Observations, metrics_available, require_prometheus_client

__all__ = ["StatusServer"]

log = logging.getLogger("anyservice.status")

#: How long requests under way may take to finish once the server is told to stop.
_GRACE = 0.5


def check_port(port: object, what: str) -> int:
    """``port`` if it is a TCP port (0 picks a free one).

    Raises:
        TypeError: it is not an int.
        ValueError: it is outside 0..65535.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{what} must be an int, got {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} must be within 0..65535 (0 picks a free port), got {port}")
    return port


def check_host(host: object, what: str) -> str:
    """``host`` if it is an address to bind to.

    Raises:
        TypeError: it is not a str.
        ValueError: it is empty.
    """
    if not isinstance(host, str):
        raise TypeError(f"{what} must be a str (an address such as '127.0.0.1'), got {host!r}")
    if not host:
        raise ValueError(f"{what} must not be empty; use '0.0.0.0' for every interface")
    return host


class StatusServer:
    """An HTTP status server for a running service tree.

    ``GET /`` a live HTML page, ``/healthz`` liveness, ``/readyz`` readiness (503 with the
    reasons), ``/tree`` the tree as JSON, ``/metrics`` the Prometheus text format, and, when
    the tree has a task worker, ``/status`` Prefect's task-worker fields. Use it as
    ``async with StatusServer(service, port=0) as server:`` (``server.port`` is then the
    bound port) or give ``status_port=`` to :func:`anyservice.run`.

    Args:
        service: The root of the tree to report on.
        port: The TCP port; 0 picks a free one.
        host: The address to bind to (loopback unless told otherwise).
        metrics: Serve ``/metrics`` (needs ``anyservice[metrics]``); ``None``: when
            prometheus_client is installed. Off, nothing is collected.

    Raises:
        TypeError, ValueError: a bad service, port, host or metrics flag.
        ImportError: hypercorn (or, with ``metrics=True``, prometheus_client) is missing.
    """

    def __init__(
        self,
        service: Service,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        metrics: bool | None = None,
    ) -> None:
        if not isinstance(service, Service):
            raise TypeError(f"StatusServer() needs a Service, got {service!r}")
        what = getattr(service, "name", type(service).__name__)
        self.service = service
        #: The port: as asked until bound, then the one bound.
        self.port = check_port(port, f"{what}: status port")
        self.host = check_host(host, f"{what}: status host")
        if metrics is not None and not isinstance(metrics, bool):
            raise TypeError(f"{what}: metrics must be True, False or None, got {metrics!r}")
        _http.require_hypercorn()
        if metrics:
            require_prometheus_client()
        #: Whether ``/metrics`` is served.
        self.metrics: bool = metrics_available() if metrics is None else metrics
        self._sock: socket.socket | None = None
        self._shutdown: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8000/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def bind(self) -> None:
        """Bind the listening socket now, so that :attr:`port` is known (idempotent).

        Raises:
            OSError: the address cannot be bound, naming the service and the address.
        """
        if self._sock is None:
            self._sock = _http.bind(self.host, self.port, what=self.service.name)
            self.port = self._sock.getsockname()[1]

    def close(self) -> None:
        """Close the listening socket (after :meth:`serve` has returned)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[Any]]) -> None:
        """Serve until ``shutdown_trigger()`` returns, then finish the requests under way."""
        self.bind()
        assert self._sock is not None
        observations = Observations.start() if self.metrics else None
        try:
            await _http.serve(
                StatusApp(self.service, observations),
                self._sock,
                shutdown_trigger=shutdown_trigger,
                logger=log,
                graceful_timeout=_GRACE,
            )
        finally:
            if observations is not None:
                Observations.stop()

    async def __aenter__(self) -> StatusServer:
        self.bind()
        self._shutdown = anyio.Event()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self.serve, self._shutdown.wait, name=f"status server {self.url}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._shutdown is not None
        assert self._task_group is not None
        task_group, self._task_group = self._task_group, None
        self._shutdown.set()
        try:
            # hypercorn finishes its requests within the grace period; past it (a client
            # that never reads), the server is cancelled.
            task_group.cancel_scope.deadline = anyio.current_time() + 2 * _GRACE + 1.0
            return await task_group.__aexit__(exc_type, exc, tb)
        finally:
            self.close()
