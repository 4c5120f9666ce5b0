"""TLS for both network APIs, with a throwaway self-signed CA generated here (docs/security.md):
the FHIR gateway over HTTPS (VIGIL_HTTP_TLS_CERT/KEY) and the gRPC ingest over TLS and mTLS
(VIGIL_GRPC_TLS_CERT/KEY/CLIENT_CA). Real servers via their bootstrap; clients verify against the CA.
The ingest's gRPC TLS also carries the bearer token (token auth on, real Keycloak) in the mTLS case.
"""
from __future__ import annotations

import asyncio
import pathlib
import ssl
import uuid

import grpc
import httpx
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vigil_gateway import bootstrap as gateway_bootstrap
from vigil_ingest import bootstrap as ingest_bootstrap
from vigil_ingest.client import IngestClient

from tests.integration.pki import Pki
from vigil.devservers import free_port
from vigil.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


async def test_gateway_serves_https_verified_against_the_ca(pki, nats_url, tmp_path):
    cert, key = pki.leaf("gateway", server=True)
    port = free_port()
    settings = Settings(nats_url=nats_url, database_url=f"sqlite:///{tmp_path}/gw.db", http_port=port,
                        http_tls_cert=cert, http_tls_key=key, gateway_consumer_name="tls-" + uuid.uuid4().hex[:8])
    assert settings.fhir_base_url.startswith("https://")
    ready = asyncio.Event()
    task = asyncio.create_task(gateway_bootstrap.run(settings, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        verify = ssl.create_default_context(cafile=str(pki.ca_path))
        async with httpx.AsyncClient(verify=verify) as http:
            r = await http.get(f"https://127.0.0.1:{port}/fhir/metadata")
            assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement"
        async with httpx.AsyncClient() as http:  # the system trust store does not know the test CA
            with pytest.raises(httpx.ConnectError):
                await http.get(f"https://127.0.0.1:{port}/fhir/metadata")
        async with httpx.AsyncClient() as http:  # and plain HTTP is not served on the TLS port
            with pytest.raises(httpx.HTTPError):
                await http.get(f"http://127.0.0.1:{port}/fhir/metadata")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _health(target: str, creds: grpc.ChannelCredentials | None) -> int:
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    async with channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return resp.status


async def test_ingest_tls(pki, nats_url):
    cert, key = pki.leaf("ingest", server=True)
    srv = await ingest_bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url,
                                                grpc_tls_cert=cert, grpc_tls_key=key))
    target = f"127.0.0.1:{srv.port}"
    try:
        ca = pki.ca_path.read_bytes()
        assert await _health(target, grpc.ssl_channel_credentials(root_certificates=ca)) == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:  # plaintext client
            await _health(target, None)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        (pki.dir / "other").mkdir(exist_ok=True)
        other = Pki(pki.dir / "other")
        with pytest.raises(grpc.aio.AioRpcError) as e:  # a client trusting another CA refuses the server
            await _health(target, grpc.ssl_channel_credentials(root_certificates=other.ca_path.read_bytes()))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(1)


async def test_ingest_mtls_requires_a_client_certificate(pki, nats_url, keycloak):
    cert, key = pki.leaf("ingest-m", server=True)
    client_cert, client_key = pki.leaf("device-gw", server=False)
    srv = await ingest_bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url,
                                                grpc_tls_cert=cert, grpc_tls_key=key,
                                                grpc_tls_client_ca=str(pki.ca_path), oidc_issuer=keycloak.issuer))
    target = f"127.0.0.1:{srv.port}"
    try:
        ca = pki.ca_path.read_bytes()
        with pytest.raises(grpc.aio.AioRpcError) as e:  # TLS without a client certificate
            await _health(target, grpc.ssl_channel_credentials(root_certificates=ca))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=pathlib.Path(client_key).read_bytes(),
                                             certificate_chain=pathlib.Path(client_cert).read_bytes())
        assert await _health(target, creds) == health_pb2.HealthCheckResponse.SERVING
        # mTLS and the bearer token together: the vendor registers a device
        async with IngestClient(target, token=keycloak.token("vigil-device-demo"), credentials=creds) as c:
            device = "tls-" + uuid.uuid4().hex[:8]
            assert (await c.register_device(device)).vendor == "vigil-device-demo"
    finally:
        await srv.stop(1)


async def test_ingest_plaintext_health_listener_beside_an_mtls_device_port(pki):
    """VIGIL_GRPC_HEALTH_LISTEN: the kubelet's gRPC probe (plaintext, no client certificate) reaches a
    health-only listener while the device port requires mTLS. It answers from the device server's own
    health, so it turns NOT_SERVING while NATS is down and SERVING again after; it serves nothing but
    grpc.health.v1; it closes with the server."""
    from vigil import devservers
    from vigil.device.v1 import ingest_pb2, ingest_pb2_grpc

    cert, key = pki.leaf("ingest-h", server=True)
    nats_port = devservers.free_port()
    nats_dir = pki.dir / f"nats-{uuid.uuid4().hex[:6]}"
    nats = devservers.start_nats(store_dir=nats_dir, port=nats_port)
    srv = await ingest_bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats.url,
                                                grpc_tls_cert=cert, grpc_tls_key=key,
                                                grpc_tls_client_ca=str(pki.ca_path),
                                                grpc_health_listen="127.0.0.1:0"))
    probe = f"127.0.0.1:{srv.health_port}"
    try:
        assert srv.health_port and srv.health_port != srv.port
        assert await _health(probe, None) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the device port still requires mTLS
            await _health(f"127.0.0.1:{srv.port}", None)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(probe) as ch:  # health only: no device API in plaintext
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ingest_pb2_grpc.IngestServiceStub(ch).UploadReadings(ingest_pb2.UploadReadingsRequest(),
                                                                          timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        nats.kill()
        for _ in range(100):
            if await _health(probe, None) == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.1)
        assert await _health(probe, None) == health_pb2.HealthCheckResponse.NOT_SERVING
        nats = devservers.start_nats(store_dir=nats_dir, port=nats_port)
        for _ in range(150):
            if await _health(probe, None) == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert await _health(probe, None) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await srv.stop(1)
        nats.stop()
    with pytest.raises(grpc.aio.AioRpcError) as e:  # closed with the server
        await _health(probe, None)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# --- renewals: certificates re-read while serving (vigil.tlsreload) ----------------------------------

