"""Tracing configured by the standard OpenTelemetry environment (`OTEL_*` variables):
`configure_tracing()` builds an `OtelTracer` with its exporters, or returns None when
tracing is off. Tracing is opt-in: without `OTEL_TRACES_EXPORTER` (or with `none`) no
listener is installed and the OpenTelemetry SDK is never imported, so tracing off costs
nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from treadle.runtime.observe.tracing import OtelTracer, TracingUnavailable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

_EXPORTERS = ("console", "otlp", "none")


def configure_tracing(*, set_global: bool = False) -> OtelTracer | None:
    """A tracer configured by the standard environment, or None when tracing is off.

    `OTEL_TRACES_EXPORTER`: a comma list of `console` (spans as JSON on stderr), `otlp`
    and `none`. Unset means off: unlike the OpenTelemetry default (`otlp`), a CLI should not
    send to a collector nobody asked for. `OTEL_SDK_DISABLED=true` turns it off too.
    `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`
    (default) or `grpc`, each needing its exporter package; the endpoint, headers and
    timeout are read by the exporter from its own `OTEL_EXPORTER_OTLP_*` variables.
    `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (default `treadle`),
    and `OTEL_TRACES_SAMPLER` / `OTEL_BSP_*` are honoured by the SDK itself.
    With `set_global`, the provider also becomes the process's global one, so spans that
    user code opens inside nodes are exported too.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER: unsupported exporter {unknown[0]!r} "
            f"(supported: {', '.join(_EXPORTERS)})"
        )
    names = [n for n in names if n != "none"]
    if not names:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']} needs OpenTelemetry: "
            "pip install 'treadle[otel]'"
        ) from exc
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "treadle"}))
    provider = SdkProvider(resource=resource)
    for name in dict.fromkeys(names):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    if set_global:
        trace.set_tracer_provider(provider)
    return OtelTracer(provider, owns_provider=True)


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout carries the command's own output (`treadle run --json`)
        return ConsoleSpanExporter(out=sys.stderr)
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        package = "opentelemetry-exporter-otlp-proto-http"
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )
        except ImportError:
            raise TracingUnavailable(
                f"OTLP over http/protobuf needs {package}: pip install {package}"
            ) from None
        return HttpExporter()
    if protocol == "grpc":
        package = "opentelemetry-exporter-otlp-proto-grpc"
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise TracingUnavailable(
                f"OTLP over grpc needs {package}: pip install {package}"
            ) from None
        return GrpcExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r} (http/protobuf or grpc)"
    )
