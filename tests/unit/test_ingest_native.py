"""The native fast path (services/ingest/native, vigil_ingest.native) against the Python reference.

Differential: for the golden cases, thousands of seeded random batches (every catalogue input incl. MDC
codes and explicit systems, converted units, implausible values, fractional times with half-even rounding
edges, sequences up to 2**64-1, fields in any order, unknown fields at every level) and random byte
mutations, FastMapper.prepare must equal handler.prepare_batch (same JSON, byte for byte as orjson writes
it; msg_id; first/last/count; last_effective) and scan must equal reading_tuples' view; for every kind of
violation or unusual encoding it must answer None (the Python path then reports the violations).

Skipped when the extension is not built (`make native`), unless VIGIL_REQUIRE_NATIVE=1 (CI).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
import string
import struct

import orjson
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from vigil_ingest import native
from vigil_ingest.client import make_reading
from vigil_ingest.handler import BatchRejected, prepare_batch, reading_tuples

from tests.unit.test_ingest_mapping import CASES, T
from vigil import codes
from vigil.catalogue import Catalogue, load_catalogue
from vigil.device.v1 import ingest_pb2
from vigil.observation import MAX_BATCH

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
CAT = load_catalogue()
INPUTS = [(system, code, m) for (system, code), m in CAT.by_input.items() if not m.components]
PANEL_INPUTS = [(system, code) for (system, code), m in CAT.by_input.items() if m.components]
ID_CHARS = string.ascii_letters + string.digits + "-."
LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z


@pytest.fixture(scope="module")
def fast() -> native.FastMapper:
    mapper = native.load(CAT)
    if mapper is None:
        why = ("VIGIL_INGEST_NATIVE=0" if os.environ.get(native.ENV, "").strip() == "0"
               else "the extension is not built (make native), is stale or failed its self-check (see the log)")
        if os.environ.get("VIGIL_REQUIRE_NATIVE") == "1":
            pytest.fail(f"VIGIL_REQUIRE_NATIVE=1 but vigil_ingest.native.load() is None: {why}")
        pytest.skip(f"native ingest path unavailable: {why}")
    return mapper


@pytest.fixture(scope="module")
def ext(fast):
    from vigil_ingest import _native

    return _native


# --- wire format helpers --------------------------------------------------------------------------

def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _unknown(rng: random.Random) -> bytes:
    """A field no message of ingest.proto knows (numbers >= 8), of any non-group wire type."""
    field = rng.choice([8, 9, 15, 16, 100, 2047, 2**29 - 1])
    wt = rng.choice([0, 1, 2, 5])
    if wt == 0:
        payload = _varint(rng.choice([0, 1, 2**64 - 1, rng.randrange(2**35)]))
    elif wt == 1:
        payload = rng.randbytes(8)
    elif wt == 2:
        n = rng.choice([0, 3, 40])
        payload = _varint(n) + rng.randbytes(n)
    else:
        payload = rng.randbytes(4)
    return _key(field, wt) + payload


# --- the two paths --------------------------------------------------------------------------------

def _parse(data: bytes, wrapped: bool) -> ingest_pb2.ReadingBatch:
    if wrapped:
        return ingest_pb2.StreamReadingsRequest.FromString(data).batch
    return ingest_pb2.ReadingBatch.FromString(data)


def _python(data: bytes, patient: str, wrapped: bool = False):
    p = prepare_batch(_parse(data, wrapped), CAT, patient_id=patient)
    return p.body, p.msg_id, p.first_sequence, p.last_sequence, p.count, p.last_effective


def _python_scan(data: bytes, wrapped: bool = False):
    batch = _parse(data, wrapped)
    eff = [r[5] for r in reading_tuples(batch)]
    return batch.device_id, batch.patient_id, len(eff), min(eff), max(eff)


def assert_same(fast: native.FastMapper, data: bytes, patient: str, wrapped: bool = False) -> None:
    expected = _python(data, patient, wrapped)
    scanned = fast.scan(data, wrapped)
    assert scanned == _python_scan(data, wrapped)
    got = fast.prepare(data, patient, wrapped)  # reuses the scan of this very bytes object
    assert got is not None, "the fast path refused a batch the Python path accepts"
    assert orjson.loads(got[0]) == orjson.loads(expected[0])
    assert got[0] == expected[0], "not byte-identical to orjson"
    assert got[1:] == expected[1:]
    assert fast.prepare(bytes(bytearray(data)), patient, wrapped) == got  # without the scan


# --- (a) the golden files -------------------------------------------------------------------------

def test_every_non_panel_golden_case_is_covered():
    goldens = {p.name[len("observation-"):-len(".json")] for p in GOLDEN.glob("observation-*.json")}
    assert {g for g in goldens if "panel" not in g} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(fast, name):
    seq, code, system, value, unit = CASES[name]
    data = ingest_pb2.ReadingBatch(device_id="monitor-1", patient_id="p000001",
                                   readings=[make_reading(seq, code, value, unit, T, system)]).SerializeToString()
    assert_same(fast, data, "p000001")
    body = fast.prepare(data, "p000001")[0]
    [entry] = orjson.loads(body)["entry"]
    assert entry["resource"] == json.loads((GOLDEN / f"observation-{name}.json").read_text())


def test_all_goldens_in_one_batch_wrapped(fast):
    readings = [make_reading(seq, code, value, unit, T + i * 0.25, system)
                for i, (seq, code, system, value, unit) in enumerate(CASES.values())]
    batch = ingest_pb2.ReadingBatch(device_id="monitor-1", patient_id="p000001", readings=readings)
    data = ingest_pb2.StreamReadingsRequest(batch=batch).SerializeToString()
    assert_same(fast, data, "p000001", wrapped=True)
    assert_same(fast, batch.SerializeToString(), "p000002")


# --- (b) random batches ---------------------------------------------------------------------------

def _fhir_id(rng: random.Random) -> str:
    return "".join(rng.choice(ID_CHARS) for _ in range(rng.choice([1, 2, 9, 20, 64])))


SPECIAL_VALUES = [0.0, -0.0, 1e-7, 5e-324, 2.5e-5, 1e15, 1e16 + 2, 123456789.123, 1234567890.5, 12345678905.0,
                  9999999999.5, 0.1 + 0.2, 99.99999999949999, 1e22, 1.7976931348623157e300, -273.15, 37.5]


def _value(rng: random.Random, m, unit: str) -> float:
    lo, hi = m.plausible
    k = rng.random()
    if k < 0.45:
        target = rng.uniform(lo, hi)
        digits = rng.choice([0, 1, 2, 3, None])
        if digits is not None:
            target = round(target, digits)
        if unit != m.ucum:  # the same reading in the device's unit
            mul, add = m.convert[unit]
            target = (target - add) / mul
            if rng.random() < 0.5:
                target = round(target, rng.choice([1, 2, 3]))
        return target
    if k < 0.6:
        return rng.choice([hi + rng.uniform(0.01, 500), lo - rng.uniform(0.01, 500)])  # implausible
    if k < 0.75:
        return float(rng.randint(-1000, 100000))
    if k < 0.87:
        return rng.choice(SPECIAL_VALUES) * rng.choice([1, -1])
    return rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30)


def _timestamp(rng: random.Random) -> tuple[int, int]:
    seconds = rng.choice([
        rng.randint(1_700_000_000, 1_900_000_000), rng.randint(1_700_000_000, 1_900_000_000),
        rng.randint(1, LAST_SECOND - 10**6), 1, 86_399, 951_782_400, 4_107_542_400, 0,
        LAST_SECOND - rng.randint(10**6, 10**7),
    ])
    nanos = rng.choice([
        0, 0, rng.randint(0, 999_999_999), rng.randint(0, 999) * 1_000_000 + 500_000,  # .0005 edges
        rng.randint(0, 999) * 1_000_000, 500, 1500, 2500, 999_500_000, 999_999_500, 999_999_999, 1,
        rng.randint(0, 999_999) * 1000 + 500,  # frac * 1e6 near a .5: half-even
    ])
    if seconds == 0 and nanos == 0:
        nanos = 250_000_000
    return seconds, nanos


def _reading(rng: random.Random, seq: int, unknown: bool) -> bytes:
    system, code, m = rng.choice(INPUTS)
    if system == codes.LOINC and rng.random() < 0.6:
        system = ""  # the default system
    unit = rng.choice(m.accepted_units)
    value = _value(rng, m, unit)
    seconds, nanos = _timestamp(rng)
    ts = (_key(1, 0) + _varint(seconds) if seconds else b"") + (_key(2, 0) + _varint(nanos) if nanos else b"")
    if unknown and rng.random() < 0.3:
        ts += _unknown(rng)
    fields = [
        _key(1, 0) + _varint(seq) if seq or rng.random() < 0.2 else b"",
        _ld(2, code.encode()),
        _ld(3, system.encode()) if system or rng.random() < 0.1 else b"",
        _key(4, 1) + struct.pack("<d", value),
        _ld(5, unit.encode()),
        _ld(6, ts),
    ]
    fields = [f for f in fields if f]
    if unknown:
        for _ in range(rng.randint(1, 3)):
            fields.insert(rng.randint(0, len(fields)), _unknown(rng))
    if rng.random() < 0.2:
        rng.shuffle(fields)  # any field order is valid protobuf
    return b"".join(fields)


def _sequences(rng: random.Random, n: int) -> list[int]:
    seqs: set[int] = set()
    style = rng.random()
    start = rng.randint(0, 10**6)
    while len(seqs) < n:
        if style < 0.4:
            seqs.add(start + len(seqs))
        else:
            seqs.add(rng.choice([rng.randint(0, 1000), rng.randint(0, 2**64 - 1), 2**64 - 1, 2**63, 2**53 + 1, 0]))
    out = list(seqs)
    if style >= 0.4 or rng.random() < 0.3:
        rng.shuffle(out)
    return out


def random_batch(rng: random.Random) -> tuple[bytes, str, bool]:
    """(data, patient for prepare, wrapped)"""
    n = rng.choice([1, 1, 2, 3, 5, 10, 17, 50, 100, rng.randint(1, 300)])
    unknown = rng.random() < 0.3
    readings = [_ld(3, _reading(rng, seq, unknown)) for seq in _sequences(rng, n)]
    device, patient = _fhir_id(rng), _fhir_id(rng)
    others = [_ld(1, device.encode())]
    if rng.random() < 0.7:
        others.append(_ld(2, patient.encode()))
    if rng.random() < 0.2:
        status = ingest_pb2.DeviceStatus(battery_percent=rng.uniform(0, 100), signal_quality=rng.uniform(0, 100))
        others.append(_ld(4, status.SerializeToString()))
    if unknown:
        others += [_unknown(rng) for _ in range(rng.randint(1, 3))]
    chunks = readings
    for c in others:
        chunks.insert(rng.randint(0, len(chunks)), c)
    if rng.random() < 0.1:
        chunks.insert(0, _ld(1, b"replaced by the later device_id"))  # last one wins
    data = b"".join(chunks)
    wrapped = rng.random() < 0.25
    if wrapped:
        data = _ld(1, data) + (_unknown(rng) if unknown else b"")
    target = patient if rng.random() < 0.7 else _fhir_id(rng)
    return data, target, wrapped


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_equal_the_python_path(fast, seed):
    rng = random.Random(20260101 + seed)
    for _ in range(400):
        data, patient, wrapped = random_batch(rng)
        assert_same(fast, data, patient, wrapped)


def test_every_catalogue_input_and_unit(fast):
    rng = random.Random(7)
    readings = []
    for system, code, m in INPUTS:
        for unit in m.accepted_units:
            for value in (sum(m.plausible) / 2, m.plausible[0], m.plausible[1], m.plausible[1] + 1, 1.5, 0.35):
                readings.append(make_reading(len(readings), code, value, unit, T + rng.random() * 1e5, system))
    data = ingest_pb2.ReadingBatch(device_id="d", readings=readings).SerializeToString()
    assert_same(fast, data, "p")


def test_max_batch_is_on_the_fast_path(fast):
    readings = [make_reading(i, "8867-4", 60 + i % 50, "/min", T + i) for i in range(MAX_BATCH)]
    data = ingest_pb2.ReadingBatch(device_id="d", readings=readings).SerializeToString()
    assert_same(fast, data, "p")


def test_random_mutations_are_refused_or_equal(fast):
    """A corrupted batch is either refused (None) or, when it is still a valid batch, mapped exactly as the
    Python path maps it."""
    rng = random.Random(99)
    equal = 0
    for _ in range(2000):
        data, patient, wrapped = random_batch(rng)
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            op = rng.random()
            if op < 0.5:
                b[i] = rng.randrange(256)
            elif op < 0.7:
                del b[i]
            elif op < 0.85:
                b.insert(i, rng.randrange(256))
            else:
                del b[i:]
            if not b:
                b.append(0)
        mutated = bytes(b)
        got = fast.prepare(mutated, patient, wrapped)
        scanned = fast.scan(mutated, wrapped)
        if got is None:
            assert scanned is None
            continue
        assert_same(fast, mutated, patient, wrapped)  # raises (DecodeError, BatchRejected) if Python refuses
        equal += 1
    assert equal > 50  # the mutations do reach the fast path


# --- (c) everything else goes to the Python path --------------------------------------------------

def _b(readings, device="monitor-1", patient="p000001") -> bytes:
    return ingest_pb2.ReadingBatch(device_id=device, patient_id=patient, readings=readings).SerializeToString()


def _r(seq=1, code="8867-4", value=72.0, unit="/min", t=T, system="", **kw) -> ingest_pb2.Reading:
    r = make_reading(seq, code, value, unit, t, system)
    for k, v in kw.items():
        if k == "components":
            r.components.extend(v)
        else:
            setattr(r, k, v)
    return r


def _ts_reading(seconds: int, nanos: int) -> bytes:
    ts = _key(1, 0) + _varint(seconds % 2**64) + _key(2, 0) + _varint(nanos % 2**64)
    return _ld(3, _key(1, 0) + _varint(1) + _ld(2, b"8867-4") + _key(4, 1) + struct.pack("<d", 72.0)
               + _ld(5, b"/min") + _ld(6, ts))


GOOD = _b([_r(1), _r(2, "8310-5", 100.4, "[degF]")])
GOOD_READING = ingest_pb2.ReadingBatch.FromString(GOOD).readings[0].SerializeToString()
DEVICE = _ld(1, b"monitor-1")
BP = ingest_pb2.Reading(sequence=9, code="85354-9", effective_time=Timestamp(seconds=int(T)), components=[
    ingest_pb2.ReadingComponent(code="8480-6", value=120, unit="mm[Hg]"),
    ingest_pb2.ReadingComponent(code="8462-4", value=80, unit="mm[Hg]")])

# name -> batch bytes; the Python path refuses each (BatchRejected or DecodeError) unless marked below
REFUSED = {
    "empty batch": _b([]),
    "more than MAX_BATCH": _b([_r(i) for i in range(MAX_BATCH + 1)]),
    "empty device id": _b([_r()], device=""),
    "device id with a space": _b([_r()], device="bad id"),
    "device id with a slash": _b([_r()], device="dev/1"),
    "device id of 65 characters": _b([_r()], device="a" * 65),
    "non-ASCII device id": _b([_r()], device="dévice"),
    "duplicate sequence": _b([_r(1), _r(2), _r(1, "8310-5", 37.0, "Cel")]),
    "unknown code": _b([_r(), _r(2, "9999-9")]),
    "MDC code without its system": _b([_r(1, "147842")]),
    "LOINC code under the MDC system": _b([_r(1, "8867-4", system=codes.MDC)]),
    "unknown system": _b([_r(1, "8867-4", system="http://example.org")]),
    "unit not accepted": _b([_r(), _r(2, unit="kg")]),
    "empty unit": _b([_r(unit="")]),
    "NaN": _b([_r(value=float("nan"))]),
    "+inf": _b([_r(value=float("inf"))]),
    "-inf": _b([_r(value=float("-inf"))]),
    "no effective time": _b([ingest_pb2.Reading(sequence=1, code="8867-4", value=72, unit="/min")]),
    "effective time 0": _b([_r(t=0)]),
    "negative effective time": _b([_r(t=-5.5)]),
    "components on a plain reading": _b([_r(components=[ingest_pb2.ReadingComponent(code="8480-6", value=1)])]),
    "panel code without components": _b([_r(1, "85354-9", 0.0, "")]),
    "truncated": GOOD[:-3],
    "length past the end": DEVICE + _key(3, 2) + _varint(200) + GOOD_READING,
    "varint of 11 bytes": DEVICE + _key(8, 0) + b"\xff" * 10 + b"\x01" + _ld(3, GOOD_READING),
    "field number 0": GOOD + _key(0, 0) + b"\x01",
    "device id invalid UTF-8": _ld(1, b"\xff\xfe") + _ld(3, GOOD_READING),
    "replaced device id invalid UTF-8": _ld(1, b"\xff") + GOOD,
    "batch patient id invalid UTF-8": GOOD + _ld(2, b"p\xc3"),
    "replaced code invalid UTF-8": DEVICE + _ld(3, _ld(2, b"\xe2\x82") + GOOD_READING),
    "readings as a varint": DEVICE + _key(3, 0) + b"\x01",
    "device_status malformed": GOOD + _ld(4, b"\x09\x00"),
    # refused by the Python path too (they used to be published: invalid FHIR, or an UNKNOWN error)
    "year 10000": DEVICE + _ts_reading(LAST_SECOND + 1, 0),
    "rounds up to year 10000": DEVICE + _ts_reading(LAST_SECOND, 999_999_999),
    "year 10^10": DEVICE + _ts_reading(2**62, 0),
    "negative nanos": DEVICE + _ts_reading(int(T), -1),
    "nanos of 1e9": DEVICE + _ts_reading(int(T), 1_000_000_000),
    "conversion overflows to inf": _b([_r(1, "59408-5", 1e307, "1")]),
    "device id with a trailing newline": _b([_r()], device="monitor-1\n"),  # vigil.ids' `$` accepts it
    "battery percent NaN": GOOD + _ld(4, ingest_pb2.DeviceStatus(battery_percent=math.nan).SerializeToString()),
    "battery percent -1": GOOD + _ld(4, ingest_pb2.DeviceStatus(battery_percent=-1).SerializeToString()),
    "signal quality 100.5": GOOD + _ld(4, ingest_pb2.DeviceStatus(signal_quality=100.5).SerializeToString()),
    "signal quality inf": GOOD + _ld(4, ingest_pb2.DeviceStatus(signal_quality=math.inf).SerializeToString()),
}
# Valid for the Python path, but left to it: panels, merge semantics, unusual encodings. Answered None,
# whatever Python makes of them.
LEFT_TO_PYTHON = {
    "effective_time twice in a reading": DEVICE + _ld(3, GOOD_READING + _ld(6, _key(1, 0) + _varint(int(T)))),
    "negative seconds, positive epoch": DEVICE + _ts_reading(-1, 0),
    # a known field with another wire type (upb keeps it as an unknown field)
    "blood pressure panel": _b([_r(), BP]),  # panels go to the Python path
    "unknown group": GOOD + _key(9, 3) + _key(9, 4),
    "device_status as a varint": GOOD + _key(4, 0) + b"\x01",
    "sequence as a string": DEVICE + _ld(3, _ld(1, b"1") + GOOD_READING[2:]),
    "value as a varint": DEVICE + _ld(3, GOOD_READING + _key(4, 0) + b"\x01"),
    "timestamp seconds as fixed64": DEVICE + _ld(3, GOOD_READING[:-8] + _ld(6, _key(1, 1) + struct.pack("<q", int(T)))),
}
WRAPPED_REFUSED = {
    "batch twice": _ld(1, GOOD) + _ld(1, GOOD),
    "no batch": _unknown(random.Random(1)),
    "batch as a varint": _key(1, 0) + b"\x01",
    "empty wrapped batch": _ld(1, b""),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_by_both(fast, name):
    data = REFUSED[name]
    assert fast.scan(data) is None
    assert fast.prepare(data, "p000001") is None
    with pytest.raises((BatchRejected, DecodeError)):
        _python(data, "p000001")


@pytest.mark.parametrize("name", sorted(LEFT_TO_PYTHON))
def test_left_to_python(fast, name):
    data = LEFT_TO_PYTHON[name]
    assert fast.scan(data) is None
    assert fast.prepare(data, "p000001") is None


@pytest.mark.parametrize("name", sorted(WRAPPED_REFUSED))
def test_wrapped_refused(fast, name):
    assert fast.scan(WRAPPED_REFUSED[name], wrapped=True) is None
    assert fast.prepare(WRAPPED_REFUSED[name], "p000001", wrapped=True) is None


@pytest.mark.parametrize("patient", ["", "p/1", "a" * 65, "p 1", "pé", "p000001\n"])
def test_invalid_patient_id_is_refused_by_prepare(fast, patient):
    assert fast.scan(GOOD) is not None  # the batch itself is fine
    assert fast.prepare(GOOD, patient) is None


def test_scan_returns_the_batch_patient_unvalidated_and_refuses_invalid_utf8(fast):
    assert fast.scan(_b([_r()], patient=""))[:2] == ("monitor-1", "")
    assert fast.scan(_b([_r()], patient="not a fhir id"))[:2] == ("monitor-1", "not a fhir id")
    bad = DEVICE + _ld(2, b"\xc3") + _ld(3, GOOD_READING)
    assert fast.scan(bad) is None


def test_a_wrapped_flag_mismatch_is_refused(fast):
    assert fast.scan(GOOD, wrapped=True) is None
    assert fast.prepare(_ld(1, GOOD), "p000001") is None  # a request read as a batch: unknown shape


# --- (d) scan -------------------------------------------------------------------------------------

def test_scan_min_max_effective(fast):
    readings = [_r(1, t=T + 10.5), _r(2, t=T - 3600), _r(3, t=T + 0.0005), _r(4, t=T + 7200.25)]
    data = _b(readings, patient="")
    device, patient, count, lo, hi = fast.scan(data)
    assert (device, patient, count) == ("monitor-1", "", 4)
    assert (lo, hi) == (T - 3600, T + 7200.25)
    assert (lo, hi) == _python_scan(data)[3:]
    assert fast.prepare(data, "p1")[5] == hi


def test_scan_then_prepare_of_another_batch_does_not_reuse_the_scan(fast):
    a, b = _b([_r(1)]), _b([_r(5, "8310-5", 37.0, "Cel")], device="other")
    assert fast.scan(a) is not None
    assert fast.prepare(b, "p1") == fast.prepare(bytes(bytearray(b)), "p1")
    assert fast.prepare(b, "p1")[1].startswith("obs/other/5-5/1/")
    assert fast.scan(a) is not None
    assert fast.prepare(a, "p1", wrapped=True) is None  # the scan was of a batch, not a request


def test_wrapper_accepts_bytes_like(fast):
    assert fast.prepare(bytearray(GOOD), "p1") == fast.prepare(GOOD, "p1")
    assert fast.scan(memoryview(GOOD)) == fast.scan(GOOD)


# --- number formatting against Python -------------------------------------------------------------

def _random_doubles(rng: random.Random, n: int):
    for _ in range(n):
        k = rng.random()
        if k < 0.3:
            x = struct.unpack("<d", rng.randbytes(8))[0]
            if math.isfinite(x):
                yield x
        elif k < 0.6:
            yield rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30)
        elif k < 0.8:
            yield round(rng.uniform(0, 1000), rng.randint(0, 12)) * rng.choice([1, 0.5555555555555556, 7.500615758456563])
        else:
            # exact ties at 10 significant digits: an 11th digit 5 with nothing after it
            yield (rng.randint(10**9, 10**10 - 1) * 10 + 5) * 10.0 ** rng.randint(-5, 0)


def test_canonical_rounding_equals_python(ext):
    rng = random.Random(5)
    cases = [1234567890.5, 12345678905.0, 9999999999.5, 98765432105.0, 0.1 + 0.2, 38.00000000000001,
             99.99999999949999, 2.5, 1e-320, -1234567890.5, 1e300 * 10]
    for x in [*cases, *_random_doubles(rng, 100_000)]:
        if not math.isfinite(x):
            continue
        fast_path, reference = ext._canonical_10g(x)
        expected = float(f"{x:.10g}")
        assert fast_path == expected and reference == expected, x
        assert math.copysign(1, fast_path) == math.copysign(1, expected), x


def test_float_text_equals_orjson(ext):
    rng = random.Random(6)
    cases = [0.0, -0.0, 72.0, 1e15, 1e16, 999999999999999.9, 1e-5, 1e-6, 1.5e-5, 5e-324, 1.7976931348623157e308,
             -1e21, 123456789012345680.0, 0.1, 37.77777777777778]
    for x in [*cases, *_random_doubles(rng, 100_000)]:
        assert ext._format_float(x).encode() == orjson.dumps(x), x


# --- load ----------------------------------------------------------------------------------------

def test_load_honours_the_switch(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.load(CAT) is None


def test_load_without_the_extension(monkeypatch):
    import sys

    import vigil_ingest

    monkeypatch.setitem(sys.modules, "vigil_ingest._native", None)  # import -> ImportError
    monkeypatch.delattr(vigil_ingest, "_native", raising=False)
    assert native.load(Catalogue(CAT.measurements)) is None


def test_load_refuses_an_extension_that_disagrees(fast, monkeypatch, caplog):
    monkeypatch.setattr(native, "MAX_BATCH", 1)  # the extension would refuse every batch of 2+
    assert native.load(Catalogue(CAT.measurements)) is None
    assert "native ingest path disabled" in caplog.text


def test_load_is_cached_per_catalogue(fast):
    assert native.load(CAT) is fast
    other = Catalogue(CAT.measurements)
    mapper = native.load(other)
    assert mapper is not None and mapper is not fast and native.load(other) is mapper
    assert native.load() is native.load(load_catalogue())
