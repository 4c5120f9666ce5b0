"""Gateway store write path: how fast `upsert_many` stores bus-sized batches (no HTTP, no bus).

    python -m vigil_bench.store_write                     # 50k Observations, 500 per batch, both dialects
    python -m vigil_bench.store_write --n 5000 --stores sqlite --json

Builds `n` Observations with `vigil.observation.build_observation` (the catalogue's measurements,
`patients` patients, one full set every 5 min) plus one RiskAssessment per patient-hour (what the
bench's fhir_reads loader writes), then, each into a fresh database (a throwaway PostgreSQL from
`vigil.devservers.start_postgres` unless --postgres-url is given, and a temporary SQLite file):

* `new`: every resource upserted in `batch`-sized `upsert_many` calls, as the bus consumer does;
* `redelivery`: the same batches again (every resource `unchanged`: no new version);
* `changed`: a tenth of the batches again with a changed value (every resource `updated`).

Reports resources/s per pass. Resources are built before the clock starts. Timing only: the tests
(tests/unit/test_bench_store_write.py) run it tiny to prove it works, never assert on speed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import tempfile
import time


def build_resources(n_obs: int, n_patients: int, nonce: str = "sw") -> list[dict]:
    from vigil_bench.scenarios import synthetic_resources

    out: list[dict] = []
    # interleave patients the way the bus does (readings from many monitors arrive mixed)
    per_patient = [chunk for _, _, chunk in synthetic_resources(n_obs, n_patients, nonce=nonce)]
    longest = max((len(c) for c in per_patient), default=0)
    for i in range(longest):
        for c in per_patient:
            if i < len(c):
                out.append(c[i])
    return out


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _changed(batch: list[dict]) -> list[dict]:
    out = []
    for r in batch:
        r = copy.deepcopy(r)
        if "valueQuantity" in r:
            r["valueQuantity"]["value"] = r["valueQuantity"]["value"] + 0.5
        else:
            r["status"] = "amended" if r.get("status") != "amended" else "final"
        out.append(r)
    return out


def run_store(url: str, resources: list[dict], batch: int) -> dict:
    from vigil_gateway.bootstrap import build_store

    store = build_store(url)
    store.migrate()
    batches = _batches(resources, batch)
    changed = [_changed(b) for b in batches[::10]]
    out: dict = {"resources": len(resources), "batch": batch}
    try:
        for name, passes, expect in (("new", batches, "new"), ("redelivery", batches, "unchanged"),
                                     ("changed", changed, "updated")):
            n = sum(len(b) for b in passes)
            t0 = time.perf_counter()
            counts = [store.upsert_many(b) for b in passes]
            secs = time.perf_counter() - t0
            got = sum(getattr(c, expect) for c in counts)
            if got != n:
                raise AssertionError(f"{name}: expected {n} {expect}, got {got}")
            out[name] = {"resources": n, "seconds": round(secs, 3), "rows_per_s": round(n / secs, 1)}
    finally:
        store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="Observations (default 50000)")
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--stores", default="postgresql,sqlite")
    ap.add_argument("--postgres-url", default=os.environ.get("VIGIL_BENCH_PG_URL"),
                    help="an existing server (a fresh database is created on it); default: a throwaway one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    resources = build_resources(args.n, args.patients)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vigil-sw-") as tmp:
        if "sqlite" in stores:
            results["sqlite"] = run_store(f"sqlite:///{pathlib.Path(tmp) / 'store.db'}", resources, args.batch)
        if "postgresql" in stores:
            results["postgresql"] = _run_postgres(args.postgres_url, resources, args.batch)
    if args.json:
        print(json.dumps(results))
    else:
        for store, r in results.items():
            print(f"{store:10s} " + "  ".join(f"{k}={r[k]['rows_per_s']:>9.0f}/s ({r[k]['resources']})"
                                             for k in ("new", "redelivery", "changed")))
    return 0


def _run_postgres(url: str | None, resources: list[dict], batch: int) -> dict:
    import uuid

    import psycopg

    from vigil import devservers

    if url is None:
        with devservers.start_postgres() as server:
            return _run_postgres(server.url, resources, batch)
    name = "sw_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = f"{url.rsplit('/', 1)[0]}/{name}"
    try:
        return run_store(db_url, resources, batch)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
