"""The status server's HTTP side, with hypercorn: the package's one backend-specific module.

hypercorn has an entry point per event loop (``hypercorn.asyncio.serve`` and
``hypercorn.trio.serve``) and anyio has no HTTP server, so the choice is made here, by the
event loop we run on. hypercorn is an optional dependency (``anyservice[http]``), imported
only when a status server is asked for.

The listening socket is bound by the caller (so port 0 works and the port is known before
anything is served) and handed to hypercorn as ``fd://`` of a duplicate descriptor:
hypercorn closes its descriptor when it stops, the caller closes its own.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["HTTP_EXTRA_HINT", "bind", "require", "require_hypercorn", "serve"]

HTTP_EXTRA_HINT = "pip install 'anyservice[http]'"


def require(module: str, *, what: str, hint: str) -> None:
    """Check that the optional ``module`` can be imported.

    Raises:
        ImportError: it cannot, saying ``what`` needs it and ``hint`` (how to install it).
    """
    try:
        importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        raise ImportError(f"{what} needs {package}, which is not installed: {hint}") from exc


def require_hypercorn() -> None:
    """Check that hypercorn can be imported (or raise ImportError with the extra to install)."""
    require("hypercorn.config", what="the status server", hint=HTTP_EXTRA_HINT)


def bind(host: str, port: int, *, what: str) -> socket.socket:
    """A non-blocking socket listening on ``host:port`` (port 0: a free one).

    Raises:
        OSError: it cannot be bound, naming ``what`` wanted it and the address.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(100)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"{what}: cannot serve status on {host}:{port}: {exc.strerror}"
        ) from exc
    sock.setblocking(False)
    return sock


def _event_loop() -> str:
    try:
        import sniffio
    except ImportError:  # trio depends on sniffio: without it, this is asyncio
        return "asyncio"
    return sniffio.current_async_library()


async def serve(
    app: Callable[..., Awaitable[None]],
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    logger: logging.Logger,
    graceful_timeout: float = 0.5,
) -> None:
    """Serve ``app`` on the bound, listening ``sock`` until ``shutdown_trigger()`` returns.

    Raises:
        ImportError: hypercorn is not installed.
        RuntimeError: the event loop is neither asyncio nor trio.
    """
    require_hypercorn()
    from hypercorn.config import Config

    serve_on_loop: Callable[..., Awaitable[None]]
    loop = _event_loop()
    if loop == "trio":
        import hypercorn.trio

        serve_on_loop = hypercorn.trio.serve
    elif loop == "asyncio":
        import hypercorn.asyncio

        serve_on_loop = hypercorn.asyncio.serve
    else:
        raise RuntimeError(f"the status server runs on asyncio or trio, not on {loop!r}")
    config = Config()
    # hypercorn logs "Running on ..." and its errors here: the service's logger, not stderr.
    config.errorlog = logger
    config.accesslog = None
    config.graceful_timeout = graceful_timeout
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    await serve_on_loop(app, config, shutdown_trigger=shutdown_trigger, mode="asgi")
