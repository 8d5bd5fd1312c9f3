"""The Python a PostgreSQL submit runs before its statement is sent.

Not part of ``run.py``: ``python benchmarks/profile_postgres_submit.py [asyncio|trio]
[PROBES] [--gap]``. A PostgreSQL server of its own (as the tests start it, ``fsync`` on), a
queue with one task, no worker; ``await stamp.delay()`` one probe at a time, and the time
from the call to the direct connection's ``send`` (the statement handed to libpq), median
and 10th percentile in µs. ``--gap``: 20 ms between probes, as ``profile_postgres_latency.py``
spaces them (the caches grow cold in between); without it, back to back. Then the Python
and C function calls from ``delay()`` to the ``send``, counted with ``sys.setprofile``.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROBES = 500
GAP = 0.02

#: perf_counter() at each send since the last probe.
SENT: list[float] = []
CALLS = [0]


def instrument() -> None:
    from anyservice.taskqueue.brokers import _postgres_direct as direct

    send = direct.DirectConnection.send

    def noted_send(self: Any, *args: Any) -> Any:
        SENT.append(time.perf_counter())
        sys.setprofile(None)
        return send(self, *args)

    direct.DirectConnection.send = noted_send  # type: ignore[method-assign]


def count(frame: Any, event: str, arg: Any) -> None:
    if event in ("call", "c_call"):
        CALLS[0] += 1


async def probe(url: str, backend: str, probes: int, gap: float) -> None:
    import anyservice.taskqueue as taskqueue

    queue = taskqueue.TaskQueue(url)

    @queue.task
    async def stamp() -> None:
        """Never run: no worker."""

    async with queue:
        for _ in range(20):
            await stamp.delay()
        before_send = []
        for _ in range(probes):
            SENT.clear()
            begun = time.perf_counter()
            await stamp.delay()
            before_send.append(SENT[0] - begun)
            if gap:
                await anyio.sleep(gap)
        calls = []
        for _ in range(50):
            CALLS[0] = 0
            sys.setprofile(count)
            await stamp.delay()
            calls.append(CALLS[0])
    before_send.sort()
    print(
        f"{backend}: delay() to send, us: median {statistics.median(before_send) * 1e6:.1f}"
        f" p10 {before_send[len(before_send) // 10] * 1e6:.1f};"
        f" calls {statistics.median(calls):.0f}"
    )


def main() -> None:
    from tests._postgres import postgres_schema, postgres_server

    args = [arg for arg in sys.argv[1:] if arg != "--gap"]
    backend = next((arg for arg in args if not arg.isdigit()), "asyncio")
    probes = next((int(arg) for arg in args if arg.isdigit()), PROBES)
    gap = GAP if "--gap" in sys.argv[1:] else 0.0
    instrument()
    with postgres_server(durable=True) as server, postgres_schema(server) as url:
        anyio.run(functools.partial(probe, url, backend, probes, gap), backend=backend)


if __name__ == "__main__":
    main()
