"""`vigil gateway`: run the FHIR gateway (wired into the `vigil` command by vigil/cli.py)."""
from __future__ import annotations

import argparse
import asyncio
import logging


def add_commands(subparsers) -> None:
    """Add the `gateway` sub-command; it sets `func` (args -> exit code) on the parsed namespace."""
    p = subparsers.add_parser("gateway", help="run the FHIR R4 gateway (bus consumer + HTTP API)",
                              description="Serve stored Observations and RiskAssessments over FHIR R4 "
                                          "REST. Settings come from VIGIL_* environment variables; "
                                          "options override them.")
    p.add_argument("--http-host", default=None, help="listen address (VIGIL_HTTP_HOST)")
    p.add_argument("--http-port", type=int, default=None, help="listen port (VIGIL_HTTP_PORT)")
    p.add_argument("--database-url", default=None,
                   help="sqlite:///path or postgresql://user@host:port/db (VIGIL_DATABASE_URL)")
    p.add_argument("--nats-url", default=None, help="NATS server URL (VIGIL_NATS_URL)")
    p.set_defaults(func=run_gateway_command)
    m = subparsers.add_parser("gateway-migrate", help="apply the gateway store's schema migrations and exit",
                              description="Apply pending schema migrations to VIGIL_DATABASE_URL (or "
                                          "--database-url); safe to run again (already applied = no-op).")
    m.add_argument("--database-url", default=None,
                   help="sqlite:///path or postgresql://user@host:port/db (VIGIL_DATABASE_URL)")
    m.set_defaults(func=run_migrate_command)


def run_migrate_command(args: argparse.Namespace) -> int:
    from vigil.settings import Settings
    from vigil_gateway.bootstrap import build_store

    settings = Settings.from_env(database_url=args.database_url)
    store = build_store(settings.database_url)
    try:
        version = store.migrate()
    finally:
        store.close()
    print(f"gateway store at schema version {version}")
    return 0


def run_gateway_command(args: argparse.Namespace) -> int:
    from vigil import gc_tuning
    from vigil.settings import Settings
    from vigil_gateway import bootstrap

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(http_host=getattr(args, "http_host", None), http_port=args.http_port,
                                 database_url=args.database_url, nats_url=args.nats_url)
    gc_tuning.tune(settings.gc_thresholds)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(bootstrap.run(settings))
    except KeyboardInterrupt:
        pass
    return 0


def _loop_factory():
    """uvloop when installed (uvicorn[standard] brings it), else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
