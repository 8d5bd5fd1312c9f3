"""The anyservice demo: a supervised service tree that starts, survives crashes, and stops.

    python3 dev.py demo                   # on asyncio
    python3 dev.py demo --backend trio    # the same code on trio

which runs ``anyservice run examples.demo:build``. The tree runs for a few seconds: a
consumer handles messages, a timer reports on a drift-free grid, a LoopService cleans up, a
flaky child crashes twice (each crash reported, and the supervisor restarts it), a task
worker works through durable task runs; then the whole tree stops gracefully and the
process exits 0.
"""

from __future__ import annotations

import os

import anyio

from anyservice import Backoff, LoopService, Service, Supervisor, task, timer

SECONDS = float(os.environ.get("ANYSERVICE_DEMO_SECONDS", "4"))


def say(text: str) -> None:
    print(f"  demo | {text}", flush=True)


class Database(Service):
    """Stands in for a connection pool: opened on start, closed on shutdown."""

    shutdown_timeout = 2.0

    async def on_start(self) -> None:
        await anyio.sleep(0.05)
        say("database pool open")

    async def on_shutdown(self) -> None:
        say("database pool closed")


class Ingest(Service):
    """Consumes messages; a stop lets the message in hand finish, then ends the task."""

    shutdown_timeout = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.db = self.add_dependency(Database())
        self.handled = 0

    @task(workers=2)
    async def consume(self) -> None:
        while True:
            await anyio.sleep(0.1)  # waiting for a message: idle, cancelled at once on stop
            async with self.in_flight():  # handling it: finishes within the grace period
                await anyio.sleep(0.15)
                self.handled += 1


class Reporter(Service):
    """Reports every second, on the grid t0 + k seconds: no drift."""

    def __init__(self, ingest: Ingest) -> None:
        super().__init__()
        self.ingest = ingest

    @timer(1.0)
    async def report(self) -> None:
        stats = self.timer_stats["report"]
        say(
            f"report #{stats.ticks + 1}: {self.ingest.handled} messages handled "
            f"(timer worst lateness {stats.worst_lateness * 1000:.2f} ms)"
        )


class Cleanup(LoopService):
    """Prefect-style loop: run_once every loop_seconds, measured from each run's start."""

    loop_seconds = 1.5

    async def run_once(self) -> None:
        say(f"cleanup run #{self.loops_run + 1}")


class Flaky(Service):
    """Loses its upstream twice: each crash is logged once, then the supervisor restarts it."""

    crashes_left = 2

    @task
    async def follow_upstream(self) -> None:
        await anyio.sleep(0.6)
        if Flaky.crashes_left > 0:
            Flaky.crashes_left -= 1
            raise ConnectionError("upstream closed the connection")
        say(f"flaky is steady after {self.restart_count} restarts")
        await anyio.sleep_forever()


class Tasks(Service):
    """Durable task runs: a worker on an embedded SQLite file, and runs submitted to it."""

    async def on_started(self) -> None:
        self.spawn(self.submit_and_follow)

    async def submit_and_follow(self) -> None:
        from examples.tasks_demo import task_demo

        await task_demo(runs=8)


class Director(Service):
    """Stops the whole tree after a while, from inside it: no deadlock, a graceful stop."""

    def __init__(self, root: Supervisor) -> None:
        super().__init__()
        self.root = root

    @task
    async def direct(self) -> None:
        await anyio.sleep(SECONDS)
        say("the tree before stopping:\n" + self.root.dump_tree())
        say("stopping the tree gracefully")
        await self.root.stop()


def build() -> Supervisor:
    """The demo's service tree (the target of ``anyservice run examples.demo:build``)."""
    ingest = Ingest()
    root = Supervisor(
        ingest,
        Reporter(ingest),
        Cleanup(),
        Flaky(),
        name="demo",
        max_restarts=5,
        within=10,
        backoff=Backoff(initial=0.2, maximum=2),
    )
    root.add_child(Tasks(), restart="transient")
    root.add_child(Director(root), restart="temporary")
    return root


if __name__ == "__main__":
    import anyservice

    raise SystemExit(anyservice.run(build()))
