"""Load generators that should not be the bottleneck: multi-process gRPC streams and wrk for HTTP.

gRPC: each client process opens `streams` long-lived bidi streams on its own channel and writes
pre-serialized `StreamReadingsRequest` bytes (no per-request proto work on the hot path), with up to
`window` unacknowledged messages per stream. The same client drives the raw ceiling server and the
real ingest service, so the two numbers are comparable.

HTTP: `wrk` (with a Lua script rotating through a list of paths and printing percentiles as JSON) when it
is installed, otherwise a multi-process Python keep-alive client (reported as such).
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import numpy as np

INGEST_METHOD = "/vigil.device.v1.IngestService/StreamReadings"


# --- readings ------------------------------------------------------------------------------------

def measurement_codes() -> list[tuple[str, str, float]]:
    """(LOINC code, UCUM unit, a plausible value) for every catalogue measurement a device can send by
    its LOINC code in the catalogue unit."""
    from vigil import codes
    from vigil.catalogue import load_catalogue

    cat = load_catalogue()
    out = []
    for m in cat.measurements:
        if cat.lookup(m.loinc, codes.LOINC) is m and not getattr(m, "components", ()):  # no panels
            lo, hi = m.plausible
            out.append((m.loinc, m.ucum, round((lo + hi) / 2, 2)))
    return out


def request_bytes(device_id: str, patient_id: str, first_seq: int, n: int, effective: float,
                  codes_: list[tuple[str, str, float]]) -> bytes:
    """One serialized StreamReadingsRequest with `n` readings (sequences first_seq..first_seq+n-1)."""
    from vigil.device.v1 import ingest_pb2

    secs = int(effective)
    readings = []
    for i in range(n):
        code, unit, value = codes_[(first_seq + i) % len(codes_)]
        r = ingest_pb2.Reading(sequence=first_seq + i, code=code, value=value, unit=unit)
        r.effective_time.seconds = secs
        readings.append(r)
    batch = ingest_pb2.ReadingBatch(device_id=device_id, patient_id=patient_id, readings=readings)
    return ingest_pb2.StreamReadingsRequest(batch=batch).SerializeToString()


# --- gRPC client processes -----------------------------------------------------------------------

def _payloads(spec: dict, proc_no: int) -> list[bytes]:
    """Pre-build this process's messages: `batches` messages of `per_batch` readings, spread over
    `patients` devices; unique device ids per run (`nonce`) so JetStream's duplicate window never drops them."""
    if spec.get("raw_payload") is not None:
        return [spec["raw_payload"]] * spec["batches"]
    codes_ = measurement_codes()
    out, seqs = [], {}
    eff = spec.get("effective") or time.time()
    for b in range(spec["batches"]):
        p = (b * spec["procs"] + proc_no) % spec["patients"]
        dev = f"{spec['nonce']}-dev{p}"
        seq = seqs.get(dev, 0)
        seqs[dev] = seq + spec["per_batch"]
        out.append(request_bytes(dev, f"{spec['nonce']}-p{p}", seq, spec["per_batch"], eff, codes_))
    return out


