"""Where the time goes between a submit and the run's first line, across processes.

Not part of ``run.py``: a trace for finding what to cut, printed as a table.
``python benchmarks/profile_postgres_latency.py [asyncio|trio] [PROBES] [--sqlite|--bare]
[--slowest=N]`` (``--slowest``: the N slowest probes too, each with its long steps).

``--bare``: the floor the broker's way is measured against: the broker's own submit
statement from a sync psycopg connection in this process, and in a worker process one
sync connection that LISTENs and, on each notification, claims the run it names with the
broker's claim by id; no event loop, no thread, no anyservice code on the way. Steps: the
submit's statement answered, the worker's socket readable (from the answer), readable to
the claim answered, and submit to claimed.

``--sqlite``: the same on a fresh SQLite file, the ``taskqueue`` benchmark's latency rows
(probes 2 ms apart). Noted in the submitter: ``delay()`` called, the broker's submit
entered (the task's options and payload encoded), the transaction's statements begun and
committed (INSERT, COMMIT), the datagram sent and ``delay()`` returned; in the worker: its
socket readable, the wait for work returned (the woken task running), the claim entered,
its statements begun and committed, the broker's claim returned, and the body's first line.
Each step is the time between two notes, median and 90th percentile. A run claimed ahead
(as the datagram is read, for the claim loop waiting) has no wait's return, claim call or
claim's return: two rows sum the worker's steps either way (readable to the claim's
transaction, committed to the body's first line).

A PostgreSQL server of its own (Debian's binaries, as the tests start it, ``fsync`` and
``synchronous_commit`` on), one ``serve()`` worker process, and ``await stamp.delay()``
here, one probe at a time, as the ``postgres`` benchmark's latency rows do. Both processes
note wall-clock times at the steps of the way (the broker's methods wrapped, nothing else
changed): the submit's statement, its time in a worker thread if it went through one, the
LISTEN socket turning readable in the worker, the claim (from its statement's sending, if
that came first, as for a claim sent as the notification is read; and its statement's time
in a thread), and the body's first line, which returns the worker's notes. Medians and 90th
percentiles of each step over the probes, in ms. The wrapping costs a few µs per step;
run it on the tree to measure (``PYTHONPATH=src``), before and after a change.
"""

from __future__ import annotations

import functools
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROBES = 300
GAP = 0.02
#: The ``taskqueue`` benchmark's gap between probes.
SQLITE_GAP = 0.002

#: (step, wall-clock time) noted in this process since the last probe.
NOTES: list[tuple[str, float]] = []


def note(step: str) -> None:
    NOTES.append((step, time.time()))


def _timed(method: Callable[..., Any], step: str) -> Callable[..., Any]:
    """``method`` noting ``step.start`` and ``step.end`` around each call."""

    async def timed(*args: Any, **kwargs: Any) -> Any:
        note(f"{step}.start")
        try:
            return await method(*args, **kwargs)
        finally:
            note(f"{step}.end")

    return timed


def instrument(url: str) -> None:
    """Wrap the broker's steps (those this tree has) so that each call notes its times."""
    if url.startswith("sqlite"):
        instrument_sqlite()
        return
    from anyservice.taskqueue.brokers import _postgres as pg

    for owner, name, step in (
        (pg._Connections, "_call", "pooled"),
        (pg._Connections, "_quick", "direct"),
        (pg._Claims, "_claim", "claim"),
        (pg._Claims, "_claim_named", "named"),
        (pg._Claims, "_claim_all", "full"),
    ):
        method = owner.__dict__.get(name)
        if method is not None:
            setattr(owner, name, _timed(method, step))
    in_thread = pg._Connections._in_thread

    def noted_in_thread(self: Any, pool: Any, call: Any, operation: Any) -> Any:
        note("thread.start")
        try:
            return in_thread(self, pool, call, operation)
        finally:
            note("thread.end")

    pg._Connections._in_thread = noted_in_thread  # type: ignore[method-assign]
    from anyservice.taskqueue.brokers import _postgres_direct as direct

    send = direct.DirectConnection.__dict__.get("send")
    if send is not None:  # a claim may go out before the claim call (sent ahead)

        def noted_send(self: Any, *args: Any) -> Any:
            note("send")
            return send(self, *args)

        direct.DirectConnection.send = noted_send  # type: ignore[method-assign]
    wait_readable = anyio.wait_readable

    async def noted_wait_readable(obj: Any) -> None:
        await wait_readable(obj)
        note("readable")

    anyio.wait_readable = noted_wait_readable  # type: ignore[assignment]


