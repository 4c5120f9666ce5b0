"""Replay PhysioNet/CinC 2019 stays through the ingest gRPC API, as bedside devices would send them.

One device per stay (`bedside-<stem>`, patient `<stem>`). Row k (ICULOS = k) becomes ONE batch with a
Reading per non-missing measurement column, effective at T0 + (k-1) h (vigil.timecontract). Sequence
numbers are deterministic (row_index * 64 + column_index), so replaying again is idempotent: the bus
de-duplicates and acks say duplicate=True.

Like a real device gateway, replay first registers each device and binds it to its patient from T0
(DeviceService); with `fhir_base`, it first writes each stay's Patient and its hospital and ICU
Encounters to the FHIR gateway (PUT, update-as-create), built by vigil/ehr.py.

Stays are replayed `concurrency` at a time, their rows merged in event-time order (all stays share T0,
so the pipeline sees an ICU where these patients were admitted together; a stay that ends is replaced
by the next one, which starts again at T0). Batches are pipelined on `streams` long-lived
StreamReadings streams, each with a window of unacknowledged batches.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vigil import codes, ehr, physionet, timecontract
from vigil.catalogue import Catalogue, load_catalogue
from vigil.device.v1 import ingest_pb2
from vigil_ingest.client import IngestClient

SEQ_STRIDE = 64  # sequence = row_index * 64 + column_index (34 measurement columns < 64)


@dataclass
class ReplayStats:
    stays: int = 0
    batches: int = 0
    readings: int = 0
    duplicates: int = 0  # batches the bus already had (a repeated replay)
    seconds: float = 0.0

    @property
    def readings_per_second(self) -> float:
        return self.readings / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class ColumnCode:
    code: str
    system: str
    unit: str


def column_codes(catalogue: Catalogue | None = None) -> list[ColumnCode]:
    """The (code, system, unit) a bedside device sends for each of the 34 measurement columns.

    The code is the catalogue LOINC when that code maps back to the same measurement, otherwise the
    measurement's first input code (O2Sat: LOINC 2708-6 is arterial SaO2 as a device input, so pulse
    oximetry is sent as 59408-5). The unit is the data set's unit (FiO2 is a fraction: "1").
    """
    catalogue = catalogue or load_catalogue()
    out = []
    for key in physionet.MEASUREMENT_COLUMNS:
        m = catalogue.by_key[key]
        if catalogue.lookup(m.loinc, codes.LOINC) is m:
            system, code = codes.LOINC, m.loinc
        else:
            system, code = m.inputs[0].split("|", 1)
        out.append(ColumnCode(code=code, system=system, unit=physionet.SOURCE_UNITS.get(key, m.ucum)))
    return out


def stay_batches(stay: physionet.Stay, t0_epoch: float, cols: list[ColumnCode], *, id_prefix: str = ""
                 ) -> list[tuple[float, ingest_pb2.ReadingBatch]]:
    """(effective epoch, batch) per row with at least one measurement, in time order."""
    device_id, patient_id = f"{id_prefix}bedside-{stay.stem}", f"{id_prefix}{stay.stem}"
    values = stay.data[:, :len(cols)]
    present = ~np.isnan(values)
    out = []
    for row_index, k in enumerate(stay.iculos.tolist()):
        idx = np.flatnonzero(present[row_index])
        if idx.size == 0:
            continue
        eff = timecontract.row_effective_epoch(t0_epoch, k)
        ts_seconds = int(eff)
        readings = []
        for j in idx.tolist():
            c = cols[j]
            r = ingest_pb2.Reading(sequence=row_index * SEQ_STRIDE + j, code=c.code, value=float(values[row_index, j]),
                                   unit=c.unit)
            if c.system != codes.LOINC:
                r.system = c.system
            r.effective_time.seconds = ts_seconds
            readings.append(r)
        out.append((eff, ingest_pb2.ReadingBatch(device_id=device_id, patient_id=patient_id, readings=readings)))
    out.sort(key=lambda x: x[0])
    return out


def ehr_resources(stay: physionet.Stay, t0: dt.datetime, *, id_prefix: str = "") -> list[tuple[str, dict]]:
    """(path, resource) to PUT for a stay: Patient/<stem>, Encounter/<stem>-hospital, Encounter/<stem>-icu."""
    pid = f"{id_prefix}{stay.stem}"
    patient = {**ehr.patient_from_stay(stay, t0), "id": pid}
    hospital, icu = ehr.encounters_from_stay(stay, t0, f"Patient/{pid}")
    hospital = {**hospital, "id": f"{pid}-hospital"}
    icu = {**icu, "id": f"{pid}-icu", "partOf": {"reference": f"Encounter/{pid}-hospital"}}
    return [(f"Patient/{pid}", patient), (f"Encounter/{pid}-hospital", hospital), (f"Encounter/{pid}-icu", icu)]


class FhirWriter:
    """PUTs the EHR side of a stay through the FHIR REST API (application/fhir+json, Bearer token)."""

    def __init__(self, base: str, token: str | None = None, *, timeout: float = 30.0):
        import httpx

        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base = base.rstrip("/")
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def write_stay(self, stay: physionet.Stay, t0: dt.datetime, *, id_prefix: str = "") -> None:
        import orjson

        for path, resource in ehr_resources(stay, t0, id_prefix=id_prefix):
            r = await self.http.put(f"{self.base}/{path}", content=orjson.dumps(resource))
            if r.status_code >= 300:
                raise RuntimeError(f"PUT {self.base}/{path}: HTTP {r.status_code}: {r.text[:500]}")

    async def close(self) -> None:
        await self.http.aclose()


def default_credentials(env: dict | None = None) -> tuple[str | None, Callable[[], object] | None]:
    """(token, token_provider) from the environment when the caller gave none: VIGIL_DEVICE_TOKEN, or
    client credentials VIGIL_DEVICE_CLIENT_SECRET (+ VIGIL_DEVICE_CLIENT_ID, default vigil-device-demo)
    at VIGIL_OIDC_ISSUER. (None, None) otherwise: right when ingest runs with auth off."""
    import os

    from vigil_ingest.client import ClientCredentials

    env = os.environ if env is None else env
    if env.get("VIGIL_DEVICE_TOKEN"):
        return env["VIGIL_DEVICE_TOKEN"], None
    if env.get("VIGIL_DEVICE_CLIENT_SECRET") and env.get("VIGIL_OIDC_ISSUER"):
        return None, ClientCredentials.for_issuer(env["VIGIL_OIDC_ISSUER"],
                                                  env.get("VIGIL_DEVICE_CLIENT_ID", "vigil-device-demo"),
                                                  env["VIGIL_DEVICE_CLIENT_SECRET"])
    return None, None


async def replay(path: str | pathlib.Path, *, target: str, limit: int | None = None,
                 start: dt.datetime = timecontract.DEFAULT_T0, speed: float = 0.0, token: str | None = None,
                 progress: Callable[[ReplayStats], None] | None = None, concurrency: int = 256,
                 streams: int = 4, window: int = 64, id_prefix: str = "", fhir_base: str | None = None,
                 fhir_token: str | None = None, token_provider: Callable[[], object] | None = None
                 ) -> ReplayStats:
    """Replay stays from a folder or .tar.gz of .psv files; returns counts and elapsed seconds.

    speed 0 = as fast as the pipeline acknowledges; otherwise N x real time in event time.
    `id_prefix` is prepended to device and patient ids (isolated test runs). Each stay's device is
    registered and bound to its patient from T0 before its readings are sent; with `fhir_base`
    (and `fhir_token`) its Patient and Encounters are written there first.
    """
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    t0 = start.timestamp()
    if token is None and token_provider is None:
        token, token_provider = default_credentials()
    cols = column_codes()
    stats = ReplayStats()
    clients = [IngestClient(target, token=token, window=window, token_provider=token_provider)
               for _ in range(max(1, streams))]
    fhir = FhirWriter(fhir_base, fhir_token) if fhir_base else None
    stays = physionet.iter_stays(path, limit)
    heap: list = []  # (effective, order, stay_no, batch_index)
    active: dict[int, list] = {}
    order = 0
    stay_no = 0

    async def admit() -> bool:
        nonlocal stay_no, order
        try:
            stay = next(stays)
        except StopIteration:
            return False
        if fhir is not None:
            await fhir.write_stay(stay, start, id_prefix=id_prefix)
        device_id = f"{id_prefix}bedside-{stay.stem}"
        await clients[0].register_device(device_id, manufacturer="PhysioNet replay", model="vigil replay",
                                         display_name=f"Bedside monitor of stay {stay.stem}")
        await clients[0].bind_patient(device_id, f"{id_prefix}{stay.stem}", t0)
        batches = stay_batches(stay, t0, cols, id_prefix=id_prefix)
        stats.stays += 1
        if batches:
            active[stay_no] = batches
            heapq.heappush(heap, (batches[0][0], order, stay_no, 0))
            order += 1
        stay_no += 1
        return True

    try:
        while len(active) < concurrency and await admit():
            pass
    except BaseException:
        for c in clients:
            await c.close()
        if fhir is not None:
            await fhir.close()
        raise

    wall0 = time.monotonic()
    inflight: set[asyncio.Future] = set()
    errors: list[BaseException] = []

    def done(fut: asyncio.Future):
        inflight.discard(fut)
        if fut.cancelled():
            return
        if fut.exception() is not None:
            errors.append(fut.exception())
        elif fut.result().duplicate:
            stats.duplicates += 1

    try:
        while heap:
            eff, _o, sno, bi = heapq.heappop(heap)
            batches = active[sno]
            batch = batches[bi][1]
            if speed > 0:
                due = wall0 + (eff - t0) / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            fut = await clients[sno % len(clients)].submit(batch)
            inflight.add(fut)
            fut.add_done_callback(done)
            stats.batches += 1
            stats.readings += len(batch.readings)
            if bi + 1 < len(batches):
                heapq.heappush(heap, (batches[bi + 1][0], order, sno, bi + 1))
                order += 1
            else:
                del active[sno]
                await admit()
            if progress is not None and stats.batches % 1000 == 0:
                stats.seconds = time.monotonic() - wall0
                progress(stats)
            # Surface a failed batch promptly instead of at the end.
            if errors:
                raise errors[0]
        if inflight:
            await asyncio.gather(*list(inflight))
        if errors:
            raise errors[0]
    finally:
        for c in clients:
            await c.close()
        if fhir is not None:
            await fhir.close()
    stats.seconds = time.monotonic() - wall0
    if progress is not None:
        progress(stats)
    return stats


