"""Micro-benchmark of batch preparation: the native fast path against the Python path (µs per reading).

    .venv/bin/python scripts/bench-native.py [--readings 100] [--repeat 15]

Per batch, from the serialized ReadingBatch bytes to the message body and id:
  python          ReadingBatch.FromString + handler.prepare_batch (decode, map_batch, ids, orjson, msg id)
  native prepare  FastMapper.prepare
  native scan+prepare  FastMapper.scan then .prepare (what the server does: scan, bind the patient, prepare)
CPU time of this thread (time.thread_time), best of --repeat runs: stable on a busy machine.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import timeit

from vigil_ingest import native
from vigil_ingest.client import make_reading
from vigil_ingest.handler import prepare_batch

from vigil import codes
from vigil.catalogue import load_catalogue
from vigil.device.v1 import ingest_pb2

# A bedside monitor's mix: code, system, unit, value range.
MIX = [
    ("8867-4", "", "/min", (55, 120)),            # heart rate
    ("150456", codes.MDC, "1", (0.9, 1.0)),       # SpO2 as a fraction (converted to %)
    ("8310-5", "", "[degF]", (97.0, 103.0)),      # temperature in °F (converted to Cel)
    ("9279-1", "", "/min", (10, 30)),             # respiratory rate
    ("150017", codes.MDC, "mm[Hg]", (90, 160)),   # systolic pressure, MDC
    ("2524-7", "", "mmol/L", (0.5, 6.0)),         # lactate
    ("8867-4", "", "/min", (310, 350)),           # an implausible heart rate (flagged)
]


def batch_bytes(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    t0 = 1_767_225_600.0
    readings = []
    for i in range(n):
        code, system, unit, (lo, hi) = MIX[i % len(MIX)]
        value = round(rng.uniform(lo, hi), 2 if unit == "1" else 1)
        readings.append(make_reading(1000 + i, code, value, unit, t0 + i * 0.25, system))
    return ingest_pb2.ReadingBatch(device_id="monitor-7", patient_id="p000001", readings=readings).SerializeToString()


def best(fn, number: int, repeat: int) -> float:
    return min(timeit.Timer(fn, timer=time.thread_time).repeat(number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=100, help="readings per batch (default 100)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    catalogue = load_catalogue()
    data = batch_bytes(args.readings)
    n = args.readings

    def python():
        return prepare_batch(ingest_pb2.ReadingBatch.FromString(data), catalogue, patient_id="p000001")

    py = best(python, max(1, 2000 // n), args.repeat) / n * 1e6
    print(f"{n}-reading batches, µs per reading (CPU time, best of {args.repeat})")
    print(f"  python               {py:8.3f}")
    mapper = native.load(catalogue)
    if mapper is None:
        print("  native               not available (make native; VIGIL_INGEST_NATIVE=0 disables it)")
        return 0
    expected = python()
    got = mapper.prepare(data, "p000001")
    assert got is not None and got[0] == expected.body and got[1] == expected.msg_id, "native != python"
    number = max(1, 50_000 // n)
    prep = best(lambda: mapper.prepare(data, "p000001"), number, args.repeat) / n * 1e6
    both = best(lambda: (mapper.scan(data), mapper.prepare(data, "p000001")), number, args.repeat) / n * 1e6
    print(f"  native prepare       {prep:8.3f}   ({py / prep:.0f}x)")
    print(f"  native scan+prepare  {both:8.3f}   ({py / both:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
