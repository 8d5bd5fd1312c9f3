"""What a concurrency limit costs a claim, on SQLite and PostgreSQL, beside the bare claim.

One claimer takes no-op runs in batches of ``BATCH`` through the broker API (no worker
around it), completing each batch before its next claim, until every run is COMPLETED; the
figure is the time spent in the claims, per claimed run. Once with
``claim(..., concurrency={"noop": CAP})`` and once with the same claim without a limit,
alternating, each sample on a fresh database holding the same runs. ``CAP`` is far above
the batch, so the limit never holds a run back: the difference is what counting the
task's RUNNING runs costs (and on PostgreSQL the advisory lock and the transaction around
the claim statement). Without PostgreSQL binaries only the SQLite rows are measured.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from _harness import (
    Config,
    Metrics,
    SampleFunction,
    Table,
    compare,
    comparison_cells,
    fmt_count,
    fmt_time,
    now,
    require,
)
from bench_taskqueue import sqlite_database

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests._postgres import (  # noqa: E402 - the test helper lives beside the benchmarks
    MissingPostgres,
    find_binaries,
    postgres_schema,
    postgres_server,
)

NAME = "claims"
TITLE = "Claims: a concurrency limit's cost per claimed run, beside the claim without one"

BATCH = 10
CAP = 1_000
RATIO_TARGET = 1.5
Database = Callable[[], AbstractContextManager[str]]


def runs_for(config: Config) -> int:
    return 500 if config.quick else 2_000


@functools.cache
def _library() -> Any:
    from anyservice.taskqueue import brokers

    return brokers


def claims(database: Database, runs: int, concurrency: dict[str, int] | None) -> SampleFunction:
    """Claim ``runs`` stored runs, ``BATCH`` a claim, completing each batch before the next
    claim (not timed); claim time per run."""

    async def sample() -> Metrics:
        brokers = _library()
        with database() as url:
            async with brokers.broker_from_url(url) as broker:
                await broker.submit_many("noop", ['{"args":[],"kwargs":{}}'] * runs)
                done = 0
                claiming = 0.0
                while done < runs:
                    started = now()
                    batch = await broker.claim(
                        "bench", ["noop"], limit=BATCH, lease_seconds=30, concurrency=concurrency
                    )
                    claiming += now() - started
                    for run in batch:
                        await broker.complete("bench", run.id, run.attempts, "null")
                    done += len(batch)
        return {"run": claiming / runs}

    return sample


def limited(config: Config, database: Database, runs: int) -> Callable[[], SampleFunction]:
    def build() -> SampleFunction:
        require(_library, config)
        return claims(database, runs, {"noop": CAP})

    return build


@contextmanager
def _databases() -> Iterator[list[tuple[str, Database]]]:
    """The brokers to measure: SQLite, and PostgreSQL when a server can be started."""
    found: list[tuple[str, Database]] = [("SQLite", sqlite_database)]
    with ExitStack() as stack:
        try:
            binaries = find_binaries()
        except MissingPostgres as exc:
            print(f"claims: PostgreSQL rows skipped, no server to start: {exc}", flush=True)
        else:
            # fsync off: with it, each claim's commit waits for the disk, and the wait
            # hides what the claim itself does.
            server = stack.enter_context(postgres_server(binaries, durable=False))
            found.append(("PostgreSQL", functools.partial(postgres_schema, server)))
        yield found


def run(config: Config) -> list[Table]:
    runs = runs_for(config)
    repeats = config.repeats(full=5, quick=2)
    table = Table(
        f"Claim time per run, {fmt_count(runs)} runs, {BATCH} a claim: with a concurrency "
        f"limit ({CAP}, never reached) vs without",
        ["backend", "broker", "with a limit", "without", "ratio", "target", "met?"],
    )
    with _databases() as databases:
        for backend in config.backends:
            for label, database in databases:
                subject, baseline = compare(
                    backend,
                    limited(config, database, runs),
                    claims(database, runs, None),
                    repeats=repeats,
                    timeout=300,
                )
                cells = comparison_cells(
                    subject, baseline, "run", fmt=fmt_time, target=RATIO_TARGET
                )
                table.add_row(backend, label, *cells)
    table.notes += [
        f"Medians of {repeats} runs after one discarded warm-up pair, alternating; each "
        "sample on a fresh SQLite file or PostgreSQL schema holding the runs, submitted "
        "before the clock starts. One claimer; only the claim calls are timed (each batch is "
        "completed, untimed, before the next claim).",
        "SQLite: the count is one more read of the RUNNING runs' lease index inside the "
        "claim's write transaction, and the limited task's due runs are read by a query of "
        "their own. PostgreSQL (`fsync=off`, `synchronous_commit=off`, so that the commit's "
        "disk wait does not hide the statements): the claim of a limited task is a "
        "transaction of two statements, a transaction-level advisory lock then the claim, "
        "instead of one autocommit statement.",
    ]
    return [table]
