"""`vigil ingest` and `vigil replay` sub-commands (wired into the `vigil` console command by vigil/cli.py)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys


def _iso_datetime(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="serve the device ingest gRPC API (IngestService)")
    p.add_argument("--listen", help="gRPC listen address host:port (default VIGIL_GRPC_LISTEN or 127.0.0.1:50051)")
    p.add_argument("--nats-url", help="NATS server URL (default VIGIL_NATS_URL or nats://127.0.0.1:4222)")
    p.add_argument("--workers", type=int, default=None,
                   help="serving processes sharing the listen port, e.g. one per core (default "
                        "VIGIL_INGEST_WORKERS or 1); see vigil_ingest.workers")
    p.set_defaults(func=cmd_ingest)

    r = subparsers.add_parser("replay", help="replay PhysioNet 2019 stays through the ingest API")
    r.add_argument("path", help="folder of .psv files or the challenge .tar.gz")
    r.add_argument("--target", default="127.0.0.1:50051", help="ingest gRPC address (default %(default)s)")
    r.add_argument("--limit", type=int, help="replay at most this many stays")
    r.add_argument("--start", type=_iso_datetime, help="ICU admission time T0 (ISO 8601, default 2026-01-01T00:00Z)")
    r.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible, N = N x real time")
    r.add_argument("--token", default=None, help="bearer token (default $VIGIL_DEVICE_TOKEN)")
    r.add_argument("--concurrency", type=int, default=256, help="stays replayed at once (default %(default)s)")
    r.add_argument("--fhir-base", default=None,
                   help="FHIR base URL: first PUT each stay's Patient and Encounters there (e.g. http://127.0.0.1:8080/fhir)")
    r.add_argument("--fhir-token", default=None, help="bearer token for --fhir-base (default $VIGIL_FHIR_TOKEN)")
    r.set_defaults(func=cmd_replay)


def cmd_ingest(args: argparse.Namespace) -> int:
    import logging

    from vigil import gc_tuning
    from vigil.settings import Settings
    from vigil_ingest import bootstrap, workers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(grpc_listen=args.listen, nats_url=args.nats_url)
    n = workers.worker_count(args.workers)
    if n > 1:
        if workers.listen_port(settings.grpc_listen) == 0:
            print(f"vigil ingest: --workers {n} needs a fixed listen port, not {settings.grpc_listen!r}",
                  file=sys.stderr)
            return 2
        argv = ["--listen", settings.grpc_listen, "--nats-url", settings.nats_url]
        return workers.supervise(n, argv)
    reuse_port = workers.WORKER_ENV in os.environ  # one of several workers on the same port
    if reuse_port:
        workers.die_with_supervisor()
    gc_tuning.tune(settings.gc_thresholds)

    async def serve() -> None:
        # SIGTERM/SIGINT cancel run(), which then stops gracefully (drains in-flight batches).
        # Only the first signal counts: a worker gets SIGTERM from its supervisor and, when a process
        # group is signalled, directly too; a second cancel must not cut the drain short.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
                loop.add_signal_handler(sig, lambda: None)
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        with contextlib.suppress(asyncio.CancelledError):
            await bootstrap.run(settings, reuse_port=reuse_port)

    try:  # grpc.aio runs on uvloop too; it costs the server less CPU per message
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from vigil import timecontract
    from vigil_ingest.replay import replay

    token = args.token or os.environ.get("VIGIL_DEVICE_TOKEN") or None

    def progress(s):
        print(f"\r{s.stays} stays, {s.batches} batches, {s.readings} readings, "
              f"{s.readings_per_second:,.0f} readings/s", end="", file=sys.stderr, flush=True)

    stats = asyncio.run(replay(args.path, target=args.target, limit=args.limit,
                               start=args.start or timecontract.DEFAULT_T0, speed=args.speed, token=token,
                               progress=progress, concurrency=args.concurrency, fhir_base=args.fhir_base,
                               fhir_token=args.fhir_token or os.environ.get("VIGIL_FHIR_TOKEN") or None))
    print(file=sys.stderr)
    print(f"replayed {stats.stays} stays: {stats.batches} batches, {stats.readings} readings "
          f"({stats.duplicates} duplicate batches) in {stats.seconds:.1f}s "
          f"= {stats.readings_per_second:,.0f} readings/s")
    return 0
