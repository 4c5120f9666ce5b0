"""Raw ceilings: the speed of each part alone on this machine, measured in the same run as the scenarios.

Each function returns a dict with at least `value` and `unit`.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import numpy as np


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


# --- JetStream: batched async publishing of messages the size of a 100-reading batch -------------------

async def _jetstream(nats_url: str, payload: bytes, messages: int, window: int) -> float:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(nats_url)
    js = nc.jetstream(publish_async_max_pending=window)
    name = f"BENCH_RAW_{time.monotonic_ns()}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"bench.raw.{name}"], storage=StorageType.FILE))
    subject = f"bench.raw.{name}"
    start = time.perf_counter()
    futures = [await js.publish_async(subject, payload) for _ in range(messages)]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - start
    await js.delete_stream(name)
    await nc.close()
    return elapsed


def jetstream_publish(nats_url: str, payload: bytes, messages: int, readings_per_message: int,
                      window: int = 256) -> dict:
    elapsed = asyncio.run(_jetstream(nats_url, payload, messages, window))
    return {"value": _rate(messages * readings_per_message, elapsed), "unit": "readings/s",
            "messages_per_s": _rate(messages, elapsed), "message_bytes": len(payload)}


# --- gRPC: a bidi stream of opaque batches, echoing a small ack, server in its own process -------------

def _grpc_server(port_q, ack: bytes) -> None:
    import grpc

    async def serve():
        async def handler(request_iterator, context):
            async for _ in request_iterator:
                yield ack

        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.Raw", {"Stream": grpc.stream_stream_rpc_method_handler(handler)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


def start_grpc_server():
    """The raw echo server in its own (spawned) process: (process, port)."""
    from vigil.device.v1 import ingest_pb2

    ack = ingest_pb2.StreamReadingsResponse(ack=ingest_pb2.BatchAck(device_id="d", first_sequence=1,
                                            last_sequence=100, reading_count=100)).SerializeToString()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_grpc_server, args=(q, ack), daemon=True)
    proc.start()
    return proc, q.get(timeout=60)


def grpc_stream(payload: bytes, readings_per_message: int, *, procs: int, batches: int, streams: int = 2,
                window: int = 64, server=None, connections: int | None = None) -> dict:
    """Raw gRPC ceiling: the same multi-process pipelined client as the ingest scenario, against a
    Python grpc.aio server that only echoes a pre-serialized ack (no mapping, no bus)."""
    from vigil_bench.loadgen import run_grpc_clients

    own = server is None
    proc, port = start_grpc_server() if own else server
    try:
        r = run_grpc_clients(f"127.0.0.1:{port}", "/bench.Raw/Stream",
                             {"procs": procs, "batches": batches, "per_batch": readings_per_message,
                              "streams": streams, "connections": connections or streams, "window": window,
                              "raw_payload": payload})
    finally:
        if own:
            proc.terminate()
            proc.join(10)
    return {"value": r["readings_per_s"], "unit": "readings/s", "messages_per_s": r["messages_per_s"],
            "message_bytes": len(payload), "client_processes": procs, "messages": r["messages"]}


# --- PostgreSQL COPY of Observation-sized JSON rows ---------------------------------------------------

def postgres_copy(database_url: str, rows: int, row_json: bytes) -> dict:
    import psycopg

    body = row_json.decode()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bench_copy (id text, subject text, body jsonb)")
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY bench_copy (id, subject, body) FROM STDIN") as copy:
            for i in range(rows):
                copy.write_row((str(i), f"p{i % 1000}", body))
        elapsed = time.perf_counter() - start
    return {"value": _rate(rows, elapsed), "unit": "rows/s", "row_bytes": len(row_json),
            "note": "COPY of (id, subject, jsonb body) into a temp table, one connection, no indexes"}


# --- XGBoost batched predict ----------------------------------------------------------------------------

def xgboost_predict(booster, n_features: int, rows: int, batch: int = 1024) -> dict:
    """In-process Booster.inplace_predict on batches of `batch` rows (1024 = the service's max batch).
    The cost grows with the model's trees, so the result names its boosting rounds."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * batch, n_features))  # reused: memory stays small whatever `rows` is
    x[rng.random(x.shape) < 0.5] = np.nan  # missing values, as in real feature rows
    booster.inplace_predict(x[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, rows, batch):
        j = i % len(x)
        booster.inplace_predict(x[j:j + batch])
    elapsed = time.perf_counter() - start
    return {"value": _rate(rows, elapsed), "unit": "rows/s", "batch": batch,
            "rounds": booster.num_boosted_rounds()}


# --- FastAPI: a pre-serialized GET, same server stack as the gateway (uvicorn, one process) -------------

def fastapi_app():
    """ASGI app (uvicorn --factory) returning the bytes of the file $VIGIL_BENCH_BODY as
    application/fhir+json on every GET /fhir/..."""
    import os

    from fastapi import FastAPI
    from starlette.responses import Response

    with open(os.environ["VIGIL_BENCH_BODY"], "rb") as fh:
        body = fh.read()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/fhir/{rest:path}")
    async def get(rest: str) -> Response:
        return Response(body, media_type="application/fhir+json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"{}", media_type="application/json")

    return app