def _noted(function: Callable[..., Any], step: str, *, after: bool = False) -> Any:
    """The sync ``function`` noting ``step`` before it runs (or after it returned)."""

    @functools.wraps(function)
    def noted(*args: Any, **kwargs: Any) -> Any:
        if not after:
            note(step)
        try:
            return function(*args, **kwargs)
        finally:
            if after:
                note(step)

    return noted


def instrument_sqlite() -> None:
    """Wrap the SQLite broker's steps, in whichever process this is."""
    from anyservice.taskqueue.brokers import _base, _sqlite, _sqlite_thread, _wake_channel

    broker = _sqlite.SqliteBroker
    for name, step in (("submit", "submit"), ("_claim", "claim"), ("claim", "claimed")):
        setattr(broker, name, _timed(getattr(broker, name), step))
    wait_for_work = _base.BaseBroker.wait_for_work

    async def noted_wait(self: Any, timeout: float) -> None:
        await wait_for_work(self, timeout)
        note("woken")

    broker.wait_for_work = noted_wait  # type: ignore[method-assign]
    transactions = _sqlite_thread._Transactions
    execute = transactions._execute
    transactions._execute = _noted(  # type: ignore[method-assign]
        _noted(execute, "execute.end", after=True), "execute.start"
    )
    channel = _wake_channel.WakeChannel
    channel.poke = _noted(  # type: ignore[method-assign]
        _noted(channel.poke, "poke.end", after=True), "poke.start"
    )
    channel._drain = _noted(channel._drain, "readable")  # type: ignore[method-assign]


#: The SQLite path: (step, whose note it starts from, whose note it ends at), each note
#: named ``side:name`` (``mine``: the submitter's, ``theirs``: the worker's), each the
#: first of its name after the note before it.
SQLITE_PATH = (
    ("delay(): called to the broker's submit (options, encode)", "mine:begun", "mine:submit.start"),
    ("submit: to its transaction's start", "mine:submit.start", "mine:execute.start"),
    ("submit: INSERT + COMMIT", "mine:execute.start", "mine:execute.end"),
    ("submit: committed to the datagram's send", "mine:execute.end", "mine:poke.start"),
    ("submit: the datagram's send", "mine:poke.start", "mine:poke.end"),
    ("submit: sent to delay()'s return", "mine:poke.end", "mine:delay.end"),
    ("datagram: sent to the worker's socket readable", "mine:poke.start", "theirs:readable"),
    ("wake: readable to the woken wait's return", "theirs:readable", "theirs:woken"),
    ("wake: returned to the claim's start", "theirs:woken", "theirs:claim.start"),
    ("claim: to its transaction's start", "theirs:claim.start", "theirs:execute.start"),
    # A claim made ahead, as the datagram is read, has only these steps of the worker's.
    (
        "wake: readable to the claim's transaction (all of the above)",
        "theirs:readable",
        "theirs:execute.start",
    ),
    ("claim: its statements + COMMIT", "theirs:execute.start", "theirs:execute.end"),
    ("claim: committed to the broker's claim returned", "theirs:execute.end", "theirs:claimed.end"),
    ("start: claimed to the body's first line", "theirs:claimed.end", "theirs:started"),
    (
        "start: committed to the body's first line (all of the above)",
        "theirs:execute.end",
        "theirs:started",
    ),
)


def _sqlite_steps(
    begun: float, mine: list[tuple[str, float]], started: float, theirs: list[Any]
) -> dict[str, float]:
    """One probe's steps along :data:`SQLITE_PATH`, in ms (those whose notes were found)."""
    notes = {
        "mine": [("begun", begun), *mine],
        "theirs": [*((name, at) for name, at in theirs), ("started", started)],
    }
    found: dict[str, float] = {"mine:begun": begun}
    steps: dict[str, float] = {"submit to start": (started - begun) * 1e3}
    for label, start, end in SQLITE_PATH:
        side, name = end.split(":")
        after = found.get(start)
        if after is None:
            continue
        if end not in found:
            at = _first(notes[side], name, after)
            if at is None:
                continue
            found[end] = at
        steps[label] = (found[end] - after) * 1e3
    return steps


def define(url: str) -> tuple[Any, Any]:
    import anyservice.taskqueue as taskqueue

    queue = taskqueue.TaskQueue(url)

    @queue.task
    async def stamp() -> list[Any]:
        """The body's first line: its time, and what this process noted since the last."""
        started = time.time()
        notes = list(NOTES)
        NOTES.clear()
        return [started, notes]

    return queue, stamp


