"""`helm test` check, run with the vigil image's python: the FHIR gateway answers GET /fhir/metadata with a
CapabilityStatement, ingest's grpc.health.v1 reports SERVING, the model server is ready."""
import json
import os
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

failures = []


def check(name, fn):
    try:
        fn()
        print(f"ok   {name}", flush=True)
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
        print(f"FAIL {name}: {exc!r}", flush=True)
        failures.append(name)


def gateway_metadata():
    url = os.environ["VIGIL_TEST_GATEWAY_URL"] + "/fhir/metadata"
    req = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.load(r)
        assert r.status == 200, r.status
    assert body.get("resourceType") == "CapabilityStatement", body.get("resourceType")
    assert body.get("fhirVersion", "").startswith("4."), body.get("fhirVersion")


def ingest_health():
    with grpc.insecure_channel(os.environ["VIGIL_TEST_INGEST_TARGET"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply.status


def model_ready():
    with urllib.request.urlopen(os.environ["VIGIL_TEST_MODEL_URL"] + "/readyz", timeout=10) as r:
        assert r.status == 200, r.status


if os.environ.get("VIGIL_TEST_GATEWAY_URL"):
    check("gateway GET /fhir/metadata", gateway_metadata)
if os.environ.get("VIGIL_TEST_INGEST_TARGET"):
    check("ingest grpc.health.v1 Check", ingest_health)
if os.environ.get("VIGIL_TEST_MODEL_URL"):
    check("model GET /readyz", model_ready)
sys.exit(1 if failures else 0)
