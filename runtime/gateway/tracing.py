"""The gateway's place in a trace: the caller's W3C trace context (`traceparent`,
`tracestate`) continues through the gateway to the engine, with a gateway span in between
(`chat {model}`, kind SERVER, the replica and tokens as attributes).

With OpenTelemetry installed and a tracer provider configured (`treadle gateway`
configures the global one from the `OTEL_*` environment, as `treadle run` does, or one is
given), spans go there; otherwise (no OpenTelemetry, or tracing off) the caller's headers
are forwarded unchanged, so the engine's spans still join the caller's trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")


class GatewaySpan:
    """One request's span (or nothing, when tracing is unavailable)."""

    __slots__ = ("_span", "headers")

    def __init__(self, span: Any, headers: dict[str, str]) -> None:
        self._span = span
        #: what goes upstream: the gateway span's context (or the caller's, forwarded)
        self.headers = headers

    def set(self, key: str, value: Any) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def end(self, error: str | None = None) -> None:
        span = self._span
        if span is None:
            return
        self._span = None
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


class GatewayTracing:
    """Starts a span per request (module docstring)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:  # no OpenTelemetry: forward the caller's context as it came
            self._tracer: Any = None
            return
        self._propagate = propagate
        self._in_context = trace.set_span_in_context
        self._kind = trace.SpanKind.SERVER
        self._tracer = trace.get_tracer("treadle.gateway", tracer_provider=tracer_provider)
        self._provider = tracer_provider
        self._get_provider = trace.get_tracer_provider
        self._noop = (trace.NoOpTracerProvider, trace.ProxyTracerProvider)

    def _recording(self) -> bool:
        """Whether spans go anywhere: without a configured provider the gateway adds no
        span (it would only cost time) and forwards the caller's context as it came."""
        provider = self._provider or self._get_provider()
        return not isinstance(provider, self._noop)

    def start(self, model: str, headers: Mapping[str, str]) -> GatewaySpan:
        if self._tracer is None or not self._recording():
            return GatewaySpan(None, {k: headers[k] for k in TRACE_HEADERS if k in headers})
        carrier = {k: headers[k] for k in TRACE_HEADERS if k in headers}
        context = self._propagate.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"chat {model}",
            context=context,
            kind=self._kind,
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": model},
        )
        out: dict[str, str] = {}
        self._propagate.inject(out, context=self._in_context(span))
        if not out and carrier:  # a no-op tracer without a caller's context to carry
            out = carrier
        return GatewaySpan(span, out)