def worker_main(url: str, backend: str) -> int:
    import anyservice.taskqueue as taskqueue

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    instrument(url)
    _, stamp = define(url)
    code: int = taskqueue.serve(stamp, backend=backend, limit=10)
    return code


def _first(notes: list[tuple[str, float]], step: str, after: float) -> float | None:
    return next((at for name, at in notes if name == step and at >= after), None)


def _steps(
    begun: float, mine: list[tuple[str, float]], started: float, theirs: list[Any]
) -> dict[str, float]:
    """One probe's steps, in ms."""
    steps: dict[str, float] = {"submit to start": started - begun}
    notes = [(name, at) for name, at in theirs]
    sent = _first(mine, "direct.end", begun) or _first(mine, "pooled.end", begun)
    assert sent is not None
    steps["submit: delay() to its statement answered"] = sent - begun
    thread_start, thread_end = (
        _first(mine, "thread.start", begun),
        _first(mine, "thread.end", begun),
    )
    if thread_start is not None and thread_end is not None:
        steps["  submit: of which in a worker thread"] = thread_end - thread_start
    readable = _first(notes, "readable", begun)
    claim_start = _first(notes, "claim.start", readable or begun)
    ahead = _first(notes, "send", readable or begun)
    if claim_start is not None and ahead is not None and ahead < claim_start:
        claim_start = ahead  # sent ahead, as the notification was read
    claim_end = _first(notes, "claim.end", claim_start or begun)
    if readable is None or claim_start is None or claim_end is None:
        return {name: value * 1e3 for name, value in steps.items()}
    steps["notification: answered to the worker's socket readable"] = readable - sent
    steps["wake: readable to the claim's start"] = claim_start - readable
    steps["claim"] = claim_end - claim_start
    for kind in ("named", "full"):
        at = _first(notes, f"{kind}.start", claim_start)
        end = _first(notes, f"{kind}.end", claim_start)
        if at is not None and end is not None and end <= claim_end:
            steps[f"  {kind} claims"] = end - at
    thread_start = _first(notes, "thread.start", claim_start)
    thread_end = _first(notes, "thread.end", claim_start)
    if thread_start is not None and thread_end is not None and thread_end <= claim_end:
        steps["  claim: of which in a worker thread"] = thread_end - thread_start
    steps["start: claimed to the body's first line"] = started - claim_end
    return {name: value * 1e3 for name, value in steps.items()}


async def trace(url: str, backend: str, probes: int) -> list[dict[str, float]]:
    instrument(url)
    sqlite = url.startswith("sqlite")
    queue, stamp = define(url)
    traced = []
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "worker.log"
        with log.open("wb") as output:
            command = [sys.executable, __file__, "--worker", url, backend]
            process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            async with queue:
                with anyio.fail_after(60):
                    while "] started" not in await anyio.Path(log).read_text():  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                await anyio.sleep(1.0)
                for _ in range(probes):
                    NOTES.clear()
                    begun = time.time()
                    run = await stamp.delay()
                    note("delay.end")
                    mine = list(NOTES)
                    started, theirs = await run.result(timeout=30)
                    steps = _sqlite_steps if sqlite else _steps
                    traced.append(steps(begun, mine, started, theirs))
                    await anyio.sleep(SQLITE_GAP if sqlite else GAP)
        finally:
            process.kill()
            await process.wait()
    return traced


def report(backend: str, traced: list[dict[str, float]]) -> None:
    print(f"{backend}: {len(traced)} probes, ms      median      p90   probes")
    names: list[str] = []
    for steps in traced:
        names.extend(name for name in steps if name not in names)
    for name in names:
        values = sorted(steps[name] for steps in traced if name in steps)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"  {name:56} {statistics.median(values):7.3f} {p90:8.3f} {len(values):6}")


def _bare_statements(url: str) -> tuple[Any, Any, Any, str, str]:
    """The broker's own submit and claim-by-id statements, its conninfo and its channel."""
    from psycopg import sql

    from anyservice.taskqueue.brokers import _postgres as pg

    broker = pg.PostgresBroker(url)
    return (
        broker._compose(pg._INSERT_ONE),
        broker._compose(pg._CLAIM_NAMED),
        sql.SQL("LISTEN {}").format(sql.Identifier(broker._channel)),
        broker._conninfo,
        broker._channel,
    )


