"""`vigil ingest --workers N` against a real NATS JetStream: N processes on one port, one supervisor."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import nats
import psutil
import pytest
from vigil_ingest import bootstrap
from vigil_ingest.client import make_reading

from vigil import bus, devservers
from vigil.device.v1 import device_pb2, device_pb2_grpc, ingest_pb2
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0

pytestmark = pytest.mark.integration
T = DEFAULT_T0.timestamp()
CONNECTIONS = 16  # all on one worker by chance: 2 * 2**-16


def start_workers(nats_url: str, port: int, n: int = 2, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "VIGIL_NATS_URL": nats_url, **(extra_env or {})}
    env.pop("VIGIL_INGEST_WORKERS", None)
    return subprocess.Popen([sys.executable, "-m", "vigil.cli", "ingest", "--workers", str(n),
                             "--listen", f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def workers_of(proc: subprocess.Popen, n: int, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children()
        if len(kids) == n:
            return kids
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError(f"expected {n} workers")


def listening(pids: list[int], port: int) -> bool:
    for pid in pids:
        conns = psutil.Process(pid).net_connections("tcp")
        if not any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return False
    return True


def wait_listening(pids: list[int], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not listening(pids, port):
        assert time.monotonic() < deadline, "workers not listening"
        time.sleep(0.1)


def established(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def stop(proc: subprocess.Popen) -> None:
    """Leave nothing behind, whatever the test did."""
    kids = []
    with contextlib.suppress(psutil.Error):
        kids = psutil.Process(proc.pid).children()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.kill()


@contextlib.contextmanager
def running_workers(nats_url: str, n: int = 2):
    """(supervisor, its n workers, port) once every worker listens; nothing is left behind afterwards."""
    port = devservers.free_port()
    proc = start_workers(nats_url, port, n)
    try:
        kids = workers_of(proc, n)
        wait_listening([k.pid for k in kids], port)
        yield proc, kids, port
    finally:
        stop(proc)


async def register_and_bind(target: str, device: str, patient: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = device_pb2_grpc.DeviceServiceStub(ch)
        await stub.RegisterDevice(device_pb2.RegisterDeviceRequest(device=device_pb2.Device(device_id=device)))
        b = device_pb2.Binding(patient_id=patient)
        b.start_time.seconds = int(T - 86400)
        await stub.BindPatient(device_pb2.BindPatientRequest(device_id=device, binding=b))


async def test_workers_share_one_port_and_store_every_batch_once(nats_url):
    with running_workers(nats_url) as (proc, kids, port):
        target = f"127.0.0.1:{port}"
        run = uuid.uuid4().hex[:8]
        devices = [(f"wk-{run}-d{i}", f"wk-{run}-p{i}") for i in range(CONNECTIONS)]
        # registered through whichever worker a connection lands on; every worker must see them
        for dev, pat in devices:
            await register_and_bind(target, dev, pat)
        per_stream = 10
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in devices]
        try:
            for ch in channels:
                await asyncio.wait_for(ch.channel_ready(), 10)
            served = [established(k.pid, port) for k in kids]
            assert sum(served) >= CONNECTIONS and all(n > 0 for n in served), served

            async def one(ch, dev, pat):
                reqs = [ingest_pb2.StreamReadingsRequest(batch=ingest_pb2.ReadingBatch(
                    device_id=dev, patient_id=pat, readings=[make_reading(3 * b + i, "8867-4", 70 + i, "/min",
                                                                          T + 60 * (3 * b + i)) for i in range(3)]))
                    for b in range(per_stream)]
                call = ch.stream_stream("/vigil.device.v1.IngestService/StreamReadings",
                                        request_serializer=ingest_pb2.StreamReadingsRequest.SerializeToString,
                                        response_deserializer=ingest_pb2.StreamReadingsResponse.FromString)
                acks = [r.ack async for r in call(iter(reqs), timeout=30)]
                return acks

            results = await asyncio.gather(*(one(ch, d, p) for ch, (d, p) in zip(channels, devices, strict=True)))
        finally:
            for ch in channels:
                await ch.close()
        for acks, (dev, _) in zip(results, devices, strict=True):
            assert [(a.device_id, a.first_sequence, a.reading_count, a.duplicate) for a in acks] == \
                [(dev, 3 * b, 3, False) for b in range(per_stream)]
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for _, pat in devices:
                info = await js.stream_info(bus.OBSERVATIONS_STREAM, subjects_filter=bus.observation_subject(pat))
                assert sum((info.state.subjects or {}).values()) == per_stream
        finally:
            await nc.close()
        # SIGTERM to the supervisor alone (what Kubernetes sends to PID 1): every worker drains and exits
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


def test_a_dying_worker_stops_the_unit_with_an_error(nats_url):
    with running_workers(nats_url) as (proc, kids, _):
        kids[0].kill()
        assert proc.wait(30) == 1
        out = proc.stdout.read()
        assert f"worker pid {kids[0].pid} exited" in out
        kids[1].wait(10)  # the other worker was stopped, not left serving alone


def test_workers_stop_when_the_supervisor_is_killed(nats_url):
    with running_workers(nats_url) as (proc, kids, _):
        proc.kill()  # SIGKILL: no chance to forward anything
        proc.wait(10)
        _, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive, f"workers left serving: {[k.pid for k in alive]}"


def test_workers_need_a_fixed_port(nats_url):
    proc = subprocess.run([sys.executable, "-m", "vigil.cli", "ingest", "--workers", "2", "--listen",
                           "127.0.0.1:0", "--nats-url", nats_url], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "needs a fixed listen port" in proc.stderr


async def test_a_single_server_does_not_share_a_taken_port(nats_url):
    """Without --workers, SO_REUSEPORT is off: a second server on a port in use fails to start instead
    of silently taking part of the traffic."""
    first = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url))
    try:
        with pytest.raises(RuntimeError):
            second = await bootstrap.start(Settings(grpc_listen=f"127.0.0.1:{first.port}", nats_url=nats_url))
            await second.stop(1)
    finally:
        await first.stop(1)
