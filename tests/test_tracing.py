"""OpenTelemetry: restarts and crashes as span events, and nothing at all without the
package. Real SDK, in-memory exporter, on asyncio and trio.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from anyservice import ServiceState, Supervisor

from .otel_helpers import named
from .status_helpers import BreaksOnce

pytestmark = [pytest.mark.anyio]

PROMPTLY = 10.0


@pytest.mark.virtual_time
async def test_a_restart_and_the_crash_before_it_are_events_of_the_current_span(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test")
    flaky = BreaksOnce("flaky")
    tree = Supervisor(flaky, name="top")
    with tracer.start_as_current_span("application"):
        async with tree:
            flaky.now.set()
            with anyio.fail_after(PROMPTLY):
                while flaky.restart_count < 1 or flaky.state is not ServiceState.RUNNING:  # noqa: ASYNC110 - no event for a restart
                    await anyio.sleep(0.01)
    (application,) = named(spans, "application")
    events = [(event.name, dict(event.attributes or {})) for event in application.events]
    assert events == [
        (
            "anyservice.crash",
            {
                "anyservice.service": "flaky",
                "exception.type": "RuntimeError",
                "exception.message": "told to break",
            },
        ),
        ("anyservice.restart", {"anyservice.service": "flaky", "anyservice.restarts": 1}),
    ]


@pytest.mark.virtual_time
async def test_a_crash_outside_any_span_is_a_span_of_its_own(
    spans: InMemorySpanExporter,
) -> None:
    flaky = BreaksOnce("flaky")
    tree = Supervisor(flaky, name="top")
    async with tree:
        flaky.now.set()
        with anyio.fail_after(PROMPTLY):
            while flaky.restart_count < 1:  # noqa: ASYNC110 - no event for a restart
                await anyio.sleep(0.01)
    (crash,) = named(spans, "anyservice.crash flaky")
    assert [event.name for event in crash.events] == ["anyservice.crash"]
    assert crash.parent is None
    assert [event.name for event in named(spans, "anyservice.restart flaky")[0].events] == [
        "anyservice.restart"
    ]


def test_without_opentelemetry_nothing_is_traced_and_runs_still_run() -> None:
    # A fresh interpreter in which the package cannot be imported, as without the extra.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # import opentelemetry -> ImportError
        import anyio
        import anyservice
        from anyservice import _hooks, _tracing
        from anyservice.taskqueue import TaskQueue, TaskWorker

        assert _tracing.otel is None
        assert _hooks.service_restart is None and _hooks.service_crash is None

        async def main():
            async with TaskQueue("memory://") as queue:
                @queue.task
                async def add(a, b):
                    return a + b

                run = await add.delay(1, 2)
                assert run.record.trace_context is None
                async with TaskWorker(add):
                    assert await run.result(timeout=10) == 3

        anyio.run(main)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
