"""VIGIL_GC_THRESHOLDS: the services' garbage-collector settings (vigil.gc_tuning).

Applied in child processes: freezing and new thresholds must not leak into the test process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vigil import gc_tuning
from vigil.settings import Settings


def test_parse_thresholds():
    assert gc_tuning.parse_thresholds("50000,20,100") == (50000, 20, 100)
    assert gc_tuning.parse_thresholds(" 700 , 10 , 10 ") == (700, 10, 10)
    assert gc_tuning.parse_thresholds("") is None
    assert gc_tuning.parse_thresholds("  ") is None
    for bad in ("50000", "1,2", "1,2,3,4", "0,10,10", "-1,10,10", "a,b,c", "1.5,10,10", "1,,3"):
        with pytest.raises(ValueError, match="VIGIL_GC_THRESHOLDS must be three positive integers"):
            gc_tuning.parse_thresholds(bad)


def test_default_setting():
    assert Settings.from_env({}).gc_thresholds == gc_tuning.DEFAULT
    assert gc_tuning.parse_thresholds(gc_tuning.DEFAULT) == (50000, 20, 100)
    assert Settings.from_env({"VIGIL_GC_THRESHOLDS": ""}).gc_thresholds == ""


_PROBE = ("import gc, json, sys\n"
          "from vigil import gc_tuning\n"
          "before = gc.get_threshold()\n"
          "got = gc_tuning.tune(sys.argv[1])\n"
          "print(json.dumps({'before': before, 'got': got, 'now': gc.get_threshold(),"
          " 'frozen': gc.get_freeze_count()}))\n")


def _probe(value: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, value], capture_output=True, text=True, timeout=60,
                          check=False)


def test_tune_freezes_and_sets_thresholds():
    out = json.loads(_probe("50000,20,100").stdout)
    assert out["got"] == [50000, 20, 100] and out["now"] == [50000, 20, 100]
    assert out["before"] != out["now"]
    assert out["frozen"] > 1000  # the interpreter's and vigil's start-up objects


def test_empty_leaves_cpython_defaults():
    out = json.loads(_probe("").stdout)
    assert out["got"] is None and out["now"] == out["before"] and out["frozen"] == 0


def test_bad_value_stops_before_serving():
    r = _probe("lots")
    assert r.returncode == 1 and "VIGIL_GC_THRESHOLDS must be three positive integers" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["gateway"], ["ingest"], ["worker"]])
def test_every_service_command_applies_it(command, tmp_path):
    """Each long-running service reads the setting at start: a bad value stops it with the reason
    (before it connects to anything: no servers are running here)."""
    env = {**os.environ, "VIGIL_GC_THRESHOLDS": "1,2", "VIGIL_DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
           "VIGIL_NATS_URL": "nats://127.0.0.1:9", "VIGIL_GRPC_LISTEN": "127.0.0.1:0", "VIGIL_OIDC_ISSUER": ""}
    r = subprocess.run([sys.executable, "-m", "vigil.cli", *command], env=env, capture_output=True, text=True,
                       timeout=60, check=False, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "VIGIL_GC_THRESHOLDS must be three positive integers" in r.stderr and "'1,2'" in r.stderr
