"""Headless Chromium driven over the DevTools protocol on a pipe (no websocket, no driver).

``--remote-debugging-pipe`` makes Chromium read protocol messages from its fd 3 and write
its answers and events to fd 4, each a JSON object ended by a NUL byte. That is enough to
open a page and evaluate expressions in it, which is all the page tests need.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
)


def find() -> str | None:
    """The Chromium executable on PATH, if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser; :meth:`open` a page, then :meth:`evaluate` in it."""

    def __init__(self, executable: str) -> None:
        self._profile = tempfile.TemporaryDirectory(
            prefix="anyservice-chromium-", ignore_cleanup_errors=True
        )
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The child's fds 3 and 4 must be these two pipe ends.
        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=lambda: _as_fds_3_and_4(to_browser_read, from_browser_write),
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    def close(self) -> None:
        if self.process.poll() is None:
            # Asked to close, the browser ends its helper processes and stops writing into
            # its profile; killed, helpers may still write while the profile is removed.
            try:
                self.call("Browser.close")
                self.process.wait(timeout=10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        """Send one command and return its result (events before the answer are dropped).

        Raises:
            RuntimeError: Chromium answered with an error, or went away.
        """
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 65536)
            if not chunk:
                raise RuntimeError("Chromium closed its protocol pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        answer: dict[str, Any] = json.loads(message)
        return answer

    def open(self, url: str) -> None:
        """Open ``url`` in a new tab; later evaluations run in it."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the open page (JSON-able values)."""
        result = self.call(
            "Runtime.evaluate", self._session, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")


def _as_fds_3_and_4(read_end: int, write_end: int) -> None:
    # In the child, before exec: its protocol pipe is fd 3 (commands) and fd 4 (answers).
    # Moved out of the way first, in case either end already is 3 or 4.
    read_end, write_end = os.dup(read_end), os.dup(write_end)
    os.dup2(read_end, 3)
    os.dup2(write_end, 4)
