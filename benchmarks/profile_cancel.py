"""How soon a cancel of a RUNNING run stops its body, asked from another broker.

Not part of ``run.py``: a profile, printed as lines. ``python benchmarks/profile_cancel.py
[asyncio|trio] [PROBES]``: a worker (``limit=1``, lease 60 s, so that its first heartbeat
is 20 s away) runs a body that sleeps forever; a second queue on the same database,
standing for another process, asks for its cancellation (``request_cancel()``), and the
time to the body's ``finally`` is taken, ``PROBES`` (20) times in a row: on a fresh SQLite
file, then on a PostgreSQL server of its own (Debian's binaries, as the tests start it).
The worker is full, so its claim loop waits for a slot, not for work: what stops the body
is the worker's cancel watch, told by the broker (a datagram beside the SQLite file, a
``NOTIFY`` on PostgreSQL).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LEASE = 60.0


async def probe(url: str, probes: int) -> list[float]:
    """Seconds from each cancel request to its body's stop."""
    from anyservice.taskqueue import RunState, TaskQueue, TaskWorker

    queue, other = TaskQueue(url), TaskQueue(url)
    started, halted = anyio.Event(), anyio.Event()
    stopped: list[float] = []

    @queue.task
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.append(time.perf_counter())
            halted.set()

    delays: list[float] = []
    async with queue, other, TaskWorker(endless, limit=1, lease_seconds=LEASE):
        for _ in range(probes):
            started, halted = anyio.Event(), anyio.Event()
            run = await endless.delay()
            await started.wait()
            await anyio.sleep(0.05)  # the worker settled into its wait for a slot
            asked = time.perf_counter()
            await other.broker.request_cancel(run.id)
            with anyio.fail_after(LEASE):
                await halted.wait()
            delays.append(stopped[-1] - asked)
            record = await other.broker.wait_until_finished(run.id, LEASE)
            if record is None or record.state is not RunState.CANCELLED:
                raise RuntimeError(f"the run did not end CANCELLED: {record}")
    return delays


def report(name: str, delays: list[float]) -> None:
    print(
        f"  {name:10} p50 {statistics.median(delays) * 1e3:7.2f} ms"
        f"   max {max(delays) * 1e3:7.2f} ms   ({len(delays)} probes)"
    )


async def main(probes: int) -> None:
    from tests._postgres import postgres_schema, postgres_server

    print(f"{sys.argv[1] if len(sys.argv) > 1 else 'asyncio'}, cancel request to the body's stop:")
    with tempfile.TemporaryDirectory() as directory:
        report("sqlite", await probe(f"sqlite:///{Path(directory) / 'runs.db'}", probes))
    with postgres_server(durable=True) as server, postgres_schema(server) as url:
        report("postgresql", await probe(url, probes))


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    anyio.run(main, count, backend=backend)
