"""Which workers are alive: what lets a broker take a killed worker's runs over at once.

Each broker records the worker ids (lease owners) it claims for, with this process's host
identity, pid and start time. A broker that finds, among the workers recorded on its own
host, one whose process is gone, ends that worker's leases at once instead of leaving
its runs until the leases expire. Workers on other hosts cannot be checked from here:
their runs wait for their leases, as before.
"""

from __future__ import annotations

import os
import socket

__all__ = ["WORKERS_EVERY", "WORKERS_FORGOTTEN", "host_identity", "process_gone"]

#: How often a broker records its workers as alive and looks for dead ones on its host.
WORKERS_EVERY = 1.0
#: Rows of workers not seen for this long are deleted (their leases expired long ago).
WORKERS_FORGOTTEN = 24 * 3600.0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as file:
            return file.read()
    except OSError:
        return None


def host_identity() -> str:
    """Names this machine's process space: processes with the same identity share pids.

    The host name alone is not enough: containers may share one (host networking) while
    each has its own pids, so the kernel's boot id and the pid namespace are part of it.
    """
    boot = (_read("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return ":".join(part for part in (socket.gethostname(), boot, namespace) if part)


def process_gone(pid: int, started_at: float) -> bool:
    """Whether process ``pid``, started at ``started_at`` (epoch seconds), has ended.

    A pid that now belongs to a process started later than ``started_at`` was reused:
    the process that had it is gone (checked where ``/proc`` tells start times).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    stat = _read(f"/proc/{pid}/stat")
    boot = _read("/proc/stat")
    if stat is None or boot is None:
        return False
    try:
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        booted = next(
            int(line.split()[1]) for line in boot.splitlines() if line.startswith("btime")
        )
        began = booted + ticks / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, StopIteration, OSError):
        return False
    # Start times from /proc are whole seconds since boot at best: allow for rounding.
    return began > started_at + 2
