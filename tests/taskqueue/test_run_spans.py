"""OpenTelemetry: a span per task-run attempt, a child of the span that submitted the run
(its trace context stored by each kind of broker). Real SDK, in-memory exporter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from anyservice.taskqueue import TaskQueue, TaskRunFailed, TaskWorker
from tests._postgres import postgres_schema
from tests.otel_helpers import named

pytestmark = [pytest.mark.anyio]

PROMPTLY = 10.0


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


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskQueue]:
    """A queue whose runs are stored, trace context included, by each kind of broker."""
    if request.param == "postgresql":
        with postgres_schema(request.getfixturevalue("postgres_url")) as url:
            async with TaskQueue(url) as queue:
                yield queue
        return
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"
    async with TaskQueue(url) as queue:
        yield queue


async def test_a_run_is_a_child_of_the_span_that_submitted_it(
    spans: InMemorySpanExporter, queue: TaskQueue
) -> None:
    tracer = trace.get_tracer("test")

    @queue.task
    async def job(number: int) -> int:
        return number

    with tracer.start_as_current_span("request") as request:
        delayed = await job.delay(1)
        applied = await job.apply_async((2,), countdown=0)
        (mapped,) = await job.map([4])
    outside = await job.delay(3)
    assert delayed.record.trace_context is not None
    assert delayed.record.trace_context.split("-")[1:3] == [
        format(request.get_span_context().trace_id, "032x"),
        format(request.get_span_context().span_id, "016x"),
    ]
    assert outside.record.trace_context is None
    async with TaskWorker(job):
        for run in (delayed, applied, mapped, outside):
            await run.wait(timeout=PROMPTLY)
    (finished_request,) = named(spans, "request")
    runs = {
        span.attributes and span.attributes["anyservice.run_id"]: span
        for span in named(spans, "run job")
    }
    for run in (delayed, applied, mapped):
        span = runs[run.id]
        assert span.parent is not None
        assert span.parent.span_id == finished_request.context.span_id
        assert span.context.trace_id == finished_request.context.trace_id
    assert runs[outside.id].parent is None
    assert runs[outside.id].context.trace_id != finished_request.context.trace_id


def test_delay_sync_stores_the_span_of_its_caller(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    queue = TaskQueue(f"sqlite:///{tmp_path / 'runs.db'}")

    @queue.task
    async def job() -> None: ...

    with trace.get_tracer("test").start_as_current_span("script") as script:
        run = job.delay_sync()
    assert run.record.trace_context is not None
    assert run.record.trace_context.split("-")[2] == format(
        script.get_span_context().span_id, "016x"
    )


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
