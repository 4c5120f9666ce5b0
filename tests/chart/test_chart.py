"""Helm chart checks: scripts/chart-check.sh (helm lint --strict, helm template, strict Kubernetes schema
validation, hadolint, checkov) must pass, and the rendered manifests must keep the properties the chart
promises (hardened containers, resources, probes on the real endpoints, default-deny NetworkPolicy...).

Needs helm (built by the script with `go install` when missing) and package-registry access the first time.
"""
from __future__ import annotations

import filecmp
import json
import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "vigil"
SCRIPT = REPO / "scripts" / "chart-check.sh"
CASES = ["default", "minimal-values", "production-values", "existing-nats-values"]
POD_KINDS = {"Deployment", "Job", "Pod"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if shutil.which("go"):
        gopath = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True, check=True).stdout.strip()
        env["PATH"] = f"{env.get('PATH', '')}:{gopath}/bin"
    return env


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    if not shutil.which("helm", path=_env()["PATH"]) and not shutil.which("go"):
        pytest.skip("neither helm nor a Go toolchain (to build helm) is available")
    out = tmp_path_factory.mktemp("rendered")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env={**_env(), "CHART_CHECK_OUT": str(out)},
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"chart-check.sh failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return {case: [d for d in yaml.safe_load_all((out / f"{case}.yaml").read_text()) if d] for case in CASES}


def _helm_template(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """helm template on a copy of the chart without the (unfetched) nats dependency entry."""
    copy = tmp_path / "vigil"
    shutil.copytree(CHART, copy)
    meta = yaml.safe_load((copy / "Chart.yaml").read_text())
    meta.pop("dependencies", None)
    (copy / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return subprocess.run(["helm", "template", "t", str(copy), "--kube-version", "1.31.0", *args],
                          env=_env(), capture_output=True, text=True, timeout=120, check=False)


def _pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _containers(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in POD_KINDS:
            spec = _pod_spec(doc)
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield doc, spec, c


def _by(docs, kind, component=None):
    return [d for d in docs if d["kind"] == kind
            and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]


def test_realm_copy_is_identical():
    assert filecmp.cmp(CHART / "files" / "vigil-realm.json", REPO / "deploy" / "keycloak" / "vigil-realm.json",
                       shallow=False), "charts/vigil/files/vigil-realm.json differs from deploy/keycloak/vigil-realm.json"


@pytest.mark.parametrize("case", CASES)
def test_containers_hardened_with_resources(rendered, case):
    seen = 0
    for doc, spec, c in _containers(rendered[case]):
        seen += 1
        where = f"{case}: {doc['kind']} {doc['metadata']['name']} / {c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("runAsNonRoot") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        res = c.get("resources", {})
        assert res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory"), where
        assert res.get("limits", {}).get("memory"), where
        assert spec["securityContext"]["runAsUser"] == 10001, where
        assert spec["automountServiceAccountToken"] is False, where
        assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), where
    assert seen >= 5


@pytest.mark.parametrize("case", CASES)
def test_default_deny_network_policy(rendered, case):
    deny = [d for d in rendered[case] if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1
    spec = deny[0]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in spec and "egress" not in spec
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "vigil"


def test_probes_on_real_endpoints(rendered):
    docs = rendered["default"]
    ingest = _by(docs, "Deployment", "ingest")[0]["spec"]["template"]["spec"]["containers"][0]
    assert ingest["livenessProbe"]["grpc"]["port"] == 50051 and ingest["readinessProbe"]["grpc"]["port"] == 50051
    gateway = _by(docs, "Deployment", "gateway")[0]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    model = _by(docs, "Deployment", "model")[0]["spec"]["template"]["spec"]["containers"][0]
    assert model["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert model["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert model["args"][:1] == ["serve-model"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["VIGIL_DATABASE_URL"]["value"].startswith("postgresql://vigil@")
    assert ":" not in env["VIGIL_DATABASE_URL"]["value"].split("@")[0].removeprefix("postgresql://")
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "vigil-postgresql"


def test_migration_hook_and_helm_test(rendered):
    docs = rendered["default"]
    job = _by(docs, "Job", "migration")[0]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == values["migration"]["args"]
    pod = _by(docs, "Pod", "test")[0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "/fhir/metadata" in script and "HealthStub" in script


def test_production_render(rendered):
    docs = rendered["production-values"]
    for _, _, c in _containers(docs):
        assert "@sha256:" in c["image"], c["image"]
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert hpas == {"vigil-ingest", "vigil-gateway", "vigil-model"}
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] in hpas:
            assert "replicas" not in d["spec"], d["metadata"]["name"]
    monitors = {d["metadata"]["name"].rsplit("-", 1)[-1]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"model", "gateway"}
    endpoint = monitors["gateway"]["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # ... which the gateway serves because the chart turns its Prometheus metrics on
    gw_env = {e["name"]: e.get("value") for _, _, c in _containers(docs) if c["name"] == "gateway"
              for e in c["env"]}
    assert gw_env["OTEL_METRICS_EXPORTER"] == "prometheus" and gw_env["VIGIL_LOG_FORMAT"] == "json"
    assert _by(docs, "Job", "realm-import"), "realm import Job missing"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == hpas


def test_schema_rejects_typos(tmp_path):
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    bad = _helm_template(tmp_path, "--set", "ingest.replicaCont=3")
    assert bad.returncode != 0 and "replicaCont" in bad.stderr


def test_worker_is_not_scaled_out_by_mistake(tmp_path):
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    bad = _helm_template(tmp_path, "--set", "worker.replicaCount=2")
    assert bad.returncode != 0 and "per-patient state" in bad.stderr


def test_realm_import_drops_test_only_clients_and_fails_closed():
    """The chart's realm import never creates the test vendors, and an unset secret stops it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("realm_import", CHART / "files" / "realm-import.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (CHART / "files" / "vigil-realm.json").read_text()
    realm = mod.prepare(text, {"VIGIL_EHR_CLIENT_SECRET": "e" * 32, "VIGIL_DEVICE_CLIENT_SECRET": "d" * 32})
    assert [c["clientId"] for c in realm["clients"]] == ["vigil-ehr", "vigil-backend-service", "vigil-smart-app",
                                                         "vigil-admin", "vigil-device-demo"]
    # the private_key_jwt and public clients carry no secret at all
    assert all("secret" not in c for c in realm["clients"] if c["clientId"] not in ("vigil-ehr", "vigil-device-demo"))
    assert "${" not in json.dumps(realm)
    with pytest.raises(SystemExit, match="VIGIL_DEVICE_CLIENT_SECRET"):
        mod.prepare(text, {"VIGIL_EHR_CLIENT_SECRET": "e" * 32})


def test_telemetry_env_and_collector_egress(tmp_path):
    """telemetry.otlpEndpoint reaches the three services (and only them) and opens egress to it."""
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    out = _helm_template(tmp_path, "--set", "telemetry.otlpEndpoint=http://otel-collector:4317")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for _, _, c in _containers(docs):
        names = {e["name"]: e.get("value") for e in c.get("env", [])}
        if c["name"] in ("ingest", "worker", "gateway"):
            assert names["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317", c["name"]
        else:
            assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in names, c["name"]
    for d in docs:
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].rsplit("-", 1)[-1] in ("ingest", "worker", "gateway"):
            assert any(p["port"] == 4317 for rule in d["spec"]["egress"] for p in rule["ports"]), d["metadata"]["name"]
