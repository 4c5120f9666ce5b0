"""The scenarios of `vigil bench`. Each returns {"status", "params", "metrics", ...}; a metric is
{"value", "unit"} plus optional "ceiling" (the ceiling's key) and "ratio" (value / ceiling value).

Every loop is bounded in count and in time; every server binds to 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import sys
import tempfile
import time
import urllib.parse

import numpy as np
import orjson

from vigil import bus, devservers
from vigil_bench import ceilings as C
from vigil_bench.loadgen import (
    INGEST_METHOD,
    http_get,
    http_load,
    measurement_codes,
    percentiles,
    register_devices,
    request_bytes,
    run_grpc_clients,
)
from vigil_bench.procs import Services

# Sizes per mode. quick: < 3 min for the whole run; tiny: only checks that the harness works.
MODES: dict[str, dict] = {
    "tiny": {"train_limit": 60, "xgb_rows": 20_000, "js_messages": 300, "grpc_batches": 100,
             "pg_copy_rows": 5_000, "http_seconds": 1, "http_conns": 8, "client_procs": 2, "ingest_batches": 60,
             "ingest_single": 300, "fixed_rate": 300, "fixed_seconds": 2, "sat_seconds": 2,
             "sat_max_readings": 10_000, "drain_timeout": 8, "probe_hz": 5, "inference_seconds": 1,
             "inference_single": 30, "fhir_obs": 1_000, "fhir_patients": 50},
    "quick": {"train_limit": 150, "xgb_rows": 100_000, "js_messages": 4_000, "grpc_batches": 6_000,
              "pg_copy_rows": 50_000, "http_seconds": 2, "http_conns": 32, "client_procs": 2,
              "ingest_batches": 6_000, "ingest_single": 4_000, "fixed_rate": 5_000, "fixed_seconds": 8,
              "sat_seconds": 6, "sat_max_readings": 200_000, "drain_timeout": 15, "probe_hz": 10,
              "inference_seconds": 3, "inference_single": 200, "fhir_obs": 20_000, "fhir_patients": 1_000},
    "full": {"train_limit": 2_000, "xgb_rows": 1_000_000, "js_messages": 20_000, "grpc_batches": 6_000,
             "pg_copy_rows": 1_000_000, "http_seconds": 8, "http_conns": 64, "client_procs": 2,
             "ingest_batches": 6_000, "ingest_single": 15_000, "fixed_rate": 5_000, "fixed_seconds": 30,
             "sat_seconds": 30, "sat_max_readings": 3_000_000, "drain_timeout": 120, "probe_hz": 10,
             "inference_seconds": 10, "inference_single": 1_000, "fhir_obs": 1_000_000, "fhir_patients": 1_000},
}
LONG_OBS = 10_000_000
LONG_PATIENTS = 5_000  # --long: 10M Observations = 5000 patients x ~200 hours (8 days) x 10 codes, in 4 weeks
BATCH = 100  # readings per message, "batched"
PIPELINE_BATCH = 50  # readings per message in the pipeline load (a device gateway's batch)
# Load shape of the ingest scenario and the gRPC ceilings: per client process, STREAMS pipelined streams
# (window 64 each) over CONNECTIONS TCP connections. A fleet is many devices on many connections;
# several ingest workers on one port are balanced per connection. Measured on the 2-core machine with
# one ingest process: 2 streams on 1 connection per process ~260k readings/s, 4 ~300k, 8 ~320-350k
# (more in flight, more batches per event-loop turn; ack latency grows with it).
STREAMS = 8
CONNECTIONS = 4


def metric(value, unit: str, **extra) -> dict:
    out = {"value": None if value is None else float(value), "unit": unit}
    out.update(extra)
    return out


def with_ratio(m: dict, ceilings: dict, key: str) -> dict:
    c = ceilings.get(key) or {}
    cv = c.get("value")
    m["ceiling"] = key
    m["ratio"] = (m["value"] / cv) if (m.get("value") is not None and cv) else None
    return m


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "metrics": {}}


def sample_bundle(n: int) -> bytes:
    """A bus message like ingest's: a collection Bundle of n Observations."""
    from vigil import bus, codes
    from vigil.catalogue import load_catalogue
    from vigil.observation import build_observation

    cat = load_catalogue()
    ms = [m for m in cat.measurements if cat.lookup(m.loinc, codes.LOINC) is m and not getattr(m, "components", ())]
    now = time.time()
    obs = [build_observation(ms[i % len(ms)], device_id="bench-dev", patient_id="bench-p", sequence=i,
                             value=sum(ms[i % len(ms)].plausible) / 2, effective=now) for i in range(n)]
    return bus.encode_bundle(obs)


# --- ceilings ------------------------------------------------------------------------------------

