"""The committed generated protobuf code matches protos/ (scripts/gen-protos.py --check)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_protos_are_fresh():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-protos.py"), "--check"],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
