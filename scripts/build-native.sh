#!/usr/bin/env bash
# Build the native fast path of the ingest service (Rust + pyo3, services/ingest/native) and copy it next
# to the package as services/ingest/vigil_ingest/_native.abi3.so (the package is installed editable, so it
# imports from the source tree; the wheel takes it as an artifact). The pure-Python path stays the
# reference and works without it (vigil_ingest.native.load() returns None).
#   --if-available  (make setup) warn and succeed when there is no Rust toolchain or the build fails
set -euo pipefail
cd "$(dirname "$0")/.."
crate=services/ingest/native
dest=services/ingest/vigil_ingest/_native.abi3.so
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then PATH="$HOME/.cargo/bin:$PATH"; fi
if ! command -v cargo >/dev/null; then
  if [ "${1:-}" = "--if-available" ]; then
    echo "build-native: WARNING: no Rust toolchain (cargo): the ingest service runs the pure-Python path" \
         "(far slower per reading). Install Rust (https://rustup.rs) and run 'make native'." >&2
    exit 0
  fi
  echo "build-native: cargo is required (https://rustup.rs)" >&2
  exit 1
fi
py="${PYO3_PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py="$PWD/.venv/bin/python"; else py="$(command -v python3 || true)"; fi
fi
[ -z "$py" ] || export PYO3_PYTHON="$py"  # abi3: without an interpreter pyo3 still builds on Linux
export CARGO_TARGET_DIR="$PWD/$crate/target"
if ! cargo build --release --locked --quiet --manifest-path "$crate/Cargo.toml"; then
  if [ "${1:-}" = "--if-available" ]; then
    echo "build-native: WARNING: the native build failed (see above): the ingest service runs the" \
         "pure-Python path. Fix it and run 'make native'." >&2
    exit 0
  fi
  exit 1
fi
case "$(uname -s)" in
  Darwin) lib="$CARGO_TARGET_DIR/release/lib_native.dylib" ;;
  *) lib="$CARGO_TARGET_DIR/release/lib_native.so" ;;
esac
if ! cmp -s "$lib" "$dest"; then
  # Copy then rename: a running process keeps its mapping of the old file.
  cp "$lib" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
fi
echo "build-native: $dest ready"
