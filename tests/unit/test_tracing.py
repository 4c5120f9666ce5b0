"""W3C trace context survives a trip through NATS-style headers, and batch processing links to it."""
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from vigil import tracing


def _provider():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_publish_then_process_is_one_trace(monkeypatch):
    provider, exporter = _provider()
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    with tracing.publish_span("vigil.v1.observation.p1", batch_size=3):
        headers = tracing.inject({"Nats-Msg-Id": "x"})
    assert headers["Nats-Msg-Id"] == "x" and headers["traceparent"].startswith("00-")
    with tracing.process_span("observations", [headers, {}]):
        pass
    publish, process = exporter.get_finished_spans()
    assert publish.kind == SpanKind.PRODUCER and process.kind == SpanKind.CONSUMER
    assert process.context.trace_id == publish.context.trace_id
    assert process.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]
    assert publish.attributes["messaging.system"] == "nats"
    assert publish.attributes["messaging.destination.name"] == "vigil.v1.observation.p1"
    assert process.attributes["messaging.batch.message_count"] == 2


def test_no_context_in_headers_starts_a_new_trace(monkeypatch):
    provider, exporter = _provider()
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    with tracing.process_span("risk", [None]):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.links == ()
