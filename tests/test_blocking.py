"""The blocking detector: one warning with the blocked stack per episode, both backends.

These run on the real clock (a heartbeat under a virtual clock would spin it), with short
blocks; they assert what is reported, never how fast.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Literal

import anyio
import pytest

from anyservice import Service, ServiceState, task
from anyservice._blocking import WATCHDOG_THREAD_NAME, BlockingDetector
from anyservice._runner import run

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def no_collection_in_the_loop() -> object:
    """No garbage collection in the event loop's thread while a test blocks it on purpose.

    A collection is a block of its own, which the detector rightly reports with the
    collector's stack: after a long test session, one of the garbage left behind can
    take more than the threshold and come just before the block a test makes.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


THRESHOLD = 0.1
LOGGER = "anyservice"


def watchdog_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == WATCHDOG_THREAD_NAME]


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == LOGGER
        and getattr(record, "service", None) == "BlockingDetector"
        and record.levelno == logging.WARNING
    ]


class Blocker(Service):
    """Blocks its event loop once, for ``seconds``, in a task."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.blocked = anyio.Event()

    @task
    async def block_the_loop(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        time.sleep(self.seconds)  # noqa: ASYNC251 - blocking the loop is the point
        self.blocked.set()
        await anyio.sleep_forever()


async def wait_until(condition: Callable[[], bool], *, bound: float = 5.0) -> None:
    """Wait for what the watchdog thread reports: a thread can't set an anyio.Event."""
    with anyio.fail_after(bound):
        while not condition():  # noqa: ASYNC110 - the condition changes in another thread
            await anyio.sleep(0.01)


async def test_a_blocked_loop_gets_one_warning_with_the_stack_and_the_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    detector = BlockingDetector(THRESHOLD)
    blocker = Blocker(0.3)
    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with detector, blocker:
            await blocker.blocked.wait()
            # The episode is over once the watchdog has seen a fresh heartbeat.
            await wait_until(lambda: "responds again" in caplog.text)
    (warning,) = warnings_from(caplog)
    message = warning.getMessage()
    assert re.search(r"blocked for \d+\.\d{3}s \(threshold 0\.1s\)", message)
    assert "in block_the_loop" in message
    assert "time.sleep(self.seconds)" in message
    assert detector.episodes == 1
    assert re.search(r"responds again after \d+\.\d{3}s without a heartbeat", caplog.text)


async def test_two_blocks_are_two_episodes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with BlockingDetector(THRESHOLD) as detector:
            for episode in (1, 2):
                time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point

                def over(episode: int = episode) -> bool:
                    return caplog.text.count("responds again") == episode

                await wait_until(over)
    assert detector.episodes == 2
    assert len(warnings_from(caplog)) == 2


async def test_no_warning_while_nothing_blocks(caplog: pytest.LogCaptureFixture) -> None:
    # A generous threshold: a busy test machine must not look like a blocked loop.
    with caplog.at_level(logging.INFO, logger="anyservice"):
        async with BlockingDetector(0.5) as detector:
            await anyio.sleep(0.6)
    assert detector.episodes == 0
    assert warnings_from(caplog) == []


async def test_the_watchdog_thread_runs_while_the_detector_does_and_not_after() -> None:
    assert watchdog_threads() == []
    async with BlockingDetector(THRESHOLD):
        (thread,) = watchdog_threads()
        assert thread.daemon
    assert watchdog_threads() == []
    assert not thread.is_alive()


async def test_a_crash_beside_it_still_ends_the_thread() -> None:
    class Failing(Service):
        @task
        async def fail(self) -> None:
            raise ConnectionError("gone")

    detector = BlockingDetector(THRESHOLD)
    with pytest.RaisesGroup(ConnectionError, flatten_subgroups=True):
        async with detector:
            await Failing().run()
    assert detector.state is ServiceState.STOPPED
    assert watchdog_threads() == []


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "-1"])
def test_a_bad_threshold_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="threshold must be a finite number of seconds > 0"):
        BlockingDetector(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, None, [1]])
def test_a_threshold_that_is_not_a_duration_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="threshold must be a number of seconds"):
        BlockingDetector(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("given", "seconds"), [(dt.timedelta(milliseconds=250), 0.25), ("2", 2.0)])
def test_a_threshold_may_be_a_timedelta_or_a_numeric_string(given: object, seconds: float) -> None:
    detector = BlockingDetector(given)  # type: ignore[arg-type]
    assert (detector.threshold, detector.period) == (seconds, seconds / 4)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_runner_runs_the_detector_when_asked(
    backend: Literal["asyncio", "trio"], caplog: pytest.LogCaptureFixture
) -> None:
    class BlockOnceThenStop(Blocker):
        @task
        async def stop_after_the_block(self) -> None:
            await self.blocked.wait()
            await wait_until(lambda: "responds again" in caplog.text)
            await self.stop()

    with caplog.at_level(logging.INFO, logger="anyservice"):
        assert run(BlockOnceThenStop(0.3), backend=backend, blocking_threshold=THRESHOLD) == 0
    (warning,) = warnings_from(caplog)
    assert "time.sleep(self.seconds)" in warning.getMessage()
    assert watchdog_threads() == []
