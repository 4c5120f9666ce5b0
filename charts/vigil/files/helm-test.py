"""`helm test` check, run with the vigil image's python: the FHIR gateway answers GET /fhir/metadata with a
CapabilityStatement, ingest's grpc.health.v1 reports SERVING, the model server is ready.

With gateway.tls / ingest.tls the checks use TLS. They connect by Service name, so the host name in the
certificate is not checked; the chain is checked against the TLS Secret's ca.crt when it has one (mounted
at VIGIL_TEST_*_CA), else the gateway check does not verify it and the ingest check only does a TLS
handshake (gRPC cannot skip verification). With mTLS the ingest check is skipped: no client certificate.
"""
import json
import os
import socket
import ssl
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


def _ca(name):
    path = os.environ.get(name, "")
    return path if path and os.path.exists(path) else None


def gateway_metadata():
    url = os.environ["VIGIL_TEST_GATEWAY_URL"] + "/fhir/metadata"
    req = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
    ctx = None
    if url.startswith("https://"):
        ca = _ca("VIGIL_TEST_GATEWAY_CA")
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False  # connected by Service name
        if ca is None:
            ctx.verify_mode = ssl.CERT_NONE
            print("note gateway certificate not verified (no ca.crt in gateway.tls.secretName)", flush=True)
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        body = json.load(r)
        assert r.status == 200, r.status
    assert body.get("resourceType") == "CapabilityStatement", body.get("resourceType")
    assert body.get("fhirVersion", "").startswith("4."), body.get("fhirVersion")


def _tls_handshake(target):
    """TLS handshake with ALPN h2, no verification: (leaf certificate DER, negotiated protocol)."""
    host, port = target.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as conn:
        return conn.getpeercert(binary_form=True), conn.selected_alpn_protocol()


def _channel(target):
    mode = os.environ.get("VIGIL_TEST_INGEST_TLS", "")
    if not mode:
        return grpc.insecure_channel(target)
    der, alpn = _tls_handshake(target)
    assert alpn == "h2", f"ALPN {alpn!r}, want h2"
    ca = _ca("VIGIL_TEST_INGEST_CA")
    if ca is None:
        print("note ingest: TLS handshake (h2) only: no ca.crt in ingest.tls.secretName to verify with", flush=True)
        return None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert names, "the ingest certificate has no DNS name"
    # Connected by Service name: verify the chain, accept the certificate's own (first) DNS name.
    name = names[0].replace("*", "check", 1)
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])


def ingest_health():
    channel = _channel(os.environ["VIGIL_TEST_INGEST_TARGET"])
    if channel is None:
        return
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply.status


def model_ready():
    with urllib.request.urlopen(os.environ["VIGIL_TEST_MODEL_URL"] + "/readyz", timeout=10) as r:
        assert r.status == 200, r.status


if os.environ.get("VIGIL_TEST_GATEWAY_URL"):
    check("gateway GET /fhir/metadata", gateway_metadata)
if os.environ.get("VIGIL_TEST_INGEST_TLS") == "mtls":
    print("skip ingest grpc.health.v1 Check: ingest requires client certificates (mTLS)", flush=True)
elif os.environ.get("VIGIL_TEST_INGEST_TARGET"):
    check("ingest grpc.health.v1 Check", ingest_health)
if os.environ.get("VIGIL_TEST_MODEL_URL"):
    check("model GET /readyz", model_ready)
sys.exit(1 if failures else 0)
