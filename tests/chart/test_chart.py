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
CASES = ["default", "minimal-values", "production-values", "existing-nats-values", "partitioned-worker-values"]
POD_KINDS = {"Deployment", "Job", "Pod"}
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")


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
    ingest = _container(docs, "ingest")
    assert ingest["startupProbe"]["grpc"]["port"] == 50051 and ingest["readinessProbe"]["grpc"]["port"] == 50051
    # ingest's grpc.health.v1 status is NOT_SERVING while NATS is down: liveness must not follow it (a NATS
    # outage would restart every ingest pod into a crash loop); it checks the gRPC port only.
    assert "grpc" not in ingest["livenessProbe"], ingest["livenessProbe"]
    assert ingest["livenessProbe"]["tcpSocket"]["port"] in (50051, "grpc")
    assert any(p["name"] == "grpc" and p["containerPort"] == 50051 for p in ingest["ports"])
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
    [ing] = _by(docs, "Ingress", "gateway")  # rendered, schema-checked and scanned by chart-check.sh
    assert ing["spec"]["tls"][0]["secretName"] == "vigil-example-tls"
    # the device API behind ingress-nginx, gRPC over TLS to the pod (ingest.tls with mTLS)
    [ing] = _by(docs, "Ingress", "ingest")
    assert ing["spec"]["rules"][0]["host"] == "devices.vigil.example"
    assert ing["spec"]["tls"] == [{"hosts": ["devices.vigil.example"], "secretName": "devices-vigil-example-tls"}]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert {p["backend"]["service"]["port"]["name"] for p in ing["spec"]["rules"][0]["http"]["paths"]} == {"grpc"}
    ingest = _container(docs, "ingest")
    assert {"VIGIL_GRPC_TLS_CERT", "VIGIL_GRPC_TLS_KEY", "VIGIL_GRPC_TLS_CLIENT_CA"} <= {e["name"] for e in ingest["env"]}
    # the kubelet cannot reach an mTLS server over gRPC: its gRPC probes go to the plaintext health port
    assert all(ingest[k].get("grpc", {"port": 50052})["port"] == 50052 for k in PROBES)
    assert ingest["readinessProbe"]["grpc"] == {"port": 50052}
    np = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "vigil-ingest")
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in \
        np["spec"]["ingress"][0]["from"], "the ingress controller must be allowed to reach ingest"
    assert monitors["gateway"]["spec"]["endpoints"][0]["scheme"] == "https"
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


