"""Trace context across the bus: W3C `traceparent` in NATS message headers, messaging spans.

Semantic conventions: https://opentelemetry.io/docs/specs/semconv/messaging/messaging-spans/
(messaging.system = "nats", messaging.destination.name = the subject, messaging.operation.type
= "send" | "process"). With no TracerProvider installed (telemetry off) every call is a cheap no-op.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, SpanKind

TRACER = "vigil"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers with the current trace context added (traceparent/tracestate)."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    return propagate.extract(dict(headers or {}))


def publish_span(subject: str, *, batch_size: int | None = None):
    """A PRODUCER span for one publish (use as a context manager, then inject() inside it)."""
    attrs = {"messaging.system": "nats", "messaging.destination.name": subject,
             "messaging.operation.type": "send", "messaging.operation.name": "publish"}
    if batch_size is not None:
        attrs["messaging.batch.message_count"] = batch_size
    return tracer().start_as_current_span(f"publish {subject}", kind=SpanKind.PRODUCER, attributes=attrs)


def process_span(name: str, headers_of_messages: Iterable[Mapping[str, str] | None]):
    """A CONSUMER span processing a batch of messages.

    The first message's context is the parent (so a single-message batch continues its trace);
    every message's context is also a span link, as the conventions ask for batch processing.
    """
    contexts = [extract(h) for h in headers_of_messages]
    links = []
    for ctx in contexts:
        sc = trace.get_current_span(ctx).get_span_context()
        if sc.is_valid:
            links.append(Link(sc))
    parent = contexts[0] if contexts else None
    attrs = {"messaging.system": "nats", "messaging.operation.type": "process",
             "messaging.batch.message_count": len(contexts)}
    return tracer().start_as_current_span(f"process {name}", context=parent, kind=SpanKind.CONSUMER,
                                          links=links, attributes=attrs)
