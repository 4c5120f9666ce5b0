#!/usr/bin/env bash
# What the tests need beyond Python: PostgreSQL server binaries, a Java >= 21 and Keycloak.
# Installs only what is missing (Debian packages, Keycloak from Maven Central into ~/.cache/vigil).
set -euo pipefail
cd "$(dirname "$0")/.."
apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then echo "test-deps: please install $* (needs root)" >&2; exit 1; fi
  [ "$apt_updated" = 1 ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "test-deps: installing PostgreSQL"; apt_install postgresql
fi
command -v mvn >/dev/null || { echo "test-deps: installing Maven"; apt_install maven; }
.venv/bin/python -c 'from vigil.devservers import java_home; print("test-deps: Java", java_home())' || {
  echo "test-deps: Keycloak needs a Java >= 21 (none under /usr/lib/jvm); trying Debian's openjdk-21" >&2
  apt_install openjdk-21-jdk-headless
}
bash scripts/install-keycloak.sh
# Go tools the tests run (compiled once; Go's module and build caches make later runs fast):
# buf lints protos/, grpcurl calls the ingest API by reflection, helm checks the chart.
if command -v go >/dev/null; then
  gobin="$(go env GOPATH)/bin"
  [ -x "$gobin/buf" ] || { echo "test-deps: installing buf"; go install github.com/bufbuild/buf/cmd/buf@v1.47.2; }
  [ -x "$gobin/grpcurl" ] || { echo "test-deps: installing grpcurl"; go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3; }
  [ -x "$gobin/helm" ] || { echo "test-deps: installing helm"; go install helm.sh/helm/v3/cmd/helm@v3.22.0; }
else
  echo "test-deps: no Go toolchain: the buf, grpcurl and helm tests will skip" >&2
fi
