"""Run the anyservice benchmarks and regenerate ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/run.py                 # every benchmark, full run
    python benchmarks/run.py --quick         # fewer repeats and ticks (about a minute)
    python benchmarks/run.py service         # only the named benchmarks
    python benchmarks/run.py --list

A benchmark is a module ``benchmarks/bench_<name>.py`` with ``NAME``, ``TITLE`` and
``run(config: Config) -> list[Table]``. Sections of RESULTS.md for benchmarks that are not
re-run are kept as they were.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script this is already so; imported, it is not
    sys.path.insert(0, str(HERE))

from _harness import BACKENDS, RESULTS_PATH, Config, render_section, write_results  # noqa: E402


def discover() -> dict[str, ModuleType]:
    """The benchmark modules by ``NAME``, in file-name order."""
    modules: dict[str, ModuleType] = {}
    for path in sorted(HERE.glob("bench_*.py")):
        module = importlib.import_module(path.stem)
        for attribute in ("NAME", "TITLE", "run"):
            if not hasattr(module, attribute):
                raise SystemExit(f"{path.name} has no {attribute}")
        modules[module.NAME] = module
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and ticks")
    parser.add_argument(
        "--baselines-only",
        action="store_true",
        help="measure only the raw anyio baselines (checks the harness without the library)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="run on this backend only (repeatable; default: both)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--no-write", action="store_true", help=f"do not update {RESULTS_PATH.name}"
    )
    args = parser.parse_args(argv)

    modules = discover()
    if args.list:
        for name, module in modules.items():
            print(f"{name:12} {module.TITLE}")
        return 0
    unknown = [name for name in args.names if name not in modules]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(modules)}")
    selected = args.names or list(modules)
    config = Config(
        quick=args.quick,
        baselines_only=args.baselines_only,
        backends=tuple(args.backend) if args.backend else BACKENDS,
    )

    started = time.perf_counter()
    sections: dict[str, str] = {}
    for name in selected:
        module = modules[name]
        print(f"\n=== {name}: {module.TITLE}", flush=True)
        module_started = time.perf_counter()
        tables = module.run(config)
        elapsed = time.perf_counter() - module_started
        for table in tables:
            if table.notes:
                print(f"\n{table.title}")
                table.print_notes()
        print(f"\n=== {name} done in {elapsed:.0f} s", flush=True)
        sections[name] = render_section(module.TITLE, config, elapsed, tables)
        # Written after each module, so an interrupted run keeps what it measured.
        if not args.no_write:
            write_results(sections, order=list(modules))
    print(f"\nAll done in {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_write:
        print(f"Wrote {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
