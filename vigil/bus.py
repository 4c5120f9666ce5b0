"""The bus contract: JetStream stream names, subjects, headers and message shapes.

Every message body is a FHIR R4 Bundle of type `collection` (https://hl7.org/fhir/R4/bundle.html)
serialized with orjson; `Nats-Msg-Id` makes JetStream drop a republished duplicate within the
stream's duplicate window.
"""
from __future__ import annotations

import hashlib

import orjson

OBSERVATIONS_STREAM = "VIGIL_OBSERVATIONS"
OBSERVATIONS_SUBJECTS = "vigil.v1.observation.>"
RISK_STREAM = "VIGIL_RISK"
RISK_SUBJECTS = "vigil.v1.riskassessment.>"
# Administrative resources: Patient and Encounter (written by EHRs through the gateway) and Device
# (registered through the device API), one resource per message on vigil.v1.ehr.<type>.<id>.
EHR_STREAM = "VIGIL_EHR"
EHR_SUBJECTS = "vigil.v1.ehr.>"

DUPLICATE_WINDOW_SECONDS = 600.0
CONTENT_TYPE = "application/fhir+json"
MSG_ID = "Nats-Msg-Id"

STREAMS = {
    OBSERVATIONS_STREAM: OBSERVATIONS_SUBJECTS,
    RISK_STREAM: RISK_SUBJECTS,
    EHR_STREAM: EHR_SUBJECTS,
}


def observation_subject(patient_id: str) -> str:
    return f"vigil.v1.observation.{patient_id}"


def risk_subject(patient_id: str) -> str:
    return f"vigil.v1.riskassessment.{patient_id}"


def ehr_subject(resource_type: str, resource_id: str) -> str:
    return f"vigil.v1.ehr.{resource_type}.{resource_id}"


def encode_bundle(resources: list[dict]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "collection",
                         "entry": [{"resource": r} for r in resources]})


def decode_bundle(data: bytes) -> list[dict]:
    doc = orjson.loads(data)
    if doc.get("resourceType") != "Bundle":
        raise ValueError("bus message is not a FHIR Bundle")
    return [e["resource"] for e in doc.get("entry", [])]


def batch_msg_id(device_id: str, sequences: list[int]) -> str:
    """JetStream dedupe id of a batch: the same (device, set of sequences) always gives the same id.

    The digest covers every sequence, so two different batches that share first, last and count
    never collide.
    """
    seqs = sorted(sequences)
    digest = hashlib.blake2b(b",".join(b"%d" % s for s in seqs), digest_size=8).hexdigest()
    return f"obs/{device_id}/{seqs[0]}-{seqs[-1]}/{len(seqs)}/{digest}"


async def ensure_streams(js, *, replicas: int = 1) -> None:
    """Create (or update) Vigil's streams with file storage and the duplicate window."""
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    for name, subjects in STREAMS.items():
        cfg = StreamConfig(name=name, subjects=[subjects], storage=StorageType.FILE,
                           duplicate_window=DUPLICATE_WINDOW_SECONDS, num_replicas=replicas)
        try:
            await js.stream_info(name)
            await js.update_stream(cfg)
        except NotFoundError:
            await js.add_stream(cfg)
