"""A process that sends itself SIGTERM three times and more, for the runner's signal test.

``python -m tests.signal_burst BACKEND``: runs a service with a body in flight; the first
SIGTERM starts a graceful stop, the second forces it, and from then on a thread sends
SIGTERM as fast as it can until the runner has logged the exit code. Those must all be
ignored, so the process goes on to print what ``run()`` returned.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import anyio

import anyservice
from anyservice import Service, ServiceState, task


class Busy(Service):
    shutdown_timeout = 60.0

    @task
    async def handle(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        async with self.in_flight():
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep(60)


class Burst(logging.Handler):
    """Sends the second signal, then the burst, from what the runner logs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Lock()
        self.done = False
        self.sent = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "stopping Busy gracefully" in message:
            os.kill(os.getpid(), signal.SIGTERM)
        elif "again: stopping Busy at once" in message:
            threading.Thread(target=self.burst, daemon=True).start()
        elif "exit code" in message:
            # Logged by run() before it returns: no signal is sent after this.
            with self.gate:
                self.done = True

    def burst(self) -> None:
        while True:
            with self.gate:
                if self.done:
                    return
                os.kill(os.getpid(), signal.SIGTERM)
                self.sent += 1
            time.sleep(0)


def main() -> None:
    handler = Burst()
    logging.getLogger("anyservice.runner").addHandler(handler)
    logging.getLogger("anyservice.runner").setLevel(logging.INFO)
    code = anyservice.run(Busy(), backend=sys.argv[1])  # type: ignore[arg-type]
    print(f"run() returned {code} after {handler.sent} more signals", flush=True)


if __name__ == "__main__":
    main()
