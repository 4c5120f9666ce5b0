"""`vigil bench --tiny` runs end to end and writes results of the documented shape (bench/README.md).

Checks keys, units, ratios and that every scenario is reported or skipped with a reason; never speed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration]

SCENARIOS = {"ingest", "pipeline", "inference", "fhir_reads_postgresql", "fhir_reads_sqlite"}
CEILINGS = {"grpc_stream_batched", "grpc_stream_single", "jetstream_publish_batched", "jetstream_publish_batched_zstd",
            "jetstream_publish_single",
            "postgres_copy", "xgboost_predict", "fastapi_get"}
STATUSES = {"ok", "partial", "skipped", "error"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "vigil.cli", "bench", "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.glob("bench-tiny-*.json"))
    assert len(files) == 1, list(out.iterdir())
    md = files[0].with_suffix(".md")
    assert md.exists() and (out / "latest.json").exists()
    return json.loads(files[0].read_text()), md.read_text()


def test_header(results):
    doc, _ = results
    assert doc["schema_version"] == 1
    assert doc["mode"] == "tiny"
    assert {"commit", "dirty"} <= set(doc["git"])
    m = doc["machine"]
    assert m["cores"] >= 1 and m["memory_bytes"] > 0 and m["python"]
    assert {"grpcio", "nats-py", "bentoml", "xgboost", "fastapi"} <= set(m["versions"])
    assert set(doc["load_generators"]) == {"http", "grpc"}
    assert doc["duration_s"] > 0


def test_ceilings(results):
    doc, _ = results
    assert CEILINGS <= set(doc["ceilings"])
    for name, c in doc["ceilings"].items():
        assert c["status"] in {"ok", "skipped", "error"}, name
        if c["status"] == "ok":
            assert c["value"] > 0 and c["unit"], name
        else:
            assert c["reason"], name
    xgb = doc["ceilings"]["xgboost_predict"]
    if xgb["status"] == "ok":  # the model's size is part of that ceiling
        assert isinstance(xgb["rounds"], int) and xgb["rounds"] >= 1, xgb


def test_every_scenario_reported_or_skipped_with_reason(results):
    doc, _ = results
    assert SCENARIOS <= set(doc["scenarios"])
    for name, s in doc["scenarios"].items():
        assert s["status"] in STATUSES, name
        if s["status"] != "ok":
            assert s.get("reason"), name
        for mname, m in s["metrics"].items():
            assert set(m) >= {"value", "unit"}, (name, mname)
            assert isinstance(m["unit"], str) and m["unit"], (name, mname)
            if "ceiling" in m:
                assert m["ceiling"] in doc["ceilings"], (name, mname)
                assert "ratio" in m, (name, mname)


def test_expected_metrics_and_ratios(results):
    doc, _ = results
    sc = doc["scenarios"]
    expect = {
        "ingest": {"batched_readings_per_s": "readings/s", "single_readings_per_s": "readings/s"},
        "pipeline": {"saturation_sustained_readings_per_s": "readings/s", "fixed_e2e_p99_ms": "ms",
                     "saturation_e2e_p99_ms": "ms"},
        "inference": {"batched_rows_per_s": "rows/s", "single_row_p50_ms": "ms"},
        "fhir_reads_sqlite": {"observation_search_p95_ms": "ms", "read_by_id_req_per_s": "req/s"},
    }
    for scen, metrics in expect.items():
        if sc[scen]["status"] not in ("ok", "partial"):
            continue  # reported as skipped/error with a reason (checked above)
        for mname, unit in metrics.items():
            assert mname in sc[scen]["metrics"], (scen, mname)
            assert sc[scen]["metrics"][mname]["unit"] == unit
    if sc["ingest"]["status"] == "ok":
        assert sc["ingest"]["metrics"]["batched_readings_per_s"]["ratio"] is not None


def test_targets_and_memory(results):
    doc, md = results
    assert len(doc["targets"]) >= 5
    for t in doc["targets"]:
        assert {"name", "scenario", "metric", "op", "threshold", "unit", "value", "met"} <= set(t)
        assert t["met"] in (True, False, None)
    assert doc["memory"], "peak RSS of the started processes"
    for name, v in doc["memory"].items():
        assert "peak_rss_bytes" in v, name
    for section in ("## Ceilings", "## Scenarios", "## Targets", "## Peak RSS"):
        assert section in md
