"""OpenTelemetry set-up shared by every service, called from each service's bootstrap.

Off unless configured: traces are exported only when OTEL_TRACES_EXPORTER or
OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard OTEL_* variables), or when a test passes its own
exporter. Nothing happens at import time.
"""
from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

log = logging.getLogger(__name__)


def setup_telemetry(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider | None:
    """Install a TracerProvider for `service_name`; returns it, or None when telemetry is off."""
    if exporter is None:
        if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return None
        wanted = os.environ.get("OTEL_TRACES_EXPORTER", "")
        if not wanted and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return None
        if wanted == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTLP exporter requested but opentelemetry-exporter-otlp is not installed")
                return None
            exporter = OTLPSpanExporter()
        processor = BatchSpanProcessor(exporter)
    else:
        processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider
