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
    start = time.perf_counter()
    futures = [await js.publish_async(f"bench.raw.{name}", payload) for _ in range(messages)]
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

def _grpc_server(port_q: mp.Queue, ack: bytes) -> None:
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


async def _grpc_client(port: int, payload: bytes, messages: int) -> float:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream("/bench.Raw/Stream")()
        start = time.perf_counter()

        async def send():
            for _ in range(messages):
                await call.write(payload)
            await call.done_writing()

        sender = asyncio.create_task(send())
        n = 0
        async for _ in call:
            n += 1
        await sender
        elapsed = time.perf_counter() - start
    assert n == messages
    return elapsed


def grpc_stream(payload: bytes, messages: int, readings_per_message: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_grpc_server, args=(q, b"\x08\x01"), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=30)
        elapsed = asyncio.run(_grpc_client(port, payload, messages))
    finally:
        proc.terminate()
        proc.join(10)
    return {"value": _rate(messages * readings_per_message, elapsed), "unit": "readings/s",
            "messages_per_s": _rate(messages, elapsed), "message_bytes": len(payload)}


# --- PostgreSQL COPY of Observation-sized JSON rows ---------------------------------------------------

def postgres_copy(database_url: str, rows: int, row_json: bytes) -> dict:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bench_copy (id text, subject text, body jsonb)")
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY bench_copy (id, subject, body) FROM STDIN") as copy:
            for i in range(rows):
                copy.write_row((str(i), f"p{i % 1000}", row_json.decode()))
        elapsed = time.perf_counter() - start
    return {"value": _rate(rows, elapsed), "unit": "rows/s"}


# --- XGBoost batched predict ----------------------------------------------------------------------------

def xgboost_predict(booster, n_features: int, rows: int, batch: int = 4096) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, n_features))
    booster.inplace_predict(x[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, rows, batch):
        booster.inplace_predict(x[i:i + batch])
    elapsed = time.perf_counter() - start
    return {"value": _rate(rows, elapsed), "unit": "rows/s", "batch": batch}