async def _drive(target: str, method: str, payloads: list[bytes], spec: dict) -> dict:
    import grpc

    streams = max(1, spec.get("streams", 2))
    window = spec.get("window", 64)
    rate = spec.get("rate", 0.0)  # messages/s for this process, 0 = as fast as acks allow
    deadline_s = spec.get("duration", 3600.0)
    raw = spec.get("raw_payload") is not None
    acks = readings = errors = 0
    first_error: list[str] = []
    lat: list[float] = []
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    # `connections` TCP connections per process (a local subchannel pool each, so they really are
    # separate), streams spread over them: a server with several worker processes on one port
    # (SO_REUSEPORT) is balanced per connection, as it would be by a fleet of devices.
    n_conn = max(1, min(spec.get("connections", 1), streams))
    async with contextlib.AsyncExitStack() as stack:
        chans = [await stack.enter_async_context(grpc.aio.insecure_channel(
            target, options=opts + [("grpc.use_local_subchannel_pool", 1)] * (n_conn > 1)))
            for _ in range(n_conn)]
        for ch in chans:
            await asyncio.wait_for(ch.channel_ready(), 30)
        t_start = time.time()
        while time.time() < spec.get("start_at", 0):
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        stop_at = t0 + deadline_s
        parts = [payloads[i::streams] for i in range(streams)]

        async def one(part: list[bytes], k: int):
            nonlocal acks, readings, errors
            call = chans[k % n_conn].stream_stream(method)()
            sem = asyncio.Semaphore(window)
            sent_at: list[float] = []

            async def send():
                try:
                    await _send()
                except Exception as exc:  # noqa: BLE001 - the stream ended (the reader reports why)
                    first_error.append(repr(exc))

            async def _send():
                for i, p in enumerate(part):
                    if time.perf_counter() > stop_at:
                        break
                    if rate > 0:
                        due = t0 + (i * streams + k) / rate
                        d = due - time.perf_counter()
                        if d > 0:
                            await asyncio.sleep(d)
                    await sem.acquire()
                    sent_at.append(time.perf_counter())
                    await call.write(p)
                await call.done_writing()

            sender = asyncio.create_task(send())
            from vigil.device.v1 import ingest_pb2
            n = 0
            try:
                async for resp in call:
                    now = time.perf_counter()
                    sem.release()
                    if n < len(sent_at):
                        lat.append(now - sent_at[n])
                    n += 1
                    acks += 1
                    if raw:
                        readings += spec["per_batch"]
                    else:
                        readings += ingest_pb2.StreamReadingsResponse.FromString(resp).ack.reading_count
            except grpc.aio.AioRpcError as exc:
                errors += 1
                first_error.append(f"{exc.code().name}: {exc.details()}")
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

        await asyncio.gather(*(one(part, k) for k, part in enumerate(parts)))
        elapsed = time.perf_counter() - t0
    if first_error and not readings:
        raise RuntimeError(first_error[0])
    return {"acks": acks, "readings": readings, "errors": errors, "first_error": first_error[:1], "elapsed": elapsed,
            "start": t_start, "end": time.time(), "ack_latency": lat}


def _client_main(target: str, method: str, spec: dict, proc_no: int, barrier, q) -> None:
    try:
        payloads = _payloads(spec, proc_no)
        barrier.wait(120)
        spec = {**spec, "start_at": time.time() + 0.05}
        cpu0 = time.process_time()
        out = asyncio.run(_drive(target, method, payloads, spec))
        out["cpu_seconds"] = time.process_time() - cpu0  # the load generator's own cost, payloads excluded
        q.put(out)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put({"error": repr(exc)})


def device_pairs(spec: dict) -> list[tuple[str, str]]:
    """The (device, patient) pairs `_payloads` uses for this spec."""
    return [(f"{spec['nonce']}-dev{p}", f"{spec['nonce']}-p{p}") for p in range(spec["patients"])]


async def register_devices(target: str, pairs: list[tuple[str, str]], start_epoch: float,
                           concurrency: int = 32) -> None:
    """DeviceService.RegisterDevice + BindPatient(from start_epoch, open-ended) for every pair."""
    import grpc

    from vigil.device.v1 import device_pb2, device_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = device_pb2_grpc.DeviceServiceStub(ch)
        sem = asyncio.Semaphore(concurrency)

        async def one(dev: str, pat: str):
            async with sem:
                await stub.RegisterDevice(device_pb2.RegisterDeviceRequest(device=device_pb2.Device(
                    device_id=dev, manufacturer="vigil-bench", model="synthetic")), timeout=30)
                b = device_pb2.Binding(patient_id=pat)
                b.start_time.seconds = int(start_epoch)
                await stub.BindPatient(device_pb2.BindPatientRequest(device_id=dev, binding=b), timeout=30)

        await asyncio.gather(*(one(d, p) for d, p in pairs))


