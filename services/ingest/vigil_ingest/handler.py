"""Framework-neutral batch handling: validate a ReadingBatch, publish it as one bus message, ack.

A batch is refused as a whole (BatchRejected lists every violation) or published as ONE JetStream
message: subject observation_subject(patient_id), body a FHIR Bundle of the batch's Observations,
`Nats-Msg-Id` batch_msg_id(device, sequences). The BatchAck is built only after
the publisher confirmed the message is durable.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vigil import bus
from vigil.catalogue import Catalogue, load_catalogue
from vigil.device.v1 import ingest_pb2
from vigil.observation import END_OF_TIME, Violation, format_instant, map_batch
from vigil_ingest.publisher import Publisher

_UNRESOLVED = "unresolved"  # stands in for the patient while only collecting violations (never published)
_READING_INDEX = re.compile(r"readings\[(\d+)\]")


def _epoch(ts) -> float:
    """As reading_tuples and the native scan: seconds + nanos / 1e9."""
    return ts.seconds + ts.nanos / 1e9 if ts.nanos else float(ts.seconds)


def _usable_time(ts) -> float | None:
    """The epoch of an effective_time resolve_patient can place in a binding, else None (unset, nanos
    out of range, before 1970 or from year 10000 on: prepare_batch reports those)."""
    if not 0 <= ts.nanos < 1_000_000_000:
        return None
    t = _epoch(ts)
    return t if 0 < t < END_OF_TIME else None


def _with_nanos_violations(batch: ingest_pb2.ReadingBatch, violations: list[Violation]) -> list[Violation]:
    """map_batch's violations plus one for each effective_time whose nanos is out of range (only the
    Timestamp shows it, not the epoch map_batch gets); that one replaces map_batch's for the field."""
    nanos = {f"readings[{i}].effective_time": Violation(
        f"readings[{i}].effective_time", f"nanos is {r.effective_time.nanos}; it must be 0 to 999,999,999")
        for i, r in enumerate(batch.readings) if not 0 <= r.effective_time.nanos < 1_000_000_000}
    if not nanos:
        return violations
    return [v for v in violations if v.field not in nanos] + list(nanos.values())


def status_violations(batch: ingest_pb2.ReadingBatch) -> list[Violation]:
    """device_status: battery percent and signal quality are finite numbers from 0 to 100."""
    if not batch.HasField("device_status"):
        return []
    st, out = batch.device_status, []
    for name in ("battery_percent", "signal_quality"):
        if st.HasField(name):
            v = getattr(st, name)
            if not (math.isfinite(v) and 0.0 <= v <= 100.0):
                out.append(Violation(f"device_status.{name}", f"is {v!r}; it must be a number from 0 to 100"))
    return out


def _by_reading(v: Violation) -> int:
    m = _READING_INDEX.match(v.field)
    return int(m.group(1)) if m else -1


class BatchRejected(Exception):
    """The batch breaks the contract; `violations` name each bad field (e.g. readings[3].unit).

    `preconditions` ((type, subject, description), as BindingRefused's) are the binding problems of the
    same batch: the status is INVALID_ARGUMENT, since the batch would be refused even once bound, and it
    carries both lists so that the device learns everything to fix in one answer."""

    def __init__(self, violations: list[Violation], *, batch_index: int | None = None,
                 preconditions: list[tuple[str, str, str]] = ()):
        self.violations = list(violations)
        self.preconditions = list(preconditions)
        self.batch_index = batch_index
        where = "" if batch_index is None else f"batches[{batch_index}]: "
        text = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        if self.preconditions:
            text += "; and " + "; ".join(f"{s}: {d}" for _t, s, d in self.preconditions)
        super().__init__(where + text)


class BindingRefused(Exception):
    """The device is not registered, or no binding covers some readings: FAILED_PRECONDITION with
    google.rpc.PreconditionFailure (`violations` are (type, subject, description))."""

    def __init__(self, violations: list[tuple[str, str, str]], *, batch_index: int | None = None):
        self.violations = list(violations)
        self.batch_index = batch_index
        where = "" if batch_index is None else f"batches[{batch_index}]: "
        super().__init__(where + "; ".join(f"{s}: {d}" for _t, s, d in self.violations))


