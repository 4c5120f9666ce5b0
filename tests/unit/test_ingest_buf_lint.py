"""`buf lint` (buf's default STANDARD rules, protos/buf.yaml) is clean for the device API."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _buf() -> str | None:
    found = shutil.which("buf")
    if found:
        return found
    for d in (os.environ.get("GOBIN"), os.path.join(os.environ.get("GOPATH", os.path.expanduser("~/go")), "bin")):
        if d and os.access(os.path.join(d, "buf"), os.X_OK):
            return os.path.join(d, "buf")
    return None


def test_buf_lint_is_clean():
    buf = _buf()
    if buf is None:
        pytest.skip("buf not installed (go install github.com/bufbuild/buf/cmd/buf@v1.47.2)")
    r = subprocess.run([buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
