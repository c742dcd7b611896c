"""`configure_tracing()`: the standard OTEL_* variables pick the exporters; off by default."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from obs_sample import Journal

from treadle.runtime.core.events import NodeFinished, NodeStarted, RunFinished, RunStarted
from treadle.runtime.observe.tracing import TracingUnavailable
from treadle.runtime.observe.tracing_setup import configure_tracing

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def small_journal() -> Journal:
    j = Journal("cfg-run")
    j.at(0.0, RunStarted, graph="g")
    j.at(0.1, NodeStarted, node="a")
    j.at(0.2, NodeFinished, node="a", duration_s=0.1)
    j.at(0.3, RunFinished, status="succeeded", duration_s=0.3)
    return j


@pytest.mark.parametrize("value", [None, "", "none", " none "])
def test_off_unless_an_exporter_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    if value is not None:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    assert configure_tracing() is None


def test_sdk_disabled_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert configure_tracing() is None


def test_unknown_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,zipkin")
    with pytest.raises(ValueError, match="unsupported exporter 'zipkin'"):
        configure_tracing()


def test_unknown_protocol_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="unsupported protocol 'http/json'"):
        configure_tracing()


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None,
    reason="the grpc exporter is installed",
)
def test_grpc_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    with pytest.raises(TracingUnavailable, match="opentelemetry-exporter-otlp-proto-grpc"):
        configure_tracing()


def test_console_exporter_writes_spans_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "treadle-test")
    tracer = configure_tracing()
    assert tracer is not None
    tracer.replay(small_journal().events)
    tracer.shutdown()
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays the command's own
    names = [json.loads(chunk)["name"] for chunk in _json_objects(err)]
    assert sorted(names) == ["invoke_workflow g", "node"]
    assert '"service.name": "treadle-test"' in err


def test_default_service_name_is_treadle(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracer = configure_tracing()
    assert tracer is not None
    tracer.replay(small_journal().events)
    tracer.shutdown()
    assert '"service.name": "treadle"' in capsys.readouterr().err


def _json_objects(text: str) -> Iterator[str]:
    """Split the console exporter's concatenated pretty-printed JSON objects."""
    decoder = json.JSONDecoder()
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return
        obj, end = decoder.raw_decode(text, i)
        yield json.dumps(obj)
        i = end


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        type(self).bodies.append((self.path, self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_http_exports_to_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    _Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "treadle-otlp")
        tracer = configure_tracing()
        assert tracer is not None
        tracer.replay(small_journal().events)
        tracer.shutdown()  # flushes the batch
    finally:
        server.shutdown()
        server.server_close()
    assert [path for path, _ in _Collector.bodies] == ["/v1/traces"]
    request = ExportTraceServiceRequest()
    request.ParseFromString(_Collector.bodies[0][1])
    (resource_spans,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get(
        "service.name"
    )
    assert service == "treadle-otlp"
    names = sorted(s.name for scope in resource_spans.scope_spans for s in scope.spans)
    assert names == ["invoke_workflow g", "node"]


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    # a fresh interpreter: importing treadle's observability modules and asking for a
    # tracer with tracing off loads neither OpenTelemetry nor prometheus-client
    code = (
        "import sys\n"
        "from treadle.runtime.observe.tracing_setup import configure_tracing\n"
        "import treadle.runtime.observe.metrics, treadle.runtime.observe.timeline\n"
        "import treadle.cli.trace_view\n"
        "assert configure_tracing() is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
