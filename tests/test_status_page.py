"""``GET /``: the live page, in a real headless Chromium, on asyncio and trio.

Skipped when Chromium is not installed (``.ci/run`` installs Debian's ``chromium``), but
never under CI, where a skip would hide that the page went untested.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from anyservice import Service, ServiceState, StatusServer, Supervisor, task, timer

from . import chromium

pytestmark = pytest.mark.anyio

#: Bound on what a working page does: load, fetch, refresh every couple of seconds.
PROMPTLY = 30.0

#: What the page shows for each service: name, state and the detail line, in order.
SHOWN = """
[...document.querySelectorAll("li.service")].map((item) => [
  item.querySelector(":scope > .name").textContent,
  item.querySelector(":scope > .state").textContent,
  item.querySelector(":scope > .detail").textContent,
])
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[chromium.Chromium]:
    executable = chromium.find()
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: .ci/run installs it, so CI must have it")
        pytest.skip("chromium is not installed (apt-get install chromium): the page is untested")
    with chromium.Chromium(executable) as browser:
        yield browser


class Ticker(Service):
    @timer(0.05)
    async def beat(self) -> None: ...


class BreaksOnce(Service):
    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.now = anyio.Event()
        self.broken = False

    @task
    async def work(self) -> None:
        await self.now.wait()
        if not self.broken:
            self.broken = True
            raise RuntimeError("told to break")


async def shown_until(
    browser: chromium.Chromium, condition: Callable[[list[list[str]]], bool]
) -> list[list[str]]:
    """What the page shows, once ``condition`` holds of it (polled within a bound)."""
    shown: Any = None
    with anyio.fail_after(PROMPTLY):
        while True:
            shown = await anyio.to_thread.run_sync(browser.evaluate, SHOWN)
            if shown and condition(shown):
                return list(shown)
            await anyio.sleep(0.1)


async def test_the_page_shows_every_service_and_follows_a_restart(
    browser: chromium.Chromium,
) -> None:
    flaky = BreaksOnce("flaky")
    tree = Supervisor(Ticker(name="ticker"), flaky, Service(name="idle"), name="top")
    async with StatusServer(tree) as server, tree:
        await anyio.to_thread.run_sync(browser.open, server.url)
        shown = await shown_until(
            browser, lambda rows: len(rows) == 4 and all(row[1] == "RUNNING" for row in rows)
        )
        assert [row[0] for row in shown] == ["top", "ticker", "flaky", "idle"]
        assert all(row[2].startswith("restarts=0") for row in shown)
        assert (
            await anyio.to_thread.run_sync(
                browser.evaluate, "document.querySelector('table.timers td').textContent"
            )
            == "beat"
        )
        flaky.now.set()
        # No reload: the page's own refresh picks the restart up.
        shown = await shown_until(
            browser,
            lambda rows: any(row[0] == "flaky" and "restarts=1" in row[2] for row in rows),
        )
        assert flaky.restart_count == 1
        assert flaky.state is ServiceState.RUNNING
        banner = await anyio.to_thread.run_sync(
            browser.evaluate, "document.getElementById('banner').textContent"
        )
        assert banner in ("ready", "not ready: flaky is STARTING")
