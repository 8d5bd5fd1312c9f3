"""The worker's status server: a tiny ASGI app, no framework.

``GET /status`` answers Prefect's task-worker status fields as JSON; ``GET /healthz``
answers 200 while the worker can reach its broker and 503 when its last broker call
failed. Anything else is a 404 (or 405 for another method on those paths).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["StatusApp", "StatusSource"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class StatusSource(Protocol):
    """What the app asks the worker."""

    def status(self) -> dict[str, Any]: ...

    def healthz(self) -> tuple[bool, dict[str, Any]]: ...


class StatusApp:
    """The ASGI app of a worker's status server."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

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
        if path not in ("/status", "/healthz"):
            await _respond(send, 404, {"error": f"not found: {path}; try /status or /healthz"})
        elif method not in ("GET", "HEAD"):
            await _respond(send, 405, {"error": f"{method} not allowed; use GET"}, allow=True)
        elif path == "/status":
            await _respond(send, 200, self._source.status(), head=method == "HEAD")
        else:
            healthy, body = self._source.healthz()
            await _respond(send, 200 if healthy else 503, body, head=method == "HEAD")


async def _respond(
    send: Send, status: int, body: dict[str, Any], *, head: bool = False, allow: bool = False
) -> None:
    content = json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if allow:
        headers.append((b"allow", b"GET, HEAD"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else content})
