"""How long a datagram takes to wake an idle event loop in another process.

Not part of ``run.py``: a floor for the "datagram: sent to the worker's socket readable"
step of ``profile_postgres_latency.py --sqlite``, with nothing of anyservice on the way.
``python benchmarks/profile_datagram.py [BUSY_US ...] [--probes=N]``.

A receiver process watches a Unix datagram socket with asyncio's ``add_reader`` (as the
SQLite broker's wake channel does) and notes the wall-clock time and its CPU as each
datagram is read; this process sends one datagram every 2 ms from its own asyncio loop,
noting the time and its CPU, and then keeps its CPU busy for ``BUSY_US`` microseconds
before it sleeps again (as a submitter goes on with its ``result()`` after the send).
For each ``BUSY_US`` (default 0, 150 and 300), the median and 90th percentile of sent to
read, in ms, and how many were read on the CPU the sender was on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBES = 300
GAP = 0.002
_END = b"x"


def cpu() -> int:
    """The CPU this thread runs on (``/proc``, Linux)."""
    fields = Path("/proc/thread-self/stat").read_text().rpartition(")")[2].split()
    return int(fields[36])


def receive(address: str, out: str) -> None:
    """The receiver: note ``sent read cpu`` for each datagram until the end mark."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    lines: list[str] = []

    async def main() -> None:
        done = asyncio.Event()

        def readable() -> None:
            read = time.time()
            while True:
                try:
                    message = sock.recv(64)
                except BlockingIOError:
                    return
                if message == _END:
                    done.set()
                    return
                lines.append(f"{message.decode()} {read} {cpu()}\n")

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)
        await done.wait()

    asyncio.run(main())
    Path(out).write_text("".join(lines))


def measure(busy_us: float, probes: int) -> str:
    """One receiver, ``probes`` datagrams, the sender busy ``busy_us`` after each."""
    with tempfile.TemporaryDirectory() as directory:
        address, out = os.path.join(directory, "rx.sock"), os.path.join(directory, "rx.txt")
        receiver = subprocess.Popen([sys.executable, __file__, "--receive", address, out])
        while not os.path.exists(address):
            time.sleep(0.01)
        time.sleep(0.3)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        senders: list[int] = []

        async def main() -> None:
            for _ in range(probes):
                await asyncio.sleep(GAP)
                sent = time.time()
                sock.sendto(repr(sent).encode(), address)
                senders.append(cpu())
                until = sent + busy_us / 1e6
                while time.time() < until:
                    pass

        asyncio.run(main())
        sock.sendto(_END, address)
        receiver.wait(30)
        delays, same = [], 0
        for line, sender in zip(Path(out).read_text().splitlines(), senders, strict=True):
            sent, read, where = line.split()
            delays.append((float(read) - float(sent)) * 1000)
            same += int(where) == sender
    delays.sort()
    p90 = delays[int(len(delays) * 0.9)]
    return (
        f"sender busy {busy_us:4.0f} µs after the send: sent to read median "
        f"{statistics.median(delays):.3f} ms, p90 {p90:.3f} ms; "
        f"read on the sender's CPU {same} of {len(delays)}"
    )


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--receive":
        receive(argv[1], argv[2])
        return 0
    probes = PROBES
    busy: list[float] = []
    for arg in argv:
        if arg.startswith("--probes="):
            probes = int(arg.split("=", 1)[1])
        else:
            busy.append(float(arg))
    print(f"load average {Path('/proc/loadavg').read_text().split()[0]}")
    for busy_us in busy or [0.0, 150.0, 300.0]:
        print(measure(busy_us, probes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
