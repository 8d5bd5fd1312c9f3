from __future__ import annotations

import time

import anyio
import pytest

from anyservice.testing import VirtualTimeEventLoop, run

pytestmark = pytest.mark.anyio


@pytest.mark.virtual_time
async def test_virtual_sleep_takes_exactly_its_duration() -> None:
    start = anyio.current_time()
    await anyio.sleep(3600)
    assert anyio.current_time() - start == 3600


@pytest.mark.virtual_time
async def test_timeout_fires_at_its_deadline() -> None:
    start = anyio.current_time()
    with anyio.move_on_after(5) as scope:
        await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert anyio.current_time() - start == pytest.approx(5)


@pytest.mark.virtual_time
async def test_worker_threads_still_complete_on_virtual_time() -> None:
    assert await anyio.to_thread.run_sync(lambda: 41 + 1) == 42


async def test_unmarked_tests_run_on_the_real_clock() -> None:
    before = time.monotonic()
    await anyio.sleep(0.01)
    assert time.monotonic() - before >= 0.01


def test_run_helper_runs_on_virtual_time_on_both_backends() -> None:
    async def sleep_a_day() -> float:
        start = anyio.current_time()
        await anyio.sleep(86400)
        return anyio.current_time() - start

    assert run(sleep_a_day, backend="asyncio") == 86400
    assert run(sleep_a_day, backend="trio") == 86400


def test_virtual_loop_rejects_moving_backwards() -> None:
    loop = VirtualTimeEventLoop()
    try:
        with pytest.raises(ValueError, match="forward"):
            loop.advance(-1)
        loop.advance(2.5)
        assert loop.time() == 2.5
    finally:
        loop.close()


def test_unknown_backend_is_a_clear_error() -> None:
    async def nothing() -> None:
        pass

    with pytest.raises(ValueError, match="unknown backend 'curio'"):
        run(nothing, backend="curio")
