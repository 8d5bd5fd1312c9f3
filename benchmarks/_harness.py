"""Timing, statistics and reporting shared by the benchmark modules.

Every figure is a median over repeated runs, each run in a fresh ``anyio.run`` so that no
state leaks from one repeat into the next, with a full ``gc.collect()`` before it. The
anyservice side and its raw-anyio baseline are measured alternately (A B, B A, A B, ...) so
that slow phases of a shared, noisy machine hit both sides alike, and the first pair is a
warm-up that is thrown away. The garbage collector stays enabled while timing: collections
triggered by allocating services or tasks are part of what a user pays.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import sys
import time
import traceback
import tracemalloc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import anyio

BACKENDS: tuple[str, ...] = ("asyncio", "trio")
RESULTS_PATH = Path(__file__).with_name("RESULTS.md")

#: What one run of a sample function returns: metric name -> value.
Metrics = dict[str, float]
SampleFunction = Callable[[], Awaitable[Metrics]]
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """How a benchmark module should run: passed to every module's ``run()``."""

    quick: bool = False
    #: Measure only the raw anyio baselines (to check the harness without the library).
    baselines_only: bool = False
    backends: tuple[str, ...] = BACKENDS

    def repeats(self, full: int = 7, quick: int = 3) -> int:
        return quick if self.quick else full


class Unavailable(Exception):
    """The anyservice side of a benchmark cannot run (module or name missing)."""


def require(import_: Callable[[], Any], config: Config) -> Any:
    """Call ``import_`` (a lazy import of library names) or raise :class:`Unavailable`."""
    if config.baselines_only:
        raise Unavailable("--baselines-only")
    try:
        return import_()
    except ImportError as exc:
        raise Unavailable(str(exc)) from None


# --- statistics --------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100), by linear interpolation between closest ranks.

    This is numpy's default ("linear") method and ``statistics.quantiles(method="inclusive")``:
    the sorted values sit at positions 0 .. n-1 and percentile q is read at position
    ``(n - 1) * q / 100``. ``percentile(xs, 50)`` is the median.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def ratio(subject: float, baseline: float, floor: float = 0.0) -> float:
    """``subject / baseline``, each raised to at least ``floor`` first (for tiny, noisy values)."""
    denominator = max(baseline, floor)
    if denominator <= 0:
        return math.inf if max(subject, floor) > 0 else 1.0
    return max(subject, floor) / denominator


# --- running samples -----------------------------------------------------------------------


async def _run_sample(sample: Callable[[], Awaitable[T]], timeout: float) -> T:
    with anyio.fail_after(timeout):
        return await sample()


def run_once(backend: str, sample: Callable[[], Awaitable[T]], timeout: float = 120.0) -> T:
    """Run ``sample`` in a fresh event loop of ``backend``, after a full garbage collection."""
    gc.collect()
    return anyio.run(_run_sample, sample, timeout, backend=backend)


