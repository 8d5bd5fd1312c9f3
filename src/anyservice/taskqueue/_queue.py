"""The submitting side of task runs: ``TaskQueue``, ``@queue.task`` and ``TaskRun``.

``queue = TaskQueue()`` stores runs in an embedded SQLite file; ``@queue.task`` turns a
function into a :class:`Task` whose ``delay()`` stores a run of it and returns a
:class:`TaskRun` handle; a :class:`~anyservice.taskqueue.TaskWorker` claims and executes the
runs. Calling the task directly (``say("hi")``) still just calls the function, in-process,
as Prefect's ``@task`` does, so it stays testable.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, ParamSpec, Protocol, Self, TypeVar, cast, overload

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._checks import (
    MAX_COUNT,
    Seconds,
    check_clock_reading,
    check_count,
    check_optional_count,
    check_optional_seconds,
    check_seconds,
)
from .._restart import Backoff
from .._tracing import otel
from ._errors import TaskRunFailed, TaskRunNotFound, TaskRunTimeout
from ._records import DEFAULT_MAX_ATTEMPTS, RunError, RunRecord, RunState
from ._scheduler import Schedule, define_schedule
from ._serialize import decode_result, encode_arguments
from ._ticks import DEFAULT_CATCH_UP, MissedTicks, check_missed, grid_from
from .brokers import DEFAULT_URL, Broker, broker_from_url
from .brokers._options import check_priority

#: The environment variable a queue made without a URL or broker takes its URL from.
URL_ENVIRONMENT_VARIABLE = "ANYSERVICE_TASKQUEUE_URL"

__all__ = [
    "DEFAULT_RETENTION",
    "AsyncTask",
    "SyncTask",
    "Task",
    "TaskDecorator",
    "TaskQueue",
    "TaskRun",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: How long finished runs are kept by default before workers purge them: 7 days.
DEFAULT_RETENTION = 7 * 24 * 3600.0

# How long one wait_until_finished() call lasts when the caller gave no timeout: the wait
# is repeated, so this only bounds how stale a broker's view may get.
_WAIT_CHUNK = 60.0


def in_event_loop() -> bool:
    """Whether the caller runs inside an event loop (of any backend)."""
    try:
        anyio.lowlevel.current_token()
    except anyio.NoEventLoopError:
        return False
    return True


def _run_blocking(function: Callable[[], Coroutine[Any, Any, T]], what: str, hint: str) -> T:
    """Run ``function()`` to completion from synchronous code.

    From an anyio worker thread (a sync task submitting another run) it goes through the
    thread's event loop; elsewhere it runs in a short-lived event loop of its own.

    Raises:
        RuntimeError: if called from inside a running event loop, where blocking would
            stall every other task of the loop.
    """
    if in_event_loop():
        raise RuntimeError(
            f"{what} blocks, so it cannot be called from inside a running event loop; "
            f"use {hint} there"
        )
    try:
        return anyio.from_thread.run(function)
    except anyio.NoEventLoopError:
        # Not an anyio worker thread: plain synchronous code.
        pass
    return anyio.run(function)


def _url(url: str | None) -> str:
    """The URL a queue uses: the one given, else the environment's, else the default."""
    if url is None:
        url = os.environ.get(URL_ENVIRONMENT_VARIABLE)
        if url is not None and not url.strip():
            raise ValueError(
                f"the {URL_ENVIRONMENT_VARIABLE} environment variable is set but empty; "
                "unset it or give a broker URL such as 'sqlite:////var/lib/app/runs.db'"
            )
        return DEFAULT_URL if url is None else url
    if not url.strip():
        raise ValueError(
            f"TaskQueue url must not be empty, got {url!r}; give e.g. "
            "'sqlite:////var/lib/app/runs.db', or None for the default"
        )
    return url


def _task_name(function: object, options: _TaskOptions) -> str:
    """The name a task of ``function`` takes, once ``function`` is checked fit for one."""
    if isinstance(function, Task):
        raise TypeError(f"{function!r} is already a task")
    if not callable(function):
        raise TypeError(f"@queue.task needs a function, got {function!r}")
    if inspect.isasyncgenfunction(function) or inspect.isgeneratorfunction(function):
        raise TypeError(
            f"@queue.task needs a function that returns its result, not a generator: {function!r}"
        )
    name = options.name or getattr(function, "__name__", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"@queue.task: {function!r} has no __name__; pass name=")
    return name


