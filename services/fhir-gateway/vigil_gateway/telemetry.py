"""Gateway telemetry wiring, applied by bootstrap to the app from create_app (app.py stays untouched).

* FastAPI server spans (FastAPIInstrumentor.instrument_app) when tracing is on;
* vigil.gateway.search.latency: a histogram (seconds) of search interactions (GET /fhir/<Type>,
  POST /fhir/<Type>/_search), by resource type and status code - a pure ASGI middleware;
* GET /metrics in the Prometheus text format when Prometheus metrics are on (VIGIL_METRICS_PORT or
  OTEL_METRICS_EXPORTER=prometheus): what the chart's ServiceMonitor scrapes on the `http` port.
"""
from __future__ import annotations

import time

from vigil import telemetry

SEARCH_LATENCY = "vigil.gateway.search.latency"


class SearchLatencyMiddleware:
    def __init__(self, app, base: str = "/fhir"):
        self.app = app
        self.base = "/" + base.strip("/") + "/"
        self.hist = telemetry.meter().create_histogram(
            SEARCH_LATENCY, unit="s", description="FHIR search interactions (type-level GET and _search)")

    def _search_type(self, scope) -> str | None:
        path: str = scope.get("path", "")
        if not path.startswith(self.base):
            return None
        parts = path[len(self.base):].strip("/").split("/")
        method = scope.get("method")
        if method == "GET" and len(parts) == 1 and parts[0][:1].isupper():
            return parts[0]
        if method == "POST" and len(parts) == 2 and parts[1] == "_search":
            return parts[0]
        return None

    async def __call__(self, scope, receive, send):
        rtype = self._search_type(scope) if scope["type"] == "http" else None
        if rtype is None:
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.hist.record(time.perf_counter() - t0, {"fhir.resource_type": rtype,
                                                         "http.response.status_code": status["code"]})


def instrument_app(app, settings) -> None:
    """Add the search-latency middleware, the FastAPI instrumentation (tracing on) and /metrics
    (Prometheus on). Call before the app starts serving."""
    app.add_middleware(SearchLatencyMiddleware, base=settings.fhir_base_path)
    if telemetry.prometheus_enabled():
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
        from starlette.responses import Response

        async def metrics_endpoint(_request):
            return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

        app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    if telemetry.tracing_enabled():
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"])
