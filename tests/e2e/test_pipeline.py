"""End to end on the real servers: PhysioNet stays -> gRPC -> NATS -> BentoML/XGBoost -> FHIR over HTTP.

`vigil up` runs as a user would run it (its own NATS, the BentoML server, ingest, worker and gateway),
with the session's PostgreSQL as the gateway store and the session's Keycloak as the token issuer.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from vigil import devservers
from vigil.physionet import MEASUREMENT_COLUMNS, default_dataset, iter_stays

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

N_STAYS = 20


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory):
    """A BentoML store holding a model trained by `vigil train --quick` on part of set A."""
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "vigil.cli", "train", "--quick", "--limit", "800"],
                   env=env, check=True, timeout=600)
    return home


@pytest.fixture
def pipeline(tmp_path, bentoml_home, fresh_postgres_url, keycloak):
    http_port, grpc_port = devservers.free_port(), devservers.free_port()
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    with open(tmp_path / "up.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vigil.cli", "up", "--data-dir", str(tmp_path / "data"),
             "--http-port", str(http_port), "--grpc-listen", f"127.0.0.1:{grpc_port}",
             "--database-url", fresh_postgres_url, "--oidc-issuer", keycloak.issuer],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while "vigil: ready" not in (tmp_path / "up.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("vigil up did not become ready:\n" + (tmp_path / "up.log").read_text()[-5000:])
        time.sleep(0.5)
    yield {"proc": proc, "fhir": f"http://127.0.0.1:{http_port}/fhir", "grpc": f"127.0.0.1:{grpc_port}",
           "log": tmp_path / "up.log", "data": tmp_path / "data"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pidfile in (tmp_path / "data" / "logs").glob("*.pid"):  # children of a killed `vigil up`
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _expected_assessments() -> dict[str, int]:
    """One RiskAssessment per stay-hour that has at least one measurement."""
    out = {}
    for stay in iter_stays(default_dataset(), limit=N_STAYS):
        measured = ~np.isnan(stay.data[:, : len(MEASUREMENT_COLUMNS)])
        out[stay.stem] = int(measured.any(axis=1).sum())
    return out


def test_replayed_stays_come_back_as_risk_assessments(pipeline, keycloak):
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.riskassessment import RiskAssessment
    from vigil_ingest.replay import replay

    token = keycloak.token("vigil-ehr")
    auth = {"Authorization": f"Bearer {token}"}
    # As a device gateway (device token) plus an EHR writing Patient and Encounters (EHR token).
    stats = asyncio.run(replay(default_dataset(), target=pipeline["grpc"], limit=N_STAYS,
                               token=keycloak.token("vigil-device-demo"), fhir_base=pipeline["fhir"],
                               fhir_token=token))
    expected = _expected_assessments()
    assert len(expected) == N_STAYS
    base = pipeline["fhir"]
    got: dict[str, int] = {}
    deadline = time.monotonic() + 240
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            for stem, n in expected.items():
                if got.get(stem) == n:
                    continue
                r = client.get(f"{base}/RiskAssessment", params={"subject": f"Patient/{stem}", "_count": 1,
                                                                  "method": "vigil-sepsis"}, headers=auth)
                assert r.status_code == 200, r.text
                got[stem] = r.json()["total"]
            if got == expected:
                break
            time.sleep(1)
        assert got == expected, f"replay stats {stats}; log:\n{pipeline['log'].read_text()[-3000:]}"

        stem = next(iter(expected))
        r = client.get(f"{base}/RiskAssessment", params={"subject": stem, "_count": 5, "method": "vigil-sepsis"},
                       headers=auth)
        assert r.headers["content-type"].startswith("application/fhir+json")
        bundle = r.json()
        Bundle.model_validate(bundle)
        ra = bundle["entry"][0]["resource"]
        RiskAssessment.model_validate(ra)
        assert ra["subject"]["reference"] == f"Patient/{stem}"
        assert 0.0 <= ra["prediction"][0]["probabilityDecimal"] <= 1.0
        assert ra["prediction"][0]["outcome"]["coding"][0]["code"] == "91302008"
        assert ra["basis"], "basis names the Observations used"
        obs_ref = ra["basis"][0]["reference"]
        r = client.get(f"{base}/{obs_ref}", headers=auth)
        assert r.status_code == 200 and r.json()["subject"]["reference"] == f"Patient/{stem}"
        r = client.get(f"{base}/Observation", params={"subject": f"Patient/{stem}", "code": "http://loinc.org|8867-4"},
                       headers=auth)
        assert r.status_code == 200 and r.json()["total"] > 0
        assert all(e["resource"]["code"]["coding"][0]["code"] == "8867-4" for e in r.json()["entry"])

        # The EHR's alert queries on the live assessments: by qualitativeRisk and by probability.
        def ids(**params) -> dict[str, dict]:
            r = client.get(f"{base}/RiskAssessment", params={"subject": stem, "method": "vigil-sepsis",
                                                            "_count": 1000, **params}, headers=auth)
            assert r.status_code == 200, r.text
            return {e["resource"]["id"]: e["resource"]["prediction"][0] for e in r.json().get("entry", [])}

        every = ids()
        assert len(every) == expected[stem]
        high = {i for i, p in every.items() if p["qualitativeRisk"]["coding"][0]["code"] == "high"}
        assert set(ids(risk="high")) == high
        assert set(ids(risk="http://terminology.hl7.org/CodeSystem/risk-probability|low")) == \
            {i for i, p in every.items() if p["qualitativeRisk"]["coding"][0]["code"] == "low"}
        cut = f"{sorted(p['probabilityDecimal'] for p in every.values())[len(every) // 2]:.6f}"
        above = {i for i, p in every.items() if p["probabilityDecimal"] > float(cut)}
        assert set(ids(probability=f"gt{cut}")) == above and 0 < len(above) < len(every)

        # The EHR's writes are there, and the rule-based NEWS2 model scored the same stay.
        r = client.get(f"{base}/Patient/{stem}", headers=auth)
        assert r.status_code == 200
        assert r.json()["identifier"][0] == {"system": "https://physionet.org/content/challenge-2019/",
                                             "value": stem}
        r = client.get(f"{base}/RiskAssessment", params={"subject": stem, "method": "vigil-news2", "_count": 1},
                       headers=auth)
        assert r.status_code == 200 and r.json()["total"] > 0

        # No token, or a token not issued for the FHIR API: 401 with an OperationOutcome.
        r = client.get(f"{base}/RiskAssessment", params={"subject": stem})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["resourceType"] == "OperationOutcome"
        r = client.get(f"{base}/RiskAssessment", params={"subject": stem},
                       headers={"Authorization": f"Bearer {keycloak.token('vigil-no-audience')}"})
        assert r.status_code == 401

    # SIGTERM stops every process cleanly.
    proc = pipeline["proc"]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "vigil: stopped" in pipeline["log"].read_text()


def test_up_refuses_public_bind_without_auth(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vigil.cli", "up", "--data-dir", str(tmp_path),
                        "--http-host", "0.0.0.0"], capture_output=True, text=True, timeout=60, check=False,
                       env={k: v for k, v in os.environ.items() if k != "VIGIL_OIDC_ISSUER"})
    assert r.returncode == 2
    assert "refusing to bind 0.0.0.0 with auth off" in r.stderr
