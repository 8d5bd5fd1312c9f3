"""One SQLite connection in a thread of its own, fed by a queue, committing in groups.

sqlite3 blocks, so the broker's statements run outside the event loop; a thread hop per
call (``anyio.to_thread``) would cost more than the statement. Instead each connection
has one long-lived thread, and callers queue operations for it (functions of the
connection) and wait for their own result.

Group commit: the thread takes every operation queued while it was busy and runs them in
one ``BEGIN IMMEDIATE`` transaction, each write in a savepoint of its own (one that fails
is rolled back alone), then commits once and wakes every caller. So the window is
bounded by one transaction's time and costs an idle broker nothing: a lone call is
committed at once. A caller is woken only after the commit, so a result it was told is
stored is durable (a process killed mid-batch loses the whole batch, which nobody was
told about).

A locked database (another process holds the write lock) is retried with jittered,
bounded exponential backoff for ``lock_timeout`` seconds; meanwhile the waiting callers
can still give up (be cancelled), and only an operation already executing holds its
caller until it is done.
"""

from __future__ import annotations

import enum
import functools
import os
import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._errors import BrokerBusyError, BrokerError
from ._loop_backends import LoopHandle
from ._sqlite_rows import is_locked

__all__ = ["ConnectionThread"]

T = TypeVar("T")

_FIRST_BACKOFF = 0.005
_MAX_BACKOFF = 0.5
#: Most operations in one transaction, so one batch cannot hold the write lock for long.
_MAX_BATCH = 1_000
#: Most short calls gathered in one pass of the event loop to share a transaction there;
#: more go to the connection's thread, so the event loop is never held for long.
_MAX_PASS_BATCH = 32


#: How long commits gather before the checkpointer copies them into the database file.
CHECKPOINT_EVERY = 0.1


class _Checkpointer:
    """Copies committed pages from the WAL into the database file, in a thread and on a
    connection of its own (a *checkpoint*).

    Left to SQLite, the commit that takes the WAL past 1 000 pages does it, with two
    fsyncs, while every caller of its transaction waits (milliseconds, once every few
    dozen commits of a busy worker). SQLite releases the GIL while it copies, so here the
    copy runs beside the event loop. Idle, it waits on an event: no polling.
    """

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self._conn = conn
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A transaction was committed: checkpoint soon."""
        if not self._wanted.is_set():
            self._wanted.set()

    def close(self) -> None:
        self._closing.set()
        self._wanted.set()
        self._thread.join()

    def _serve(self) -> None:
        try:
            while not self._closing.is_set():
                self._wanted.wait()
                # Let commits gather (a stop cuts it short: closing checkpoints anyway).
                self._closing.wait(CHECKPOINT_EVERY)
                self._wanted.clear()
                try:
                    # PASSIVE: never waits for readers or writers, nor holds them up.
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass  # busy or gone: the next commit asks again
        finally:
            self._conn.close()


class _Step(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    ABANDONED = "abandoned"
    DONE = "done"


class _Operation:
    """One queued call: what to run, and where its caller waits for the outcome."""

    __slots__ = ("error", "event", "function", "loop", "signal", "step", "value", "write")

    def __init__(
        self,
        function: Callable[[sqlite3.Connection], Any],
        write: bool,
        signal: bytes = b"",
        *,
        queued: bool = True,
    ) -> None:
        self.function = function
        self.write = write
        #: What to tell other processes once committed (empty: nothing worth telling).
        self.signal = signal
        if queued:
            self.loop = LoopHandle.current()
            self.event = anyio.Event()
        self.step = _Step.PENDING
        self.value: Any = None
        self.error: BaseException | None = None


def _wake(operations: list[_Operation]) -> None:
    for operation in operations:
        operation.event.set()


def _broker_error(path: str, exc: sqlite3.Error) -> BrokerError:
    error = BrokerError(f"SQLite database {path}: {exc}")
    error.__cause__ = exc
    return error


def _apply(conn: sqlite3.Connection, operation: _Operation, path: str, *, savepoint: bool) -> None:
    """Run one operation, in a savepoint of its own if ``savepoint``; keep its outcome.

    Raises:
        sqlite3.OperationalError: The database is locked: the whole batch is retried.
    """
    if savepoint:
        conn.execute("SAVEPOINT operation")
    try:
        value = operation.function(conn)
        # A cursor must die in this thread: finalised in the caller's, while this
        # thread uses the connection, it is an "API misuse" error of SQLite's.
        operation.value = None if isinstance(value, sqlite3.Cursor) else value
    except sqlite3.OperationalError as exc:
        if is_locked(exc):
            raise
        operation.error = _broker_error(path, exc)
    except sqlite3.Error as exc:
        operation.error = _broker_error(path, exc)
    except Exception as exc:
        operation.error = exc
    if savepoint:
        if operation.error is not None:
            conn.execute("ROLLBACK TO operation")
        conn.execute("RELEASE operation")


def check_file(path: str, identity: tuple[int, int] | None) -> None:
    """Raise :class:`BrokerError` if the file at ``path`` was deleted, or replaced (its
    ``(device, inode)`` is not ``identity``).

    A connection keeps using the file it opened, unlinked or not, while processes that
    open the path afterwards get a new file: their runs and this connection's would
    never meet.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BrokerError(
            f"SQLite database {path} was deleted while open: its runs are gone "
            "for every other process; restart with the file in place"
        ) from None
    except OSError as exc:
        raise BrokerError(f"SQLite database {path}: cannot check the file: {exc}") from exc
    if identity is not None and (info.st_dev, info.st_ino) != identity:
        raise BrokerError(
            f"SQLite database {path} was replaced by another file while open: "
            "new runs go to the new file, which this broker does not see; restart it"
        )


