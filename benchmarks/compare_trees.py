"""Run the same benchmark scripts against two source trees, alternately, and compare ratios.

Usage::

    python benchmarks/compare_trees.py measure --scripts OLD/benchmarks \\
        --tree old=OLD/src --tree new=NEW/src --rounds 5 --quick --out /tmp/cmp
    python benchmarks/compare_trees.py report --out /tmp/cmp

``measure`` runs, in each round, every named benchmark module of ``--scripts`` once per tree
(the order of the trees alternating from round to round: old new, new old, ...), each run
in a child process whose ``PYTHONPATH`` puts that tree's ``src`` first, so the benchmark
definitions are the same for both and only the library differs. Each child writes its
tables as JSON into ``--out`` as soon as it finishes, so an interrupted measurement keeps
its finished rounds. ``report`` reads them back and prints, for every ratio a table
reports (anyservice against its baseline measured in the same run), the median over the
rounds per tree, their quotient and whether the rounds' ranges overlap.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_NAMES = ("service", "timers", "supervisor", "taskqueue")

#: Columns that name a row rather than measure it.
KEY_COLUMNS = {
    "backend",
    "services",
    "case",
    "until",
    "anyservice logging",
    "workers",
    "limit",
    "worker",
    "interval x ticks",
    "body",
    "loop",
    "owner",
}
#: Rows that measure no anyservice code (trio-util's ``periodic`` against the baseline loop).
CONTROL = "trio-util"
_UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}


# --- the child: one tree, one benchmark module ------------------------------------------


def child(scripts: Path, name: str, quick: bool, submit_rate: float | None, out: Path) -> None:
    """Run benchmark ``name`` from ``scripts`` and write its tables to ``out`` as JSON."""
    sys.path.insert(0, str(scripts))
    harness = importlib.import_module("_harness")
    module = importlib.import_module(f"bench_{name}")
    if name == "taskqueue" and submit_rate is not None:
        _slow_submissions(module, submit_rate)
    import anyservice

    started = time.perf_counter()
    tables = module.run(harness.Config(quick=quick))
    record = {
        "name": name,
        "library": anyservice.__file__,
        "elapsed": time.perf_counter() - started,
        "tables": [
            {"title": table.title, "columns": list(table.columns), "rows": table.rows}
            for table in tables
        ],
    }
    out.write_text(json.dumps(record, indent=1), encoding="utf-8")


def _slow_submissions(module: Any, submit_rate: float) -> None:
    """Give the throughput runs ``1 / submit_rate`` s each to be submitted before t0.

    A fixed window (2 000 runs/s) fails on a loaded machine with "submitting took longer
    than planned"; this tree's ``bench_taskqueue.throughput`` takes the rate as a parameter
    and otherwise measures the same thing (one submitter, a fresh SQLite file per sample).
    """
    spec = importlib.util.spec_from_file_location(
        "bench_taskqueue_rate", HERE / "bench_taskqueue.py"
    )
    assert spec is not None
    assert spec.loader is not None
    current = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(current)

    def throughput(config: Any, processes: int, limit: int) -> Any:
        return current.throughput(config, processes, limit, submit_rate=submit_rate)

    module.throughput = throughput


# --- the parent: alternate the trees ----------------------------------------------------


def measure(args: argparse.Namespace) -> None:
    trees = [tree.split("=", 1) for tree in args.tree]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.first_round, args.first_round + args.rounds):
        for name in args.names or DEFAULT_NAMES:
            order = trees if round_ % 2 == 0 else trees[::-1]
            for label, src in order:
                target = out / f"{name}-{label}-{round_}.json"
                command = [sys.executable, __file__, "child", str(args.scripts), name, str(target)]
                if args.quick:
                    command.append("--quick")
                if args.submit_rate is not None:
                    command += ["--submit-rate", str(args.submit_rate)]
                env = {**os.environ, "PYTHONPATH": src}
                stamp = time.strftime("%H:%M:%S")
                print(f"{stamp} round {round_} {name} {label}", flush=True)
                log = out / f"{name}-{label}-{round_}.log"
                with open(log, "wb") as output:
                    subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT)
                if target.exists():
                    library = json.loads(target.read_text(encoding="utf-8"))["library"]
                    print(f"    imported {library}", flush=True)
                    if not library.startswith(str(Path(src).resolve())):
                        raise SystemExit(f"{label}: imported {library}, not from {src}")
                else:
                    print(f"    failed: see {log}", flush=True)


# --- a profile of one sample ------------------------------------------------------------


def profile(args: argparse.Namespace) -> None:
    """Run one anyservice sample of a benchmark module under cProfile and print the top.

    ``--sample`` is an expression over the module's names and ``config`` that gives the
    sample builder, e.g. ``supervisor_restarts(config, 50, False)``. The count of function
    calls does not depend on the machine's load: compare it between trees.
    """
    import cProfile
    import pstats

    sys.path.insert(0, str(args.scripts))
    harness = importlib.import_module("_harness")
    module = importlib.import_module(f"bench_{args.name}")
    config = harness.Config(quick=True)
    namespace = {**vars(module), "config": config}
    sample = eval(args.sample, namespace)()  # a command-line expression, by design
    harness.run_once(args.backend, sample)  # warm-up: imports, caches
    profiler = cProfile.Profile()
    profiler.enable()
    metrics = harness.run_once(args.backend, sample)
    profiler.disable()
    import anyservice

    print(f"library {anyservice.__file__}; metrics {metrics}")
    stats = pstats.Stats(profiler).strip_dirs().sort_stats(args.sort)
    print(f"{stats.total_calls} function calls")  # type: ignore[attr-defined]
    stats.print_stats(args.top)
    if args.dump is not None:
        stats.dump_stats(args.dump)


# --- the report ---------------------------------------------------------------------------


def parse_value(cell: str) -> float | None:
    """``"2.09x"`` -> 2.09, ``"7.33 ms"`` -> 0.00733, anything else -> None."""
    match = re.fullmatch(r"([0-9.]+)x", cell)
    if match:
        return float(match[1])
    match = re.fullmatch(r"([0-9.]+) (s|ms|µs|ns)", cell)
    if match:
        return float(match[1]) * _UNITS[match[2]]
    return None


def ratios(table: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(row key, ratio name) -> ratio, for one table of one run.

    The table's own ratio columns; a latency table without one gets p50 / baseline p50 and
    p99 / baseline p99 computed from its cells.
    """
    columns: list[str] = table["columns"]
    found: dict[tuple[str, str], float] = {}
    for row in table["rows"]:
        cells = dict(zip(columns, row, strict=True))
        key = " · ".join(cells[c] for c in columns if c in KEY_COLUMNS)
        for column, cell in cells.items():
            if "ratio" in column and (value := parse_value(cell)) is not None:
                found[key, column] = value
        for quantile in ("p50", "p99"):
            if quantile in cells and f"baseline {quantile}" in cells:
                subject = parse_value(cells[quantile])
                base = parse_value(cells[f"baseline {quantile}"])
                if subject is not None and base:
                    found[key, f"{quantile} / baseline {quantile}"] = subject / base
    return found


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    # (name, title, key, ratio) -> tree -> values over rounds
    figures: dict[tuple[str, str, str, str], dict[str, list[float]]] = {}
    errors: dict[tuple[str, str, str], dict[str, int]] = {}
    for path in sorted(out.glob("*.json")):
        name, label, _ = path.stem.rsplit("-", 2)
        record = json.loads(path.read_text(encoding="utf-8"))
        for table in record["tables"]:
            for (key, column), value in ratios(table).items():
                slot = figures.setdefault((name, table["title"], key, column), {})
                slot.setdefault(label, []).append(value)
            for row in table["rows"]:
                if any(cell.startswith("error:") for cell in row):
                    key = " · ".join(
                        cell
                        for cell, c in zip(row, table["columns"], strict=True)
                        if c in KEY_COLUMNS
                    )
                    count = errors.setdefault((name, table["title"], key), {})
                    count[label] = count.get(label, 0) + 1
    old, new = args.old, args.new
    title = None
    for (name, table_title, key, column), by_tree in figures.items():
        if (name, table_title) != title:
            title = (name, table_title)
            print(f"\n#### `{name}`: {table_title}\n")
            print(f"| row | ratio | {old} | {new} | {new} / {old} | rounds | verdict |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
        before, after = by_tree.get(old, []), by_tree.get(new, [])
        if not before or not after:
            continue
        quotient = median(after) / median(before)
        overlap = min(after) <= max(before) and min(before) <= max(after)
        verdict = "within noise" if overlap else "**slower**" if quotient > 1 else "faster"
        if CONTROL in key:
            # No anyservice in it: the same figure on both trees shows the noise alone.
            verdict = f"control: {verdict}"
        print(
            f"| {key} | {column} | {median(before):.2f}x ({min(before):.2f}-{max(before):.2f}) "
            f"| {median(after):.2f}x ({min(after):.2f}-{max(after):.2f}) | {quotient:.2f} "
            f"| {len(before)}/{len(after)} | {verdict} |"
        )
    for (name, table_title, key), count in errors.items():
        failed = ", ".join(f"{label} {n}" for label, n in sorted(count.items()))
        print(f"- samples that failed: {name} / {table_title} / {key}: {failed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="run the benchmarks, alternating the trees")
    run.add_argument("names", nargs="*", help=f"benchmarks (default: {' '.join(DEFAULT_NAMES)})")
    run.add_argument("--scripts", type=Path, default=HERE, help="the benchmarks/ to run")
    run.add_argument("--tree", action="append", required=True, help="LABEL=SRC, twice")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--first-round", type=int, default=0, help="to add rounds to --out")
    run.add_argument("--quick", action="store_true")
    run.add_argument("--submit-rate", type=float, help="taskqueue: runs/s submitted before t0")
    run.add_argument("--out", required=True, help="directory for the JSON of each run")
    show = commands.add_parser("report", help="compare the measured ratios")
    show.add_argument("--out", required=True)
    show.add_argument("--old", default="old")
    show.add_argument("--new", default="new")
    prof = commands.add_parser("profile", help="one sample under cProfile, against one tree")
    prof.add_argument("name")
    prof.add_argument("--scripts", type=Path, default=HERE)
    prof.add_argument("--sample", required=True, help="expression giving the sample builder")
    prof.add_argument("--backend", default="asyncio")
    prof.add_argument("--sort", default="tottime")
    prof.add_argument("--top", type=int, default=25)
    prof.add_argument("--dump", type=Path, help="also save the stats (pstats format) here")
    one = commands.add_parser("child", help="(internal) one benchmark against one tree")
    one.add_argument("scripts", type=Path)
    one.add_argument("name")
    one.add_argument("target", type=Path)
    one.add_argument("--quick", action="store_true")
    one.add_argument("--submit-rate", type=float)
    args = parser.parse_args(argv)
    if args.command == "measure":
        measure(args)
    elif args.command == "report":
        report(args)
    elif args.command == "profile":
        profile(args)
    else:
        child(args.scripts, args.name, args.quick, args.submit_rate, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
