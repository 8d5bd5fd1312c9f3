"""For tests against a real status server: a minimal HTTP/1.1 client, and polling."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio

#: Bound on one request to a server that works; it only matters when something is broken.
PROMPTLY = 10.0


async def request(
    port: int, path: str, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers (lower-case names), body."""
    with anyio.fail_after(PROMPTLY):
        async with await anyio.connect_tcp(host, port) as stream:
            head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
            await stream.send(head.encode())
            response = b""
            try:
                while True:
                    response += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head_bytes, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], Any]:
    """One request whose answer is JSON: status, headers, the decoded body (None if empty)."""
    status, headers, body = await request(port, path, method)
    return status, headers, json.loads(body) if body else None


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, within a bound."""
    with anyio.fail_after(PROMPTLY):
        # The state polled lives in another task (or a server's answer): nothing to wait on.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)
