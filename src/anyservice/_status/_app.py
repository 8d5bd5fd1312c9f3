"""The status server's ASGI app, no framework: a handful of GET routes over one tree.

``/`` the live page, ``/healthz`` liveness, ``/readyz`` readiness, ``/tree`` the tree as
JSON, ``/metrics`` the Prometheus text format (when metrics are on), and ``/status``
Prefect's task-worker fields (when the tree has a task worker). Anything else is a 404, or
a 405 for another method than GET or HEAD on those paths.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from . import _metrics, _snapshot
from ._core_names import Service
from ._page import PAGE

__all__ = ["StatusApp"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PATHS = ("/", "/healthz", "/readyz", "/tree", "/metrics", "/status")


class StatusApp:
    """The ASGI app of a status server for the tree under ``root``.

    ``observations`` is the metrics store while metrics are on, ``None`` when they are off.
    """

    def __init__(self, root: Service, observations: _metrics.Observations | None) -> None:
        self._root = root
        self._exposition = None if observations is None else _metrics.Exposition(root, observations)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, send)
        # Websockets are not served: returning closes the connection.

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        head = method == "HEAD"
        root = self._root
        if path not in PATHS:
            await _json(send, 404, {"error": f"not found: {path}; try {', '.join(PATHS)}"})
        elif method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": f"{method} not allowed; use GET"}, allow=True)
        elif path == "/":
            await _respond(send, 200, PAGE.encode(), b"text/html; charset=utf-8", head=head)
        elif path == "/healthz":
            alive, body = _snapshot.liveness(root)
            await _json(send, 200 if alive else 503, body, head=head)
        elif path == "/readyz":
            ready, body = _snapshot.readiness(root)
            await _json(send, 200 if ready else 503, body, head=head)
        elif path == "/tree":
            await _json(send, 200, _snapshot.tree(root), head=head)
        elif path == "/metrics":
            await self._metrics(send, head=head)
        else:
            workers = _snapshot.task_workers(_snapshot.walk(root))
            if not workers:
                await _json(send, 404, {"error": f"{root.name} runs no task worker"})
            else:
                await _json(send, 200, workers[0].status(), head=head)

    async def _metrics(self, send: Send, *, head: bool) -> None:
        if self._exposition is None:
            await _json(send, 404, {"error": "metrics are off for this status server"})
            return
        body, content_type = await self._exposition.render()
        await _respond(send, 200, body, content_type.encode(), head=head)


async def _json(
    send: Send, status: int, body: dict[str, Any], *, head: bool = False, allow: bool = False
) -> None:
    content = json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
    await _respond(send, status, content, b"application/json", head=head, allow=allow)


async def _respond(
    send: Send,
    status: int,
    content: bytes,
    content_type: bytes,
    *,
    head: bool = False,
    allow: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(content)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if allow:
        headers.append((b"allow", b"GET, HEAD"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else content})
