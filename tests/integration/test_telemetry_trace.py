"""One connected trace from a reading to its stored RiskAssessment, on the real NATS JetStream.

Ingest (bootstrap.start, gRPC), the inference worker (with the in-process LocalModel twin around a tiny
XGBoost booster) and the gateway's bus consumer (SQLite store) run in this process and event loop, with
one TracerProvider exporting to memory. The expected shape:

  [SERVER] ingest batch           (a root per batch, linked to the long-lived StreamReadings RPC span)
      -> [PRODUCER] publish vigil.v1.observation.<patient>         (traceparent in the NATS headers)
        -> [CONSUMER] process vigil.observations                   (worker; parent + link = the message)
          -> [CLIENT] model predict_explain
          -> [PRODUCER] publish vigil.v1.riskassessment.<patient>  (one per RiskAssessment)
            -> [CONSUMER] process VIGIL_RISK                        (gateway; parent = an RA message)
              -> [INTERNAL] store upsert
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

import nats
import numpy as np
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util._once import Once
from vigil_gateway import consumer as gateway_consumer
from vigil_gateway.bootstrap import build_store
from vigil_gateway.consumer import BusConsumer
from vigil_inference import features as F
from vigil_inference.client import LocalModel
from vigil_inference.model import LoadedModel
from vigil_inference.worker import Worker
from vigil_ingest import bootstrap
from vigil_ingest.client import IngestClient, make_reading

from vigil import bus, telemetry
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0

pytestmark = pytest.mark.integration
T = DEFAULT_T0.timestamp()


@pytest.fixture
def telemetry_on():
    """A process-wide TracerProvider + MeterProvider for this test; the globals are reset afterwards
    (test-only use of the API's private globals, so later tests run with telemetry off again)."""
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    saved = (trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE,
             metrics._internal._METER_PROVIDER, metrics._internal._METER_PROVIDER_SET_ONCE)
    provider = telemetry.setup_telemetry("vigil-test", exporter=exporter, metric_reader=reader)
    assert provider is not None and telemetry.tracing_enabled()
    yield exporter, reader
    provider.shutdown()
    trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved[0], saved[1] if saved[0] else Once()
    metrics._internal._METER_PROVIDER = saved[2]
    metrics._internal._METER_PROVIDER_SET_ONCE = saved[3] if saved[2] else Once()


def tiny_model() -> LocalModel:
    import xgboost as xgb

    names = F.feature_names()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, len(names)))
    y = (x[:, 0] > 0).astype(float)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
                        xgb.DMatrix(x, label=y, feature_names=names), num_boost_round=2)
    return LocalModel(LoadedModel(booster=booster, threshold=0.5, feature_names=names, version="trace-test"))


