#!/usr/bin/env bash
# Install Keycloak (org.keycloak:keycloak-quarkus-dist from Maven Central) into ~/.cache/vigil/keycloak-VERSION.
# The zip stays in ~/.m2, so a second run is fast. Needs Maven and a Java >= 21 to run (not to install).
set -euo pipefail
VERSION="${KEYCLOAK_VERSION:-$(python3 -c 'import re,sys;print(re.search(r"KEYCLOAK_VERSION = \"([^\"]+)\"", open(sys.argv[1]).read()).group(1))' "$(dirname "$0")/../vigil/devservers.py")}"
DEST="${VIGIL_KEYCLOAK_HOME:-$HOME/.cache/vigil/keycloak-$VERSION}"
if [ -x "$DEST/bin/kc.sh" ]; then echo "keycloak $VERSION already at $DEST"; exit 0; fi
ZIP="$HOME/.m2/repository/org/keycloak/keycloak-quarkus-dist/$VERSION/keycloak-quarkus-dist-$VERSION.zip"
if [ ! -f "$ZIP" ]; then
  command -v mvn >/dev/null || { apt-get update -qq && apt-get install -y -qq maven; }
  mvn -q -B dependency:get -Dartifact="org.keycloak:keycloak-quarkus-dist:$VERSION:zip" -Dtransitive=false
fi
tmp="$(mktemp -d)"
python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$ZIP" "$tmp"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$tmp/keycloak-$VERSION" "$DEST"
chmod +x "$DEST"/bin/*.sh
rm -rf "$tmp"
echo "keycloak $VERSION installed at $DEST"