@dataclass
class Side:
    """The measurements of one side (anyservice or baseline) of a comparison."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    #: Why there are no figures: ``"skipped: ..."`` or ``"error: ..."``; None when measured.
    problem: str | None = None

    def add(self, metrics: Metrics) -> None:
        for name, value in metrics.items():
            self.samples.setdefault(name, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        return median(values) if values and self.problem is None else None


def compare(
    backend: str,
    subject: Callable[[], SampleFunction],
    baseline: SampleFunction,
    *,
    repeats: int,
    warmup: int = 1,
    timeout: float = 120.0,
) -> tuple[Side, Side]:
    """Measure ``subject()`` and ``baseline`` alternately on ``backend``; warm-up discarded.

    ``subject`` is called once to build the anyservice sample function, so that it can
    import the library lazily: if it raises :class:`Unavailable` the subject side is
    ``skipped``, and if a run raises, the subject side reports the error (the traceback goes
    to stderr) while the baseline is still measured. An error in a baseline propagates: it
    is a bug in the benchmark.
    """
    subject_side, baseline_side = Side(), Side()
    subject_sample: SampleFunction | None
    try:
        subject_sample = subject()
    except Unavailable as exc:
        subject_side.problem = f"skipped: {exc}"
        subject_sample = None

    def measure_subject(keep: bool) -> None:
        if subject_sample is None or subject_side.problem is not None:
            return
        try:
            metrics = run_once(backend, subject_sample, timeout)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            subject_side.problem = f"error: {describe(exc)}"
            return
        if keep:
            subject_side.add(metrics)

    for index in range(warmup + repeats):
        keep = index >= warmup
        # Alternate which side goes first, so neither always runs on a warmer machine.
        if index % 2 == 0:
            measure_subject(keep)
        metrics = run_once(backend, baseline, timeout)
        if keep:
            baseline_side.add(metrics)
        if index % 2 == 1:
            measure_subject(keep)
    return subject_side, baseline_side


def describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` that looks inside exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    return " ".join(text.split())[:160]


class Countdown:
    """An event that fires once ``count`` tasks have called :meth:`arrive` (at once if 0)."""

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.event = anyio.Event()
        if count <= 0:
            self.event.set()

    def arrive(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class HeldMemory:
    """Bytes allocated inside the ``with`` block and still alive, by ``tracemalloc``.

    Only allocations made after entering are traced, so :meth:`held` counts what the code
    under test allocated and still holds; a ``gc.collect()`` first drops collectable garbage.
    tracemalloc slows allocation down a lot: never time code inside this block.
    """

    def __enter__(self) -> HeldMemory:
        gc.collect()
        tracemalloc.start()
        self._start = tracemalloc.get_traced_memory()[0]
        return self

    def held(self) -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - self._start

    def __exit__(self, *exc_info: object) -> None:
        tracemalloc.stop()


now = time.perf_counter


# --- formatting --------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    """A duration with a unit chosen for it and three significant digits."""
    if seconds is None:
        return "—"
    magnitude = abs(seconds)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if magnitude >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(size: float | None) -> str:
    if size is None:
        return "—"
    if abs(size) >= 1024 * 1024:
        return f"{size / (1024 * 1024):.3g} MiB"
    if abs(size) >= 1024:
        return f"{size / 1024:.3g} KiB"
    return f"{size:.0f} B"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}x"


def fmt_count(count: int) -> str:
    return f"{count:,}".replace(",", " ")


def verdict(met: bool | None) -> str:
    if met is None:
        return "—"
    return "yes" if met else "**no**"


def comparison_cells(
    subject: Side,
    baseline: Side,
    metric: str,
    *,
    fmt: Callable[[float | None], str],
    target: float | None,
    floor: float = 0.0,
) -> list[str]:
    """``anyservice median | baseline median | ratio | target | met?`` for one metric."""
    base = baseline.median(metric)
    assert base is not None, f"baseline has no {metric!r} figures"
    target_cell = f"<= {target:g}x" if target is not None else "—"
    if subject.problem is not None:
        return [subject.problem, fmt(base), "—", target_cell, "—"]
    value = subject.median(metric)
    assert value is not None, f"subject has no {metric!r} figures"
    value_ratio = ratio(value, base, floor)
    met = value_ratio <= target if target is not None else None
    return [fmt(value), fmt(base), fmt_ratio(value_ratio), target_cell, verdict(met)]


# --- tables and the results file ---------------------------------------------------------


@dataclass
class Table:
    """One results table; rows are printed to stdout as they are added."""

    title: str
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _printed_header: bool = field(default=False, repr=False)

    def add_row(self, *cells: object) -> None:
        row = [str(cell) for cell in cells]
        if len(row) != len(self.columns):
            raise ValueError(f"{self.title}: {len(row)} cells for {len(self.columns)} columns")
        if not self._printed_header:
            print(f"\n{self.title}", flush=True)
            print(_live_line(self.columns), flush=True)
            self._printed_header = True
        self.rows.append(row)
        print(_live_line(row), flush=True)

    def print_notes(self) -> None:
        for note in self.notes:
            print(f"  note: {note}", flush=True)

    def to_markdown(self) -> str:
        widths = [
            max(len(cell) for cell in [column, *(row[i] for row in self.rows)])
            for i, column in enumerate(self.columns)
        ]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        parts = [f"### {self.title}", "", line(self.columns)]
        parts.append("| " + " | ".join("-" * w for w in widths) + " |")
        parts.extend(line(row) for row in self.rows)
        if self.notes:
            parts.append("")
            parts.extend(f"- {note}" for note in self.notes)
        return "\n".join(parts)


def _live_line(cells: Sequence[str]) -> str:
    return "  " + " | ".join(cell.ljust(14) for cell in cells)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("anyio", "trio", "trio-util", "anyservice"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return str(total)
    return str(total) if usable == total else f"{usable} usable of {total}"


def environment_line(config: Config, elapsed: float) -> str:
    found = versions()
    mode = "quick run" if config.quick else "full run"
    if config.baselines_only:
        mode += ", baselines only"
    if config.backends != BACKENDS:
        mode += f", {' and '.join(config.backends)} only"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"_Measured {stamp} ({mode}, {elapsed:.0f} s) on Python {found['python']}, "
        f"anyio {found['anyio']}, trio {found['trio']}, {cores()} cores._"
    )


def render_section(title: str, config: Config, elapsed: float, tables: Sequence[Table]) -> str:
    parts = [f"## {title}", "", environment_line(config, elapsed)]
    parts.extend(f"\n{table.to_markdown()}" for table in tables)
    return "\n".join(parts)


_SECTION = re.compile(
    r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)\n<!-- /bench:(?P=name) -->", re.S
)


def read_sections(path: Path = RESULTS_PATH) -> dict[str, str]:
    if not path.exists():
        return {}
    return {m["name"]: m["body"] for m in _SECTION.finditer(path.read_text(encoding="utf-8"))}


def write_results(
    new_sections: dict[str, str], order: Sequence[str], path: Path = RESULTS_PATH
) -> None:
    """(Re)generate ``path``: new sections replace old ones, sections not re-run are kept.

    Sections appear in ``order`` (the discovered benchmark names); a section whose module no
    longer exists is dropped.
    """
    sections = read_sections(path)
    sections.update(new_sections)
    found = versions()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# Benchmark results",
        "",
        "<!-- Generated by `python benchmarks/run.py`; edits are overwritten. -->",
        "",
        f"- Generated: {stamp} (sections re-run: {', '.join(new_sections) or 'none'})",
        f"- Python {found['python']} ({platform.python_implementation()}), "
        f"anyio {found['anyio']}, trio {found['trio']}, trio-util {found['trio-util']}, "
        f"anyservice {found['anyservice']}",
        f"- Machine: {platform.machine()} {platform.system()}, {cores()} cores",
        "- Figures are medians of repeated runs; ratios are anyservice / raw-anyio baseline, "
        "measured alternately in the same run. Each section says when it was measured.",
        "- Before and after the restructuring of the core and the task queue (old and new "
        "library on the same scripts, alternately): [README.md](README.md"
        "#before-and-after-the-restructuring).",
    ]
    body = [
        f"<!-- bench:{name} -->\n{sections[name]}\n<!-- /bench:{name} -->"
        for name in order
        if name in sections
    ]
    path.write_text("\n".join(header) + "\n\n" + "\n\n".join(body) + "\n", encoding="utf-8")
