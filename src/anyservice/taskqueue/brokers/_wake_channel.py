"""Waking brokers of one SQLite file in other processes: a datagram socket each.

Every open broker of a file binds a Unix datagram socket in a directory beside it
(``runs.db-wake/``, mode 0700), named after its process. A broker that committed a change
sends one datagram to every other socket there (``w`` for new work, ``w`` followed by
the run's id for the submit of one run due now, ``c`` for another change, ``k`` followed
by a RUNNING run's id when its cancellation was asked for);
the event loop that opened the broker watches its socket with the rest of its I/O and
wakes the broker's waiters (where it cannot, a thread per broker sleeps in ``recv``
instead). A socket being watched costs no CPU, and a datagram wakes the loop in
microseconds, where polling the file would cost either latency or a core; watched by the
loop itself, a wake-up needs no thread to wake first and hand over to the loop (on two
busy cores, one runnable thread fewer).

The signal is only a hint, never the truth: a datagram may be dropped (the receiver's
buffer is full, so it has pokes pending anyway) and a broker that cannot bind (no Unix
sockets, a directory it may not write) simply isn't woken this way; waiters keep polling
``PRAGMA data_version`` as the fallback. A datagram that makes no sense (not one of these)
counts as work that names no run. Sockets left by a killed process refuse
datagrams, and the first sender to meet one deletes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import threading
from collections.abc import Callable

from ._loop_backends import LoopReader

__all__ = ["CANCEL", "CHANGE", "WORK", "WakeChannel", "named_work"]

#: The byte sent after a commit that may have made a run claimable.
WORK = b"w"
#: The byte sent after any other change to the runs.
CHANGE = b"c"
#: The byte sent, followed by the run's id, once a cancel of a RUNNING run is stored.
CANCEL = b"k"
_CLOSE = b"x"
#: Longest datagram read: ``w`` and a run's id (a uuid4's 32 hex digits) fit many times.
_MOST_BYTES = 256
#: Longest run id a datagram may name; a longer one names no run.
_MOST_ID = 128

# Unix socket addresses are limited to about 104 bytes (sun_path).
_MAX_ADDRESS = 100
_SUFFIX = ".sock"


class WakeChannel:
    """This broker's socket beside the database file, and the pokes it sends to others.

    Args:
        database: The database file's absolute path.
        on_poke: Called when pokes arrived, with whether any of them was work, and the
            runs they named if every one of them that was work named its run (else
            ``None``): in the event loop that called :meth:`listen`, or (naming no run) in
            the listening thread.
        on_cancel: Called, where ``on_poke`` is, with the runs whose cancellation pokes
            told of.
    """

    def __init__(
        self,
        database: str,
        on_poke: Callable[[bool, list[str] | None], None],
        on_cancel: Callable[[list[str]], None],
    ) -> None:
        self.directory = database + "-wake"
        self._on_poke = on_poke
        self._on_cancel = on_cancel
        self._name = f"{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        self._socket: socket.socket | None = None
        self._directory_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._reader: LoopReader | None = None
        self._peers: list[str] = []
        self._peers_seen: int | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether this broker is listening (otherwise only polling notices others)."""
        return self._thread is not None or self._reader is not None

    def open(self) -> bool:
        """Bind (blocks briefly: the file system); whether it worked (if not, polling must
        do). :meth:`listen` then starts listening."""
        if not hasattr(socket, "AF_UNIX"):
            return False
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._directory_fd = os.open(self.directory, os.O_RDONLY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:
            self._close_directory()
            return False
        address = self._address(self._name)
        try:
            if address is None:
                raise OSError("the socket's path is too long")
            sock.bind(address)
        except OSError:
            sock.close()
            self._close_directory()
            return False
        self._socket = sock
        return True

    def listen(self) -> None:
        """Start listening: in the running event loop if it can watch the socket, else
        in a thread of its own. Called once, after :meth:`open` worked."""
        sock = self._socket
        assert sock is not None
        self._reader = LoopReader.start(sock, self._drain)
        if self._reader is None:
            self._thread = threading.Thread(
                target=self._listen, name=f"anyservice wake {self._name}", daemon=True
            )
            self._thread.start()

    def stop_listening(self) -> None:
        """In the event loop: stop the loop's watch of the socket (then :meth:`close`)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            # The watch closes the socket once it is removed, in the loop that watched.
            self._socket = None
            reader.stop()

    def close(self) -> None:
        """Stop listening and remove this broker's socket (blocks briefly)."""
        self.stop_listening()
        sock, thread = self._socket, self._thread
        if thread is not None and sock is not None:
            address = self._address(self._name)
            if address is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(_CLOSE, address)
            thread.join(5)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, self._name))
        if sock is not None:
            sock.close()
        self._socket = self._thread = None
        self._close_directory()

    def poke(self, kind: bytes) -> None:
        """Tell every other broker of the file that runs changed (``WORK``, ``WORK``
        followed by the id of the one run a submit stored, due now, ``CHANGE``, or
        ``CANCEL`` followed by a run's id)."""
        sock = self._socket
        if sock is None:
            return
        for name in self._other_sockets():
            address = self._address(name)
            if address is None:
                continue
            try:
                sock.sendto(kind, socket.MSG_DONTWAIT, address)
            except (ConnectionRefusedError, FileNotFoundError):
                # Nobody listens there any more (a killed process): tidy up for everyone.
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass  # A full buffer has pokes pending already; anything else, polling sees.

    # --- internals --------------------------------------------------------------------

    def _address(self, name: str) -> str | None:
        path = os.path.join(self.directory, name)
        if len(os.fsencode(path)) <= _MAX_ADDRESS:
            return path
        # Linux reaches a long directory through its descriptor, in a short path.
        short = f"/proc/self/fd/{self._directory_fd}/{name}"
        if self._directory_fd is not None and os.path.isdir("/proc/self/fd"):
            return short
        return None

    def _other_sockets(self) -> list[str]:
        """The other brokers' socket names, read again only when the directory changed."""
        try:
            seen = os.stat(self.directory).st_mtime_ns
        except OSError:
            return []
        with self._lock:
            if seen != self._peers_seen:
                try:
                    with os.scandir(self.directory) as entries:
                        self._peers = [
                            entry.name
                            for entry in entries
                            if entry.name.endswith(_SUFFIX)
                            and entry.name != self._name
                            and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
                        ]
                except OSError:
                    self._peers = []
                self._peers_seen = seen
            return self._peers

    def _drain(self) -> None:
        """In the event loop, the socket readable: take every poke queued, wake once."""
        sock = self._socket
        if sock is None:
            return
        kinds: set[bytes] = set()
        try:
            while True:
                kinds.add(sock.recv(_MOST_BYTES, socket.MSG_DONTWAIT))
        except BlockingIOError:
            pass
        except OSError:
            return  # Closed meanwhile: nobody is listening any more.
        if kinds:
            self._deliver(kinds, named=True)

    def _listen(self) -> None:
        sock = self._socket
        assert sock is not None
        while True:
            try:
                kinds = {sock.recv(_MOST_BYTES)}
                # Many pokes may have queued up: one wake-up for all of them.
                while True:
                    kinds.add(sock.recv(_MOST_BYTES, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
            except OSError:
                return
            if _CLOSE in kinds:
                return
            # From this thread, runs are not named: the broker's claims read them in its
            # event loop.
            self._deliver(kinds, named=False)

    def _deliver(self, kinds: set[bytes], *, named: bool) -> None:
        """Hand the pokes that arrived over: cancels to ``on_cancel``, the rest to
        ``on_poke`` (naming runs if ``named``)."""
        cancels = [kind for kind in kinds if kind[:1] == CANCEL]
        if cancels:
            kinds.difference_update(cancels)
            cancelled = [run_id for kind in cancels if (run_id := _run_id(kind)) is not None]
            if cancelled:
                self._on_cancel(cancelled)
            if not kinds:
                return
        work, run_ids = named_work(kinds)
        self._on_poke(work, run_ids if named else None)

    def _close_directory(self) -> None:
        if self._directory_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._directory_fd)
            self._directory_fd = None


def _run_id(kind: bytes) -> str | None:
    """The run a poke names after its first byte, ``None`` if it names none (or no sense)."""
    run_id = kind[1:]
    if not run_id or len(run_id) > _MOST_ID or not run_id.isalnum():
        return None
    return run_id.decode("ascii")


def named_work(kinds: set[bytes]) -> tuple[bool, list[str] | None]:
    """Whether these pokes tell of work, and the runs they name if every poke of work
    names its run (``None`` if any does not, or makes no sense)."""
    named: list[str] = []
    work = False
    for kind in kinds:
        if kind == CHANGE:
            continue
        work = True
        run_id = _run_id(kind)
        if kind[:1] != WORK or run_id is None:
            return True, None
        named.append(run_id)
    return work, named if work else None