def resolve_patient(batch: ingest_pb2.ReadingBatch, record, *, batch_index: int | None = None) -> str:
    """The patient of the batch from the device's bindings (`record`: registry.DeviceRecord or None).

    Every reading must fall in a binding, all to the same patient, and batch.patient_id (if set)
    must name that patient. Raises BindingRefused or BatchRejected.
    """
    device_id = batch.device_id
    if record is None:
        raise BindingRefused([("REGISTRATION", f"devices/{device_id}",
                               f"device {device_id!r} is not registered (DeviceService.RegisterDevice)")],
                             batch_index=batch_index)
    missing: list[tuple[str, str, str]] = []
    mixed: list[Violation] = []
    patient = None
    bindings = record.bindings
    single = bindings[0] if len(bindings) == 1 else None
    for i, r in enumerate(batch.readings):
        t = _usable_time(r.effective_time)
        if t is None:
            continue  # missing or out of range: reported by prepare_batch
        if single is not None and single[1] <= t and (single[2] is None or t < single[2]):
            p = single[0]
        else:
            p = record.patient_at(t)
        if p is None:
            missing.append(("BINDING", f"readings[{i}]",
                            (f"device {device_id!r} is bound to no patient at {format_instant(t)} "
                             f"(DeviceService.BindPatient)")))
        elif patient is None:
            patient = p
        elif p != patient:
            mixed.append(Violation(f"readings[{i}].effective_time",
                                   f"falls in the binding to patient {p}, readings[0..] are for {patient}; "
                                   f"split batches where the binding changes"))
    if missing:
        raise BindingRefused(missing, batch_index=batch_index)
    if patient is None:
        return batch.patient_id  # no timed reading: map_batch refuses the batch anyway
    if batch.patient_id and batch.patient_id != patient:
        mixed.insert(0, Violation("patient_id", f"is {batch.patient_id!r} but device {device_id!r} is bound to "
                                                f"patient {patient!r} at the readings' time"))
    if mixed:
        raise BatchRejected(mixed, batch_index=batch_index)
    return patient


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A validated batch, ready to publish."""

    subject: str
    body: bytes
    msg_id: str
    device_id: str
    first_sequence: int
    last_sequence: int
    count: int
    patient_id: str = ""
    last_effective: float = 0.0

    def ack(self, duplicate: bool) -> ingest_pb2.BatchAck:
        return ingest_pb2.BatchAck(device_id=self.device_id, first_sequence=self.first_sequence,
                                   last_sequence=self.last_sequence, reading_count=self.count,
                                   duplicate=duplicate)


def reading_tuples(batch: ingest_pb2.ReadingBatch) -> list[tuple]:
    """(sequence, code, system, value, unit, effective epoch seconds[, components]); effective 0.0 when
    unset; components (code, system, value, unit) tuples only for panel readings."""
    out = []
    for r in batch.readings:
        ts = r.effective_time  # unset -> 0, 0
        eff = ts.seconds + ts.nanos / 1e9 if ts.nanos else float(ts.seconds)
        if r.components:
            out.append((r.sequence, r.code, r.system, r.value, r.unit, eff,
                        tuple((c.code, c.system, c.value, c.unit) for c in r.components)))
        else:
            out.append((r.sequence, r.code, r.system, r.value, r.unit, eff))
    return out


def prepare_batch(batch: ingest_pb2.ReadingBatch, catalogue: Catalogue | None = None,
                  *, batch_index: int | None = None, patient_id: str | None = None) -> PreparedBatch:
    """Validate and encode; raises BatchRejected. Pure: no I/O.

    `patient_id` is the patient resolved from the device's binding (resolve_patient); None means
    batch.patient_id (no registry: unit tests of the mapping only).
    """
    catalogue = catalogue or load_catalogue()
    patient = batch.patient_id if patient_id is None else patient_id
    # An empty resolved patient: no reading has a usable effective_time, so the batch is refused; map it
    # for a stand-in patient to name those readings (not the optional patient_id).
    mapped_for = _UNRESOLVED if patient_id is not None and not patient else patient
    readings = reading_tuples(batch)
    observations, violations = map_batch(catalogue, batch.device_id, mapped_for, readings)
    violations = sorted(_with_nanos_violations(batch, violations) + status_violations(batch), key=_by_reading)
    if violations:
        raise BatchRejected(violations, batch_index=batch_index)
    seqs = [r[0] for r in readings]
    first, last = min(seqs), max(seqs)
    return PreparedBatch(
        subject=bus.observation_subject(patient),
        body=bus.encode_bundle(observations),
        msg_id=bus.batch_msg_id(batch.device_id, seqs),
        device_id=batch.device_id, first_sequence=first, last_sequence=last, count=len(readings),
        patient_id=patient, last_effective=max(r[5] for r in readings),
    )


def with_field_violations(batch: ingest_pb2.ReadingBatch, violations: list[Violation] = (),
                          catalogue: Catalogue | None = None) -> list[Violation]:
    """`violations` plus what prepare_batch would refuse in the batch whoever its patient is, each field
    once, in reading order: a batch refused on its binding reports its field errors too."""
    try:
        prepare_batch(batch, catalogue, patient_id=_UNRESOLVED)
        more = []
    except BatchRejected as e:
        more = e.violations
    seen = {v.field for v in violations}
    return sorted(list(violations) + [v for v in more if v.field not in seen], key=_by_reading)


async def publish_prepared(prepared: PreparedBatch, publisher: Publisher,
                           *, timeout: float | None = None) -> ingest_pb2.BatchAck:
    """Publish and return the ack once durable (PublishUnavailable propagates)."""
    _stored, duplicate = await publisher.publish_batch(prepared.subject, prepared.body, prepared.msg_id,
                                                       timeout=timeout)
    return prepared.ack(duplicate)


async def handle_batch(batch: ingest_pb2.ReadingBatch, publisher: Publisher,
                       catalogue: Catalogue | None = None, *, timeout: float | None = None
                       ) -> ingest_pb2.BatchAck:
    """Validate, publish one message, and return the BatchAck after the bus confirmed it."""
    return await publish_prepared(prepare_batch(batch, catalogue), publisher, timeout=timeout)
