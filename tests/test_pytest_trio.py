"""Trio-only: services under pytest-trio's own runner and autojump clock.

Users who test with pytest-trio rather than anyio's plugin get the same exact virtual time;
these tests run only on trio because pytest-trio does.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from anyservice import Service, ServiceState, timer


@pytest.mark.trio
async def test_timer_ticks_on_the_grid_under_the_autojump_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ticks: list[float] = []

    class Ticker(Service):
        @timer(2.0)
        async def tick(self) -> None:
            ticks.append(trio.current_time())
            await trio.sleep(0.5)

    async with Ticker() as service:
        start = trio.current_time()
        await trio.sleep(7)
        assert service.timer_stats["tick"].ticks == 3
    assert [tick - start for tick in ticks] == [2, 4, 6]


@pytest.mark.trio
async def test_idle_service_stops_in_no_time_under_the_autojump_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Idle(Service):
        shutdown_timeout = 3600.0

    async with trio.open_nursery() as nursery:
        service = Idle()
        await nursery.start(service.run)
        before = trio.current_time()
        assert await service.stop() is True
        assert trio.current_time() == before
        assert service.state is ServiceState.STOPPED
