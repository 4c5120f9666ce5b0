"""OpenTelemetry set-up shared by every service, called from each service's bootstrap.

Off unless configured, and nothing happens at import time:

* traces are exported when OTEL_TRACES_EXPORTER (otlp | console) or OTEL_EXPORTER_OTLP_ENDPOINT is set
  (the standard OTEL_* variables configure the OTLP exporter), or when a test passes its own exporter;
* metrics are exported over OTLP when OTEL_METRICS_EXPORTER=otlp (or OTEL_EXPORTER_OTLP_ENDPOINT is set
  and OTEL_METRICS_EXPORTER is not "none"), and served for Prometheus when VIGIL_METRICS_PORT is set
  (a /metrics HTTP server on that port) or OTEL_METRICS_EXPORTER=prometheus (the gateway then serves
  /metrics on its HTTP port);
* OTEL_SDK_DISABLED=true turns everything off.

With nothing configured, the OpenTelemetry API's no-op tracer and meter are used: spans and
instruments cost a function call. Logs: `configure_logging` (VIGIL_LOG_FORMAT=json) writes one JSON
object per line with trace_id/span_id of the current span.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from opentelemetry import metrics, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

log = logging.getLogger(__name__)
METER = "vigil"

_state: dict = {"prometheus": False, "metrics_server": None}


def _disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"


def _exporters(var: str) -> set[str]:
    """OTEL_*_EXPORTER as a set (the variables take comma-separated lists, e.g. "otlp,prometheus")."""
    return {e.strip().lower() for e in os.environ.get(var, "").split(",") if e.strip()}


_PROVIDER_GLOBAL = hasattr(trace, "_TRACER_PROVIDER")


def tracing_enabled() -> bool:
    """True when an SDK TracerProvider is installed (spans are recorded).

    Asked per batch on the ingest hot path: the installed provider is read from the API's module
    global, because `trace.get_tracer_provider()` looks up an environment variable on every call while
    none is installed (Vigil installs its provider with `setup_telemetry`, never through
    OTEL_PYTHON_TRACER_PROVIDER)."""
    if _PROVIDER_GLOBAL:
        return isinstance(trace._TRACER_PROVIDER, TracerProvider)
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def setup_telemetry(service_name: str, exporter: SpanExporter | None = None, *,
                    metric_reader=None) -> TracerProvider | None:
    """Install a TracerProvider (and a MeterProvider) for `service_name`.

    Returns the TracerProvider, or None when tracing is off. `exporter` (tests: InMemorySpanExporter)
    forces tracing on with a synchronous processor; `metric_reader` (tests: InMemoryMetricReader)
    forces metrics on. A process where a provider is already installed (several services in one test
    process) gets the exporter added to the existing provider.
    """
    setup_metrics(service_name, metric_reader)
    if exporter is None:
        if _disabled():
            return None
        wanted = _exporters("OTEL_TRACES_EXPORTER")
        if "none" in wanted or (not wanted and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            return None
        if wanted == {"console"}:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTLP exporter requested but opentelemetry-exporter-otlp-proto-grpc is not installed")
                return None
            exporter = OTLPSpanExporter()
        processor = BatchSpanProcessor(exporter)
    else:
        processor = SimpleSpanProcessor(exporter)
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        current.add_span_processor(processor)
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def setup_metrics(service_name: str, reader=None):
    """Install a MeterProvider with the configured readers; returns it, or None when metrics are off."""
    from opentelemetry.sdk.metrics import MeterProvider

    if isinstance(metrics.get_meter_provider(), MeterProvider):
        return metrics.get_meter_provider()  # already set up in this process
    readers = [reader] if reader is not None else []
    if reader is None and not _disabled():
        wanted = _exporters("OTEL_METRICS_EXPORTER")
        port = os.environ.get("VIGIL_METRICS_PORT", "").strip()
        if "otlp" in wanted or (not wanted and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
                from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            except ImportError:
                log.warning("OTLP metrics requested but opentelemetry-exporter-otlp-proto-grpc is not installed")
        if (port or "prometheus" in wanted) and "none" not in wanted:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(PrometheusMetricReader())
            _state["prometheus"] = True
            if port:
                from prometheus_client import start_http_server

                host = os.environ.get("VIGIL_METRICS_HOST", "0.0.0.0")
                _state["metrics_server"] = start_http_server(int(port), addr=host)
                log.info("Prometheus metrics on http://%s:%s/metrics", host, port)
    if not readers:
        return None
    provider = MeterProvider(metric_readers=readers,
                             resource=Resource.create({"service.name": service_name}))
    metrics.set_meter_provider(provider)
    return provider


def prometheus_enabled() -> bool:
    """True when metrics are served in the Prometheus format (VIGIL_METRICS_PORT / OTEL_METRICS_EXPORTER)."""
    return _state["prometheus"]


def meter() -> metrics.Meter:
    return metrics.get_meter(METER)


def now() -> float:
    return time.perf_counter()


# --- logs ---------------------------------------------------------------------------------------

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace_id/span_id (when a span is
    current), exception, plus any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _iso(record.created), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
        return json.dumps(out, ensure_ascii=False)


def _iso(epoch: float) -> str:
    t = time.gmtime(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int((epoch % 1) * 1000):03d}Z"


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", fmt: str | None = None, stream=None) -> None:
    """Root logging: `fmt` json | text (default VIGIL_LOG_FORMAT, else text, human-readable)."""
    fmt = (fmt or os.environ.get("VIGIL_LOG_FORMAT", "text")).strip().lower()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
