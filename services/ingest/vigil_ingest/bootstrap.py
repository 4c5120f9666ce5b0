"""Wiring: connect to NATS, make sure the streams exist, serve IngestService over gRPC.

Nothing here runs at import time; `start()` does the I/O and `run()` serves until cancelled.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vigil import bus
from vigil.settings import Settings
from vigil.tlsreload import CertFiles, GrpcCertificates
from vigil_ingest.publisher import JetStreamPublisher, Publisher
from vigil_ingest.registry import KVStore, MemoryStore, Registry
from vigil_ingest.server import DEVICE_SERVICE_NAME, SERVICE_NAME, IngestServicer, build_server

log = logging.getLogger("vigil.ingest")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class IngestServer:
    """A running ingest server: `.port` is the bound port (also when 0 was asked for)."""

    server: grpc.aio.Server
    port: int
    health: object
    servicer: IngestServicer
    nc: object | None = None
    health_server: grpc.aio.Server | None = None  # VIGIL_GRPC_HEALTH_LISTEN: plaintext, health only
    health_port: int | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        await self.health.set(DEVICE_SERVICE_NAME, status)

    async def stop(self, grace: float = 5) -> None:
        """Stop taking new RPCs, let in-flight batches finish (up to `grace` s), then close NATS."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.servicer.registry.stop()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=max(grace, 1))
            except Exception:  # noqa: BLE001 - closing anyway
                with contextlib.suppress(Exception):
                    await self.nc.close()


async def start_health_listener(listen: str, health_servicer, *, reuse_port: bool = False
                                ) -> tuple[grpc.aio.Server, int]:
    """A plaintext gRPC server on `listen` serving only grpc.health.v1, answering from the device
    server's own HealthServicer (so it turns NOT_SERVING with it): what the kubelet's gRPC probe can
    reach when the device port is TLS or mTLS. Health carries no data and needs no token."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind the gRPC health listen address {listen}")
    await server.start()
    return server, port


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when VIGIL_GRPC_TLS_CERT/KEY are set; with VIGIL_GRPC_TLS_CLIENT_CA, client certificates
    (mTLS) are required. The files are looked at again every VIGIL_TLS_RELOAD_SECONDS (vigil.tlsreload):
    a renewed certificate serves new connections without a restart."""
    if not settings.grpc_tls_cert:
        return None
    files = (settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca)
    if settings.tls_reload_seconds > 0:
        return GrpcCertificates(*files, every=settings.tls_reload_seconds).credentials()
    chain, key, ca = CertFiles(*files).read()
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


async def start(settings: Settings, *, publisher: Publisher | None = None,
                stream_window: int = 64, max_inflight: int = 4096, max_inflight_bytes: int = 256 << 20,
                publish_timeout: float = 5.0, registry: Registry | None = None,
                validator=None, reuse_port: bool = False) -> IngestServer:
    """Connect to NATS (unless `publisher` is given), ensure the streams, and start serving.

    `reuse_port`: share the listen port with other processes (SO_REUSEPORT; `vigil ingest --workers`).
    Off by default, so a second server on a port already taken fails to start instead of silently
    taking part of the traffic.

    Health is SERVING once NATS is connected (or at once with an injected publisher) and turns
    NOT_SERVING while the NATS connection is down.
    """
    bus.check_compression(settings.bus_compression)  # a bad setting stops the start before any connection
    nc = None
    holder: dict = {}

    if publisher is None:
        import nats

        async def disconnected():
            srv = holder.get("srv")
            if srv is not None and srv._stopped:
                return  # our own shutdown
            if srv is not None:
                await srv.set_serving(False)
            log.warning("NATS disconnected: health NOT_SERVING, batches get UNAVAILABLE until it is back")

        async def reconnected():
            if "srv" in holder:
                await holder["srv"].set_serving(True)
            log.info("NATS reconnected")

        async def error_cb(e):
            log.warning("NATS error: %s", e)

        nc = await nats.connect(settings.nats_url, name="vigil-ingest", max_reconnect_attempts=-1,
                                disconnected_cb=disconnected, reconnected_cb=reconnected,
                                error_cb=error_cb, connect_timeout=5)
        js = nc.jetstream()
        await bus.ensure_streams(js, replicas=settings.stream_replicas)
        publisher = JetStreamPublisher(nc, timeout=publish_timeout, compression=settings.bus_compression,
                                       max_pending=max(max_inflight, 1) * 2)
        await publisher.start()
        if registry is None:
            async def emit(subject: str, body: bytes, msg_id: str) -> None:
                await js.publish(subject, body, headers={bus.MSG_ID: msg_id}, stream=bus.EHR_STREAM,
                                 timeout=publish_timeout)
            registry = Registry(await KVStore.open(js, replicas=settings.stream_replicas), emit=emit)
    if registry is None:
        registry = Registry(MemoryStore())
    await registry.start()

    interceptors = []
    from vigil import telemetry

    if telemetry.tracing_enabled():  # gRPC server spans (one per RPC; a stream is one RPC)
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor())
    if settings.auth_enabled:
        from vigil.tokens import TokenValidator
        from vigil_ingest.auth import AuthInterceptor

        interceptors.append(AuthInterceptor(validator or TokenValidator(
            settings.oidc_issuer, settings.ingest_audience, leeway=settings.oidc_leeway_seconds,
            allowed_clients=settings.allowed_clients)))
    servicer = IngestServicer(publisher, stream_window=stream_window, max_inflight=max_inflight,
                              max_inflight_bytes=max_inflight_bytes,
                              publish_timeout=publish_timeout, registry=registry)
    server, health_servicer = build_server(servicer, interceptors=interceptors, reuse_port=reuse_port)
    creds = server_credentials(settings)
    port = (server.add_secure_port(settings.grpc_listen, creds) if creds is not None
            else server.add_insecure_port(settings.grpc_listen))
    if port == 0:
        raise RuntimeError(f"could not bind gRPC listen address {settings.grpc_listen}")
    await server.start()
    srv = IngestServer(server=server, port=port, health=health_servicer, servicer=servicer, nc=nc)
    holder["srv"] = srv
    await srv.set_serving(nc is None or nc.is_connected)
    if settings.grpc_health_listen:
        try:
            srv.health_server, srv.health_port = await start_health_listener(
                settings.grpc_health_listen, health_servicer, reuse_port=reuse_port)
        except BaseException:
            await srv.stop(0)
            raise
        log.info("vigil ingest health (plaintext, grpc.health.v1 only) on %s (port %d)",
                 settings.grpc_health_listen, srv.health_port)
    log.info("vigil ingest listening on %s (port %d, %s, auth %s, %s mapper)", settings.grpc_listen, port,
             "mTLS" if settings.grpc_tls_client_ca else "TLS" if creds else "plaintext",
             "on" if settings.auth_enabled else "OFF", "native" if servicer.fast is not None else "Python")
    return srv


async def run(settings: Settings, *, ready: asyncio.Event | None = None, grace: float = 5,
              reuse_port: bool = False) -> None:
    """Start, set `ready`, serve until cancelled, then stop gracefully."""
    from vigil.telemetry import setup_telemetry

    setup_telemetry("vigil-ingest")
    srv = await start(settings, reuse_port=reuse_port)
    try:
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(srv.stop(grace))
