"""OpenTelemetry: a span per task-run attempt, child of the submitter's; restart and crash
events. Spans go through the real SDK to its in-memory exporter, on asyncio and trio.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from anyservice import ServiceState, Supervisor
from anyservice.taskqueue import TaskQueue, TaskRunFailed, TaskWorker

from .status_helpers import BreaksOnce

pytestmark = [pytest.mark.anyio]

PROMPTLY = 10.0


class _WhileRecording(InMemorySpanExporter):
    """The SDK's in-memory exporter, keeping spans only while a test of this module runs
    (the provider is the process's, so other tests' runs make spans too)."""

    recording = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.recording:
            return SpanExportResult.SUCCESS
        return super().export(spans)


_EXPORTER = _WhileRecording()


@pytest.fixture
def spans() -> Iterator[_WhileRecording]:
    # A process has one tracer provider, set once: the first test of this module sets it.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    _EXPORTER.recording = True
    try:
        yield _EXPORTER
    finally:
        _EXPORTER.recording = False
        _EXPORTER.clear()


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


async def test_a_run_is_a_consumer_span_named_for_its_task(spans: InMemorySpanExporter) -> None:
    async with TaskQueue("memory://") as queue:

        @queue.task
        async def say(text: str) -> str:
            return text

        run = await say.delay("hi")
        async with TaskWorker(say, name="worker"):
            assert await run.result(timeout=PROMPTLY) == "hi"
    (span,) = named(spans, "run say")
    assert span.kind is SpanKind.CONSUMER
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "anyservice.task": "say",
        "anyservice.run_id": run.id,
        "anyservice.attempt": 1,
        "anyservice.worker": span.attributes["anyservice.worker"],
        "anyservice.outcome": "completed",
    }
    assert span.status.status_code is StatusCode.UNSET
    # Submitted outside any span: the run starts a trace of its own.
    assert span.parent is None


async def test_a_failed_attempt_records_the_error_and_each_retry_is_a_span(
    spans: InMemorySpanExporter,
) -> None:
    async with TaskQueue("memory://") as queue:

        @queue.task(retries=1)
        async def broken() -> None:
            raise ValueError("no")

        run = await broken.delay()
        async with TaskWorker(broken):
            with pytest.raises(TaskRunFailed):
                await run.result(timeout=PROMPTLY)
    attempts = sorted(named(spans, "run broken"), key=lambda span: span.start_time or 0)
    assert [span.attributes and span.attributes["anyservice.outcome"] for span in attempts] == [
        "retried",
        "failed",
    ]
    assert [span.attributes and span.attributes["anyservice.attempt"] for span in attempts] == [
        1,
        2,
    ]
    for span in attempts:
        assert span.status.status_code is StatusCode.ERROR
        (event,) = span.events
        assert event.name == "exception"
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ValueError"


async def test_a_span_of_the_task_body_is_a_child_of_the_run(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test")
    async with TaskQueue("memory://") as queue:

        @queue.task
        async def inner() -> None:
            with tracer.start_as_current_span("inside"):
                await anyio.lowlevel.checkpoint()

        run = await inner.delay()
        async with TaskWorker(inner):
            await run.wait(timeout=PROMPTLY)
    (outer,) = named(spans, "run inner")
    (body,) = named(spans, "inside")
    assert body.parent is not None
    assert body.parent.span_id == outer.context.span_id


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
