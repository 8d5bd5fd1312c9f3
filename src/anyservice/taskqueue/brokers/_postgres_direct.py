"""One PostgreSQL connection driven from the event loop, for the statements latency hangs on.

Every other statement of the PostgreSQL broker runs in a worker thread on a pooled sync
psycopg connection. On a loaded two-core host a hand-off to a thread and back costs 0.3 to
0.5 ms, and the way from a submit to the run's first line crossed four of them (the
submit's statement, then the worker's claim): more than the whole target of 2 ms. So a
submit of one run, and the claim of runs a notification named, go out on one connection
that the event loop drives itself, through psycopg's documented low-level libpq interface
(``psycopg.pq.PGconn``: ``send_query_prepared``, ``flush``, ``consume_input``,
``is_busy``, ``get_result``, in non-blocking mode), waiting on its socket with
``anyio.wait_readable``/``wait_writable``: the same code on asyncio and trio.

Only statements with a handful of plain parameters go this way: they are sent as text
(strings, numbers, arrays of strings) and their rows read back as text by column type,
which this module does for the few types those statements use. The connection is used by
one statement at a time (a caller that finds it busy takes a pooled connection instead),
and a statement cancelled while in flight makes the connection be discarded: nothing is
left half-read, and the next call opens a new one.

The broker's LISTEN connection is one of these: between statements a task waits on its
socket for notifications (:meth:`DirectConnection.wait_notified`), and a statement of the
same thread makes it let go (:meth:`DirectConnection.take`); notifications that arrive
with a statement's answer go to ``on_notifies``. A commit that notifies wakes every
listening server process: one connection per process, not two, halves the processes woken
on the way from a submit to the run's start, and a submitter's own notification comes
with its statement's answer instead of waking a second process.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import psycopg.errors
from psycopg import pq

__all__ = ["DirectConnection", "positional"]

_NAMED = re.compile(r"%\((\w+)\)s|%%")

# Result columns' type OIDs, and how their text reads.
_BOOL, _INT8, _INT2, _INT4, _TEXT, _FLOAT4, _FLOAT8, _VARCHAR = 16, 20, 21, 23, 25, 700, 701, 1043
_LOADERS: dict[int, Callable[[bytes], Any]] = {
    _BOOL: lambda value: value == b"t",
    _INT8: int,
    _INT2: int,
    _INT4: int,
    _FLOAT4: float,
    _FLOAT8: float,
    _TEXT: bytes.decode,
    _VARCHAR: bytes.decode,
}


def positional(query: str) -> tuple[str, list[str]]:
    """``query`` with its ``%(name)s`` placeholders as ``$1, $2...``, and the names in order.

    A name used twice is one parameter; ``%%`` reads as ``%``, as psycopg reads it.
    """
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(number, query), names


def _array_text(values: Sequence[Any]) -> str:
    items = []
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"only arrays of strings are sent as text, got {value!r}")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        items.append(f'"{escaped}"')
    return "{" + ",".join(items) + "}"


def _dump(value: Any) -> bytes | None:
    """A parameter as PostgreSQL reads it in text format (``None`` is NULL)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        if math.isnan(value):
            return b"NaN"
        if math.isinf(value):
            return b"Infinity" if value > 0 else b"-Infinity"
        return repr(value).encode()
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list | tuple):
        return _array_text(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} {value!r} as a text parameter")


def _rows(result: pq.abc.PGresult) -> list[tuple[Any, ...]]:
    # Any other type reads as its text (void, pg_notify's, as an empty string).
    loaders = [_LOADERS.get(result.ftype(column), bytes.decode) for column in range(result.nfields)]
    rows = []
    for row in range(result.ntuples):
        values = []
        for column, loader in enumerate(loaders):
            value = result.get_value(row, column)
            values.append(None if value is None else loader(value))
        rows.append(tuple(values))
    return rows


def _raise_for(result: pq.abc.PGresult) -> None:
    if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        return
    state = result.error_field(pq.DiagnosticField.SQLSTATE)
    message = (result.error_message or b"the statement failed").decode(errors="replace")
    error = psycopg.errors.lookup(state.decode()) if state else psycopg.DatabaseError
    raise error(message.strip())


