"""Replay PhysioNet/CinC 2019 stays through the ingest gRPC API, as bedside devices would send them.

One device per stay (`bedside-<stem>`, patient `<stem>`). Row k (ICULOS = k) becomes ONE batch with a
Reading per non-missing measurement column, effective at T0 + (k-1) h (vigil.timecontract). Sequence
numbers are deterministic (row_index * 64 + column_index), so replaying again is idempotent: the bus
de-duplicates and acks say duplicate=True.

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

from vigil import codes, physionet, timecontract
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


async def replay(path: str | pathlib.Path, *, target: str, limit: int | None = None,
                 start: dt.datetime = timecontract.DEFAULT_T0, speed: float = 0.0, token: str | None = None,
                 progress: Callable[[ReplayStats], None] | None = None, concurrency: int = 256,
                 streams: int = 4, window: int = 64, id_prefix: str = "") -> ReplayStats:
    """Replay stays from a folder or .tar.gz of .psv files; returns counts and elapsed seconds.

    speed 0 = as fast as the pipeline acknowledges; otherwise N x real time in event time.
    `id_prefix` is prepended to device and patient ids (isolated test runs).
    """
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    t0 = start.timestamp()
    cols = column_codes()
    stats = ReplayStats()
    clients = [IngestClient(target, token=token, window=window) for _ in range(max(1, streams))]
    stays = physionet.iter_stays(path, limit)
    heap: list = []  # (effective, order, stay_no, batch_index)
    active: dict[int, list] = {}
    order = 0
    stay_no = 0

    def admit() -> bool:
        nonlocal stay_no, order
        try:
            stay = next(stays)
        except StopIteration:
            return False
        batches = stay_batches(stay, t0, cols, id_prefix=id_prefix)
        stats.stays += 1
        if batches:
            active[stay_no] = batches
            heapq.heappush(heap, (batches[0][0], order, stay_no, 0))
            order += 1
        stay_no += 1
        return True

    while len(active) < concurrency and admit():
        pass

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
                admit()
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
    stats.seconds = time.monotonic() - wall0
    if progress is not None:
        progress(stats)
    return stats