def bare_worker_main(url: str) -> int:
    """The floor's worker: one sync connection, LISTEN, then the claim by id of each run
    named, no event loop; prints ``id readable claimed`` (wall-clock) per run."""
    import select

    import psycopg

    _, claim, listen, conninfo, _ = _bare_statements(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(listen)
        pgconn = conn.pgconn
        print("ready", flush=True)
        while True:
            select.select([pgconn.socket], [], [])
            readable = time.time()
            pgconn.consume_input()
            ids = []
            while (notify := pgconn.notifies()) is not None:
                payload = notify.extra.decode()
                if payload.startswith("w "):
                    ids.append(payload[2:])
            if not ids:
                continue
            now = time.time()
            parameters = {
                "ids": ids,
                "now": now,
                "tasks": ["stamp"],
                "owner": "bare",
                "expires": now + 30,
            }
            rows = conn.execute(claim, parameters, prepare=True).fetchall()
            claimed = time.time()
            for _ in rows:
                print(ids[0], readable, claimed, flush=True)


def bare(url: str, probes: int) -> list[dict[str, float]]:
    """The floor: the broker's submit statement from a sync psycopg connection here, the
    claim by id in a bare worker process (:func:`bare_worker_main`)."""
    import uuid

    import psycopg

    from anyservice.taskqueue import TaskQueue

    async def create() -> None:
        async with TaskQueue(url):
            pass

    anyio.run(create)
    insert, _, _, conninfo, channel = _bare_statements(url)
    command = [sys.executable, __file__, "--bare-worker", url]
    traced = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        assert worker.stdout is not None
        try:
            assert worker.stdout.readline().strip() == "ready"
            with psycopg.connect(conninfo, autocommit=True) as conn:
                for _ in range(probes):
                    run_id = uuid.uuid4().hex
                    now = time.time()
                    parameters = {
                        "id": run_id,
                        "task": "stamp",
                        "payload": "[[], {}]",
                        "state": "SCHEDULED",
                        "attempts": 0,
                        "max_attempts": 1,
                        "retries_left": 0,
                        "retry_delay": 0.0,
                        "timeout": None,
                        "created_at": now,
                        "scheduled_at": now,
                        "priority": 0,
                        "trace_context": None,
                        "channel": channel,
                        "notice": f"w {run_id}",
                    }
                    begun = time.time()
                    conn.execute(insert, parameters, prepare=True)
                    answered = time.time()
                    claimed_id, readable, claimed = worker.stdout.readline().split()
                    assert claimed_id == run_id
                    traced.append(
                        {
                            "submit to claimed": (float(claimed) - begun) * 1e3,
                            "submit: statement answered": (answered - begun) * 1e3,
                            "notification: answered to readable": (float(readable) - answered)
                            * 1e3,
                            "claim: readable to claimed": (float(claimed) - float(readable)) * 1e3,
                        }
                    )
                    time.sleep(GAP)
        finally:
            worker.kill()
    return traced


def report_slowest(traced: list[dict[str, float]], count: int) -> None:
    """The ``count`` slowest probes, each with its steps of 0.25 ms or more."""
    print(f"the {count} slowest probes (ms), and their steps of 0.25 ms or more:")
    for steps in sorted(traced, key=lambda steps: -steps["submit to start"])[:count]:
        slow = [f"{name} {value:.2f}" for name, value in steps.items() if value >= 0.25]
        print(f"  {steps['submit to start']:6.2f}: " + "; ".join(slow[1:]))


def main() -> None:
    from tests._postgres import postgres_schema, postgres_server

    if "--bare" in sys.argv[1:]:
        probes = next((int(arg) for arg in sys.argv[1:] if arg.isdigit()), PROBES)
        with postgres_server(durable=True) as server, postgres_schema(server) as url:
            report("bare psycopg", bare(url, probes))
        return
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    backend = next((arg for arg in args if not arg.isdigit()), "asyncio")
    probes = next((int(arg) for arg in args if arg.isdigit()), PROBES)
    slowest = next(
        (int(arg.split("=", 1)[1]) for arg in sys.argv[1:] if arg.startswith("--slowest=")), 0
    )
    if "--sqlite" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite:///{Path(directory) / 'runs.db'}"
            traced = anyio.run(functools.partial(trace, url, backend, probes), backend=backend)
    else:
        with postgres_server(durable=True) as server, postgres_schema(server) as url:
            traced = anyio.run(functools.partial(trace, url, backend, probes), backend=backend)
    report(backend, traced)
    if slowest:
        report_slowest(traced, slowest)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-worker":
        sys.exit(bare_worker_main(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    main()
