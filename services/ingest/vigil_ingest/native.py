"""Native (Rust, pyo3) fast path of batch preparation; `handler.prepare_batch` stays the reference.

    mapper = native.load(catalogue)        # None: not built, stale, disabled, or failed its self-check
    if mapper is not None:
        hit = mapper.scan(data)            # (device_id, patient_id, count, min_effective, max_effective)
        ...                                # resolve the patient from the device's bindings
        prepared = mapper.prepare(data, patient_id)   # (body, msg_id, first, last, count, last_effective)
    if hit is None or prepared is None:
        ...                                # the Python path (it reports the precise violations)

The extension (services/ingest/native, built by scripts/build-native.sh into vigil_ingest/_native.abi3.so)
covers only the common all-valid case and answers None for anything else: a violation of any kind (device_status
values included), a panel reading (components), an odd or malformed protobuf encoding. Implausible values (flagged "preliminary")
and unit conversions are on the fast path.

One source of truth for the FHIR shape: the Rust side holds no FHIR constants of its own beyond the key
names of `vigil.observation.map_batch`'s dict; every code, display, profile, unit and system comes from
the catalogue and `vigil.observation._Parts`, serialized here with orjson. `load` checks the extension
against the Python path on a probe batch covering every catalogue input and unit before handing it out,
so a drift between the two disables the fast path (with a warning) instead of publishing different data.

VIGIL_INGEST_NATIVE=0 disables the fast path.
"""
from __future__ import annotations

import logging
import os

import orjson

from vigil import codes, ids
from vigil.catalogue import Catalogue, load_catalogue
from vigil.observation import MAX_BATCH, _parts

log = logging.getLogger(__name__)

ENV = "VIGIL_INGEST_NATIVE"
ABI = 2  # must equal the extension's ABI (services/ingest/native/src/lib.rs)

_LOADED: dict[int, tuple[Catalogue, FastMapper | None]] = {}


class FastMapper:
    """The native mapper for one catalogue (from `load`)."""

    __slots__ = ("_mapper", "catalogue")

    def __init__(self, mapper, catalogue: Catalogue):
        self._mapper = mapper
        self.catalogue = catalogue

    def scan(self, data: bytes, wrapped: bool = False) -> tuple[str, str, int, float, float] | None:
        """(device_id, patient_id, count, min_effective, max_effective) when the batch can take the fast
        path, else None.

        `data` is a serialized ReadingBatch, or with wrapped=True a serialized StreamReadingsRequest.
        patient_id is the batch's (possibly empty, not validated: the patient comes from the binding);
        effective times are `handler.reading_tuples`' (seconds + nanos / 1e9). Everything else is
        validated as by `prepare`, so a batch scan accepts is one prepare accepts for a valid patient id.
        """
        if type(data) is not bytes:
            data = bytes(data)
        return self._mapper.scan(data, wrapped)

    def prepare(self, data: bytes, patient_id: str, wrapped: bool = False
                ) -> tuple[bytes, str, int, int, int, float] | None:
        """(body, msg_id, first_sequence, last_sequence, count, last_effective) equal to what
        handler.prepare_batch(batch, catalogue, patient_id=patient_id) yields (PreparedBatch.body,
        .msg_id, ...), or None: the caller takes the Python path.

        Right after `scan` of the same bytes object (same `wrapped`), the scan's validation is reused
        (the extension keeps a reference to that object until the next call), so scan + prepare costs
        about what prepare alone does."""
        if type(data) is not bytes:
            data = bytes(data)
        return self._mapper.prepare(data, patient_id, wrapped)


def _json(value) -> str:
    return orjson.dumps(value).decode()


