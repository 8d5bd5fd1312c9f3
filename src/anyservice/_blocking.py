"""The event-loop blocking detector: a heartbeat task watched by a thread.

mode's ``BlockingDetector`` raises inside whatever code happens to be running when the loop
is late; this one only reports. A ``@task`` of the service records the time on every turn
of the loop it gets (every ``threshold / 4``); a daemon thread wakes as often and, when the
last heartbeat is older than ``threshold``, logs the event-loop thread's current stack. The
stack comes from ``sys._current_frames()``, so the same code serves asyncio and trio.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from ._checks import MIN_INTERVAL, Seconds, check_seconds
from ._core import Service, task

__all__ = ["WATCHDOG_THREAD_NAME", "BlockingDetector"]

#: The name of the watchdog thread, to spot it in ``threading.enumerate()`` or a thread dump.
WATCHDOG_THREAD_NAME = "anyservice-blocking-detector"

# How long stopping the detector waits for its thread: the thread wakes at once when told
# to stop, so this only bounds a thread stuck in a slow log handler.
_JOIN_TIMEOUT = 1.0


class BlockingDetector(Service):
    """Logs a warning with the blocked stack when the event loop stops responding.

    A ``Service``: run it beside your services (``anyservice.run(service,
    blocking_threshold=0.5)`` does), as a dependency (``self.add_dependency(
    BlockingDetector(0.5))``) or with ``async with BlockingDetector(0.5):``. While it runs,
    a loop that does not get back to its heartbeat for longer than ``threshold`` seconds
    (real time, ``time.monotonic``) gets one warning per blocked episode, naming how long it
    has been blocked so far and where the event-loop thread is; when the loop responds
    again an INFO line says for how long it did not. Nothing is raised into user code.

    It measures real time: under a virtual clock its heartbeat would spin the clock.

    ``threshold`` is a duration: seconds, a ``timedelta`` or a numeric string.

    Raises:
        TypeError: if ``threshold`` is not a duration.
        ValueError: if ``threshold`` is not a finite number of seconds, at least one
            microsecond.
    """

    # Its start and stop are not news: it says it is watching in one INFO line.
    lifecycle_log_level = logging.DEBUG
    shutdown_timeout = 1.0

    def __init__(self, threshold: Seconds, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.threshold = check_seconds(threshold, f"{self.name}: threshold", minimum=MIN_INTERVAL)
        #: How often the heartbeat beats and the watchdog looks: often enough to see a block
        #: soon after it passes the threshold.
        self.period = self.threshold / 4
        #: How many blocked episodes were reported since the detector was created.
        self.episodes = 0
        self._last_beat = time.monotonic()
        self.add_context(self._watchdog)

    @task
    async def heartbeat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await anyio.sleep(self.period)

    @contextmanager
    def _watchdog(self) -> Iterator[None]:
        # Entered by the service's start, so in the event-loop thread.
        loop_thread = threading.get_ident()
        self._last_beat = time.monotonic()
        stop = threading.Event()
        thread = threading.Thread(
            target=self._watch, args=(loop_thread, stop), name=WATCHDOG_THREAD_NAME, daemon=True
        )
        thread.start()
        self.log.info(
            "watching the event loop: a warning when it is blocked for more than %ss",
            self.threshold,
        )
        try:
            yield
        finally:
            stop.set()
            thread.join(_JOIN_TIMEOUT)

    def _watch(self, loop_thread: int, stop: threading.Event) -> None:
        reported_beat: float | None = None
        while not stop.wait(self.period):
            beat = self._last_beat
            silent = time.monotonic() - beat
            if silent > self.threshold:
                if reported_beat != beat:
                    reported_beat = beat
                    self.episodes += 1
                    self._report(loop_thread, silent)
            elif reported_beat is not None:
                self.log.info(
                    "the event loop responds again after %.3fs without a heartbeat",
                    beat - reported_beat,
                )
                reported_beat = None

    def _report(self, loop_thread: int, silent: float) -> None:
        frame = sys._current_frames().get(loop_thread)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
        self.log.warning(
            "the event loop has been blocked for %.3fs (threshold %ss); "
            "the event-loop thread is at:\n%s",
            silent,
            self.threshold,
            stack.rstrip("\n"),
        )
