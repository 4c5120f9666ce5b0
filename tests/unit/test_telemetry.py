"""Telemetry set-up: off by default, JSON logs with trace ids, the gateway's search latency and /metrics."""
from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from vigil import telemetry

OTEL_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
             "OTEL_SDK_DISABLED", "VIGIL_METRICS_PORT")


@pytest.fixture
def no_otel_env(monkeypatch):
    for v in OTEL_VARS:
        monkeypatch.delenv(v, raising=False)


def test_off_by_default_installs_nothing(no_otel_env):
    before_t, before_m = trace.get_tracer_provider(), metrics.get_meter_provider()
    assert telemetry.setup_telemetry("vigil-test") is None
    assert telemetry.setup_metrics("vigil-test") is None
    assert trace.get_tracer_provider() is before_t and metrics.get_meter_provider() is before_m
    assert not telemetry.tracing_enabled() and not telemetry.prometheus_enabled()


def test_sdk_disabled_wins(no_otel_env, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert telemetry.setup_telemetry("vigil-test") is None


def test_exporter_lists_are_parsed(monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp, Prometheus")
    assert telemetry._exporters("OTEL_METRICS_EXPORTER") == {"otlp", "prometheus"}


def _log_line(fmt: str, with_span: bool) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter() if fmt == "json" else logging.Formatter(telemetry.TEXT_FORMAT))
    logger = logging.getLogger("vigil.test.telemetry")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if with_span:
            span = TracerProvider().get_tracer("t").start_span("s")
            with trace.use_span(span, end_on_exit=True):
                logger.warning("stored %d", 3, extra={"patient_count": 1})
            return stream.getvalue(), span.get_span_context()
        logger.warning("plain")
        return stream.getvalue(), None
    finally:
        logger.removeHandler(handler)


def test_json_logs_carry_the_current_trace_and_span_ids():
    line, ctx = _log_line("json", True)
    rec = json.loads(line)
    assert rec["message"] == "stored 3" and rec["level"] == "WARNING" and rec["logger"] == "vigil.test.telemetry"
    assert rec["trace_id"] == format(ctx.trace_id, "032x") and rec["span_id"] == format(ctx.span_id, "016x")
    assert rec["patient_count"] == 1 and rec["time"].endswith("Z")
    line, _ = _log_line("json", False)
    assert "trace_id" not in json.loads(line)


def test_default_log_format_is_human_readable(monkeypatch):
    monkeypatch.delenv("VIGIL_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        root.handlers = []
        telemetry.configure_logging("INFO")
        assert not isinstance(root.handlers[0].formatter, telemetry.JsonFormatter)
        root.handlers = []
        monkeypatch.setenv("VIGIL_LOG_FORMAT", "json")
        telemetry.configure_logging("INFO")
        assert isinstance(root.handlers[0].formatter, telemetry.JsonFormatter)
    finally:
        root.handlers = saved


async def test_gateway_search_latency_and_metrics_route(monkeypatch):
    from vigil_gateway import telemetry as gw

    from vigil.settings import Settings

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(telemetry, "meter", lambda: provider.get_meter("vigil"))
    monkeypatch.setitem(telemetry._state, "prometheus", True)

    async def ok(_request):
        return JSONResponse({"resourceType": "Bundle"})

    app = Starlette(routes=[Route("/fhir/{rtype}", ok), Route("/fhir/{rtype}/_search", ok, methods=["POST"]),
                            Route("/fhir/{rtype}/{rid}", ok), Route("/healthz", ok)])
    gw.instrument_app(app, Settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/fhir/Observation", params={"subject": "Patient/p1"})).status_code == 200
        assert (await client.post("/fhir/RiskAssessment/_search")).status_code == 200
        assert (await client.get("/fhir/Observation/o1")).status_code == 200  # a read, not a search
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    points = [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == gw.SEARCH_LATENCY for p in m.data.data_points]
    by_type = {p.attributes["fhir.resource_type"]: p.count for p in points}
    assert by_type == {"Observation": 1, "RiskAssessment": 1}
    assert all(p.attributes["http.response.status_code"] == 200 for p in points)


def test_each_process_of_one_machine_gets_its_own_metrics_port():
    from vigil_ingest.workers import worker_env

    from vigil.settings import offset_metrics_port
    from vigil.up import _service_env

    assert offset_metrics_port({"VIGIL_METRICS_PORT": "9100", "X": "1"}, 2) == {"VIGIL_METRICS_PORT": "9102", "X": "1"}
    assert offset_metrics_port({"X": "1"}, 2) == {"X": "1"}  # metrics off stays off
    assert [worker_env({"VIGIL_METRICS_PORT": "9100"}, i)["VIGIL_METRICS_PORT"] for i in range(3)] == \
        ["9100", "9101", "9102"]
    assert _service_env({"VIGIL_METRICS_PORT": "9100"}, 1) == {"VIGIL_METRICS_PORT": "9101",
                                                               "VIGIL_METRICS_HOST": "127.0.0.1"}
    assert "VIGIL_METRICS_HOST" not in _service_env({}, 1)