def _task_class(function: Callable[..., Any]) -> type[Task[Any, Any]]:
    """The kind of task ``function`` makes: async, or sync (run in a worker thread)."""
    is_async = inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004  # an object with async __call__
    )
    return AsyncTask if is_async else SyncTask


class TaskQueue:
    """Where task runs are stored: an embedded SQLite file unless told otherwise.

    Args:
        url: The broker's URL: ``sqlite:///relative/path.db`` (relative to the current
            directory), ``sqlite:////absolute/path.db``, or ``memory://`` (this process
            only). Without one, the ``ANYSERVICE_TASKQUEUE_URL`` environment variable's,
            or else ``sqlite:///anyservice.db``: give every process of an application the
            same absolute URL, so none writes to a file of its own directory.
        broker: A broker object instead of a URL (e.g. a ``MemoryBroker`` with a fake
            clock, or a ``SqliteBroker`` with its own timeouts).
        max_attempts: How many times a run may be claimed (at least its retries + 1)
            before a worker dying on it ends it CRASHED rather than handing it on again.
        retention: How long finished runs are kept (seconds or a ``timedelta``; 7 days
            by default): the queue's workers purge older ones now and then. ``None``
            keeps them until :meth:`purge` is called.

    The broker is opened on first use (``delay()``, a worker's start) and stays open until
    :meth:`close`; ``async with queue:`` opens it and closes it at the end of the block.

    Raises:
        ValueError: an unsupported URL scheme, an empty URL or a URL without a usable
            path, a SQLite file whose directory does not exist (or is not a directory),
            both a URL and a broker, or a bad ``max_attempts`` or ``retention``.
        TypeError: a URL that is not a string, or a ``max_attempts`` that is not an int.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        broker: Broker | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retention: Seconds | None = DEFAULT_RETENTION,
    ) -> None:
        if broker is not None and url is not None:
            raise ValueError("TaskQueue takes a url or a broker, not both")
        if url is not None and not isinstance(url, str):
            raise TypeError(f"TaskQueue url must be a str, got {url!r}")
        max_attempts = check_count(max_attempts, "max_attempts", minimum=1)
        self._broker: Broker = broker if broker is not None else broker_from_url(_url(url))
        self.max_attempts = max_attempts
        #: Seconds finished runs are kept before workers purge them (``None``: forever).
        self.retention = None if retention is None else check_seconds(retention, "retention")
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._schedules: dict[str, Schedule] = {}
        # Opening: who holds the broker open, whether someone used it outside any holder
        # (then it stays open until close()), and an open in progress.
        self._holders = 0
        self._kept_open = False
        self._is_open = False
        self._opening: anyio.Event | None = None

    @property
    def url(self) -> str:
        """The broker's URL."""
        return self._broker.url

    @property
    def location(self) -> str:
        """Where the runs are stored, safe to log: a SQLite file's absolute path."""
        return self._broker.location

    @property
    def broker(self) -> Broker:
        """The broker that stores the runs."""
        return self._broker

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The tasks defined on this queue, by name."""
        return dict(self._tasks)

    @property
    def schedules(self) -> Mapping[str, Schedule]:
        """The schedules defined on this queue, by name."""
        return dict(self._schedules)

    def __repr__(self) -> str:
        return f"<TaskQueue {self.url!r} tasks={sorted(self._tasks)}>"

    # ------------------------------------------------------------------ defining tasks

    @overload
    def task(  # type: ignore[overload-overlap]  # an async function is matched first
        self, function: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...

    @overload
    def task(self, function: Callable[P, R], /) -> SyncTask[P, R]: ...

    @overload
    def task(
        self,
        function: None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay: Seconds | Backoff = 0.0,
        timeout: Seconds | None = None,
        schedule: object = None,
        missed: MissedTicks | str = MissedTicks.SKIP,
        overlap: bool = False,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        priority: int = 0,
        concurrency: int | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        function: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay: Seconds | Backoff = 0.0,
        timeout: Seconds | None = None,
        schedule: object = None,
        missed: MissedTicks | str = MissedTicks.SKIP,
        overlap: bool = False,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        priority: int = 0,
        concurrency: int | None = None,
    ) -> Task[Any, Any] | TaskDecorator:
        """Define a task: ``@queue.task`` or ``@queue.task(name=, retries=, ...)``.

        Async functions run in the worker's event loop; sync ones in worker threads.

        Args:
            name: The name runs are stored under; the function's ``__name__`` by default.
                Submitters and workers must agree on it, and it is unique per queue.
            retries: How many times a failed run (an exception or a timeout) is run
                again before it ends FAILED.
            retry_delay: Seconds between a failure and the retry, or a ``Backoff``
                (exponential, capped, jittered; the worker draws each retry's delay).
            timeout: Seconds one attempt may take; then it fails with ``TaskTimeoutError``
                (a sync task's thread, which cannot be cancelled, finishes unheeded).
            schedule, missed, overlap: Run the task (without arguments) on this
                schedule, as :meth:`schedule` does, under the task's name.
            retry_on: Retry only these exception types (a type or a tuple; a timeout is
                ``TaskTimeoutError``); any exception by default.
            priority: Among due runs, higher is claimed first (``apply_async`` overrides).
            concurrency: At most this many runs RUNNING at once across the cluster,
                enforced by the claim (``None``: no limit).

        Raises:
            TypeError: ``function`` is not a plain or async function (a generator, a
                task already), or an option has the wrong type.
            ValueError: an option is out of range, or the name is already taken.
        """
        options = _TaskOptions.check(
            name, retries, retry_delay, timeout, priority, concurrency, retry_on
        )
        grid = None if schedule is None else grid_from(schedule)
        policy = check_missed(missed)

        def decorate(function: Callable[..., Any]) -> Task[Any, Any]:
            task = self._define(function, options)
            if grid is not None:
                self.schedule(task, grid, missed=policy, overlap=overlap)
            return task

        if function is not None:
            return decorate(function)
        return cast(TaskDecorator, decorate)

    def _define(self, function: Callable[..., Any], options: _TaskOptions) -> Task[Any, Any]:
        name = _task_name(function, options)
        if name in self._tasks:
            raise ValueError(
                f"task name {name!r} is already taken on this queue by "
                f"{self._tasks[name].function!r}; pass a different name="
            )
        task = _task_class(function)(self, function, name, options)
        self._tasks[name] = task
        return task

    def schedule(
        self,
        task: Task[Any, Any],
        schedule: object,
        *,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        timezone: str | None = None,
        missed: MissedTicks | str = MissedTicks.SKIP,
        overlap: bool = False,
        catch_up: int = DEFAULT_CATCH_UP,
    ) -> Schedule:
        """Run ``task(*args, **kwargs)`` on a schedule, once per tick across every worker.

        Every :class:`TaskWorker` serving ``task`` stores each tick under (``name``, due
        time) as it falls due: however many workers there are, a tick gets one run.

        Args:
            task: A task of this queue.
            schedule: A cron expression (``"*/5 * * * *"``; a sixth field, last, for seconds), a
                ``CronSchedule``, or a number of seconds / ``timedelta``: a fixed interval
                on the epoch grid (ticks at multiples of it), so processes agree on it.
            args, kwargs: The arguments every run gets (JSON-serialisable).
            name: The schedule's name, unique per queue: ticks are stored under it. The
                task's name by default.
            timezone: The cron expression's timezone (an IANA name; UTC by default).
            missed: After every worker was down: ``"skip"`` runs only the next tick,
                ``"latest"`` also the most recent missed one, ``"all"`` every missed one
                (at most ``catch_up``).
            overlap: If false (the default), a tick due while the previous run of this
                schedule is RUNNING is skipped, and counted.
            catch_up: Most missed ticks ``missed="all"`` runs.

        Raises:
            TypeError: a bad schedule, arguments that do not fit the task or JSON, or an
                option of the wrong type.
            ValueError: a task of another queue, a name taken, a bad cron, interval or zone.
        """
        if not isinstance(task, Task):
            raise TypeError(f"schedule() needs a task made by @queue.task, got {task!r}")
        if task.queue is not self:
            raise ValueError(f"task {task.name!r} belongs to another queue ({task.queue.url!r})")
        defined = define_schedule(
            task,
            grid_from(schedule, timezone=timezone),
            task.name if name is None else name,
            args=args,
            kwargs=kwargs,
            missed=missed,
            overlap=overlap,
            catch_up=catch_up,
        )
        if defined.name in self._schedules:
            raise ValueError(
                f"schedule name {defined.name!r} is already taken on this queue; "
                "pass a different name="
            )
        self._schedules[defined.name] = defined
        return defined

    async def schedule_counts(self, name: str) -> dict[str, Any]:
        """What the broker holds of a schedule: ``runs``, ``skipped``, the ``latest`` tick.

        Raises ``KeyError`` for a schedule this queue does not define.
        """
        if name not in self._schedules:
            raise KeyError(f"no schedule {name!r} on this queue")
        broker = await self.ensure_open()
        counts = await broker.tick_counts(name)
        return {"runs": counts.runs, "skipped": counts.skipped, "latest": counts.latest}

    # ------------------------------------------------------------- opening the broker

    async def open(self) -> None:
        """Open the broker (it would be opened at first use anyway); keep it open.

        Raises:
            BrokerError: the storage cannot be opened.
        """
        await self._open_broker()
        if not self._holders:
            self._kept_open = True

    async def close(self) -> None:
        """Close the broker, or, while workers hold it, once the last of them stops."""
        self._kept_open = False
        if not self._holders and self._is_open:
            self._is_open = False
            await self._broker.close()

    async def __aenter__(self) -> Self:
        await self.hold()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.let_go()

    async def hold(self) -> Broker:
        """Hold the broker open (a worker does, for its life) until :meth:`let_go`.

        Raises:
            BrokerError: the storage cannot be opened.
        """
        self._holders += 1
        try:
            await self._open_broker()
        except BaseException:
            self._holders -= 1
            raise
        return self._broker

    async def let_go(self) -> None:
        """End a :meth:`hold`: the broker is closed if nobody else holds it and it was
        not opened for keeps (by :meth:`open`, or a ``delay()`` outside any holder).
        Shielded: a worker lets go while it is being cancelled.
        """
        self._holders -= 1
        if not self._holders and not self._kept_open and self._is_open:
            self._is_open = False
            with anyio.CancelScope(shield=True):
                await self._broker.close()

    @asynccontextmanager
    async def holding(self) -> AsyncIterator[Broker]:
        """``hold()`` for the length of a block."""
        broker = await self.hold()
        try:
            yield broker
        finally:
            await self.let_go()

    async def _open_broker(self) -> None:
        while self._opening is not None:
            await self._opening.wait()
        if self._is_open:
            return
        # Other tasks wait for this open instead of using a half-prepared database.
        self._opening = opening = anyio.Event()
        try:
            await self._broker.open()
            self._is_open = True
        finally:
            self._opening = None
            opening.set()

    async def ensure_open(self) -> Broker:
        """The broker, opened (and kept open) if nobody holds it open yet."""
        if not self._is_open:
            await self.open()
        return self._broker

    # ------------------------------------------------------------------ runs

    async def get_run(self, run_id: str) -> TaskRun[Any]:
        """A handle on an existing run, e.g. one submitted by another process.

        Raises:
            TaskRunNotFound: there is no run with this id.
        """
        broker = await self.ensure_open()
        record = await broker.get(run_id)
        if record is None:
            raise TaskRunNotFound(f"no run {run_id!r} in {self.location}")
        return TaskRun(self, record)

    async def counts(self) -> dict[RunState, int]:
        """How many runs are in each state."""
        broker = await self.ensure_open()
        return await broker.counts()

    async def runs(
        self,
        *,
        state: RunState | str | None = None,
        task: str | Task[Any, Any] | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[TaskRun[Any]]:
        """The runs stored, newest first: in ``state``, of ``task`` (a task or its name),
        submitted at or after ``since`` (epoch seconds), at most ``limit``.

        Raises:
            ValueError, TypeError: an unknown state, ``limit`` < 1, or a wrong type.
        """
        name = task.name if isinstance(task, Task) else task
        broker = await self.ensure_open()
        records = await broker.list_runs(
            state=None if state is None else RunState(state), task=name, since=since, limit=limit
        )
        return [TaskRun(self, record) for record in records]

    async def purge(self, older_than: Seconds | None = None) -> int:
        """Delete the runs that finished more than ``older_than`` ago, in small batches.

        Args:
            older_than: Seconds or a ``timedelta``; the queue's ``retention`` by default.

        Returns:
            How many runs were deleted (on PostgreSQL, 0 while another process purges).

        Raises:
            ValueError: ``older_than`` is not a positive duration, or it is not given and
                the queue has no retention.
        """
        if older_than is None:
            if self.retention is None:
                raise ValueError(
                    "purge() needs older_than= when the queue keeps runs forever (retention=None)"
                )
            seconds = self.retention
        else:
            seconds = check_seconds(older_than, "older_than")
        broker = await self.ensure_open()
        return await broker.purge(seconds)


def _check_retry_on(value: object) -> tuple[type[BaseException], ...] | None:
    if value is None:
        return None
    types = value if isinstance(value, tuple) else (value,)
    if not types or not all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in types
    ):
        raise TypeError(
            f"@queue.task retry_on must be an exception type or a tuple of them, got {value!r}"
        )
    return types


@dataclass(frozen=True, slots=True)
class _TaskOptions:
    """A task's checked options, as ``@queue.task`` was given them."""

    name: str | None
    retries: int
    retry_delay: float | Backoff
    timeout: float | None
    priority: int
    concurrency: int | None
    retry_on: tuple[type[BaseException], ...] | None

    @classmethod
    def check(
        cls,
        name: object,
        retries: object,
        retry_delay: object,
        timeout: object,
        priority: object,
        concurrency: object,
        retry_on: object,
    ) -> _TaskOptions:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"@queue.task name must be a str, got {name!r}")
        if name == "":
            raise ValueError("@queue.task name must not be empty")
        return cls(
            name,
            # One attempt more than the retries must still be a count the brokers store.
            check_count(retries, "@queue.task retries", maximum=MAX_COUNT - 1),
            retry_delay
            if isinstance(retry_delay, Backoff)
            else check_seconds(retry_delay, "@queue.task retry_delay", allow_zero=True),
            check_optional_seconds(timeout, "@queue.task timeout"),
            check_priority(priority, "@queue.task priority"),
            check_optional_count(concurrency, "@queue.task concurrency", minimum=1),
            _check_retry_on(retry_on),
        )


def _trace_context() -> str | None:
    """What a submit stores for the spans of the run: the current span's traceparent."""
    return None if otel is None else otel.traceparent()


class Task(Generic[P, R]):
    """A function that workers run: ``await task.delay(...)`` stores a run of it.

    Made by ``@queue.task``. Attributes: ``name``, ``function``, ``queue``, ``retries``,
    ``retry_delay``, ``retry_on``, ``timeout``, ``priority``, ``concurrency``, ``is_async``.
    """

    is_async: bool = False
    #: The most runs of the task RUNNING at once across the cluster; ``None``: no limit.
    concurrency: int | None
    #: The exception types a failure is retried for; ``None``: any.
    retry_on: tuple[type[BaseException], ...] | None
    # Copied from the function, as functools.wraps does.
    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(
        self,
        queue: TaskQueue,
        function: Callable[..., Any],
        name: str,
        options: _TaskOptions,
    ) -> None:
        # First, so that attributes copied from the function cannot shadow the task's own.
        functools.update_wrapper(cast(Any, self), function)
        self.queue = queue
        self.function = function
        self.name = name
        self.retries = options.retries
        self.retry_delay = options.retry_delay
        self.timeout = options.timeout
        self.priority = options.priority
        self.concurrency = options.concurrency
        self.retry_on = options.retry_on
        try:
            self.signature: inspect.Signature | None = inspect.signature(function)
        except (TypeError, ValueError):  # some builtins and C callables have none
            self.signature = None
        #: Whether calls of a shape (how many positional arguments, which keywords) fit
        #: the signature, and if not why: binding depends on nothing else, and costs
        #: more than encoding a small call.
        self._shapes: dict[tuple[int, tuple[str, ...]], str | None] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} of {self.queue.url!r}>"

    def should_retry(self, exc: BaseException) -> bool:
        """Whether a failure with ``exc`` may be retried (see ``retry_on``)."""
        return self.retry_on is None or isinstance(exc, self.retry_on)

    @property
    def stored_retry_delay(self) -> float:
        """The ``retry_delay`` stored with each run: the seconds, or a ``Backoff``'s
        first delay (what a retry waits when its worker gives no delay of its own)."""
        delay = self.retry_delay
        return delay.initial if isinstance(delay, Backoff) else delay

    def delay_before_retry(self, record: RunRecord) -> float:
        """Seconds until the retry of ``record``'s failed attempt is due.

        A fixed ``retry_delay`` is the same each time; a ``Backoff`` grows with each
        retry of the series (the first retry is its first delay), jittered anew.
        """
        delay = self.retry_delay
        if not isinstance(delay, Backoff):
            return delay
        # Retries the series has had before this one; the task's retries are its budget.
        done = max(self.retries - record.retries_left, 0)
        return delay.delay(done + 1)

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The JSON payload of a run with these arguments.

        Raises:
            TypeError: the arguments do not fit the function's signature, or one of
                them is not JSON-serialisable (the message names it).
        """
        if self.signature is not None:
            shape = (len(args), tuple(kwargs))
            try:
                problem = self._shapes[shape]
            except KeyError:
                problem = self._shapes[shape] = self._binding_problem(args, kwargs)
            if problem is not None:
                raise TypeError(f"task {self.name!r}: {problem}")
        return encode_arguments(self.name, args, kwargs, self.signature)

    def _binding_problem(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        assert self.signature is not None
        if len(self._shapes) >= 64:
            self._shapes.clear()  # callers with ever new keywords: keep it small
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            return str(exc)
        return None

    def _submit_options(self) -> dict[str, Any]:
        """What the broker stores with each run of this task, besides its arguments.

        The trace context is the caller's: read this in the caller's task and thread.
        """
        return {
            "retries": self.retries,
            "retry_delay": self.stored_retry_delay,
            "timeout": self.timeout,
            "max_attempts": max(self.queue.max_attempts, self.retries + 1),
            "priority": self.priority,
            "trace_context": _trace_context(),
        }

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRun[R]:
        """Store a run of the task with these arguments; a worker will run it.

        Returns at once with a :class:`TaskRun` (SCHEDULED): ``await run.result()``.

        Raises:
            TypeError: an argument does not fit the signature or is not JSON-serialisable.
            BrokerError: the storage cannot be used.
        """
        payload = self.encode(args, kwargs)
        broker = await self.queue.ensure_open()
        record = await broker.submit(
            self.name,
            payload,
            **self._submit_options(),
        )
        return TaskRun(self.queue, record)

    async def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        at: float | datetime.datetime | None = None,
        countdown: Seconds | None = None,
        key: str | None = None,
        priority: int | None = None,
    ) -> TaskRun[R]:
        """Store a run with these arguments, due ``at`` a time or after a ``countdown``.

        Prefect's (and Celery's) name; ``delay(*args, **kwargs)`` is the short form.

        Args:
            args, kwargs: The task's arguments (JSON-serialisable).
            at: When the run is due: epoch seconds or an aware ``datetime``.
            countdown: Seconds from now until it is due (not with ``at``).
            key: Deduplicate: while a run submitted under ``key`` is not finished,
                submitting again returns that run instead of storing another.
            priority: Among due runs, higher is claimed first; the task's ``priority``
                (0 unless ``@queue.task(priority=)`` says) by default.

        Raises:
            TypeError: arguments that do not fit the task or JSON, a naive datetime, or an
                option of the wrong type.
            ValueError: both ``at`` and ``countdown``, a negative countdown, an empty key,
                a priority beyond 32 bits.
        """
        if not isinstance(args, tuple | list):
            raise TypeError(f"apply_async() args must be a tuple or list, got {args!r}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"apply_async() kwargs must be a mapping, got {kwargs!r}")
        if at is not None and countdown is not None:
            raise ValueError("apply_async() takes at= or countdown=, not both")
        payload = self.encode(tuple(args), dict(kwargs or {}))
        broker = await self.queue.ensure_open()
        scheduled_at: float | None = None
        if isinstance(at, datetime.datetime):
            if at.utcoffset() is None:
                raise TypeError(f"apply_async() at= needs an aware datetime, got {at!r}")
            scheduled_at = at.timestamp()
        elif at is not None:
            scheduled_at = check_clock_reading(at, "apply_async() at")
        elif countdown is not None:
            scheduled_at = broker.now() + check_seconds(
                countdown, "apply_async() countdown", allow_zero=True
            )
        options = {**self._submit_options(), "scheduled_at": scheduled_at}
        if priority is not None:
            options["priority"] = check_priority(priority, "apply_async() priority")
        if key is None:
            record = await broker.submit(self.name, payload, **options)
        else:
            record, _ = await broker.submit_once(key, self.name, payload, **options)
        return TaskRun(self.queue, record)

    async def delay_many(self, calls: Iterable[tuple[Any, ...]]) -> list[TaskRun[R]]:
        """Store one run per tuple of positional arguments, all in one transaction.

        All or nothing: if any call's arguments do not fit or are not JSON-serialisable,
        no run is stored. ``await say.delay_many([("hi",), ("ho",)])``.

        Returns:
            The runs' handles (SCHEDULED), in the order of ``calls``.

        Raises:
            TypeError: a call is not a tuple, or its arguments do not fit the signature or
                are not JSON-serialisable; the message names the call's index.
            BrokerError: the storage cannot be used.
        """
        given: object = calls  # checked: callers without type checking pass anything
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise TypeError(
                f"task {self.name!r}: delay_many() takes an iterable of argument tuples, "
                f"got {calls!r}"
            )
        payloads = []
        for index, call in enumerate(calls):
            if not isinstance(call, tuple):
                raise TypeError(
                    f"task {self.name!r}: delay_many() call {index} must be a tuple of "
                    f"positional arguments, got {call!r}"
                )
            payloads.append(self._encode_call(index, call, {}))
        return await self._submit_many(payloads)

    async def map(self, *iterables: Iterable[Any], **kwargs: Any) -> list[TaskRun[R]]:
        """One run per element of ``iterables`` taken together, as ``map()`` (Prefect's name).

        ``await add.map([1, 2], [10, 20])`` stores ``add(1, 10)`` and ``add(2, 20)``;
        keyword arguments are given, unchanged, to every run. All in one transaction, all
        or nothing, as :meth:`delay_many`.

        Raises:
            ValueError: the iterables have different lengths.
            TypeError: as :meth:`delay_many`.
        """
        columns = []
        for position, iterable in enumerate(iterables):
            if isinstance(iterable, str | bytes) or not isinstance(iterable, Iterable):
                raise TypeError(
                    f"task {self.name!r}: map() argument {position} must be an iterable "
                    f"of values, one per run, got {iterable!r}"
                )
            columns.append(list(iterable))
        lengths = sorted({len(column) for column in columns})
        if len(lengths) > 1:
            raise ValueError(
                f"task {self.name!r}: map() iterables have different lengths "
                f"({', '.join(map(str, (len(column) for column in columns)))})"
            )
        payloads = [
            self._encode_call(index, call, kwargs)
            for index, call in enumerate(zip(*columns, strict=True))
        ]
        return await self._submit_many(payloads)

    def _encode_call(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        try:
            return self.encode(args, kwargs)
        except TypeError as exc:
            raise TypeError(f"call {index} of the batch: {exc}") from None

    async def _submit_many(self, payloads: list[str]) -> list[TaskRun[R]]:
        broker = await self.queue.ensure_open()
        records = await broker.submit_many(
            self.name,
            payloads,
            **self._submit_options(),
        )
        return [TaskRun(self.queue, record) for record in records]

    def delay_sync(self, *args: P.args, **kwargs: P.kwargs) -> TaskRun[R]:
        """``delay()`` for plain synchronous code (scripts, sync tasks); blocks until stored.

        Raises:
            RuntimeError: called from inside a running event loop: use
                ``await task.delay(...)`` there.
            TypeError, BrokerError: as :meth:`delay`.
        """
        payload = self.encode(args, kwargs)  # bad arguments fail before any event loop
        # Read here: the submit below may run in another thread, outside the caller's span.
        options = self._submit_options()

        async def submit() -> TaskRun[R]:
            async with self.queue.holding() as broker:
                record = await broker.submit(self.name, payload, **options)
            return TaskRun(self.queue, record)

        return _run_blocking(submit, f"{self.name}.delay_sync()", f"'await {self.name}.delay(...)'")


class AsyncTask(Task[P, R]):
    """A task made from an ``async def`` function."""

    is_async = True

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """Call the function itself, in-process (no run is stored)."""
        return cast(Coroutine[Any, Any, R], self.function(*args, **kwargs))


class SyncTask(Task[P, R]):
    """A task made from a plain function; workers run it in a thread."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function itself, in-process (no run is stored)."""
        return cast(R, self.function(*args, **kwargs))


class TaskDecorator(Protocol):
    """What ``queue.task(name=..., ...)`` returns: apply it to a function."""

    @overload
    def __call__(  # type: ignore[overload-overlap]  # an async function is matched first
        self, function: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...

    @overload
    def __call__(self, function: Callable[P, R], /) -> SyncTask[P, R]: ...


class TaskRun(Generic[R]):
    """A handle on one stored run: its state, and a way to wait for its result.

    ``state`` is the state when the handle last looked (``refresh()``, ``wait()`` and
    ``result()`` look again).
    """

    def __init__(self, queue: TaskQueue, record: RunRecord) -> None:
        self._queue = queue
        self._record = record

    @property
    def id(self) -> str:
        """The run's id (a uuid4 hex string)."""
        return self._record.id

    @property
    def task(self) -> str:
        """The task's name."""
        return self._record.task

    @property
    def record(self) -> RunRecord:
        """Everything the broker stores about the run, as last seen."""
        return self._record

    @property
    def state(self) -> RunState:
        """SCHEDULED, RUNNING, COMPLETED, FAILED, CANCELLED or CRASHED, as last seen."""
        return self._record.state

    @property
    def attempts(self) -> int:
        """How many times a worker claimed the run, as last seen."""
        return self._record.attempts

    @property
    def error(self) -> RunError | None:
        """Why the run last failed, as last seen."""
        return self._record.error

    def __repr__(self) -> str:
        return f"<TaskRun {self.id} of {self.task!r} {self.state.value}>"

    async def refresh(self) -> RunState:
        """Read the run's current state from the broker and return it.

        Raises:
            TaskRunNotFound: the run is gone (another database?).
        """
        broker = await self._queue.ensure_open()
        record = await broker.get(self.id)
        if record is None:
            raise TaskRunNotFound(f"run {self.id} is not in {self._queue.location}")
        self._record = record
        return record.state

    async def wait(self, timeout: Seconds | None = None) -> RunState:
        """Wait until the run finishes (any finished state); return that state.

        Raises:
            TaskRunTimeout: it did not finish within ``timeout`` seconds.
            TaskRunNotFound: the run is gone.
            ValueError: ``timeout`` is negative or not finite.
        """
        seconds = check_optional_seconds(timeout, "wait() timeout", allow_zero=True)
        broker = await self._queue.ensure_open()
        deadline = None if seconds is None else anyio.current_time() + seconds
        while True:
            remaining = _WAIT_CHUNK if deadline is None else deadline - anyio.current_time()
            record = await broker.wait_until_finished(self.id, max(remaining, 0.0))
            if record is None:
                raise TaskRunNotFound(f"run {self.id} is not in {self._queue.location}")
            self._record = record
            if record.finished:
                return record.state
            if deadline is not None and anyio.current_time() >= deadline:
                assert seconds is not None
                raise TaskRunTimeout(
                    run_id=self.id,
                    task=self.task,
                    timeout=seconds,
                    state=record.state,
                    database=self._queue.location,
                )

    async def result(self, timeout: Seconds | None = None) -> R:
        """Wait until the run finishes and return what the task returned (JSON-decoded).

        Raises:
            TaskRunFailed: the run ended FAILED, CRASHED or CANCELLED; it carries the
                task's exception type, message and traceback.
            TaskRunTimeout: it did not finish within ``timeout`` seconds.
            PayloadError: the stored result cannot be decoded.
        """
        state = await self.wait(timeout)
        record = self._record
        if state is not RunState.COMPLETED:
            raise TaskRunFailed(
                run_id=self.id,
                task=self.task,
                state=state,
                attempts=record.attempts,
                error=record.error,
            )
        return cast(R, decode_result(record.result if record.result is not None else ""))

    def result_sync(self, timeout: Seconds | None = None) -> R:
        """:meth:`result` for synchronous code; see ``Task.delay_sync`` for where it works."""

        async def result() -> R:
            async with self._queue.holding():
                return await self.result(timeout)

        return _run_blocking(result, "TaskRun.result_sync()", "'await run.result()'")

    async def cancel(self, timeout: Seconds | None = 60.0) -> bool:
        """Cancel the run, even a RUNNING one; return whether it ended CANCELLED.

        A SCHEDULED run is cancelled at once. For a RUNNING run the request is stored and
        its worker, wherever it is, cancels the task's scope at its next heartbeat (a
        third of its lease): the task's ``finally`` blocks run, and the run ends
        CANCELLED. This waits for that, for at most ``timeout`` seconds (``None``: as long
        as it takes); False if the run finished otherwise first, or was finished already.

        Raises:
            TaskRunTimeout: a RUNNING run did not end within ``timeout``.
        """
        seconds = check_optional_seconds(timeout, "cancel() timeout", allow_zero=True)
        broker = await self._queue.ensure_open()
        state = await broker.request_cancel(self.id)
        if state is RunState.RUNNING:
            return await self.wait(seconds) is RunState.CANCELLED
        await self.refresh()
        return state is RunState.CANCELLED

    async def retry(self) -> bool:
        """Run a FAILED, CRASHED or CANCELLED run again, as a new series of attempts.

        It is SCHEDULED now, with its task's ``retries`` (when the task is defined on this
        queue; none otherwise). Returns whether it was re-queued (False for a run that is
        not in one of those states).
        """
        task = self._queue.tasks.get(self.task)
        broker = await self._queue.ensure_open()
        record = await broker.requeue(self.id, retries=0 if task is None else task.retries)
        if record is None:
            await self.refresh()
            return False
        # As re-queued: a worker may have claimed it already, and refresh() shows that.
        self._record = record
        return True
