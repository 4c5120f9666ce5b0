"""Wiring of the gateway process: store + migrations, NATS consumer, token validator, HTTP server.

Nothing here connects or reads the environment at import time; `run` does it all and undoes it all.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

from vigil import tlsreload
from vigil.settings import Settings
from vigil.tokens import TokenValidator
from vigil_gateway.store import Store

log = logging.getLogger("vigil.gateway")


def build_store(database_url: str) -> Store:
    """sqlite:///path (parent folder created) or postgresql://... -> a Store (not yet migrated)."""
    if database_url.startswith("sqlite:///"):
        from vigil_gateway.sqlite_store import SqliteStore
        return SqliteStore.from_url(database_url)
    if database_url.startswith(("postgresql://", "postgres://")):
        from vigil_gateway.postgres_store import PostgresStore
        return PostgresStore(database_url)
    raise ValueError(f"unsupported database_url {database_url!r}: use sqlite:///path or postgresql://...")


def build_validator(settings: Settings) -> TokenValidator | None:
    """A validator for settings.oidc_issuer/oidc_audience, or None when auth is off (no issuer)."""
    if not settings.oidc_issuer:
        return None
    return TokenValidator(settings.oidc_issuer, settings.oidc_audience, leeway=settings.oidc_leeway_seconds,
                          allowed_clients=settings.allowed_clients)


async def _serve(server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when it cannot bind; make it an error
        raise RuntimeError(f"HTTP server failed to start on {server.config.host}:{server.config.port} "
                           f"(exit {exc.code}); is the port in use?") from None


async def connect_nats(url: str, *, timeout: float = 30.0):
    """Connect to NATS, reconnecting forever once connected; fail after `timeout` s at startup."""
    import nats

    async def on_error(exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    async def on_disconnect() -> None:
        log.warning("NATS disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("NATS reconnected")

    try:
        return await asyncio.wait_for(
            nats.connect(url, name="vigil-gateway", max_reconnect_attempts=-1, error_cb=on_error,
                         disconnected_cb=on_disconnect, reconnected_cb=on_reconnect), timeout)
    except TimeoutError:
        raise ConnectionError(f"cannot connect to NATS at {url} within {timeout:g} s") from None


async def run(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run the gateway until cancelled or stopped by SIGTERM/SIGINT.

    Order: store + migrate, NATS + durable consumers, validator, HTTP. `ready` is set once the HTTP
    socket listens. Shutdown (on cancellation, or SIGTERM/SIGINT when run in the main thread): stop
    HTTP, finish the in-flight batch and stop the consumer, drain NATS, close the store; then return.
    """
    import uvicorn

    from vigil.telemetry import setup_telemetry
    from vigil_gateway import telemetry as gateway_telemetry
    from vigil_gateway.app import create_app
    from vigil_gateway.consumer import BusConsumer

    setup_telemetry("vigil-gateway")

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn would re-raise SIGTERM after serving, killing the process before our cleanup;
            # run() handles the signals itself instead.
            yield

    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop_requested.set)
                handled.append(sig)

    store = await asyncio.to_thread(build_store, settings.database_url)
    nc = consumer = outbox = None
    try:
        version = await asyncio.to_thread(store.migrate)
        log.info("store %s at schema version %d", store.dialect, version)
        nc = await connect_nats(settings.nats_url)
        consumer = BusConsumer(nc.jetstream(), store, settings.gateway_consumer_name,
                               stream_replicas=settings.stream_replicas)
        await consumer.start()
        from vigil_gateway.outbox import OutboxPublisher
        outbox = OutboxPublisher(nc.jetstream(), store)
        outbox.start()
        validator = build_validator(settings)
        if validator is None:
            log.warning("auth is OFF (no oidc_issuer): serve on loopback only")
        app = create_app(settings, store, validator, consumer=consumer, outbox_event=outbox.event)
        gateway_telemetry.instrument_app(app, settings)
        config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, lifespan="on",
                                loop="uvloop", http="httptools",
                                log_level="info", access_log=False, server_header=False,  # no URLs (PHI) in logs
                                ssl_certfile=settings.http_tls_cert or None, ssl_keyfile=settings.http_tls_key or None)
        logging.getLogger("uvicorn.access").disabled = True  # never log URLs: they carry patient ids (PHI)
        server = Server(config)
        serve = asyncio.create_task(_serve(server), name="gateway-http")

        async def stop_on_signal() -> None:
            await stop_requested.wait()
            log.info("stop requested: shutting down")
            server.should_exit = True

        watcher = asyncio.create_task(stop_on_signal())
        serve.add_done_callback(lambda _: watcher.cancel())
        try:
            while not server.started:
                if serve.done():
                    await serve  # raises the startup error (e.g. port in use)
                    raise RuntimeError("HTTP server exited during startup")
                await asyncio.sleep(0.02)
            log.info("FHIR gateway listening on %s", settings.fhir_base_url)
            if settings.http_tls and settings.tls_reload_seconds > 0:  # renewals without a restart
                certs = asyncio.create_task(tlsreload.watch_server_context(
                    server.config.ssl, settings.http_tls_cert, settings.http_tls_key, settings.tls_reload_seconds))
                serve.add_done_callback(lambda _: certs.cancel())
            if ready is not None:
                ready.set()
            await asyncio.shield(serve)
        finally:
            if not serve.done():
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(serve), timeout=10)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if outbox is not None:
            await outbox.stop()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        await asyncio.to_thread(store.close)