class _Transactions:
    """What both sides of a connection share: its state, the transaction that runs a batch
    of operations, and the wake-up of their callers (see :class:`ConnectionThread`)."""

    def __init__(
        self,
        path: str,
        *,
        url: str,
        busy_timeout: float,
        lock_timeout: float,
        on_commit: Callable[[set[bytes]], None] | None = None,
    ) -> None:
        self._path = path
        self._url = url
        self._busy_timeout = busy_timeout
        self._lock_timeout = lock_timeout
        self._on_commit = on_commit
        self._condition = threading.Condition()
        self._pending: deque[_Operation] = deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        #: The thread is running a batch; a caller is running one call itself.
        self._running = False
        self._inline = False
        #: The task whose calls ran here in this pass of the event loop, if any.
        self._inline_this_pass: int | None = None
        #: Other tasks' short calls of this pass, run together at the next one (see
        #: _gather), and the event loop they wait in.
        self._gathered: list[_Operation] = []
        self._gathered_loop: object = None
        #: Whether SQLite waits busy_timeout for locks (the thread's way) or not at all.
        self._waiting_for_locks = True
        self._thread_id: int | None = None
        #: Signals that operations of the transaction under way asked for (see signal()).
        self._signals: set[bytes] = set()
        self._conn: sqlite3.Connection | None = None
        #: (device, inode) of the file opened, to notice it deleted or replaced.
        self._identity: tuple[int, int] | None = None
        #: How many times a locked database was retried; a health signal.
        self.lock_retries = 0
        #: How many transactions with writes were committed (calls share them).
        self.commits = 0
        #: Checkpoints the WAL off the committing thread, once the file is in WAL mode.
        self._checkpointer: _Checkpointer | None = None

    @property
    def is_open(self) -> bool:
        """Whether calls are accepted."""
        return self._thread is not None and not self._closing

    def _check_open(self) -> None:
        """Raise :class:`BrokerError` unless the connection is open (under the condition)."""
        if not self.is_open:
            raise BrokerError(
                f"SQLite database {self._path} is not open; "
                "use 'async with broker:' or 'await broker.open()'"
            )

    def _wait_for_locks(self, conn: sqlite3.Connection, wait: bool) -> None:
        """Have SQLite wait ``busy_timeout`` for a lock (in the thread) or not at all (in
        the caller's); set only when it changes, since the pragma costs tens of µs."""
        if wait != self._waiting_for_locks:
            milliseconds = round(self._busy_timeout * 1000) if wait else 0
            conn.execute(f"PRAGMA busy_timeout = {milliseconds}")
            self._waiting_for_locks = wait

    def _execute(self, batch: list[_Operation]) -> bool:
        """Run ``batch`` in one transaction if it writes; whether it committed writes.

        Raises:
            sqlite3.OperationalError: The database is locked (nothing was kept), or the
                commit failed.
        """
        conn = self._conn
        assert conn is not None
        if threading.get_ident() == self._thread_id:
            self._wait_for_locks(conn, True)
        writes = [operation for operation in batch if operation.write]
        savepoints = len(writes) > 1
        self._signals.clear()
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
            for operation in batch:
                _apply(conn, operation, self._path, savepoint=savepoints and operation.write)
            if not writes:
                return False
            if not savepoints and writes[0].error is not None:
                conn.execute("ROLLBACK")
                return False
            conn.execute("COMMIT")
            self.commits += 1
            if self._checkpointer is not None:
                self._checkpointer.committed()
            return True
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    pass  # The original error says more.
            raise

    def _execute_here(self, batch: list[_Operation]) -> bool:
        """Run ``batch`` in the event loop's thread and wake its callers; ``False`` if the
        database was locked (nothing was kept)."""
        try:
            committed = self._execute(batch)
        except sqlite3.OperationalError as exc:
            if is_locked(exc):
                return False
            self._fail_writes(batch, exc)
            return True
        except sqlite3.Error as exc:
            self._fail_writes(batch, exc)
            return True
        self._committed(batch, committed)
        with self._condition:
            for operation in batch:
                operation.step = _Step.DONE
        _wake(batch)
        return True

    @staticmethod
    def _done(operation: _Operation) -> _Operation:
        operation.step = _Step.DONE
        return operation

    def _committed(self, batch: list[_Operation], committed: bool) -> None:
        """Pass the signals of a batch's operations to ``on_commit``, once committed."""
        signals, self._signals = self._signals, set()
        if committed and self._on_commit is not None:
            signals.update(op.signal for op in batch if op.signal and op.error is None)
            if signals:
                self._on_commit(signals)

    def _fail_writes(
        self, batch: list[_Operation], exc: sqlite3.Error, *, last: bool = False
    ) -> None:
        """The transaction failed: every operation of it fails with the error."""
        for operation in batch:
            if operation.error is None:
                operation.error = _broker_error(self._path, exc)
        self._deliver(batch, last=last)

    def _deliver(self, batch: list[_Operation], *, last: bool = False) -> None:
        """Wake the callers, one call into each event loop for the whole batch; ``last``:
        the thread is done with what it took, so their next calls may run inline."""
        by_loop: dict[int, tuple[LoopHandle, list[_Operation]]] = {}
        with self._condition:
            if last:
                self._running = False
            for operation in batch:
                operation.step = _Step.DONE
                key = id(operation.loop.native)
                by_loop.setdefault(key, (operation.loop, []))[1].append(operation)
        for loop, operations in by_loop.values():
            loop.call_soon(functools.partial(_wake, operations))


