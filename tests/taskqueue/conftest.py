"""A real PostgreSQL server for the task-run tests that use one, started once per session.

Only tests that ask for ``postgres_url`` (directly or through a parametrised broker URL)
start it. Without the server binaries they skip with one reason; in CI (``CI`` set) that is
a failure instead, so a CI run can never pass with the PostgreSQL broker untested.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._postgres import MissingPostgres, find_binaries, postgres_schema, postgres_server


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run the PostgreSQL tests, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL server, stopped at the end of the session."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        _unavailable(f"the PostgreSQL driver is not installed ({exc}): pip install -e .[test]")
    try:
        binaries = find_binaries()
    except MissingPostgres as exc:
        _unavailable(str(exc))
        raise  # unreachable: skip and fail raise
    with postgres_server(binaries) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A broker URL of each database broker (a file, or a fresh PostgreSQL schema): for
    what only brokers that several connections share can show."""
    if request.param == "postgresql":
        with postgres_schema(request.getfixturevalue("postgres_url")) as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'runs.db'}"
