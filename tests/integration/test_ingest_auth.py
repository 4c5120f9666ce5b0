"""Device API auth against a real Keycloak and NATS: tokens, the write scope, vendor ownership of devices.

Rows of the error table in docs/device-api.md: UNAUTHENTICATED (no/invalid token, wrong audience),
PERMISSION_DENIED (missing scope, another vendor's device), UNAVAILABLE (issuer keys unreachable).
"""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from vigil_ingest import bootstrap
from vigil_ingest.client import ClientCredentials, IngestClient, make_reading

from vigil import devservers
from vigil.device.v1 import ingest_pb2, ingest_pb2_grpc
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0
from vigil.tokens import TokenValidator

pytestmark = pytest.mark.integration
T = DEFAULT_T0.timestamp()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def other_token(keycloak, *, with_scope: bool) -> str:
    data = {"grant_type": "client_credentials", "client_id": "vigil-device-other",
            "client_secret": keycloak.device_other_secret}
    if with_scope:
        data["scope"] = "device/readings.write"
    with urllib.request.urlopen(f"{keycloak.issuer}/protocol/openid-connect/token",
                                urllib.parse.urlencode(data).encode(), timeout=10) as r:
        return json.load(r)["access_token"]


def reason(err: grpc.aio.AioRpcError) -> str:
    st = rpc_status.from_call(err)
    for d in st.details:
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo in {st}")


@pytest.fixture
async def secured(nats_url, keycloak):
    if not keycloak.device_other_secret:
        pytest.skip("Keycloak was started without VIGIL_DEVICE_OTHER_CLIENT_SECRET")
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url,
                                         oidc_issuer=keycloak.issuer))
    yield srv
    await srv.stop(1)


def one(device, seq=1):
    return [make_reading(seq, "8867-4", 70, "/min", T)]


async def test_error_missing_or_invalid_token_is_unauthenticated(secured, keycloak):
    for token in (None, "not-a-jwt", keycloak.token("vigil-ehr")):  # vigil-ehr: audience vigil-fhir only
        async with IngestClient(secured.target, token=token, retries=0) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.register_device(uid("mon"))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert reason(e.value) == ("TOKEN_MISSING" if token is None else "TOKEN_INVALID")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.upload([ingest_pb2.ReadingBatch(device_id="x", readings=one("x"))])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_need_no_token(secured):
    async with grpc.aio.insecure_channel(secured.target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_vendor_writes_its_own_devices_with_client_credentials(secured, keycloak):
    creds = ClientCredentials.for_issuer(keycloak.issuer, "vigil-device-demo", keycloak.device_secret)
    device, patient = uid("mon"), uid("pt")
    async with IngestClient(secured.target, token_provider=creds) as c:
        d = await c.register_device(device)
        assert d.vendor == "vigil-device-demo"
        await c.bind_patient(device, patient, T - 60)
        acks = await c.send(device, patient, one(device))
        assert acks[0].reading_count == 1
        assert (await c.get_device(device)).bindings[0].patient_id == patient


async def test_error_missing_scope_is_permission_denied(secured, keycloak):
    async with IngestClient(secured.target, token=other_token(keycloak, with_scope=False), retries=0) as c:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.register_device(uid("mon"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason(e.value) == "INSUFFICIENT_SCOPE"
        stub = ingest_pb2_grpc.IngestServiceStub(c._channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            req = ingest_pb2.StreamReadingsRequest(batch=ingest_pb2.ReadingBatch(device_id="x", readings=one("x")))
            async for _ in stub.StreamReadings(iter([req]), metadata=c._static_metadata):
                pass
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_error_another_vendors_device_is_permission_denied(secured, keycloak):
    device, patient = uid("mon"), uid("pt")
    async with IngestClient(secured.target, token=keycloak.token("vigil-device-demo")) as demo:
        await demo.register_device(device)
        await demo.bind_patient(device, patient, T - 60)
    async with IngestClient(secured.target, token=other_token(keycloak, with_scope=True), retries=0) as other:
        own = uid("mon")
        assert (await other.register_device(own)).vendor == "vigil-device-other"  # the scope works
        for call in (lambda: other.register_device(device), lambda: other.get_device(device),
                     lambda: other.bind_patient(device, uid("pt"), T + 86400),
                     lambda: other.unbind_patient(device, T + 60), lambda: other.device_health(device),
                     lambda: other.upload([ingest_pb2.ReadingBatch(device_id=device, readings=one(device))])):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason(e.value) == "DEVICE_OF_OTHER_VENDOR"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await other.send(device, patient, one(device))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_error_issuer_keys_unreachable_is_unavailable(nats_url, keycloak):
    dead = f"http://127.0.0.1:{devservers.free_port()}/certs"
    validator = TokenValidator(keycloak.issuer, "vigil-ingest", jwks_url=dead)
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url, oidc_issuer=keycloak.issuer),
                                validator=validator)
    try:
        async with IngestClient(srv.target, token=keycloak.token("vigil-device-demo"), retries=0) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.get_device(uid("mon"))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason(e.value) == "ISSUER_UNAVAILABLE"
    finally:
        await srv.stop(1)
