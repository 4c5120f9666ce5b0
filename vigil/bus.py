"""The bus contract: JetStream stream names, subjects, headers and message shapes.

Every message body is a FHIR R4 Bundle of type `collection` (https://hl7.org/fhir/R4/bundle.html)
serialized with orjson; `Nats-Msg-Id` makes JetStream drop a republished duplicate within the
stream's duplicate window. A body larger than COMPRESS_MIN_BYTES may be stored as one zstd frame
(`wire_body`): FHIR JSON shrinks about 18x, which cuts NATS's CPU, disk and network per reading by as
much. Bodies describe themselves (a zstd frame starts with ZSTD_MAGIC, JSON never does), so
`decode_bundle` reads both and a consumer never needs to know how a producer was configured.
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
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESS_MIN_BYTES = 2048  # one-reading bodies (~0.9 KB) stay plain JSON: not worth a frame
MAX_BODY_BYTES = 64 << 20  # decoded size refused beyond this (a corrupt or hostile frame)
COMPRESSIONS = ("zstd", "none")
CONTENT_TYPE = "application/fhir+json"
MSG_ID = "Nats-Msg-Id"
EXPECTED_STREAM = "Nats-Expected-Stream"  # JetStream refuses the message when another stream would store it

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


_zstd: dict[str, object] = {}


def _codec(kind: str):
    c = _zstd.get(kind)
    if c is None:
        import zstandard

        c = _zstd[kind] = (zstandard.ZstdCompressor(level=1, write_checksum=True) if kind == "c"
                           else zstandard.ZstdDecompressor())
    return c


def check_compression(compression: str) -> str:
    """`compression` if it is one of COMPRESSIONS (VIGIL_BUS_COMPRESSION), else ValueError."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"VIGIL_BUS_COMPRESSION must be one of {COMPRESSIONS}, not {compression!r}")
    return compression


def wire_body(body: bytes, compression: str = "zstd") -> bytes:
    """The body as stored on the bus: a zstd frame (level 1, content size and checksum) when
    `compression` is "zstd" and the body is at least COMPRESS_MIN_BYTES, else the body itself."""
    if compression == "none" or len(body) < COMPRESS_MIN_BYTES:
        return body
    check_compression(compression)
    return _codec("c").compress(body)


def plain_body(data: bytes) -> bytes:
    """The JSON of a bus body, whether it was stored compressed or not."""
    if data[:4] != ZSTD_MAGIC:
        return data
    import zstandard

    try:
        params = zstandard.get_frame_parameters(data)
        if not 0 < params.content_size <= MAX_BODY_BYTES:
            raise ValueError(f"bus message: zstd frame of {params.content_size} bytes "
                             f"(no content size, or more than {MAX_BODY_BYTES})")
        return _codec("d").decompress(data, max_output_size=MAX_BODY_BYTES)
    except zstandard.ZstdError as e:
        raise ValueError(f"bus message: corrupt zstd frame: {e}") from e


def decode_bundle(data: bytes) -> list[dict]:
    doc = orjson.loads(plain_body(data))
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
