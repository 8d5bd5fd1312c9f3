"""``request_stop()`` from another thread and from a signal handler, on real time.

A thread and a signal are real, so these tests run on the real clock, with bounded waits.
"""

from __future__ import annotations

import os
import signal
import threading

import anyio
import pytest

from anyservice import Service, ServiceState

pytestmark = [pytest.mark.anyio]


async def test_request_stop_from_another_thread() -> None:
    async with Service() as service:
        thread = threading.Thread(target=service.request_stop)
        thread.start()
        with anyio.fail_after(5):
            await service.wait_for(ServiceState.STOPPED)
        thread.join()


async def test_request_stop_from_a_signal_handler() -> None:
    async with Service() as service:
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: service.request_stop())
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            with anyio.fail_after(5):
                await service.wait_for(ServiceState.STOPPED)
        finally:
            signal.signal(signal.SIGUSR1, previous)
