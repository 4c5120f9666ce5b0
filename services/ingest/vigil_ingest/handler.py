"""Framework-neutral batch handling: validate a ReadingBatch, publish it as one bus message, ack.

A batch is refused as a whole (BatchRejected lists every violation) or published as ONE JetStream
message: subject observation_subject(patient_id), body a FHIR Bundle of the batch's Observations,
`Nats-Msg-Id` batch_msg_id(device, sequences). The BatchAck is built only after
the publisher confirmed the message is durable.
"""
from __future__ import annotations

from dataclasses import dataclass

from vigil import bus
from vigil.catalogue import Catalogue, load_catalogue
from vigil.device.v1 import ingest_pb2
from vigil.observation import Violation, map_batch
from vigil_ingest.publisher import Publisher


class BatchRejected(Exception):
    """The batch breaks the contract; `violations` name each bad field (e.g. readings[3].unit)."""

    def __init__(self, violations: list[Violation], *, batch_index: int | None = None):
        self.violations = list(violations)
        self.batch_index = batch_index
        where = "" if batch_index is None else f"batches[{batch_index}]: "
        super().__init__(where + "; ".join(f"{v.field}: {v.description}" for v in self.violations))


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

    def ack(self, duplicate: bool) -> ingest_pb2.BatchAck:
        return ingest_pb2.BatchAck(device_id=self.device_id, first_sequence=self.first_sequence,
                                   last_sequence=self.last_sequence, reading_count=self.count,
                                   duplicate=duplicate)


def reading_tuples(batch: ingest_pb2.ReadingBatch) -> list[tuple[int, str, str, float, str, float]]:
    """(sequence, code, system, value, unit, effective epoch seconds); 0.0 when effective_time is unset."""
    out = []
    for r in batch.readings:
        if r.HasField("effective_time"):
            ts = r.effective_time
            eff = ts.seconds + ts.nanos / 1e9
        else:
            eff = 0.0
        out.append((r.sequence, r.code, r.system, r.value, r.unit, eff))
    return out


def prepare_batch(batch: ingest_pb2.ReadingBatch, catalogue: Catalogue | None = None,
                  *, batch_index: int | None = None) -> PreparedBatch:
    """Validate and encode; raises BatchRejected. Pure: no I/O."""
    catalogue = catalogue or load_catalogue()
    readings = reading_tuples(batch)
    observations, violations = map_batch(catalogue, batch.device_id, batch.patient_id, readings)
    if violations:
        raise BatchRejected(violations, batch_index=batch_index)
    seqs = [r[0] for r in readings]
    first, last = min(seqs), max(seqs)
    return PreparedBatch(
        subject=bus.observation_subject(batch.patient_id),
        body=bus.encode_bundle(observations),
        msg_id=bus.batch_msg_id(batch.device_id, seqs),
        device_id=batch.device_id, first_sequence=first, last_sequence=last, count=len(readings),
    )


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
