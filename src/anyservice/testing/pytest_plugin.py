"""pytest plugin: every anyio test on asyncio and trio, optionally on virtual time.

Enable it with ``pytest_plugins = ["anyservice.testing.pytest_plugin"]`` in your top-level
``conftest.py`` (registered from a conftest, its fixture takes precedence over anyio's). It
overrides anyio's ``anyio_backend`` fixture so that each test marked ``@pytest.mark.anyio``
runs once per backend, with a fresh event loop, and, when the test is also marked
``@pytest.mark.virtual_time``, on a virtual clock: trio's ``MockClock(autojump_threshold=0)``
or anyservice's :class:`~anyservice.testing.VirtualTimeEventLoop` on asyncio. Sleeps,
timeouts and timers then take no real time and land exactly where they are due.
"""

from __future__ import annotations

from typing import Any

import pytest

from ._clock import backend_options

BACKENDS = ("asyncio", "trio")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "virtual_time: run this anyio test on a virtual clock that jumps to the next timer "
        "whenever every task is waiting (both backends)",
    )


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """``(backend name, options)`` for anyio's runner, one test run per backend."""
    backend: str = request.param
    virtual = request.node.get_closest_marker("virtual_time") is not None
    return backend, backend_options(backend, virtual_time=virtual)