def run_grpc_clients(target: str, method: str, spec: dict, timeout: float = 300) -> dict:
    """Run `spec['procs']` client processes at once; aggregate readings/s over the wall time from the
    common start to the last process's end. Each process sends `batches` messages."""
    if spec.get("raw_payload") is None:
        asyncio.run(register_devices(target, device_pairs(spec), time.time() - 3600))
    ctx = mp.get_context("spawn")
    procs_n = spec["procs"]
    barrier, q = ctx.Barrier(procs_n + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(target, method, spec, i, barrier, q), daemon=True)
             for i in range(procs_n)]
    for p in procs:
        p.start()
    try:
        barrier.wait(120)
        t0 = time.perf_counter()
        results = [q.get(timeout=timeout) for _ in procs]
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    errs = [r["error"] for r in results if "error" in r]
    if errs:
        raise RuntimeError(f"gRPC load client failed: {errs[0]}")
    readings = sum(r["readings"] for r in results)
    acks = sum(r["acks"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    lat = np.concatenate([np.asarray(r["ack_latency"]) for r in results]) if acks else np.zeros(1)
    first = [e for r in results for e in r.get("first_error", [])]
    return {"readings": readings, "messages": acks, "errors": sum(r["errors"] for r in results),
            "first_error": first[0] if first else None,
            "seconds": elapsed, "wall_seconds": wall, "readings_per_s": readings / elapsed if elapsed else 0.0,
            "client_cpu_cores": round(sum(r.get("cpu_seconds", 0.0) for r in results) / elapsed, 3) if elapsed else None,
            "messages_per_s": acks / elapsed if elapsed else 0.0,
            "ack_latency_ms": percentiles(lat * 1000)}


def percentiles(values_ms, ps=(50, 95, 99)) -> dict:
    v = np.asarray(values_ms, dtype=float)
    if v.size == 0:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": round(float(np.percentile(v, p)), 3) for p in ps}


# --- HTTP ----------------------------------------------------------------------------------------

WRK_LUA = r"""
local paths = {}
local counter = 0
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  counter = math.random(#paths)
end
request = function()
  counter = counter % #paths + 1
  return wrk.format("GET", paths[counter])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def http_tool() -> str:
    """'wrk' when installed (tries `apt-get install -y wrk` once when running as root), else 'python'."""
    if shutil.which("wrk"):
        return "wrk"
    if os.geteuid() == 0 and shutil.which("apt-get") and not os.environ.get("VIGIL_BENCH_NO_INSTALL"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False, timeout=300)
        if shutil.which("wrk"):
            return "wrk"
    return "python"


def http_load(base: str, paths: list[str], *, seconds: float, connections: int, tool: str,
              threads: int = 1) -> dict:
    """GET the paths in rotation for `seconds` with `connections` keep-alive connections.
    Returns req/s, latency p50/p95/p99 (ms) and error counts."""
    if tool == "wrk":
        return _wrk(base, paths, seconds, connections, threads)
    return _py_http(base, paths, seconds, connections)


def _wrk(base: str, paths: list[str], seconds: float, connections: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vigil-wrk-") as d:
        lua, plist = pathlib.Path(d, "paths.lua"), pathlib.Path(d, "paths.txt")
        lua.write_text(WRK_LUA)
        plist.write_text("\n".join(paths) + "\n")
        dur = max(1, round(seconds))
        r = subprocess.run(["wrk", "-t", str(threads), "-c", str(max(connections, threads)), "-d", f"{dur}s",
                            "--timeout", "10s", "-s", str(lua), base, "--", str(plist)],
                           capture_output=True, text=True, timeout=dur + 60, check=False)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    s = json.loads(line[len("WRKJSON "):])
    secs = s["duration_us"] / 1e6
    return {"requests": s["requests"], "req_per_s": s["requests"] / secs if secs else 0.0,
            "latency_ms": {"p50": s["p50_us"] / 1000, "p95": s["p95_us"] / 1000, "p99": s["p99_us"] / 1000},
            "errors": s["connect"] + s["read"] + s["write"] + s["timeout"], "non_2xx": s["status"],
            "connections": connections, "seconds": secs}


def _py_http_proc(host: str, port: int, paths: list[str], seconds: float, conns: int, q) -> None:
    async def worker(k: int, out: list, stats: dict):
        i = k * 7919
        reader, writer = await asyncio.open_connection(host, port)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            path = paths[i % len(paths)]
            i += 1
            t = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b""):
                    break
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            await reader.readexactly(length)
            out.append(time.perf_counter() - t)
            if not status_line.split(b" ")[1].startswith(b"2"):
                stats["non_2xx"] += 1
        writer.close()

    async def main():
        out: list[float] = []
        stats = {"non_2xx": 0}
        await asyncio.gather(*(worker(k, out, stats) for k in range(conns)))
        return out, stats

    out, stats = asyncio.run(main())
    q.put((out, stats["non_2xx"]))


def _py_http(base: str, paths: list[str], seconds: float, connections: int) -> dict:
    import urllib.parse

    u = urllib.parse.urlsplit(base)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    nproc = max(1, min(os.cpu_count() or 1, connections))
    per = max(1, connections // nproc)
    procs = [ctx.Process(target=_py_http_proc, args=(u.hostname, u.port, paths, seconds, per, q), daemon=True)
             for _ in range(nproc)]
    for p in procs:
        p.start()
    lat, non2 = [], 0
    for _ in procs:
        out, n2 = q.get(timeout=seconds + 60)
        lat.extend(out)
        non2 += n2
    for p in procs:
        p.join(10)
    pct = percentiles(np.asarray(lat) * 1000)
    return {"requests": len(lat), "req_per_s": len(lat) / seconds, "latency_ms": pct, "errors": 0,
            "non_2xx": non2, "connections": per * nproc, "seconds": seconds}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()
