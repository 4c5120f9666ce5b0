"""The store write-path benchmark helper (bench/vigil_bench/store_write.py) runs and checks outcomes:
new, redelivered (unchanged, no new version) and changed (new version) batches. No timing asserted."""
from __future__ import annotations

from vigil_bench import store_write


def test_store_write_sqlite_tiny(tmp_path):
    resources = store_write.build_resources(120, 4)
    assert {r["resourceType"] for r in resources} == {"Observation", "RiskAssessment"}
    out = store_write.run_store(f"sqlite:///{tmp_path / 's.db'}", resources, 50)
    assert out["new"]["resources"] == out["redelivery"]["resources"] == len(resources)
    assert out["changed"]["resources"] > 0
    for key in ("new", "redelivery", "changed"):
        assert out[key]["rows_per_s"] > 0


def test_store_write_cli_json(tmp_path, capsys):
    assert store_write.main(["--n", "60", "--patients", "2", "--batch", "25", "--stores", "sqlite", "--json"]) == 0
    assert '"sqlite"' in capsys.readouterr().out