def _build(native, catalogue: Catalogue):
    """The extension's Mapper for `catalogue`: per measurement its input keys, UCUM unit, conversions,
    plausible range and the pre-serialized constant parts of its Observations. Panels are left out
    (their readings then miss the lookup and go to the Python path)."""
    inputs: dict[int, list[tuple[str, str]]] = {}
    measurements = {}
    for (system, code), m in catalogue.by_input.items():
        if m.components:
            continue
        inputs.setdefault(id(m), []).append((system, code))
        measurements[id(m)] = m
    spec = []
    for key, m in measurements.items():
        parts = _parts(m)
        spec.append((
            inputs[key], m.ucum, [(unit, float(mul), float(add)) for unit, (mul, add) in m.convert.items()],
            float(m.plausible[0]), float(m.plausible[1]),
            _json(parts.category), _json(parts.code), None if parts.meta is None else _json(parts.meta),
            _json(parts.implausible), _json(m.ucum),
        ))
    return native.Mapper(spec, loinc=codes.LOINC, namespace=ids._NS.bytes, max_batch=MAX_BATCH,
                         reading_system_json=_json(codes.READING_IDENTIFIER_SYSTEM),
                         ucum_system_json=_json(codes.UCUM))


def _probe(catalogue: Catalogue) -> bytes:
    """A ReadingBatch with every non-panel input code, each accepted unit, a plausible and an
    implausible value, whole and fractional times."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from vigil.device.v1 import ingest_pb2

    t0 = 1_767_225_600  # 2026-01-01T00:00:00Z
    readings = []
    for (system, code), m in catalogue.by_input.items():
        if m.components:
            continue
        lo, hi = m.plausible
        values = [(lo + hi) / 2 + 0.1, hi + abs(hi - lo) + 1.0]
        for unit in m.accepted_units:
            for value in values:
                n = len(readings)
                ts = Timestamp(
                    seconds=t0 + 60 * n, nanos=(n % 4) * 250_000_000 + (n % 3) * 500_000)
                readings.append(ingest_pb2.Reading(sequence=2 ** 40 + 7 * n, code=code, system=system,
                                                   value=value, unit=unit, effective_time=ts))
    batch = ingest_pb2.ReadingBatch(device_id="native-self-check", patient_id="self-check", readings=readings)
    return batch.SerializeToString()


def _self_check(mapper: FastMapper, catalogue: Catalogue) -> str | None:
    """None when the extension agrees with the Python path on the probe batch, else what differs."""
    from vigil.device.v1 import ingest_pb2
    from vigil_ingest.handler import prepare_batch, reading_tuples

    data = _probe(catalogue)
    batch = ingest_pb2.ReadingBatch.FromString(data)
    expected = prepare_batch(batch, catalogue, patient_id="self-check")
    got = mapper.prepare(data, "self-check")
    if got is None:
        return "the extension refused the probe batch"
    body, msg_id, first, last, count, last_effective = got
    if orjson.loads(body) != orjson.loads(expected.body):
        return "Observations differ from vigil.observation.map_batch"
    if (msg_id, first, last, count, last_effective) != (expected.msg_id, expected.first_sequence,
                                                        expected.last_sequence, expected.count,
                                                        expected.last_effective):
        return "msg_id, sequences, count or last_effective differ from handler.prepare_batch"
    effective = [r[5] for r in reading_tuples(batch)]
    if mapper.scan(data) != (batch.device_id, batch.patient_id, count, min(effective), max(effective)):
        return "scan differs from handler.reading_tuples"
    return None


def load(catalogue: Catalogue | None = None) -> FastMapper | None:
    """The native mapper for this catalogue, or None when the extension is not built or
    VIGIL_INGEST_NATIVE=0 (also when it is stale or disagrees with the Python path: logged)."""
    if os.environ.get(ENV, "").strip() == "0":
        return None
    try:
        from vigil_ingest import _native
    except ImportError:
        return None
    catalogue = catalogue or load_catalogue()
    hit = _LOADED.get(id(catalogue))
    if hit is not None and hit[0] is catalogue:
        return hit[1]
    mapper: FastMapper | None = None
    if getattr(_native, "ABI", None) != ABI:
        log.warning("native ingest path disabled: %s is stale (ABI %s, expected %s); run `make native`",
                    _native.__file__, getattr(_native, "ABI", None), ABI)
    else:
        try:
            mapper = FastMapper(_build(_native, catalogue), catalogue)
            problem = _self_check(mapper, catalogue)
        except Exception as e:  # noqa: BLE001 - any failure means: use the Python path
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            log.warning("native ingest path disabled: %s", problem)
            mapper = None
    _LOADED[id(catalogue)] = (catalogue, mapper)
    return mapper