def run_ceilings(cfg: dict, env: dict, log_dir: pathlib.Path, memory: dict, http_tool: str,
                 pg_available: str | None) -> dict:
    out: dict = {}
    codes_ = measurement_codes()

    def guard(name, fn):
        t = time.perf_counter()
        try:
            out[name] = fn()
            out[name]["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            out[name] = {"status": "error", "reason": repr(exc)[:500], "value": None, "unit": None}
        out[name]["seconds"] = round(time.perf_counter() - t, 2)

    # XGBoost in-process, the stored model
    def xgb():
        from vigil_inference.model import load_model

        m = load_model(env.get("VIGIL_MODEL_TAG", "vigil-sepsis:latest"))
        return C.xgboost_predict(m.booster, len(m.feature_names), cfg["xgb_rows"])
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    try:
        guard("xgboost_predict", xgb)
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old

    with Services(log_dir, env, memory, "ceilings") as svc:
        nats = svc.add_server(devservers.start_nats())
        batched = sample_bundle(BATCH)
        single = sample_bundle(1)
        guard("jetstream_publish_batched",
              lambda: C.jetstream_publish(nats.url, batched, cfg["js_messages"], BATCH))
        # what ingest publishes with VIGIL_BUS_COMPRESSION=zstd (the default): the same Bundle as one zstd frame
        guard("jetstream_publish_batched_zstd",
              lambda: C.jetstream_publish(nats.url, bus.wire_body(batched, "zstd"), cfg["js_messages"], BATCH))
        guard("jetstream_publish_single",
              lambda: C.jetstream_publish(nats.url, single, cfg["js_messages"] * 5, 1))
        raw = C.start_grpc_server()
        try:
            p100 = request_bytes("bench-dev", "bench-p", 0, BATCH, time.time(), codes_)
            p1 = request_bytes("bench-dev", "bench-p", 0, 1, time.time(), codes_)
            guard("grpc_stream_batched", lambda: C.grpc_stream(p100, BATCH, procs=cfg["client_procs"],
                                                               batches=cfg["grpc_batches"], server=raw,
                                                               streams=STREAMS, connections=CONNECTIONS))
            guard("grpc_stream_single", lambda: C.grpc_stream(p1, 1, procs=cfg["client_procs"],
                                                              batches=cfg["ingest_single"], server=raw,
                                                              streams=STREAMS, connections=CONNECTIONS))
        finally:
            raw[0].terminate()
            raw[0].join(10)
        if pg_available is None:
            out["postgres_copy"] = {"status": "skipped", "reason": "PostgreSQL binaries not found",
                                    "value": None, "unit": "rows/s"}
        else:
            pg = svc.add_server(devservers.start_postgres())
            row = orjson.dumps(orjson.loads(batched)["entry"][0]["resource"])
            guard("postgres_copy", lambda: C.postgres_copy(pg.url, cfg["pg_copy_rows"], row))

        # FastAPI: a pre-serialized Observation, uvicorn in its own process, same HTTP load generator
        def fastapi():
            body = pathlib.Path(tempfile.mkstemp(prefix="vigil-bench-body-", suffix=".json")[1])
            body.write_bytes(orjson.dumps(orjson.loads(batched)["entry"][0]["resource"]))
            port = devservers.free_port()
            svc.env = {**env, "VIGIL_BENCH_BODY": str(body)}
            import sys
            svc.spawn_cmd("fastapi", [sys.executable, "-m", "uvicorn", "--factory", "vigil_bench.ceilings:fastapi_app",
                                      "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                                      "--log-level", "warning"])
            svc.wait_http(f"http://127.0.0.1:{port}/healthz", 30)
            r = http_load(f"http://127.0.0.1:{port}", ["/fhir/Observation/x"], seconds=cfg["http_seconds"],
                          connections=cfg["http_conns"], tool=http_tool)
            body.unlink()
            return {"value": r["req_per_s"], "unit": "req/s", "latency_ms": r["latency_ms"],
                    "connections": r["connections"], "tool": http_tool, "non_2xx": r["non_2xx"]}
        guard("fastapi_get", fastapi)
    return out


# --- ingest --------------------------------------------------------------------------------------

def native_mapper_built() -> bool:
    from vigil_ingest import native

    return native.load() is not None


def wait_workers_listening(pid: int, n: int, port: int, check, timeout: float = 60) -> None:
    """Until all `n` worker processes of the supervisor `pid` listen on `port` (connections made before
    that would all land on the first one)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        kids = psutil.Process(pid).children()
        if len(kids) == n and all(any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                      for c in k.net_connections("tcp")) for k in kids):
            return
        time.sleep(0.1)
    raise RuntimeError(f"ingest: {n} workers not listening on {port} after {timeout:g}s")


def ingest_workers() -> int:
    """`vigil ingest --workers` for the bench: one per core (what an operator sets on such a machine)."""
    return max(1, os.cpu_count() or 1)


def run_ingest(cfg: dict, env: dict, log_dir: pathlib.Path, memory: dict, ceilings: dict) -> dict:
    nonce = f"b{os.getpid()}x{int(time.time())}"
    common = {"procs": cfg["client_procs"], "patients": 200, "streams": STREAMS, "connections": CONNECTIONS,
              "window": 64, "duration": 60}
    workers = ingest_workers()
    runs = {}
    # `vigil ingest` as deployed by default (one process), then with one worker per core
    for n in (1, workers) if workers > 1 else (1,):
        with Services(log_dir, env, memory, "ingest" if n == 1 else f"ingest_{n}_workers") as svc:
            nats = svc.add_server(devservers.start_nats())
            port = devservers.free_port()
            proc = svc.spawn("ingest", ["ingest", "--workers", str(n)],
                             {"VIGIL_NATS_URL": nats.url, "VIGIL_GRPC_LISTEN": f"127.0.0.1:{port}"})
            svc.wait_port(port, 60)
            if n > 1:
                wait_workers_listening(proc.pid, n, port, svc.check)
            target = f"127.0.0.1:{port}"
            b = run_grpc_clients(target, INGEST_METHOD, {**common, "nonce": f"{nonce}{n}wb", "per_batch": BATCH,
                                                         "batches": cfg["ingest_batches"]})
            s = run_grpc_clients(target, INGEST_METHOD, {**common, "nonce": f"{nonce}{n}ws", "per_batch": 1,
                                                         "batches": cfg["ingest_single"]})
            svc.check()
        runs[n] = (b, s)
    b, s = runs[1]
    metrics = {
        "batched_readings_per_s": with_ratio(metric(b["readings_per_s"], "readings/s", readings=b["readings"],
                                                    ack_latency_ms=b["ack_latency_ms"], errors=b["errors"],
                                                    load_generator_cpu_cores=b["client_cpu_cores"],
                                                    ingest_workers=1),
                                             ceilings, "grpc_stream_batched"),
        "batched_vs_jetstream": with_ratio(metric(b["readings_per_s"], "readings/s"), ceilings,
                                           "jetstream_publish_batched"),
        "batched_vs_jetstream_zstd": with_ratio(metric(b["readings_per_s"], "readings/s"), ceilings,
                                                "jetstream_publish_batched_zstd"),
        "single_readings_per_s": with_ratio(metric(s["readings_per_s"], "readings/s", readings=s["readings"],
                                                   ack_latency_ms=s["ack_latency_ms"], errors=s["errors"],
                                                   ingest_workers=1),
                                            ceilings, "grpc_stream_single"),
        "single_vs_jetstream": with_ratio(metric(s["readings_per_s"], "readings/s"), ceilings,
                                          "jetstream_publish_single"),
    }
    if workers > 1:
        bw, sw = runs[workers]
        metrics["batched_per_core_workers_readings_per_s"] = with_ratio(
            metric(bw["readings_per_s"], "readings/s", readings=bw["readings"], ack_latency_ms=bw["ack_latency_ms"],
                   errors=bw["errors"], load_generator_cpu_cores=bw["client_cpu_cores"], ingest_workers=workers),
            ceilings, "grpc_stream_batched")
        metrics["single_per_core_workers_readings_per_s"] = with_ratio(
            metric(sw["readings_per_s"], "readings/s", readings=sw["readings"], errors=sw["errors"],
                   ingest_workers=workers),
            ceilings, "grpc_stream_single")
    return {"status": "ok", "metrics": metrics,
            "params": {"readings_per_batch": BATCH, "client_processes": cfg["client_procs"],
                       "mapper": "native" if native_mapper_built() else "Python (native extension not built)",
                       "bus_compression": env.get("VIGIL_BUS_COMPRESSION", "zstd"), "ingest_workers": 1,
                       "per_core_workers": workers,
                       "streams_per_process": STREAMS, "connections_per_process": CONNECTIONS, "window": 64,
                       "durable": "acked after JetStream stored it"}}


# --- pipeline + inference ------------------------------------------------------------------------

class FhirProbe:
    """Sends one small batch for a fresh patient and polls the gateway until its RiskAssessment is
    readable; latency = first successful read - just before the batch was written."""

    def __init__(self, grpc_target: str, fhir: str, nonce: str, timeout: float):
        self.target, self.fhir, self.nonce, self.timeout = grpc_target, fhir, nonce, timeout
        self.codes = measurement_codes()
        self.k = 0
        self.pending: dict[str, float] = {}
        self.latencies: list[float] = []
        self.lost = 0
        self.sent_readings = 0

    async def run(self, hz: float, seconds: float, http, wait: float | None = None) -> None:
        """Send probes at `hz` for `seconds`, then wait up to `wait` s (default: the timeout) for
        the outstanding ones."""
        await self.start(http)
        try:
            await self.send(hz, seconds)
        finally:
            await self.finish(self.timeout if wait is None else wait)

    def censored_ms(self) -> np.ndarray:
        """Latencies in ms; a probe never seen counts as the timeout (so percentiles are a lower bound)."""
        return np.asarray(self.latencies + [self.timeout] * self.lost) * 1000

    async def start(self, http) -> None:
        from vigil_ingest.client import IngestClient

        self._client = IngestClient(self.target, window=256)
        self._poller = asyncio.create_task(self._poll(http))

    async def send(self, hz: float, seconds: float) -> None:
        from vigil.device.v1 import ingest_pb2

        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            self.k += 1
            n += 1
            pid = f"{self.nonce}-probe{self.k}"
            await register_devices(self.target, [(f"{pid}-dev", pid)], time.time() - 3600)
            raw = request_bytes(f"{pid}-dev", pid, 0, 5, time.time(), self.codes)
            batch = ingest_pb2.StreamReadingsRequest.FromString(raw).batch
            self.pending[pid] = time.perf_counter()
            await self._client.submit(batch)
            self.sent_readings += 5
            await asyncio.sleep(max(0.0, t0 + n / hz - time.perf_counter()))

    async def finish(self, wait: float) -> None:
        end = time.perf_counter() + wait
        while self.pending and time.perf_counter() < end:
            await asyncio.sleep(0.02)
        self._poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._poller
        self.lost += len(self.pending)
        self.pending.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.close(), 10)

    async def _poll(self, http) -> None:
        async def one(pid: str, t_sent: float):
            try:
                r = await http.get(f"{self.fhir}/RiskAssessment", params={"subject": f"Patient/{pid}",
                                                                          "_count": "1"})
            except Exception:  # noqa: BLE001 - polled again
                return
            if r.status_code == 200 and orjson.loads(r.content).get("total", 0) >= 1 and pid in self.pending:
                self.latencies.append(time.perf_counter() - t_sent)
                del self.pending[pid]
            elif time.perf_counter() - t_sent > self.timeout and pid in self.pending:
                del self.pending[pid]
                self.lost += 1

        while True:
            items = list(self.pending.items())[:64]
            if items:
                await asyncio.gather(*(one(p, t) for p, t in items))
            await asyncio.sleep(0.01)


async def _count(http, fhir: str, rtype: str) -> int:
    r = await http.get(f"{fhir}/{rtype}", params={"_count": "0"})
    r.raise_for_status()
    return int(orjson.loads(r.content)["total"])


async def _wait_stored(http, fhir: str, expected: int, timeout: float) -> tuple[bool, int, float]:
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < timeout:
        n = await _count(http, fhir, "Observation")
        if n >= expected:
            return True, n, time.perf_counter()
        await asyncio.sleep(0.2)
    return False, n, time.perf_counter()


def _pipeline_phases(cfg: dict, target: str, fhir: str, nonce: str) -> dict:
    import httpx

    async def main():
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as http:
            res: dict = {}
            base_obs = await _count(http, fhir, "Observation")
            # 1. fixed offered load, rate-limited, with latency probes
            msgs_per_s = cfg["fixed_rate"] / PIPELINE_BATCH
            spec = {"procs": 1, "patients": 500, "streams": 2, "window": 256, "per_batch": PIPELINE_BATCH,
                    "rate": msgs_per_s, "batches": int(msgs_per_s * cfg["fixed_seconds"]),
                    "duration": cfg["fixed_seconds"] + 5, "nonce": nonce + "f"}
            probe = FhirProbe(target, fhir, nonce + "f", timeout=min(10.0, cfg["drain_timeout"]))
            load = asyncio.create_task(asyncio.to_thread(run_grpc_clients, target, INGEST_METHOD, spec))
            await probe.run(cfg["probe_hz"], cfg["fixed_seconds"], http)
            fixed = await load
            expected = base_obs + fixed["readings"] + probe.sent_readings
            drained, stored, _ = await _wait_stored(http, fhir, expected, cfg["drain_timeout"])
            lat = probe.censored_ms()
            res["fixed"] = {"offered_readings_per_s": cfg["fixed_rate"], "achieved_readings_per_s":
                            fixed["readings_per_s"], "e2e_ms": percentiles(lat), "probes": len(lat),
                            "probes_lost": probe.lost, "probe_timeout_s": probe.timeout, "drained": drained, "stored": stored,
                            "expected": expected}
            # 2. saturation: as fast as ingest acks, then wait until everything is stored and scored
            per_proc = max(1, cfg["sat_max_readings"] // PIPELINE_BATCH // cfg["client_procs"])
            spec = {"procs": cfg["client_procs"], "patients": 1000, "streams": 2, "window": 128,
                    "per_batch": PIPELINE_BATCH, "batches": per_proc, "duration": cfg["sat_seconds"],
                    "nonce": nonce + "s"}
            start_obs = await _count(http, fhir, "Observation")
            probe2 = FhirProbe(target, fhir, nonce + "s", timeout=cfg["drain_timeout"])
            await probe2.start(http)
            t_start = time.perf_counter()
            load = asyncio.create_task(asyncio.to_thread(run_grpc_clients, target, INGEST_METHOD, spec))
            await probe2.send(cfg["probe_hz"], cfg["sat_seconds"])
            sat = await load
            expected = start_obs + sat["readings"] + probe2.sent_readings
            drained, stored, t_end = await _wait_stored(http, fhir, expected, cfg["drain_timeout"])
            # the worker consumes in order: a marker's RiskAssessment means everything before it was scored
            marker = FhirProbe(target, fhir, nonce + "m", timeout=min(10.0, cfg["drain_timeout"]))
            await marker.run(1.0, 0.5, http)
            t_scored = time.perf_counter()
            await probe2.finish(5.0)
            elapsed = max(t_end, t_scored if marker.latencies else t_end) - t_start
            done = stored - start_obs
            lat2 = probe2.censored_ms()
            res["saturation"] = {"ingest_readings_per_s": sat["readings_per_s"], "readings": sat["readings"],
                                 "stored": done, "drained": drained, "scored_marker_seen": bool(marker.latencies),
                                 "seconds": elapsed, "sustained_readings_per_s": done / elapsed if elapsed else 0,
                                 "e2e_ms": percentiles(lat2), "probes": len(lat2), "probes_lost": probe2.lost}
            res["risk_assessments_stored"] = await _count(http, fhir, "RiskAssessment")
            return res

    return asyncio.run(main())


def _inference(cfg: dict, model_url: str, n_features: int) -> dict:
    from vigil_inference.client import ModelClient

    async def main():
        client = ModelClient(model_url)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(1000, n_features))
        x[rng.random(x.shape) < 0.5] = np.nan
        try:
            await client.predict(x[:10])  # warm-up
            rows = 0
            end = time.perf_counter() + cfg["inference_seconds"]
            t0 = time.perf_counter()

            async def loop():
                nonlocal rows
                while time.perf_counter() < end:
                    await client.predict(x)
                    rows += len(x)
            await asyncio.gather(*(loop() for _ in range(4)))
            batched = rows / (time.perf_counter() - t0)
            lat = []
            for i in range(cfg["inference_single"]):
                t = time.perf_counter()
                await client.predict(x[i % len(x):i % len(x) + 1])
                lat.append((time.perf_counter() - t) * 1000)
        finally:
            await client.aclose()
        return batched, rows, percentiles(lat)

    return asyncio.run(main())


def run_pipeline(cfg: dict, env: dict, log_dir: pathlib.Path, memory: dict, ceilings: dict,
                 pg_available: str | None, want: set[str]) -> dict:
    """Scenarios 'pipeline' and 'inference' share one set of servers (BentoML starts slowly)."""
    out: dict = {}
    nonce = f"e{os.getpid()}x{int(time.time())}"
    with Services(log_dir, env, memory, "pipeline") as svc:
        nats = svc.add_server(devservers.start_nats())
        if pg_available:
            store_url = svc.add_server(devservers.start_postgres()).url
        else:
            store_url = f"sqlite:///{log_dir / f'pipeline-{nonce}.db'}"
        grpc_port, http_port, model_port = devservers.free_port(), devservers.free_port(), devservers.free_port()
        svc.env = {**env, "VIGIL_NATS_URL": nats.url, "VIGIL_DATABASE_URL": store_url,
                   "VIGIL_GRPC_LISTEN": f"127.0.0.1:{grpc_port}", "VIGIL_HTTP_HOST": "127.0.0.1",
                   "VIGIL_HTTP_PORT": str(http_port), "VIGIL_BENTOML_URL": f"http://127.0.0.1:{model_port}",
                   "VIGIL_OIDC_ISSUER": ""}
        model_url = f"http://127.0.0.1:{model_port}"
        svc.spawn("model", ["serve-model", "--host", "127.0.0.1", "--port", str(model_port)])
        if "pipeline" in want:
            svc.spawn("gateway", ["gateway"])
        svc.wait_http(f"{model_url}/readyz", 180)
        if "pipeline" in want:
            svc.spawn("worker", ["worker"])
            svc.spawn("ingest", ["ingest"])
            svc.wait_http(f"http://127.0.0.1:{http_port}/readyz", 60)
            svc.wait_port(grpc_port, 60)
            fhir = f"http://127.0.0.1:{http_port}/fhir"
            try:
                r = _pipeline_phases(cfg, f"127.0.0.1:{grpc_port}", fhir, nonce)
                svc.check()
                f, s = r["fixed"], r["saturation"]
                out["pipeline"] = {
                    "status": "ok",
                    "params": {"store": store_url.split(":", 1)[0], "readings_per_message": PIPELINE_BATCH,
                               "probe_readings": 5, "probe_poll_interval_ms": 10,
                               "fixed_seconds": cfg["fixed_seconds"], "saturation_max_seconds": cfg["sat_seconds"]},
                    "metrics": {
                        "fixed_offered_readings_per_s": metric(f["offered_readings_per_s"], "readings/s"),
                        "fixed_achieved_readings_per_s": metric(f["achieved_readings_per_s"], "readings/s"),
                        "fixed_e2e_p50_ms": metric(f["e2e_ms"]["p50"], "ms"),
                        "fixed_e2e_p95_ms": metric(f["e2e_ms"]["p95"], "ms"),
                        "fixed_e2e_p99_ms": metric(f["e2e_ms"]["p99"], "ms", probes=f["probes"],
                                                   probes_lost=f["probes_lost"],
                                                   lower_bound=f["probes_lost"] > 0),
                        "saturation_sustained_readings_per_s": with_ratio(
                            metric(s["sustained_readings_per_s"], "readings/s", drained=s["drained"],
                                   scored=s["scored_marker_seen"], readings=s["readings"], stored=s["stored"]),
                            ceilings, "postgres_copy" if pg_available else "jetstream_publish_batched"),
                        "saturation_ingest_readings_per_s": with_ratio(
                            metric(s["ingest_readings_per_s"], "readings/s"), ceilings, "grpc_stream_batched"),
                        "saturation_e2e_p50_ms": metric(s["e2e_ms"]["p50"], "ms"),
                        "saturation_e2e_p95_ms": metric(s["e2e_ms"]["p95"], "ms"),
                        "saturation_e2e_p99_ms": metric(s["e2e_ms"]["p99"], "ms", probes=s["probes"],
                                                        probes_lost=s["probes_lost"],
                                                        lower_bound=s["probes_lost"] > 0),
                        "risk_assessments_stored": metric(r["risk_assessments_stored"], "resources"),
                    },
                    "raw": r,
                }
            except Exception as exc:  # noqa: BLE001
                out["pipeline"] = {"status": "error", "reason": repr(exc)[:1000], "metrics": {}}
        if "inference" in want:
            try:
                import httpx
                meta = httpx.post(f"{model_url}/metadata", content=b"{}",
                                  headers={"content-type": "application/json"}, timeout=30).json()
                batched, rows, single = _inference(cfg, model_url, len(meta["feature_names"]))
                out["inference"] = {
                    "status": "ok",
                    "params": {"batch_rows": 1000, "concurrent_requests": 4, "single_requests": cfg["inference_single"],
                               "transport": "HTTP JSON (vigil_inference.client.ModelClient)"},
                    "metrics": {
                        "batched_rows_per_s": with_ratio(metric(batched, "rows/s", rows=rows), ceilings,
                                                         "xgboost_predict"),
                        "single_row_p50_ms": metric(single["p50"], "ms"),
                        "single_row_p95_ms": metric(single["p95"], "ms"),
                        "single_row_p99_ms": metric(single["p99"], "ms"),
                    },
                }
            except Exception as exc:  # noqa: BLE001
                out["inference"] = {"status": "error", "reason": repr(exc)[:1000], "metrics": {}}
    return out


# --- FHIR reads ------------------------------------------------------------------------------------

def synthetic_resources(n_obs: int, n_patients: int, nonce: str = "bench"):
    """Yield lists of Observations (and RiskAssessments: one per patient-hour) for `n_patients`."""
    from vigil_inference.riskassessment import build_risk_assessment

    from vigil import codes
    from vigil.catalogue import load_catalogue
    from vigil.observation import build_observation

    cat = load_catalogue()
    ms = [m for m in cat.measurements if cat.lookup(m.loinc, codes.LOINC) is m and not getattr(m, "components", ())]
    t0 = 1_767_225_600  # 2026-01-01T00:00:00Z
    per = max(1, n_obs // n_patients)
    rng = random.Random(7)
    for p in range(n_patients):
        pid, dev = f"{nonce}-p{p}", f"{nonce}-mon{p}"
        chunk, ids = [], []
        for k in range(per):
            m = ms[k % len(ms)]
            lo, hi = m.plausible
            eff = t0 + (k // len(ms)) * 300 + (k % len(ms))  # a full set of measurements every 5 min
            o = build_observation(m, device_id=dev, patient_id=pid, sequence=k,
                                  value=round(lo + (hi - lo) * (0.3 + 0.4 * rng.random()), 1), effective=eff)
            chunk.append(o)
            ids.append(o["id"])
        hours = int((per // len(ms)) * 300 / 3600) + 1
        for h in range(hours):
            start = t0 + h * 3600
            chunk.append(build_risk_assessment(patient_id=pid, model_name="vigil-sepsis", model_version="bench",
                                               interval_start=start, interval_end=start + 3600,
                                               probability=rng.random(), threshold=0.5, basis=ids[-10:]))
        yield pid, [o["id"] for o in chunk[:per:max(1, per // 10)]], chunk


def _load_store(url: str, n_obs: int, n_patients: int) -> dict:
    from vigil_gateway.bootstrap import build_store

    store = build_store(url)
    store.migrate()
    t0 = time.perf_counter()
    patients, obs_ids, buf, total = [], [], [], 0
    try:
        for pid, some_ids, chunk in synthetic_resources(n_obs, n_patients):
            patients.append(pid)
            obs_ids.extend(some_ids)
            buf.extend(chunk)
            if len(buf) >= 2000:
                total += store.upsert_many(buf).total
                buf = []
        if buf:
            total += store.upsert_many(buf).total
    finally:
        store.close()
    secs = time.perf_counter() - t0
    return {"patients": patients, "obs_ids": obs_ids, "resources": total, "seconds": secs,
            "rows_per_s": total / secs if secs else 0.0}


def run_fhir_reads(cfg: dict, env: dict, log_dir: pathlib.Path, memory: dict, ceilings: dict, http_tool: str,
                   pg_available: str | None, long: bool, *, stores: tuple[str, ...] = ("postgresql", "sqlite"),
                   history: bool = True, reuse: dict | None = None) -> dict:
    """FHIR reads per store. `long`: LONG_OBS Observations, bulk-loaded (vigil_bench.bulk_load).
    `reuse`: {"postgresql"|"sqlite": url, "plan": bulk_load output} measures an already bulk-loaded store
    instead of loading one (to compare changes on one big load)."""
    n_obs = LONG_OBS if long else cfg["fhir_obs"]
    out: dict = {}
    for store_name in ("postgresql", "sqlite"):
        key = f"fhir_reads_{store_name}"
        if store_name not in stores:
            out[key] = skipped("not selected (--fhir-stores)")
            continue
        if store_name == "postgresql" and not pg_available and not (reuse or {}).get(store_name):
            out[key] = skipped("PostgreSQL binaries not found (apt-get install postgresql)")
            continue
        try:
            out[key] = _fhir_reads_one(cfg, env, log_dir, memory, ceilings, http_tool, store_name, n_obs,
                                       bulk=long, history=history, reuse=reuse)
        except Exception as exc:  # noqa: BLE001
            out[key] = {"status": "error", "reason": repr(exc)[:1000], "metrics": {}}
    return out


# Disk per resource of a bulk load (Observations + one RiskAssessment per patient-hour), measured at 1M
# on PostgreSQL 15 (6.2 KB with resource_history at 1M; 4.7 KB without at 10M); SQLite ~5.8 KB with it.
_BYTES_PER_RESOURCE = {True: 6400, False: 4800}


def _bulk(url: str, plan, history: bool, say) -> dict:
    from vigil_bench import bulk_load

    res = bulk_load.bulk_load(url, plan, history=history, progress=say)
    return {"result": res.to_json(), "verified_rows": bulk_load.verify_sample(url, plan)}


def _plan_queries(plan, rng: random.Random) -> dict:
    """Paths for the three timed queries over a bulk plan: random patients (the whole window), the
    plan's first 8 codes, date=ge the window start (every reading matches: a full page of 100)."""
    from vigil import codes as vcodes
    from vigil_bench import bulk_load

    loinc = {m.key: m.loinc for m in bulk_load._measurements(plan.codes)}
    codes_ = [loinc[k] for k in plan.codes][:8]
    q = urllib.parse.quote
    since = plan.window_start_iso()
    obs_search, ra_search, reads = [], [], []
    for _ in range(1000):
        p = rng.randrange(plan.patients)
        obs_search.append(f"/fhir/Observation?subject={q('Patient/' + plan.patient_id(p), safe='')}"
                          f"&code={q(vcodes.LOINC + '|' + rng.choice(codes_), safe='')}&date=ge{since}&_count=100")
        ra_search.append(f"/fhir/RiskAssessment?subject={q('Patient/' + plan.patient_id(rng.randrange(plan.patients)), safe='')}")
        p = rng.randrange(plan.patients)
        h = plan.starts[p] + rng.randrange(plan.lengths[p])
        reads.append(f"/fhir/Observation/{plan.obs_id(p, h, rng.randrange(len(plan.codes)))}")
    return {"observation_search": obs_search, "riskassessment_search": ra_search, "read_by_id": reads}


def _explain(url: str, path: str) -> dict:
    """EXPLAIN of the statement the store runs for one search path: the scans it uses (index names),
    whether anything is a table scan or a sort; PostgreSQL also ANALYZE/BUFFERS figures."""
    import re

    from vigil_gateway.bootstrap import build_store
    from vigil_gateway.search_params import parse_search

    rtype, _, query = path.removeprefix("/fhir/").partition("?")
    items = urllib.parse.parse_qsl(query)
    store = build_store(url)
    try:
        sql, args = store.search_sql(parse_search(rtype, items).query)
        if store.dialect == "postgresql":
            import psycopg
            with psycopg.connect(url, autocommit=True) as conn:
                lines = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, args)]
            scans = re.findall(r"((?:Index Only Scan|Index Scan|Seq Scan|Bitmap Heap Scan|Bitmap Index Scan)"
                               r"(?: Backward)?(?: using \S+)? on \S+)", "\n".join(lines))
            ex = next((ln for ln in lines if ln.startswith("Execution Time")), "")
            return {"query": path, "scans": scans, "table_scan": any("Seq Scan" in s for s in scans),
                    "sort": any(ln.strip().startswith("Sort") or "-> Sort" in ln for ln in lines),
                    "heap_fetches": [ln.strip() for ln in lines if "Heap Fetches" in ln],
                    "execution_ms": float(ex.split(":")[1].split()[0]) if ex else None, "plan": lines}
        import sqlite3

        from vigil_gateway.sqlite_store import sqlite_path
        conn = sqlite3.connect(sqlite_path(url))
        try:
            lines = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        finally:
            conn.close()
        return {"query": path, "scans": lines, "table_scan": any(ln.startswith("SCAN ") for ln in lines),
                "sort": any("TEMP B-TREE" in ln for ln in lines), "plan": lines}
    finally:
        store.close()


def _verify_http(base: str, paths: dict) -> dict:
    """A few searches and reads through the gateway: 200, valid FHIR R4 (fhir.resources R4B models),
    search results of the searched patient/code, the read resource returned by its id."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.riskassessment import RiskAssessment

    checked = 0
    for path in paths["observation_search"][:5] + paths["riskassessment_search"][:3]:
        status, body = http_get(base + path)
        if status != 200:
            raise AssertionError(f"GET {path} -> {status}")
        bundle = orjson.loads(body)
        Bundle.model_validate(bundle)
        params = dict(urllib.parse.parse_qsl(path.partition("?")[2]))
        if not bundle.get("entry"):
            raise AssertionError(f"GET {path}: no entries")
        for e in bundle["entry"]:
            r = e["resource"]
            (Observation if r["resourceType"] == "Observation" else RiskAssessment).model_validate(r)
            if r["subject"]["reference"] != params["subject"]:
                raise AssertionError(f"GET {path}: entry of {r['subject']['reference']}")
            if "code" in params and params["code"].split("|")[1] not in {c["code"] for c in r["code"]["coding"]}:
                raise AssertionError(f"GET {path}: entry with another code")
            checked += 1
    for path in paths["read_by_id"][:5]:
        status, body = http_get(base + path)
        if status != 200:
            raise AssertionError(f"GET {path} -> {status}")
        r = Observation.model_validate(orjson.loads(body))
        if r.id != path.rsplit("/", 1)[1]:
            raise AssertionError(f"GET {path} returned {r.id}")
        checked += 1
    return {"resources_checked": checked, "fhir_model": "fhir.resources R4B"}


def _postgres_settings() -> dict[str, str]:
    """What a PostgreSQL holding 10M Observations is given rather than initdb's 128 MB: shared_buffers a
    quarter of the memory (at most 8 GB), effective_cache_size half."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mib = mem // 2**20
    return {"shared_buffers": f"{min(8192, mib // 4)}MB", "effective_cache_size": f"{mib // 2}MB",
            "maintenance_work_mem": "1GB"}


def _start_tuned_postgres(svc: Services, base: pathlib.Path, settings: dict[str, str]) -> devservers.Server:
    """A throwaway PostgreSQL in `base` (removed by the caller) started once to ALTER SYSTEM, then again."""
    import psycopg

    base.mkdir(parents=True, exist_ok=True)
    first = devservers.start_postgres(data_dir=base)
    try:
        with psycopg.connect(first.url, autocommit=True) as conn:
            for k, v in settings.items():
                conn.execute(f"ALTER SYSTEM SET {k} = '{v}'")
    finally:
        first.stop()
    return svc.add_server(devservers.start_postgres(data_dir=base))


def _first_pass(base: str, paths: list[str]) -> dict:
    """Every distinct path once, in order, on one keep-alive connection: the latency of a first touch
    (at 10M most of it is read from disk), and the warm-up of the timed runs that follow."""
    import http.client

    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    lat, non_2xx = [], 0
    try:
        for path in dict.fromkeys(paths):
            t = time.perf_counter()
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            lat.append((time.perf_counter() - t) * 1000)
            non_2xx += not 200 <= r.status < 300
    finally:
        conn.close()
    return {"requests": len(lat), "latency_ms": percentiles(lat), "non_2xx": non_2xx}


def _fhir_reads_one(cfg, env, log_dir, memory, ceilings, http_tool, store_name, n_obs, *, bulk: bool = False,
                    history: bool = True, reuse: dict | None = None) -> dict:
    import shutil

    def say(msg: str) -> None:
        print(f"vigil bench fhir_reads_{store_name}: {msg}", flush=True, file=sys.stderr)

    # the temporary folder (a SQLite file, a --long PostgreSQL) goes after the servers have stopped
    with tempfile.TemporaryDirectory(prefix=f"vigil-bench-{store_name}-") as tmpd, \
            Services(log_dir, env, memory, f"fhir_reads_{store_name}") as svc:
        os.chmod(tmpd, 0o755)  # PostgreSQL runs as its own user when the bench runs as root
        plan = bulk_info = pg_settings = None
        load_seconds = load_rate = resources = None
        rng = random.Random(11)
        if reuse and reuse.get(store_name):
            from vigil_bench import bulk_load
            url = reuse[store_name]
            doc = reuse["plan"]  # the JSON `python -m vigil_bench.bulk_load` printed for that load
            plan = bulk_load.Plan.from_json(doc)
            bulk_info = {"reused": url.split("@")[-1], "result": doc}
            load_seconds, load_rate, resources = doc.get("seconds_total"), doc.get("resources_per_s"), doc.get("resources")
        else:
            if store_name == "postgresql" and bulk:
                pg_settings = _postgres_settings()
                url = _start_tuned_postgres(svc, pathlib.Path(tmpd) / "pg", pg_settings).url
                where = pathlib.Path(tmpd)
            elif store_name == "postgresql":
                url = svc.add_server(devservers.start_postgres()).url
                where = pathlib.Path(tempfile.gettempdir())
            else:
                url = f"sqlite:///{pathlib.Path(tmpd) / 'gateway.db'}"
                where = pathlib.Path(tmpd)
            if bulk:
                from vigil_bench import bulk_load
                plan = bulk_load.make_plan(n_obs, LONG_PATIENTS)
                need = (plan.observations + plan.risk_assessments) * _BYTES_PER_RESOURCE[history]
                free = shutil.disk_usage(where).free
                if free < need * 1.2:
                    return skipped(f"a {plan.observations:,}-Observation load needs about {need / 1e9:.0f} GB "
                                   f"(+20% margin); {free / 1e9:.0f} GB free at {where}"
                                   + ("" if not history else "; --no-history needs a quarter less"))
                bulk_info = _bulk(url, plan, history, say)
                r = bulk_info["result"]
                load_seconds, load_rate, resources = r["seconds_total"], r["resources_per_s"], r["resources"]
            else:
                loaded = _load_store(url, n_obs, cfg["fhir_patients"])
                load_seconds, load_rate, resources = loaded["seconds"], loaded["rows_per_s"], loaded["resources"]
        nats = svc.add_server(devservers.start_nats())
        port = devservers.free_port()
        svc.spawn("gateway", ["gateway"], {"VIGIL_NATS_URL": nats.url, "VIGIL_DATABASE_URL": url,
                                           "VIGIL_HTTP_HOST": "127.0.0.1", "VIGIL_HTTP_PORT": str(port),
                                           "VIGIL_OIDC_ISSUER": ""})
        base = f"http://127.0.0.1:{port}"
        # a reused store may migrate at start (an index rebuild at 10M takes minutes)
        svc.wait_http(f"{base}/readyz", 60 if plan is None else 3600)
        detail: dict = {}
        if plan is not None:
            queries = _plan_queries(plan, rng)
            date_supported = True
            detail["verified_http"] = _verify_http(base, queries)
            n_obs_real = plan.observations
            patients = plan.patients
        else:
            codes_ = [c for c, _u, _v in measurement_codes()][:8]
            q = urllib.parse.quote
            obs_search = [f"/fhir/Observation?subject={q('Patient/' + rng.choice(loaded['patients']), safe='')}"
                          f"&code={q('http://loinc.org|' + rng.choice(codes_), safe='')}&_count=100"
                          for _ in range(1000)]
            # The EHR's usual query also has date=ge...; check whether the gateway supports it yet.
            status, _ = http_get(base + obs_search[0] + "&date=ge2026-01-01T00:00:00Z")
            date_supported = status == 200
            if date_supported:
                obs_search = [p + "&date=ge2026-01-01T00:00:00Z" for p in obs_search]
            ra_search = [f"/fhir/RiskAssessment?subject={q('Patient/' + rng.choice(loaded['patients']), safe='')}"
                         for _ in range(1000)]
            reads = [f"/fhir/Observation/{rng.choice(loaded['obs_ids'])}" for _ in range(1000)]
            queries = {"observation_search": obs_search, "riskassessment_search": ra_search, "read_by_id": reads}
            n_obs_real, patients = n_obs, len(loaded["patients"])
        with contextlib.suppress(Exception):
            detail["explain_observation_search"] = _explain(url, queries["observation_search"][0])
        metrics: dict = {}
        for name, paths in queries.items():
            status, body = http_get(base + paths[0])  # every query must answer 200 before it is timed
            if status != 200:
                detail[name] = {"status": "error", "reason": f"GET {paths[0]} -> {status}: {body[:300]!r}"}
                continue
            load_before = os.getloadavg()
            first = _first_pass(base, paths)
            lat = http_load(base, paths, seconds=cfg["http_seconds"], connections=1, tool=http_tool)
            thr = http_load(base, paths, seconds=cfg["http_seconds"], connections=cfg["http_conns"], tool=http_tool)
            svc.check()
            detail[name] = {"first_pass": first, "latency_run": lat, "throughput_run": thr, "example": paths[0],
                            "load_average": [load_before, os.getloadavg()]}
            metrics[f"{name}_first_touch_p95_ms"] = metric(first["latency_ms"]["p95"], "ms", connections=1,
                                                           p50=first["latency_ms"]["p50"],
                                                           p99=first["latency_ms"]["p99"], requests=first["requests"])
            metrics[f"{name}_p50_ms"] = metric(lat["latency_ms"]["p50"], "ms", connections=1)
            metrics[f"{name}_p95_ms"] = metric(lat["latency_ms"]["p95"], "ms", connections=1)
            metrics[f"{name}_p99_ms"] = metric(lat["latency_ms"]["p99"], "ms", connections=1)
            metrics[f"{name}_req_per_s"] = with_ratio(
                metric(thr["req_per_s"], "req/s", connections=thr["connections"],
                       non_2xx=thr["non_2xx"] + lat["non_2xx"], errors=thr["errors"] + lat["errors"],
                       p95_ms_under_load=thr["latency_ms"]["p95"]),
                ceilings, "fastapi_get")
        if load_rate is not None:
            metrics["load_resources_per_s"] = metric(load_rate, "resources/s", resources=resources,
                                                     seconds=load_seconds, bulk=bool(bulk_info))
    failed = {k: v["reason"] for k, v in detail.items() if isinstance(v, dict) and v.get("status") == "error"}
    return {"status": "ok" if not failed else ("partial" if metrics else "error"),
            "reason": "; ".join(f"{k}: {v}" for k, v in failed.items())[:1000] if failed else "",
            "metrics": metrics,
            "params": {"store": store_name, "observations": n_obs_real, "patients": patients,
                       "resources_loaded": resources, "http_tool": http_tool,
                       "date_param_supported": date_supported, "bulk_load": bulk_info,
                       "postgres_settings": pg_settings,
                       "latency_connections": 1, "throughput_connections": cfg["http_conns"],
                       "seconds_per_run": cfg["http_seconds"]},
            "queries": detail}