class _InlineCalls(_Transactions):
    """Short calls run in the caller's thread, at once or gathered for the next pass of
    its event loop (see :meth:`ConnectionThread.call`)."""

    def _run_inline(
        self, function: Callable[[sqlite3.Connection], Any], write: bool, signal: bytes
    ) -> _Operation | None:
        """Run one call in the caller's thread if the connection's is idle (the operation,
        DONE), or keep it for the next pass (see :meth:`_gather`: PENDING); ``None`` if
        it must go to the connection's thread (busy, something queued, the database
        locked)."""
        loop = LoopHandle.current()
        with self._condition:
            self._check_open()
            if self._running or self._inline or self._pending:
                return None
            # Other tasks' calls in this pass of the event loop after this one are
            # concurrent with it: they run together at the next pass, sharing a
            # transaction. The same task's next calls cannot share one anyway.
            task = id(loop.current_task())
            if self._inline_this_pass not in (None, task):
                return self._gather(function, write, signal, loop)
            self._inline = True
        if self._inline_this_pass is None:
            self._inline_this_pass = task
            loop.call_soon_here(self._next_pass)
        conn = self._conn
        assert conn is not None
        operation = _Operation(function, write, signal, queued=False)
        try:
            # Never wait for another process's lock here: the thread does, with backoff.
            self._wait_for_locks(conn, False)
            try:
                committed = self._execute([operation])
            except sqlite3.OperationalError as exc:
                if is_locked(exc):
                    return None
                operation.error = _broker_error(self._path, exc)
                return self._done(operation)
            except sqlite3.Error as exc:
                operation.error = _broker_error(self._path, exc)
                return self._done(operation)
            signals, self._signals = self._signals, set()
            if signal:
                signals.add(signal)
            if committed and signals and operation.error is None and self._on_commit is not None:
                self._on_commit(signals)
            return self._done(operation)
        finally:
            with self._condition:
                self._inline = False
                if self._pending or self._closing:
                    self._condition.notify()

    def run_here(self, function: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run the write ``function`` at once, in this thread (an event loop's, outside
        any call), if the connection's thread is idle with nothing queued; its value, or
        ``None`` if it could not run here or failed (nothing kept, no signal sent): the
        caller then makes its call the usual way."""
        with self._condition:
            if not self.is_open or self._running or self._inline or self._pending:
                return None
            self._inline = True
        conn = self._conn
        assert conn is not None
        operation = _Operation(function, True, queued=False)
        try:
            self._wait_for_locks(conn, False)
            self._execute([operation])
        except sqlite3.Error:
            return None
        finally:
            self._signals = set()
            with self._condition:
                self._inline = False
                if self._pending or self._closing:
                    self._condition.notify()
        return None if operation.error is not None else operation.value

    def _gather(
        self,
        function: Callable[[sqlite3.Connection], Any],
        write: bool,
        signal: bytes,
        loop: LoopHandle,
    ) -> _Operation | None:
        """Keep a short call for the next pass of the event loop (under the condition);
        ``None`` if enough are kept already, or for another event loop.

        Tasks whose short calls come in one pass share one commit there, and none of
        them pays the two thread hops.
        """
        gathered = self._gathered
        if len(gathered) >= _MAX_PASS_BATCH or (
            gathered and self._gathered_loop is not loop.native
        ):
            return None
        operation = _Operation(function, write, signal)
        gathered.append(operation)
        if len(gathered) == 1:
            self._gathered_loop = loop.native
            loop.call_soon_here(self._run_gathered)
        return operation

    def _run_gathered(self) -> None:
        """In the event loop, the pass after they came: run the calls kept by _gather."""
        with self._condition:
            gathered, self._gathered = self._gathered, []
            self._gathered_loop = None
            batch = [operation for operation in gathered if operation.step is _Step.PENDING]
            if not batch:
                return
            if self._running or self._inline or self._pending or self._closing:
                # The thread has work (or is closing): it runs these with it.
                self._pending.extend(batch)
                self._condition.notify()
                return
            for operation in batch:
                operation.step = _Step.RUNNING
            self._inline = True
        conn = self._conn
        assert conn is not None
        # Reads first, outside the writes' transaction, as the thread runs them: no read
        # sees a write before it is committed.
        parts = [
            part
            for part in (
                [operation for operation in batch if not operation.write],
                [operation for operation in batch if operation.write],
            )
            if part
        ]
        left: list[_Operation] = []
        try:
            self._wait_for_locks(conn, False)
            for index, part in enumerate(parts):
                if not self._execute_here(part):
                    # Locked by another process: the thread waits for the lock instead.
                    left = [operation for rest in parts[index:] for operation in rest]
                    break
        finally:
            with self._condition:
                self._inline = False
                for operation in left:
                    operation.step = _Step.PENDING
                    operation.error = None
                self._pending.extend(left)
                if self._pending or self._closing:
                    self._condition.notify()

    def _next_pass(self) -> None:
        self._inline_this_pass = None


class ConnectionThread(_InlineCalls):
    """A SQLite connection owned by one thread, and the queue of calls it runs.

    Args:
        path: The database file.
        url: The broker's URL, for error messages.
        busy_timeout: Seconds SQLite itself waits for a lock before reporting it busy.
        lock_timeout: Seconds to retry a locked database before :class:`BrokerBusyError`.
        on_commit: Called in the thread after each committed transaction whose
            operations asked for a signal, with the set of their signals.
    """

    # --- the callers' side --------------------------------------------------------------

    async def open(self, prepare: Callable[[sqlite3.Connection], None]) -> None:
        """Start the thread, connect and run ``prepare`` (outside any transaction).

        Raises:
            BrokerError: The file cannot be opened, or ``prepare`` failed.
        """
        self._closing = False
        self._running = True  # until the thread has run prepare

        def open_file(conn: sqlite3.Connection) -> None:
            prepare(conn)
            self._checkpoint_aside(conn)

        first = _Operation(open_file, write=False)
        first.step = _Step.RUNNING
        thread = threading.Thread(
            target=self._serve, args=(first,), name=f"anyservice {self._url}", daemon=True
        )
        self._thread = thread
        thread.start()
        # The first operation cannot be abandoned: the thread owns it from the start.
        with anyio.CancelScope(shield=True):
            await first.event.wait()
        if first.error is not None:
            await anyio.to_thread.run_sync(thread.join)
            self._thread = None
            raise first.error

    async def call(
        self,
        function: Callable[[sqlite3.Connection], T],
        *,
        write: bool = True,
        signal: bytes = b"",
        inline: bool = False,
    ) -> T:
        """Run ``function(connection)`` in the thread, in a transaction if ``write``.

        ``signal`` is passed to ``on_commit`` once the call's writes are committed.
        ``inline``: a short call (one run claimed, submitted, completed or read) that may
        run right here, in the caller's thread, while the connection's thread is idle
        with nothing queued. The two thread hops it saves cost more than the
        statements, and they were most of the latency of a lone claim or submission.
        The first such call of a pass of the event loop runs at once; the others of
        the same pass (concurrent submissions, a worker's claim beside its batch of
        results) are kept for the next pass, where they run together in one
        transaction, still in this thread; past a few of them, the rest go to the
        connection's thread, whose transactions they share. A locked database sends
        a call to the thread after all, so the event loop never waits for a lock.

        Raises:
            BrokerBusyError: The database stayed locked for ``lock_timeout`` seconds.
            BrokerError: Any other SQLite error, or the connection is not open.
        """
        operation: _Operation | None = None
        if inline:
            await anyio.lowlevel.checkpoint_if_cancelled()
            operation = self._run_inline(function, write, signal)
            if operation is not None and operation.step is _Step.DONE:
                if operation.error is not None:
                    raise operation.error
                return operation.value  # type: ignore[no-any-return]
        if operation is None:
            operation = _Operation(function, write, signal)
            with self._condition:
                self._check_open()
                self._pending.append(operation)
                self._condition.notify()
        try:
            await operation.event.wait()
        except anyio.get_cancelled_exc_class():
            with self._condition:
                if operation.step is _Step.PENDING:
                    operation.step = _Step.ABANDONED
                    raise
            # Already executing: its effect is on its way, so the caller waits for it.
            with anyio.CancelScope(shield=True):
                await operation.event.wait()
            raise
        if operation.error is not None:
            raise operation.error
        return operation.value  # type: ignore[no-any-return]

    def signal(self, kind: bytes) -> None:
        """From inside an operation: pass ``kind`` to ``on_commit`` too, once committed.

        For a call whose need to tell other processes shows only as it runs (a claim
        tells them only if it ended runs on the way).
        """
        self._signals.add(kind)

    async def close(self) -> None:
        """Run what is queued, close the connection and end the thread."""
        thread = self._thread
        with self._condition:
            if thread is None or self._closing:
                return
            self._closing = True
            self._condition.notify_all()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(thread.join)
        self._thread = None

    def check_file(self) -> None:
        """Raise :class:`BrokerError` if the open file was deleted or replaced."""
        check_file(self._path, self._identity)

    # --- the thread's side --------------------------------------------------------------

    def _serve(self, first: _Operation) -> None:
        self._thread_id = threading.get_ident()
        try:
            # Task arguments and results are the user's own: create the file 0600, and
            # SQLite gives its WAL and shared-memory files the mode of the database's.
            # An existing file keeps its mode.
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
            self._conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                # Transactions are explicit (BEGIN IMMEDIATE), never implicit.
                isolation_level=None,
                # Short calls may run in the caller's thread while this one is idle (see
                # call()); the condition's flags keep the two from using it at once.
                check_same_thread=False,
            )
            info = os.stat(self._path)
            self._identity = (info.st_dev, info.st_ino)
        except (sqlite3.Error, OSError) as exc:
            first.error = BrokerError(f"cannot open SQLite database {self._path!r}: {exc}")
            self._deliver([first], last=True)
            return
        try:
            self._run([first])
            if first.error is not None:
                return
            while (batch := self._take()) is not None:
                self._run(batch)
        finally:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self._conn.close()
            self._conn = None

    def _checkpoint_aside(self, conn: sqlite3.Connection) -> None:
        """In WAL mode, leave checkpoints to a :class:`_Checkpointer` rather than to
        the commit that crosses SQLite's threshold; kept as they are if that cannot be."""
        try:
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                return
            other = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error:
            other.close()
            return
        self._checkpointer = _Checkpointer(other, f"anyservice checkpoints {self._url}")

    def _take(self) -> list[_Operation] | None:
        """Wait for queued operations and take them; ``None`` once closing and drained."""
        with self._condition:
            self._running = False
            while True:
                if self._closing and self._gathered:
                    # Kept for a pass of an event loop that may never come: run them here.
                    self._pending.extend(self._gathered)
                    self._gathered = []
                batch: list[_Operation] = []
                while self._pending and len(batch) < _MAX_BATCH and not self._inline:
                    operation = self._pending.popleft()
                    if operation.step is _Step.PENDING:
                        operation.step = _Step.RUNNING
                        batch.append(operation)
                if batch:
                    self._running = True
                    return batch
                if self._closing and not self._inline:
                    return None
                self._condition.wait()

    def _run(self, batch: list[_Operation]) -> None:
        """Execute a batch: its reads first, then its writes in one transaction.

        Reads need no lock in WAL mode, so they are answered at once, never held by
        writes waiting out another process's write lock. Calls queued together were
        concurrent, so no caller can tell the order they ran in.
        """
        reads = [operation for operation in batch if not operation.write]
        if reads and len(reads) < len(batch):
            self._run_retrying(reads, last=False)
            batch = [operation for operation in batch if operation.write]
        self._run_retrying(batch, last=True)

    def _run_retrying(self, batch: list[_Operation], *, last: bool) -> None:
        """Execute operations, retrying them whole while the database is locked; ``last``:
        the thread is idle once they are delivered."""
        deadline = time.monotonic() + self._lock_timeout
        delay = _FIRST_BACKOFF
        while True:
            try:
                committed = self._execute(batch)
            except sqlite3.OperationalError as exc:
                if not is_locked(exc):
                    self._fail_writes(batch, exc, last=last)
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for operation in batch:
                        operation.error = BrokerBusyError(
                            f"SQLite database {self._path!r} stayed locked for more than "
                            f"{self._lock_timeout:g} s (lock_timeout): {exc}"
                        )
                    self._deliver(batch, last=last)
                    return
                self.lock_retries += 1
                batch = self._back_off(batch, min(delay * random.uniform(0.5, 1.0), remaining))
                delay = min(delay * 2, _MAX_BACKOFF)
                if not batch:
                    return
            except sqlite3.Error as exc:
                self._fail_writes(batch, exc, last=last)
                return
            else:
                self._committed(batch, committed)
                self._deliver(batch, last=last)
                return

    def _back_off(self, batch: list[_Operation], seconds: float) -> list[_Operation]:
        """Wait before a retry, letting callers give up meanwhile; what is still wanted."""
        with self._condition:
            for operation in batch:
                operation.step = _Step.PENDING
                operation.error = None
            if not self._closing:
                self._condition.wait(seconds)
            wanted = [operation for operation in batch if operation.step is _Step.PENDING]
            for operation in wanted:
                operation.step = _Step.RUNNING
            return wanted
