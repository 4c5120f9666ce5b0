"""Regenerate the Python code for protos/ into vigil/ (one command: `make protos`).

`--check` regenerates into a temporary folder and exits 1 when the committed code differs.
"""
from __future__ import annotations

import filecmp
import pathlib
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT  # protos/vigil/device/v1/x.proto -> vigil/device/v1/x_pb2.py
WKT = pathlib.Path(grpc_tools.__file__).parent / "_proto"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    files = sorted(PROTOS.rglob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"-I{WKT}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *map(str, files)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = []
    for f in files:
        pkg = out / f.relative_to(PROTOS).parent
        rel = pkg.relative_to(out)
        for depth in range(2, len(rel.parts) + 1):  # vigil/device, vigil/device/v1 (vigil/ is hand-written)
            (out / pathlib.Path(*rel.parts[:depth]) / "__init__.py").touch()
        generated += sorted(p for p in pkg.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    return generated


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(pathlib.Path(tmp))
            stale = [p.relative_to(tmp) for p in fresh
                     if not (OUT / p.relative_to(tmp)).exists()
                     or not filecmp.cmp(p, OUT / p.relative_to(tmp), shallow=False)]
            if stale:
                print("stale generated code (run `make protos`):", *map(str, stale), sep="\n  ")
                return 1
            print("generated protobuf code is up to date")
            return 0
    for p in generate(OUT):
        print("wrote", p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
