"""systemd's notify protocol: READY, STOPPING, STATUS and the watchdog, over NOTIFY_SOCKET.

A unit of ``Type=notify`` starts a process with ``NOTIFY_SOCKET`` naming a Unix datagram
socket; each datagram is newline-separated ``KEY=value`` lines. With ``WatchdogSec=``, the
unit also gets ``WATCHDOG_USEC`` and must send ``WATCHDOG=1`` more often than that: sent
from a task of the event loop, a loop that stops answering stops the pings and systemd
restarts the unit.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import anyio
import anyio.abc

from ._core_names import Service, ServiceState
from ._snapshot import walk

__all__ = ["SystemdNotifier"]

log = logging.getLogger("anyservice.runner")


class SystemdNotifier:
    """Sends notify messages to ``address`` (a path, or ``@name`` in the abstract namespace).

    Args:
        address: The socket ``NOTIFY_SOCKET`` names.
        watchdog_interval: Seconds between two ``WATCHDOG=1``, or ``None`` for no watchdog.
    """

    def __init__(self, address: str, *, watchdog_interval: float | None = None) -> None:
        # "@name" is the abstract namespace: a leading NUL byte on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._failed = False
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier | None:
        """The notifier systemd asks for through ``environ``, or ``None`` if it asks for none.

        The watchdog is on when ``WATCHDOG_USEC`` is a positive number and ``WATCHDOG_PID``,
        if set, is this process; it pings every half of ``WATCHDOG_USEC``.
        """
        address = environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        interval = None
        watchdog_pid = environ.get("WATCHDOG_PID")
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not a number", environ["WATCHDOG_USEC"])
            usec = 0
        if usec > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            interval = usec / 1_000_000 / 2
        return cls(address, watchdog_interval=interval)

    def close(self) -> None:
        self._socket.close()

    def notify(self, *lines: str) -> None:
        """Send one datagram of ``KEY=value`` lines; a failure is logged once, never raised."""
        try:
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            # systemd not listening (any more) must not crash the service it supervises.
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            self._failed = True

    def status(self, root: Service) -> str:
        """The one-line ``STATUS=``: the root's state and how many services run."""
        services = list(walk(root))
        running = sum(service.state is ServiceState.RUNNING for service in services)
        restarts = sum(service.restart_count for service in services)
        return (
            f"{root.name} {root.state.name}: {running} of {len(services)} services running, "
            f"{restarts} restart{'' if restarts == 1 else 's'}"
        )

    def _send_status(self, root: Service, *lines: str) -> None:
        status = self.status(root)
        if lines or status != self._last_status:
            self._last_status = status
            self.notify(*lines, f"STATUS={status}")

    async def run(self, root: Service) -> None:
        """Follow ``root``: READY=1 once RUNNING, STOPPING=1 once stopping; ping the watchdog.

        Runs until cancelled (the runner cancels it once the root's run has ended).
        """
        try:
            async with anyio.create_task_group() as task_group:
                if self.watchdog_interval is not None:
                    task_group.start_soon(self._watchdog, root)
                await self._follow(root)
        finally:
            self.close()

    async def _follow(self, root: Service) -> None:
        ready = stopping = False
        state = root.state
        while True:
            if state is ServiceState.RUNNING and not ready:
                ready = True
                self._send_status(root, "READY=1")
            elif state in (ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.CRASHED):
                if not stopping:
                    stopping = True
                    self._send_status(root, "STOPPING=1")
                else:
                    self._send_status(root)
            others = [other for other in ServiceState if other is not state]
            state = await root.wait_for(*others)

    async def _watchdog(self, root: Service) -> None:
        assert self.watchdog_interval is not None
        while True:
            self.notify("WATCHDOG=1")
            self._send_status(root)
            await anyio.sleep(self.watchdog_interval)