async def _served_certificate(port: int, ca: pathlib.Path, alpn: str) -> x509.Certificate:
    """The certificate a new TLS connection to the port gets (verified against the CA)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols([alpn])
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der)


def _renew(pki: Pki, cert: str, key: str, name: str) -> x509.Certificate:
    """What cert-manager and the kubelet do: a new pair replaces the mounted files (each file atomically)."""
    new_cert, new_key = pki.leaf(name, server=True)
    pathlib.Path(new_key).replace(key)
    pathlib.Path(new_cert).replace(cert)
    return x509.load_pem_x509_certificate(pathlib.Path(cert).read_bytes())


async def _until_served(port: int, pki: Pki, alpn: str, want: x509.Certificate) -> x509.Certificate:
    got = None
    for _ in range(100):
        got = await _served_certificate(port, pki.ca_path, alpn)
        if got.serial_number == want.serial_number:
            break
        await asyncio.sleep(0.1)
    return got


def _mismatched_pair(pki: Pki, cert: str, key: str) -> None:
    """A broken renewal: a new certificate, but the key of another one."""
    stray_cert, _ = pki.leaf("stray-a", server=True)
    _, stray_key = pki.leaf("stray-b", server=True)
    pathlib.Path(stray_key).replace(key)
    pathlib.Path(stray_cert).replace(cert)


async def test_gateway_serves_a_renewed_certificate_without_a_restart(pki, nats_url, tmp_path):
    cert, key = pki.leaf("gw-renew", server=True)
    first = x509.load_pem_x509_certificate(pathlib.Path(cert).read_bytes())
    port = free_port()
    settings = Settings(nats_url=nats_url, database_url=f"sqlite:///{tmp_path}/gw.db", http_port=port,
                        http_tls_cert=cert, http_tls_key=key, tls_reload_seconds=1,
                        gateway_consumer_name="tls-r-" + uuid.uuid4().hex[:8])
    ready = asyncio.Event()
    task = asyncio.create_task(gateway_bootstrap.run(settings, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        assert (await _served_certificate(port, pki.ca_path, "http/1.1")).serial_number == first.serial_number
        renewed = _renew(pki, cert, key, "gw-renew-2")
        assert (await _until_served(port, pki, "http/1.1", renewed)).serial_number == renewed.serial_number
        verify = ssl.create_default_context(cafile=str(pki.ca_path))
        async with httpx.AsyncClient(verify=verify) as http:
            assert (await http.get(f"https://127.0.0.1:{port}/fhir/metadata")).status_code == 200
        # a renewal that went wrong is not taken: the renewed certificate stays in service
        _mismatched_pair(pki, cert, key)
        await asyncio.sleep(2.5)
        assert (await _served_certificate(port, pki.ca_path, "http/1.1")).serial_number == renewed.serial_number
        # and the next good one is
        again = _renew(pki, cert, key, "gw-renew-3")
        assert (await _until_served(port, pki, "http/1.1", again)).serial_number == again.serial_number
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_ingest_serves_a_renewed_certificate_without_a_restart(pki, nats_url):
    cert, key = pki.leaf("ingest-renew", server=True)
    first = x509.load_pem_x509_certificate(pathlib.Path(cert).read_bytes())
    srv = await ingest_bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url,
                                                grpc_tls_cert=cert, grpc_tls_key=key, tls_reload_seconds=1))
    target = f"127.0.0.1:{srv.port}"
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_path.read_bytes())
    try:
        assert (await _served_certificate(srv.port, pki.ca_path, "h2")).serial_number == first.serial_number
        renewed = _renew(pki, cert, key, "ingest-renew-2")
        assert (await _until_served(srv.port, pki, "h2", renewed)).serial_number == renewed.serial_number
        assert await _health(target, creds) == health_pb2.HealthCheckResponse.SERVING
        _mismatched_pair(pki, cert, key)
        await asyncio.sleep(2.5)
        for _ in range(3):  # handshakes after the look at the files still get the renewed certificate
            assert (await _served_certificate(srv.port, pki.ca_path, "h2")).serial_number == renewed.serial_number
            await asyncio.sleep(0.6)
        assert await _health(target, creds) == health_pb2.HealthCheckResponse.SERVING
        again = _renew(pki, cert, key, "ingest-renew-3")
        assert (await _until_served(srv.port, pki, "h2", again)).serial_number == again.serial_number
    finally:
        await srv.stop(1)
