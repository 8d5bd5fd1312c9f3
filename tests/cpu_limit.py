"""``--cpu-limit-per-test=SECONDS``: end the test process when one test burns that much CPU.

For mutation testing (``nox -s mutation`` passes the option): a mutant that turns a bounded
loop into an endless one must end in seconds, not after the whole run's time limit. The
kernel enforces the limit (``RLIMIT_CPU``): the process gets ``SIGXCPU`` and dies of it,
which mutmut reports as a timeout. CPU time, not wall time, so a loaded machine does not
make a slow but finite test look endless. Without the option nothing changes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-limit-per-test",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill the test process (SIGXCPU) when one test uses this much CPU time",
    )


def pytest_configure(config: pytest.Config) -> None:
    seconds: float | None = config.getoption("--cpu-limit-per-test")
    if seconds is not None and not seconds > 0:
        raise pytest.UsageError(f"--cpu-limit-per-test must be > 0, got {seconds!r}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    seconds: float | None = item.config.getoption("--cpu-limit-per-test")
    if seconds is None:
        return (yield)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    # The limit counts the CPU time the process has used so far; a limit already in force
    # (mutmut sets one per mutant) is only ever lowered, never raised.
    limit = int(time.process_time() + seconds) + 1
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))
    try:
        return (yield)
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
