"""Developer sessions: ``nox -s tests lint typecheck bench demo mutation``."""

from __future__ import annotations

import collections
import re

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, every async test on asyncio and trio."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py", "dev.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library and the tests."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks, beside raw anyio baselines; writes benchmarks/RESULTS.md."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The demo: a service tree starting, a crash reported, a graceful stop."""
    session.install("-e", ".[test]")
    session.run("anyservice", "run", "examples.demo:build", *session.posargs)


# What `nox -s mutation` requires of each module: the share of its mutants that the tests
# catch (killed, or made to time out), equivalent mutants being excluded in the source.
MUTATION_SCORE_TARGET = 95.0
_MUTANT_RESULT = re.compile(r"^\s*anyservice\.(?P<module>[\w.]+?)\.x\S*: (?P<status>.+)$")


@nox.session
def mutation(session: nox.Session) -> None:
    """mutmut over the pure modules with their pure tests; fails below the target score.

    The modules and tests are listed in ``[tool.mutmut]`` in pyproject.toml; ``nox -s
    mutation -- <mutant names>`` re-runs some mutants. See docs/testing.md.
    """
    session.install("-e", ".[test]", "mutmut==3.8.1")
    session.run("mutmut", "run", *session.posargs)
    listing = session.run("mutmut", "results", "--all", "true", silent=True)
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in str(listing).splitlines():
        match = _MUTANT_RESULT.match(line)
        if match:
            counts[match["module"]][match["status"]] += 1
    below = []
    for module, by_status in sorted(counts.items()):
        caught = by_status["killed"] + by_status["timeout"]
        total = sum(by_status.values())
        score = 100.0 * caught / total
        details = ", ".join(f"{count} {status}" for status, count in sorted(by_status.items()))
        session.log(f"{module}: {score:.1f}% of {total} mutants caught ({details})")
        if score < MUTATION_SCORE_TARGET:
            below.append(module)
    if not counts:
        session.error("mutmut reported no mutants")
    if below:
        session.error(f"below {MUTATION_SCORE_TARGET}%: {', '.join(below)}")
