"""OpenTelemetry traces, when ``opentelemetry-api`` is installed (``anyservice[otel]``).

- Submitting a run stores the submitter's trace context with it: the W3C ``traceparent``
  of the span current at ``delay()``, or nothing when no span is.
- Each attempt of a run is a span (``run TASK``, kind CONSUMER) whose parent is that
  stored context, so a run shows in the trace of the request that asked for it, however
  long it waited and whichever worker (process, machine) took it. A run submitted outside
  any span starts a trace of its own.
- A service's restart and crash are span events (``anyservice.restart``,
  ``anyservice.crash``) on the span current where the service runs; with none, on a short
  span of their own, so that they are exported either way.

Without the package, :data:`otel` is ``None``: the callers test that once, and nothing
else runs (no import, no span, no context stored with a run). With the API alone (no SDK
configured), OpenTelemetry's own no-op tracer answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import _hooks

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["OTEL_EXTRA_HINT", "OpenTelemetry", "otel"]

OTEL_EXTRA_HINT = "pip install 'anyservice[otel]'"

#: The W3C Trace Context header that carries a span's context.
TRACEPARENT = "traceparent"


class OpenTelemetry:
    """The few calls anyservice makes to the OpenTelemetry API."""

    def __init__(self) -> None:
        # Raises ImportError without the API: see _load().
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._empty_context = context.Context
        self._propagator = TraceContextTextMapPropagator()
        # A proxy until the application sets a tracer provider, then that provider's.
        self._tracer = trace.get_tracer("anyservice")
        self._no_provider = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

    def records_spans(self, traceparent: str | None) -> bool:
        """Whether a run's span would be more than OpenTelemetry's no-op.

        With no tracer provider set and no submitter's context, the span would record
        nothing and carry no context to what the run submits: a worker skips it, since
        entering and leaving it costs more than a no-op run.
        """
        if traceparent is not None:
            return True
        return not isinstance(self._trace.get_tracer_provider(), self._no_provider)

    def traceparent(self) -> str | None:
        """The current span's context as a ``traceparent`` header, or ``None`` if none."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get(TRACEPARENT)

    @contextmanager
    def run_span(
        self, task: str, run_id: str, attempt: int, worker: str, traceparent: str | None
    ) -> Iterator[Span]:
        """The span of one attempt of a run, current while the block runs.

        Its parent is the submitter's span (from ``traceparent``); a missing or malformed
        one makes it the root of a trace of its own, never a child of the worker's context.
        """
        if traceparent is None:
            parent = self._empty_context()
        else:
            parent = self._propagator.extract({TRACEPARENT: traceparent}, self._empty_context())
        with self._tracer.start_as_current_span(
            f"run {task}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                "anyservice.task": task,
                "anyservice.run_id": run_id,
                "anyservice.attempt": attempt,
                "anyservice.worker": worker,
            },
            # What the attempt came to is the worker's to say (see end_run), not an
            # exception's: a cancelled run's body raises one and is no error.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def end_run(self, span: Span, outcome: str, error: BaseException | None) -> None:
        """Mark the attempt's span with its outcome (and, for a failure, the error)."""
        span.set_attribute("anyservice.outcome", outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, repr(error)))

    def service_event(self, name: str, service: Any, attributes: dict[str, Any]) -> None:
        """Add event ``name`` about ``service`` to the current span, or to one of its own."""
        attributes = {"anyservice.service": service.name, **attributes}
        span = self._trace.get_current_span()
        if span.is_recording():
            span.add_event(name, attributes)
            return
        with self._tracer.start_as_current_span(
            f"{name} {service.name}", context=self._empty_context()
        ) as own:
            own.add_event(name, attributes)

    def restarted(self, service: Any) -> None:
        self.service_event(
            "anyservice.restart", service, {"anyservice.restarts": service.restart_count}
        )

    def crashed(self, service: Any, reason: BaseException) -> None:
        self.service_event(
            "anyservice.crash",
            service,
            {"exception.type": type(reason).__qualname__, "exception.message": str(reason)},
        )


def _load() -> OpenTelemetry | None:
    try:
        found = OpenTelemetry()
    except ImportError:
        return None
    _hooks.service_restart = found.restarted
    _hooks.service_crash = found.crashed
    return found


#: The OpenTelemetry calls, or ``None`` when the API is not installed.
otel: OpenTelemetry | None = _load()
