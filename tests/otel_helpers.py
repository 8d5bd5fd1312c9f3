"""OpenTelemetry's real SDK, recording into its in-memory exporter for the tests that read
spans back (the provider is the process's: set once, by the first such test)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class _WhileRecording(InMemorySpanExporter):
    """The SDK's in-memory exporter, keeping spans only while a test that reads them runs
    (other tests' runs make spans too, once the provider is set)."""

    recording = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.recording:
            return SpanExportResult.SUCCESS
        return super().export(spans)


_EXPORTER = _WhileRecording()


@contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """The exporter, recording (from nothing) while the block runs."""
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
    """The finished spans called ``name``."""
    return [span for span in spans.get_finished_spans() if span.name == name]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans the test finished, through the SDK's in-memory exporter."""
    with recorded_spans() as exporter:
        yield exporter