def _render(tmp_path: pathlib.Path, *args: str) -> list[dict]:
    """helm template with these arguments; every object validated against the Kubernetes 1.31 schemas."""
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    out = _helm_template(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kv = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kv.validate(doc, "1.31.0", strict=True)
    return docs


def test_worker_replicas_are_partitions(tmp_path):
    """worker.replicaCount N > 1: N one-pod Deployments, partition i of N each, no shared durable consumer.

    One Deployment with N replicas would run N identical `vigil worker` (partition 0 of 1) on ONE durable
    consumer: JetStream spreads each patient's readings over the pods and every per-patient state is split.
    """
    docs = _render(tmp_path, "--set", "worker.replicaCount=3", "--set", "worker.allowMultipleReplicas=true")
    workers = _by(docs, "Deployment", "worker")
    assert len(workers) == 3
    seen = set()
    for d in workers:
        spec = d["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", d["metadata"]["name"]
        args = spec["template"]["spec"]["containers"][0]["args"]
        assert args[0] == "worker" and args.count("--partitions") == 1 and args.count("--partition") == 1, args
        part, parts = int(args[args.index("--partition") + 1]), int(args[args.index("--partitions") + 1])
        assert parts == 3
        seen.add(part)
        # the selector picks this partition's pod only, and the pod carries the labels the PDB/NetworkPolicy use
        sel = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert sel.items() <= labels.items() and sel["vigil/worker-partition"] == str(part)
        assert labels["app.kubernetes.io/component"] == "worker"
    assert seen == {0, 1, 2}
    assert len({d["metadata"]["name"] for d in workers}) == 3
    # a single worker keeps its Deployment name, selector and plain `vigil worker`
    single = _by(_render(tmp_path / "one"), "Deployment", "worker")
    assert [d["metadata"]["name"] for d in single] == ["t-vigil-worker"]
    assert single[0]["spec"]["replicas"] == 1 and single[0]["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    assert "vigil/worker-partition" not in single[0]["spec"]["selector"]["matchLabels"]


def _assert_render_fails(tmp_path, args: list[str], message: str) -> None:
    """helm template with `args` fails, naming `message` on stderr."""
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    bad = _helm_template(tmp_path, *args)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr or bad.stdout[:2000]


@pytest.mark.parametrize("args, message", [
    (["--set", "worker.autoscaling.enabled=true", "--set", "worker.allowMultipleReplicas=true"], "re-partition"),
    (["--set", "worker.extraArgs={--partitions=3}"], "--partitions=3"),
])
def test_worker_partition_count_cannot_drift(tmp_path, args, message):
    """The partition count comes from worker.replicaCount only: no HPA on the worker, no --partition(s) flags."""
    _assert_render_fails(tmp_path, args, message)


def test_gateway_public_base_url(tmp_path):
    """The gateway writes its base URL into every Bundle link and Location header: never http://0.0.0.0:8080."""
    def base(docs):
        gw = _by(docs, "Deployment", "gateway")[0]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in gw["env"]}.get("VIGIL_PUBLIC_BASE_URL")

    assert base(_render(tmp_path / "a")) == "http://t-vigil-gateway.default.svc:8080/fhir"
    assert base(_render(tmp_path / "b", "--set", "gateway.publicBaseUrl=https://vigil.example/fhir")) == \
        "https://vigil.example/fhir"


def test_gateway_ingress(tmp_path):
    """gateway.ingress: the FHIR API only (/fhir, not /healthz or /metrics), TLS when a Secret is named,
    and links that follow the Ingress host unless publicBaseUrl says otherwise."""
    def parts(docs):
        ing = [d for d in docs if d["kind"] == "Ingress"]
        gw = _by(docs, "Deployment", "gateway")[0]["spec"]["template"]["spec"]["containers"][0]
        return ing, {e["name"]: e.get("value") for e in gw["env"]}["VIGIL_PUBLIC_BASE_URL"]

    assert parts(_render(tmp_path / "off"))[0] == []
    on = ["--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.host=fhir.example.org"]
    [ing], base = parts(_render(tmp_path / "http", *on))
    assert base == "http://fhir.example.org/fhir" and "tls" not in ing["spec"]
    [rule] = ing["spec"]["rules"]
    assert rule["host"] == "fhir.example.org"
    assert [(p["path"], p["pathType"], p["backend"]["service"]["name"], p["backend"]["service"]["port"])
            for p in rule["http"]["paths"]] == [("/fhir", "Prefix", "t-vigil-gateway", {"name": "http"})]
    svc = _by(_render(tmp_path / "svc"), "Service", "gateway")[0]
    assert "http" in [p["name"] for p in svc["spec"]["ports"]]
    [ing], base = parts(_render(tmp_path / "tls", *on, "--set", "gateway.ingress.tls.secretName=fhir-tls",
                                "--set", "gateway.ingress.className=nginx"))
    assert base == "https://fhir.example.org/fhir" and ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": ["fhir.example.org"], "secretName": "fhir-tls"}]
    _, base = parts(_render(tmp_path / "pub", *on, "--set", "gateway.publicBaseUrl=https://ehr.example/fhir"))
    assert base == "https://ehr.example/fhir"
    for args, message in ((["--set", "gateway.ingress.enabled=true"], "gateway.ingress.host"),
                          ([*on[:2], "--set", "gateway.ingress.host=Not_A_Host"], "/gateway/ingress/host")):
        bad = _helm_template(tmp_path / "bad", *args)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr or bad.stdout[:2000]
        shutil.rmtree(tmp_path / "bad")


def test_gateway_scrape_with_restricted_gateway_peers(tmp_path):
    """serviceMonitor.gateway + ingress.gateway peers: monitoring peers join the gateway's `from` list, and
    without any the chart says so (it used to emit unparsable YAML: an empty list inside `from`)."""
    common = ["--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.gateway=true",
              "--set", "networkPolicy.ingress.gateway[0].namespaceSelector.matchLabels.team=edge"]
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    bad = _helm_template(tmp_path / "bad", *common)
    assert bad.returncode != 0 and "networkPolicy.ingress.monitoring" in bad.stderr, bad.stderr
    docs = _render(tmp_path / "ok", *common,
                   "--set", "networkPolicy.ingress.monitoring[0].namespaceSelector.matchLabels.team=monitoring")
    np = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "t-vigil-gateway")
    peers = np["spec"]["ingress"][0]["from"]
    teams = [p.get("namespaceSelector", {}).get("matchLabels", {}).get("team") for p in peers]
    assert "edge" in teams and "monitoring" in teams


@pytest.mark.parametrize("args, ok", [
    (["--set", "nats.config.cluster.enabled=false"], False),
    (["--set", "nats.config.cluster.replicas=2"], False),
    (["--set", "nats.config.cluster.enabled=false", "--set", "bus.streamReplicas=1"], True),
    (["--set", "nats.enabled=false", "--set", "externalNats.url=nats://n:4222"], True),
])
def test_stream_replicas_fit_the_bundled_nats(tmp_path, args, ok):
    """VIGIL_STREAM_REPLICAS above the bundled JetStream server count makes every service fail at start-up
    (stream create/update refused): the chart says so at install time instead."""
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    out = _helm_template(tmp_path, *args)
    if ok:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0 and "bus.streamReplicas=3" in out.stderr, out.stderr


def test_egress_opens_the_ports_the_services_dial(tmp_path):
    """ci/minimal-values.yaml has Keycloak on http://...:8080 (issuer) and a pooler port is one value away:
    the default-deny egress must open those ports, not only the 443/8443 and 5432 defaults."""
    docs = _render(tmp_path, "-f", str(CHART / "ci" / "minimal-values.yaml"), "--set", "postgresql.port=6432",
                   "--set", "keycloak.realmImport.enabled=true",
                   "--set", "keycloak.realmImport.url=https://kc-admin.example:9443")
    policies = {d["metadata"]["name"].removeprefix("t-vigil-"): d for d in docs if d["kind"] == "NetworkPolicy"}

    def ports(name):
        return [[p["port"] for p in rule["ports"]] for rule in policies[name]["spec"]["egress"]]

    for name in ("gateway", "ingest"):
        assert any(8080 in rule for rule in ports(name)), (name, ports(name))
    assert any(6432 in rule for rule in ports("gateway")), ports("gateway")
    assert any(6432 in rule for rule in ports("migration")), ports("migration")
    assert any(9443 in rule for rule in ports("realm-import")), ports("realm-import")
    # no duplicates when the derived port is already listed (default values: 5432, https issuer -> 443)
    for rule in ports("gateway") + ports("ingest"):
        assert len(rule) == len(set(rule)), rule
    default = {d["metadata"]["name"]: d for d in _render(tmp_path / "d") if d["kind"] == "NetworkPolicy"}
    for rule in default["t-vigil-gateway"]["spec"]["egress"]:
        assert len(rule["ports"]) == len({p["port"] for p in rule["ports"]}), rule


def _container(docs, component):
    return _by(docs, "Deployment", component)[0]["spec"]["template"]["spec"]["containers"][0]


def _pod(docs, component):
    return _by(docs, "Deployment", component)[0]["spec"]["template"]["spec"]


def _env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _tls_files(pod, container) -> dict[str, tuple[str, str]]:
    """Mounted file path -> (Secret, key), through the container's volumeMounts and the pod's volumes."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for m in container["volumeMounts"]:
        vol = volumes[m["name"]]
        for src in vol.get("projected", {}).get("sources", []) + ([{"secret": vol["secret"]}] if "secret" in vol else []):
            sec = src["secret"]
            for item in sec.get("items", []):
                files[f"{m['mountPath']}/{item['path']}"] = (sec.get("name") or sec.get("secretName"), item["key"])
            assert m.get("readOnly") is True, m
    return files


def _write_values(tmp_path: pathlib.Path, values: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _https_container(docs, component: str, secret: str, env_prefix: str) -> tuple[dict, dict]:
    """The component's container serving HTTPS from `secret`: <env_prefix>_CERT/_KEY name the mounted
    tls.crt/tls.key, every default probe has scheme HTTPS. (container, its env)"""
    c = _container(docs, component)
    env, files = _env_of(c), _tls_files(_pod(docs, component), c)
    assert files[env[f"{env_prefix}_CERT"]] == (secret, "tls.crt")
    assert files[env[f"{env_prefix}_KEY"]] == (secret, "tls.key")
    for kind in PROBES:
        assert c[kind]["httpGet"]["scheme"] == "HTTPS", (component, kind, c[kind])
    return c, env


def test_gateway_tls(tmp_path):
    """gateway.tls.secretName: the Secret's tls.crt/tls.key mounted read-only and named by VIGIL_HTTP_TLS_*,
    probes, Service, ServiceMonitor, helm test and the in-cluster base URL all on https."""
    tls = ["--set", "gateway.tls.secretName=gw-tls"]
    docs = _render(tmp_path / "on", *tls, "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.gateway=true")
    gw, env = _https_container(docs, "gateway", "gw-tls", "VIGIL_HTTP_TLS")
    assert env["VIGIL_PUBLIC_BASE_URL"] == "https://t-vigil-gateway.default.svc:8080/fhir"
    [port] = _by(docs, "Service", "gateway")[0]["spec"]["ports"]
    assert (port["name"], port["appProtocol"]) == ("http", "https")
    [endpoint] = next(d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == "t-vigil-gateway"
                      )["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": "gw-tls", "key": "ca.crt"}},
                                     "serverName": "t-vigil-gateway.default.svc"}
    test_env = _env_of(_by(docs, "Pod", "test")[0]["spec"]["containers"][0])
    assert test_env["VIGIL_TEST_GATEWAY_URL"] == "https://t-vigil-gateway.default.svc:8080"
    # the Ingress host decides what clients see: its own TLS, not the pod's
    on = ["--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.host=fhir.example.org"]
    assert _env_of(_container(_render(tmp_path / "ing", *tls, *on), "gateway"))["VIGIL_PUBLIC_BASE_URL"] == \
        "http://fhir.example.org/fhir"
    # an httpGet probe of the user's without a scheme gets HTTPS; an explicit scheme is kept
    custom = _container(_render(tmp_path / "probe", *tls, "--set", "gateway.livenessProbe.httpGet.path=/livez",
                                "--set", "gateway.livenessProbe.httpGet.port=8080",
                                "--set", "gateway.readinessProbe.httpGet.path=/readyz",
                                "--set", "gateway.readinessProbe.httpGet.port=9000",
                                "--set", "gateway.readinessProbe.httpGet.scheme=HTTP"), "gateway")
    assert custom["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 8080, "scheme": "HTTPS"}
    assert custom["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    # off: nothing of it
    plain = _render(tmp_path / "off")
    gw = _container(plain, "gateway")
    assert not {"VIGIL_HTTP_TLS_CERT", "VIGIL_HTTP_TLS_KEY"} & set(_env_of(gw))
    assert [m["name"] for m in gw["volumeMounts"]] == ["tmp"]
    assert "scheme" not in gw["livenessProbe"]["httpGet"]
    assert _by(plain, "Service", "gateway")[0]["spec"]["ports"][0]["appProtocol"] == "http"


def test_model_tls(tmp_path):
    """model.tls.secretName: the model server serves HTTPS (VIGIL_MODEL_TLS_* from the mounted Secret),
    probes, Service and ServiceMonitor on https, and the worker calls https:// checking against the
    Secret's CA (model.tls.caKey)."""
    tls = ["--set", "model.tls.secretName=model-tls"]
    docs = _render(tmp_path / "on", *tls, "--set", "serviceMonitor.enabled=true")
    _https_container(docs, "model", "model-tls", "VIGIL_MODEL_TLS")
    [port] = _by(docs, "Service", "model")[0]["spec"]["ports"]
    assert port["appProtocol"] == "https"
    [endpoint] = next(d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == "t-vigil-model"
                      )["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "model-tls", "key": "ca.crt"}}, "serverName": "t-vigil-model.default.svc"}
    worker, wpod = _container(docs, "worker"), _pod(docs, "worker")
    wenv = _env_of(worker)
    assert wenv["VIGIL_BENTOML_URL"] == "https://t-vigil-model.default.svc:3000"
    assert _tls_files(wpod, worker)[wenv["VIGIL_MODEL_TLS_CA"]] == ("model-tls", "ca.crt")
    # a publicly trusted certificate: no CA file, the system trust store
    public = _render(tmp_path / "public", *tls, "--set", "model.tls.caKey=")
    assert "VIGIL_MODEL_TLS_CA" not in _env_of(_container(public, "worker"))
    assert _env_of(_container(public, "worker"))["VIGIL_BENTOML_URL"].startswith("https://")
    # off: plain HTTP everywhere
    plain = _render(tmp_path / "off", "--set", "serviceMonitor.enabled=true")
    model, worker = _container(plain, "model"), _container(plain, "worker")
    assert not {"VIGIL_MODEL_TLS_CERT", "VIGIL_MODEL_TLS_KEY"} & set(_env_of(model))
    assert "scheme" not in model["livenessProbe"]["httpGet"]
    assert _env_of(worker)["VIGIL_BENTOML_URL"] == "http://t-vigil-model.default.svc:3000"
    assert "VIGIL_MODEL_TLS_CA" not in _env_of(worker)
    [endpoint] = next(d for d in plain if d["kind"] == "ServiceMonitor")["spec"]["endpoints"]
    assert "scheme" not in endpoint


@pytest.mark.parametrize("extra, ca_source", [
    ([], None),
    (["--set", "ingest.tls.clientCaKey=ca.crt"], ("ing-tls", "ca.crt")),
    (["--set", "ingest.tls.clientCaKey=bundle.pem", "--set", "ingest.tls.clientCaSecretName=device-ca"],
     ("device-ca", "bundle.pem")),
])
def test_ingest_tls(tmp_path, extra, ca_source):
    """ingest.tls: tls.crt/tls.key (and the client CA for mTLS) mounted read-only and named by VIGIL_GRPC_TLS_*;
    the kubelet's gRPC probe speaks plaintext, so startup and readiness probe the plaintext health-only
    listener (VIGIL_GRPC_HEALTH_LISTEN, port 50052) and liveness stays a TCP connect to the device port."""
    docs = _render(tmp_path, "--set", "ingest.tls.secretName=ing-tls", *extra)
    ingest, pod = _container(docs, "ingest"), _pod(docs, "ingest")
    env, files = _env_of(ingest), _tls_files(pod, ingest)
    assert files[env["VIGIL_GRPC_TLS_CERT"]] == ("ing-tls", "tls.crt")
    assert files[env["VIGIL_GRPC_TLS_KEY"]] == ("ing-tls", "tls.key")
    if ca_source:
        assert files[env["VIGIL_GRPC_TLS_CLIENT_CA"]] == ca_source
    else:
        assert "VIGIL_GRPC_TLS_CLIENT_CA" not in env
    assert env["VIGIL_GRPC_HEALTH_LISTEN"] == "0.0.0.0:50052"
    assert {"name": "grpc-health", "containerPort": 50052, "protocol": "TCP"} in ingest["ports"]
    for kind in ("startupProbe", "readinessProbe"):
        assert [h for h in HANDLERS if h in ingest[kind]] == ["grpc"] and ingest[kind]["grpc"] == {"port": 50052}
    assert [h for h in HANDLERS if h in ingest["livenessProbe"]] == ["tcpSocket"]
    service_ports = _by(docs, "Service", "ingest")[0]["spec"]["ports"]
    assert [p["port"] for p in service_ports] == [50051]  # the health port is for the kubelet only
    assert service_ports[0]["appProtocol"] == "https"
    test_env = _env_of(_by(docs, "Pod", "test")[0]["spec"]["containers"][0])
    assert test_env["VIGIL_TEST_INGEST_TLS"] == ("mtls" if ca_source else "tls")
    if ca_source:  # with mTLS a gRPC probe of the user's may go to the health port (and only there)
        probed = _container(_render(tmp_path / "probe", "--set", "ingest.tls.secretName=ing-tls", *extra,
                                    "--set", "ingest.livenessProbe.grpc.port=50052"), "ingest")
        assert probed["livenessProbe"] == {"grpc": {"port": 50052}}
    plain = _container(_render(tmp_path / "off"), "ingest")  # without TLS: no health listener
    assert "VIGIL_GRPC_HEALTH_LISTEN" not in _env_of(plain) and [p["name"] for p in plain["ports"]] == ["grpc"]
    assert plain["readinessProbe"]["grpc"] == {"port": 50051}


@pytest.mark.parametrize("args, message", [
    (["--set", "ingest.tls.clientCaKey=ca.crt"], "needs ingest.tls.secretName"),
    (["--set", "ingest.tls.secretName=t", "--set", "ingest.tls.clientCaSecretName=ca"], "needs ingest.tls.clientCaKey"),
    (["--set", "ingest.tls.secretName=t", "--set", "ingest.readinessProbe.grpc.port=50051"], "dials plaintext"),
    (["--set", "ingest.tls.secretName=t", "--set", "ingest.tls.clientCaKey=ca.crt",
      "--set", "ingest.readinessProbe.grpc.port=50051", "--set", "ingest.readinessProbe.grpc.mode=TLS"], "mTLS"),
    (["--set", "gateway.tls.secretName=Not_A_Secret"], "/gateway/tls/secretName"),
])
def test_tls_misconfigurations_fail_the_render(tmp_path, args, message):
    _assert_render_fails(tmp_path, args, message)


def test_ingest_tls_grpc_probe_in_tls_mode(tmp_path):
    """grpc.mode TLS (Kubernetes 1.37, alpha gate GRPCContainerProbeTLS) is the one gRPC probe allowed with TLS."""
    if not shutil.which("helm", path=_env()["PATH"]):
        pytest.skip("helm not installed (run scripts/chart-check.sh first)")
    out = _helm_template(tmp_path, "--set", "ingest.tls.secretName=t", "--set", "ingest.readinessProbe.grpc.port=50051",
                         "--set", "ingest.readinessProbe.grpc.mode=TLS")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    probe = _container(docs, "ingest")["readinessProbe"]
    assert probe == {"grpc": {"port": 50051, "mode": "TLS"}}
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(_by(docs, "Deployment", "ingest")[0], "1.37.0", strict=True)


def test_ingest_ingress(tmp_path):
    """ingest.ingress: the device API's gRPC services (not reflection) to the grpc port, TLS when a Secret is
    named, no Ingress without a host."""
    assert _by(_render(tmp_path / "off"), "Ingress") == []
    on = ["--set", "ingest.ingress.enabled=true", "--set", "ingest.ingress.host=devices.example.org"]
    [ing] = _by(_render(tmp_path / "plain", *on), "Ingress", "ingest")
    assert "tls" not in ing["spec"] and "ingressClassName" not in ing["spec"]
    [rule] = ing["spec"]["rules"]
    assert rule["host"] == "devices.example.org"
    assert [(p["path"], p["pathType"], p["backend"]["service"]["name"], p["backend"]["service"]["port"])
            for p in rule["http"]["paths"]] == [
        (f"/{svc}", "Prefix", "t-vigil-ingest", {"name": "grpc"})
        for svc in ("vigil.device.v1.IngestService", "vigil.device.v1.DeviceService", "grpc.health.v1.Health")]
    assert "grpc" in [p["name"] for p in _by(_render(tmp_path / "svc"), "Service", "ingest")[0]["spec"]["ports"]]
    [ing] = _by(_render(tmp_path / "tls", *on, "--set", "ingest.ingress.tls.secretName=devices-tls",
                        "--set", "ingest.ingress.className=nginx",
                        "--set", "ingest.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/backend-protocol=GRPC"),
                "Ingress", "ingest")
    assert ing["spec"]["tls"] == [{"hosts": ["devices.example.org"], "secretName": "devices-tls"}]
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}
    for args, message in ((["--set", "ingest.ingress.enabled=true"], "ingest.ingress.host"),
                          ([*on[:2], "--set", "ingest.ingress.host=Not_A_Host"], "/ingest/ingress/host"),
                          ([*on, "--set", "ingest.ingress.tlss.secretName=x"], "tlss")):
        bad = _helm_template(tmp_path / "bad", *args)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr or bad.stdout[:2000]
        shutil.rmtree(tmp_path / "bad")


# A probe of each kind for every workload, each with a handler other than the default's.
OVERRIDES = {
    "ingest": {"startupProbe": {"tcpSocket": {"port": "grpc"}, "failureThreshold": 30},
               "livenessProbe": {"grpc": {"port": 50051}, "periodSeconds": 20},
               "readinessProbe": {"tcpSocket": {"port": 50051}}},
    "gateway": {"startupProbe": {"tcpSocket": {"port": "http"}},
                "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 15},
                "readinessProbe": {"exec": {"command": ["true"]}}},
    "model": {"startupProbe": {"tcpSocket": {"port": "http"}},
              "livenessProbe": {"tcpSocket": {"port": "http"}},
              "readinessProbe": {"grpc": {"port": 3001}}},
    "worker": {"startupProbe": {"exec": {"command": ["true"]}},
               "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8081}},
               "readinessProbe": {"tcpSocket": {"port": 8081}}},
}


def _handlers(probe: dict) -> list[str]:
    return [h for h in HANDLERS if h in probe]


def test_probe_override_replaces_the_default(tmp_path):
    """A user probe with a handler replaces the chart's default wholesale, for every probe of every workload:
    ingest.livenessProbe.grpc used to be deep-merged into the default tcpSocket probe, a pod with two
    handlers that the API server rejects. Every rendered object validates (kubernetes-validate, strict)."""
    docs = _render(tmp_path / "all", "-f", _write_values(tmp_path / "all", OVERRIDES))
    for component, probes in OVERRIDES.items():
        c = _container(docs, component)
        for kind, want in probes.items():
            assert c[kind] == want, (component, kind, c[kind])
            assert len(_handlers(c[kind])) == 1
    # the reported case alone, on the command line
    ingest = _container(_render(tmp_path / "grpc", "--set", "ingest.livenessProbe.grpc.port=50051"), "ingest")
    assert ingest["livenessProbe"] == {"grpc": {"port": 50051}}
    assert _handlers(ingest["startupProbe"]) == ["grpc"] and _handlers(ingest["readinessProbe"]) == ["grpc"]


def test_probe_tuning_and_disabling(tmp_path):
    """No handler = tune the default (its handler kept); {enabled: false} = no probe; the old workaround
    (tcpSocket: null next to grpc) still gives one handler; a probe with no handler to fall back on fails."""
    values = {"ingest": {"readinessProbe": {"periodSeconds": 11},
                         "livenessProbe": {"grpc": {"port": 50051}, "tcpSocket": None},
                         "startupProbe": {"enabled": False}},
              "model": {"livenessProbe": {"enabled": False}}}
    docs = _render(tmp_path / "ok", "-f", _write_values(tmp_path / "ok", values))
    ingest = _container(docs, "ingest")
    assert ingest["readinessProbe"] == {"grpc": {"port": 50051}, "periodSeconds": 11, "timeoutSeconds": 3,
                                        "failureThreshold": 3}
    assert ingest["livenessProbe"] == {"grpc": {"port": 50051}}
    assert "startupProbe" not in ingest
    model = _container(docs, "model")
    assert "livenessProbe" not in model and _handlers(model["readinessProbe"]) == ["httpGet"]
    # the worker's probes go to its health port (VIGIL_WORKER_HEALTH_LISTEN); no checkov notes then
    worker = _by(docs, "Deployment", "worker")[0]
    wc = worker["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in wc["ports"]} == {"health": 8081}
    assert _env_of(wc)["VIGIL_WORKER_HEALTH_LISTEN"] == "0.0.0.0:8081" and _env_of(wc)["VIGIL_WORKER_STALL_SECONDS"] == "120"
    assert {k: wc[k]["httpGet"]["path"] for k in PROBES} == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                                                              "readinessProbe": "/readyz"}
    assert all(wc[k]["httpGet"]["port"] == "health" for k in PROBES)
    assert "annotations" not in worker["metadata"]
    # all of them turned off: checkov is told why
    off = ["--set", "worker.startupProbe.enabled=false", "--set", "worker.livenessProbe.enabled=false",
           "--set", "worker.readinessProbe.enabled=false"]
    without = _by(_render(tmp_path / "w", *off), "Deployment", "worker")[0]
    assert not set(PROBES) & set(without["spec"]["template"]["spec"]["containers"][0])
    assert "checkov.io/skip1" in without["metadata"]["annotations"]
    # tuning a worker probe keeps its handler
    tuned = _container(_render(tmp_path / "t", "--set", "worker.livenessProbe.periodSeconds=5"), "worker")
    assert tuned["livenessProbe"]["periodSeconds"] == 5 and _handlers(tuned["livenessProbe"]) == ["httpGet"]
    for args, message in ((["--set", "gateway.livenessProbe.grpc.port=1", "--set", "gateway.livenessProbe.exec.command={true}"],
                           "exactly one handler"),
                          (["--set", "gateway.livenessProbe.periodSecond=5"], "periodSecond")):
        bad = _helm_template(tmp_path / "bad", *args)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr or bad.stdout[:2000]
        shutil.rmtree(tmp_path / "bad")
