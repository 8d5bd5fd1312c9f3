"""The anyservice demo: a small service tree that starts, sees a crash, and stops gracefully.

    python3 dev.py demo                   # on asyncio
    python3 dev.py demo --backend trio    # the same code on trio
"""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from anyservice import Service, ServiceState, task


class Database(Service):
    """Stands in for a connection pool: opened on start, closed on shutdown."""

    shutdown_timeout = 2.0

    async def on_start(self) -> None:
        await anyio.sleep(0.05)
        self.log.info("pool open")

    async def on_shutdown(self) -> None:
        self.log.info("pool closed")


class Ingest(Service):
    """Consumes messages; a stop lets the message in hand finish, then ends the task."""

    shutdown_timeout = 2.0

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = self.add_dependency(db)
        self.handled = 0

    @task(workers=2)
    async def consume(self) -> None:
        while True:
            await anyio.sleep(0.1)  # waiting for a message: idle, cancelled at once on stop
            async with self.in_flight():  # handling it: finishes within the grace period
                await anyio.sleep(0.15)
                self.handled += 1


class Flaky(Service):
    """Loses its upstream after a moment: its crash is reported, never swallowed."""

    @task
    async def follow_upstream(self) -> None:
        await anyio.sleep(0.4)
        raise ConnectionError("upstream closed the connection")


async def main(seconds: float) -> None:
    app = Ingest(Database())
    async with app:
        print("\nstarted:\n" + app.dump_tree() + "\n", flush=True)
        flaky = Flaky()
        try:
            async with flaky:
                await anyio.sleep_forever()
        except* ConnectionError as crash:
            print(f"\n{flaky.name} is {flaky.state.name}: {crash.exceptions[0]!r}\n", flush=True)
        await anyio.sleep(seconds)
        started = anyio.current_time()
        stopped = await app.stop()
        took = anyio.current_time() - started
        print(
            f"\ngraceful stop: stopped={stopped} in {took * 1000:.0f} ms, "
            f"{app.handled} messages handled\n{app.dump_tree()}\n",
            flush=True,
        )
    assert app.state is ServiceState.STOPPED


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=1.0, help="how long the tree serves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    anyio.run(main, args.seconds, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