async def wait_for(predicate, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_one_connected_trace_from_reading_to_stored_risk_assessment(nats_url, tmp_path, telemetry_on,
                                                                          monkeypatch):
    exporter, reader = telemetry_on
    tag = uuid.uuid4().hex[:10]
    patient, device = f"pt-{tag}", f"mon-{tag}"
    settings = Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url, worker_name=f"trace-worker-{tag}",
                        gateway_consumer_name=f"trace-gw-{tag}")
    # this test's patient only (the streams are shared by every test of the session)
    monkeypatch.setattr(gateway_consumer, "SUBSCRIPTIONS", (
        (bus.OBSERVATIONS_STREAM, bus.observation_subject(patient), "observations"),
        (bus.RISK_STREAM, bus.risk_subject(patient), "risk"),
        (bus.EHR_STREAM, bus.ehr_subject("Patient", patient), "ehr")))

    srv = await bootstrap.start(settings)
    nc = await nats.connect(nats_url)
    store = build_store(f"sqlite:///{tmp_path}/gw.db")
    store.migrate()
    consumer = BusConsumer(nc.jetstream(), store, settings.gateway_consumer_name, fetch_timeout=0.2)
    await consumer.start()
    worker = Worker(nc.jetstream(), tiny_model(), settings, fetch_timeout=0.2,
                    filter_subject=bus.observation_subject(patient),
                    ehr_filter_subject=bus.ehr_subject("Patient", patient), anomaly=False)
    await worker.start()
    worker_task = asyncio.create_task(worker.run_forever())
    client = IngestClient(srv.target)
    try:
        await client.register_device(device)
        await client.bind_patient(device, patient, T - 86400)
        readings = [make_reading(i + 1, "8867-4", 80 + i, "/min", T + 60 * i) for i in range(3)]
        acks = await client.send(device, patient, readings)
        assert len(acks) == 1 and acks[0].reading_count == 3
        await wait_for(lambda: store.search("RiskAssessment", subject=f"Patient/{patient}")[0] >= 2)
        await wait_for(lambda: any(s.name == "store upsert" and s.attributes.get("messaging.destination.name")
                                   == bus.RISK_STREAM for s in exporter.get_finished_spans()))
    finally:
        worker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task
        await worker.stop()
        await consumer.stop()
        await client.close()
        await nc.close()  # (drain would wait for the cancelled worker's pending fetch)
        await srv.stop(1)
        store.close()

    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}

    def one(name, kind, **attrs):
        found = [s for s in spans if s.name == name and s.kind == kind
                 and all(s.attributes.get(k) == v for k, v in attrs.items())]
        assert found, f"no {kind.name} span {name!r} {attrs}; have {sorted({s.name for s in spans})}"
        return found

    def parent_of(span):
        assert span.parent is not None, f"{span.name} has no parent"
        return by_id[span.parent.span_id]

    obs_subject, risk_subject = bus.observation_subject(patient), bus.risk_subject(patient)
    publish_obs = one(f"publish {obs_subject}", SpanKind.PRODUCER)
    assert len(publish_obs) == 1
    publish_obs = publish_obs[0]
    batch = parent_of(publish_obs)
    assert batch.name == "ingest batch" and batch.attributes["vigil.batch.readings"] == 3
    assert batch.kind == SpanKind.SERVER and batch.parent is None  # the root of the trace
    (rpc_link,) = batch.links
    server = by_id[rpc_link.context.span_id]
    assert server.kind == SpanKind.SERVER and server.name.endswith("IngestService/StreamReadings")

    process = [s for s in one("process vigil.observations", SpanKind.CONSUMER)
               if s.parent is not None and s.parent.span_id == publish_obs.context.span_id]
    assert len(process) == 1
    process = process[0]
    assert [link.context.span_id for link in process.links] == [publish_obs.context.span_id]
    predict = one("model predict_explain", SpanKind.CLIENT)
    assert [parent_of(s) for s in predict] == [process]
    publish_ra = one(f"publish {risk_subject}", SpanKind.PRODUCER)
    assert len(publish_ra) >= 2 and all(parent_of(s) is process for s in publish_ra)
    assert all(s.attributes["messaging.system"] == "nats" for s in publish_ra)

    gw_process = [s for s in one(f"process {bus.RISK_STREAM}", SpanKind.CONSUMER)
                  if parent_of(s) in publish_ra]
    assert gw_process, "the gateway's processing of the RiskAssessment does not continue the worker's trace"
    gw_publish_ids = {link.context.span_id for s in gw_process for link in s.links}
    assert gw_publish_ids <= {s.context.span_id for s in publish_ra}
    stored = [s for s in one("store upsert", SpanKind.INTERNAL, **{"messaging.destination.name": bus.RISK_STREAM})
              if parent_of(s) in gw_process]
    assert stored

    chain = [batch, publish_obs, process, predict[0], publish_ra[0], gw_process[0], stored[0]]
    assert len({s.context.trace_id for s in chain}) == 1, "not one trace"
    # the gateway's Observation storage is part of the same trace (a second branch)
    gw_obs = [s for s in spans if s.name == f"process {bus.OBSERVATIONS_STREAM}" and s.parent is not None
              and s.parent.span_id == publish_obs.context.span_id]
    assert gw_obs and gw_obs[0].context.trace_id == batch.context.trace_id

    # metrics of the same run
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"vigil.ingest.readings", "vigil.ingest.batch.size", "vigil.worker.readings", "vigil.model.latency",
            "vigil.worker.consumer.lag", "vigil.gateway.stored", "vigil.worker.risk_assessments"} <= names, names