class DirectConnection:
    """A connection that the event loop drives through libpq's non-blocking interface.

    Made with :meth:`connect` (in a thread), or around a connection that LISTENs (then
    ``on_notifies`` is given the payloads of the notifications that arrive). :meth:`acquire`
    takes it if nobody is using it (from any thread), :meth:`take` also gets a reader of
    notifications of this thread off it, :meth:`execute` runs one statement,
    :meth:`wait_notified` waits for notifications, :meth:`release` hands it back. After an
    error or a cancellation it is :attr:`broken`: close it.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        on_notifies: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._pgconn.nonblocking = 1
        self._lock = threading.Lock()
        self._on_notifies = on_notifies
        # A statement's text -> its prepared name and its parameters' names in order.
        self._prepared: dict[str, tuple[bytes, list[str]]] = {}
        # The holder's thread; the scope of its wait for notifications while it waits.
        self._holder: int | None = None
        self._reader: anyio.CancelScope | None = None
        # Set as the connection is handed back, for a task of that thread waiting for it.
        self._free: tuple[int, anyio.Event] | None = None
        self._wanted = 0  # statements waiting for a reader to let go
        # The thread of the last wait for notifications: those a statement of another
        # thread reads are kept for the next wait (only its thread can wake its waiters).
        self._home: int | None = None
        self._pending: list[str] = []
        #: Unusable after an error or a cancellation in flight: to be closed.
        self.broken = False

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The psycopg connection underneath."""
        return self._conn

    @classmethod
    async def connect(cls, conninfo: str, timeout: float) -> DirectConnection:
        """A new connection (made in a worker thread: libpq's connect blocks).

        Raises:
            psycopg.Error: It could not be made.
        """

        def make() -> psycopg.Connection[Any]:
            return psycopg.connect(
                conninfo, autocommit=True, connect_timeout=max(1, round(timeout))
            )

        with anyio.CancelScope(shield=True):
            conn = await anyio.to_thread.run_sync(make)
        return cls(conn)

    def acquire(self) -> bool:
        """Take the connection if it is free and sound; whether it was taken."""
        if not self._lock.acquire(blocking=False):
            return False
        if self.broken:  # closed by another thread, before or while we took it
            self._lock.release()
            return False
        self._holder = threading.get_ident()
        return True

    def acquire_to_read(self) -> bool:
        """Take the connection to wait for notifications, unless a statement waits for it."""
        return not self._wanted and self.acquire()

    async def take(self) -> bool:
        """Take the connection; a task of this thread waiting on it for notifications is
        made to let go first (it waits for it back). Whether it was taken: not while a
        statement holds it, or a task of another thread, nor once it is found lost."""
        # Wanted, it is not taken again by a reader as it is handed back.
        self._wanted += 1
        try:
            while not self.acquire():
                if self.broken or self._reader is None or self._holder != threading.get_ident():
                    return False
                self.stop_reading()
                await self.until_free(math.inf)
        finally:
            self._wanted -= 1
        try:
            # Without waiting: a connection the server ended while it was idle shows here,
            # before a statement is sent on it.
            self._pgconn.consume_input()
        except psycopg.Error:
            self.broken = True
            self.release()
            return False
        return True

    async def until_free(self, timeout: float) -> None:
        """Wait until the connection is handed back, or ``timeout`` seconds (at most a
        hundredth of a second while a task of another thread holds it)."""
        here = threading.get_ident()
        if self._holder != here:
            timeout = min(timeout, 0.01)
        if self._free is None or self._free[0] != here:
            self._free = (here, anyio.Event())
        with anyio.move_on_after(timeout):
            await self._free[1].wait()

    def release(self) -> None:
        self._holder = None
        self._reader = None
        free, self._free = self._free, None
        self._lock.release()
        if free is not None and free[0] == threading.get_ident():
            free[1].set()

    @property
    def reading(self) -> bool:
        """Whether a task waits on the connection for notifications."""
        return self._reader is not None

    def stop_reading(self) -> None:
        """Make a task of this thread waiting for notifications (if any) stop waiting."""
        reader = self._reader
        if reader is not None and self._holder == threading.get_ident():
            reader.cancel()

    async def wait_notified(self, timeout: float) -> list[str]:
        """The payloads of the notifications that arrive within ``timeout`` seconds (or
        came already); fewer seconds if :meth:`take` asks for the connection. The caller
        holds it.

        Raises:
            psycopg.Error: The connection is lost (it is :attr:`broken`).
        """
        self._home = threading.get_ident()
        payloads, self._pending = [*self._pending, *self._arrived()], []
        if payloads:
            return payloads
        try:
            with anyio.move_on_after(timeout), anyio.CancelScope() as self._reader:
                await anyio.wait_readable(self._pgconn.socket)
        finally:
            self._reader = None
        return self._arrived()

    def _arrived(self) -> list[str]:
        """What arrived on the socket, read without waiting: notifications' payloads.

        From libpq itself (``consume_input``, then ``notifies``): psycopg's
        ``notifies(timeout=0)`` polls the socket twice on top.
        """
        try:
            self._pgconn.consume_input()
        except psycopg.Error:
            self.broken = True
            raise
        return self._notified()

    def _notified(self) -> list[str]:
        payloads = []
        while (notify := self._pgconn.notifies()) is not None:
            payloads.append(notify.extra.decode())
        return payloads

    def close(self) -> None:
        """Close the connection (it is never used again)."""
        self.broken = True
        self._conn.close()

    def discard(self) -> None:
        """Close the connection now, or (a task holds it) have it closed as it is
        handed back: it is never used again."""
        self.broken = True
        if self._lock.acquire(blocking=False):
            try:
                self._conn.close()
            finally:
                self._lock.release()
        else:
            self.stop_reading()

    async def execute(self, query: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run ``query`` (``%(name)s`` placeholders) with ``parameters``; its rows.

        Prepared on first use, so later runs skip parsing and planning (the statements
        sent this way have plans that do not depend on their parameters). The caller holds
        the connection (:meth:`acquire`).

        Raises:
            psycopg.Error: The statement failed, or the connection did (then it is
                :attr:`broken`).
        """
        try:
            if query not in self._prepared:
                text, names = positional(query)
                name = f"anyservice_direct_{len(self._prepared)}".encode()
                self._pgconn.send_prepare(name, text.encode())
                for result in await self._results():
                    _raise_for(result)
                self._prepared[query] = (name, names)
        except BaseException as exc:
            await self._failed(exc)
            raise
        self.send(query, parameters)
        return await self.receive()

    def prepared(self, query: str) -> bool:
        """Whether ``query`` was prepared on this connection (:meth:`send` sends only those)."""
        return query in self._prepared

    def send(self, query: str, parameters: dict[str, Any]) -> None:
        """Send ``query``, prepared earlier, with ``parameters``: no waiting, the answer is
        :meth:`receive`'s to read (the caller holds the connection until then).

        Raises:
            TypeError: A parameter cannot be sent as text.
            psycopg.Error: The connection failed (it is :attr:`broken`).
        """
        name, names = self._prepared[query]
        values = [_dump(parameters[key]) for key in names]
        try:
            self._pgconn.send_query_prepared(name, values)
        except psycopg.Error:
            self.broken = True
            raise

    async def receive(self) -> list[tuple[Any, ...]]:
        """The rows of the statement :meth:`send` sent.

        Raises:
            psycopg.Error: As :meth:`execute`.
        """
        try:
            rows: list[tuple[Any, ...]] = []
            failure: Exception | None = None
            for result in await self._results():
                try:
                    _raise_for(result)
                except psycopg.Error as exc:
                    failure = failure or exc
                    continue
                if result.status == pq.ExecStatus.TUPLES_OK:
                    rows = _rows(result)
            if failure is not None:
                raise failure
            return rows
        except BaseException as exc:
            await self._failed(exc)
            raise

    async def _failed(self, exc: BaseException) -> None:
        """Note what ``exc``, raised with a statement in flight, did to the connection."""
        if isinstance(exc, psycopg.Error):
            if self._pgconn.status != pq.ConnStatus.OK:
                self.broken = True
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                self.broken = True
            return
        # Cancelled (or worse) with the statement in flight. Ask the server to cancel it,
        # as a pooled statement's cancellation does (one blocked on a lock would otherwise
        # go on, and commit, once the lock is free); its answer would be read by the next
        # statement, so the connection goes too.
        self.broken = True
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._pgconn.get_cancel().cancel)
            except psycopg.Error:
                pass  # the connection is gone anyway

    async def _results(self) -> list[pq.abc.PGresult]:
        """Send what is queued, then read every result of the statement sent."""
        pgconn = self._pgconn
        socket = pgconn.socket
        while pgconn.flush():
            await anyio.wait_writable(socket)
        results: list[pq.abc.PGresult] = []
        while True:
            pgconn.consume_input()
            while pgconn.is_busy():
                await anyio.wait_readable(socket)
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:
                break
            results.append(result)
        if self._on_notifies is not None:
            # Notifications read with the answer: nobody would read them from the socket.
            payloads = self._notified()
            if self._home not in (None, threading.get_ident()):
                self._pending.extend(payloads)
            elif payloads:
                self._on_notifies(payloads)
        return results
