"""Services for the ``anyservice run`` tests, importable as ``tests.cli_targets:NAME``.

They print what the tests wait for and check on stdout, flushed, one line at a time.
"""

from __future__ import annotations

from types import SimpleNamespace

import anyio

from anyservice import Service, ServiceState, task


def say(line: str) -> None:
    print(line, flush=True)


class Graceful(Service):
    """Has a body in flight when the stop comes; the body finishes after the stop request."""

    shutdown_timeout = 10.0

    @task
    async def handle(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        async with self.in_flight():
            say("body started")
            await self.wait_for(ServiceState.STOPPING)
            await anyio.sleep(0.1)
            say("body finished after the stop request")
        await anyio.sleep_forever()


class Stubborn(Service):
    """A body in flight that would outlast any test: only a forced stop ends it early."""

    shutdown_timeout = 60.0

    @task
    async def handle(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        async with self.in_flight():
            say("body started")
            await anyio.sleep(60)
            say("body finished")


class Crashing(Service):
    @task
    async def follow_upstream(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        raise ConnectionError("upstream closed the connection")


class Exiting(Service):
    @task
    async def quit(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        raise SystemExit(3)


class Quick(Service):
    """Stops by itself once running: ``anyservice run`` then exits 0."""

    @task
    async def finish(self) -> None:
        await self.wait_for(ServiceState.RUNNING)
        say(f"{self.name} ran with shutdown_timeout={self.shutdown_timeout}")
        await self.stop()


def build() -> Service:
    """A zero-argument factory."""
    return Quick(name="built")


async def build_async() -> Service:
    return Quick()


def failing_factory() -> Service:
    raise RuntimeError("no database configured")


def not_a_factory() -> int:
    return 42


instance = Quick(name="instance")
app = SimpleNamespace(service=Quick(name="nested"))
not_a_service = 42


class NotAService:
    pass
