"""Regenerate the Python modules of ``proto/mii.proto``: ``python -m mii_transport.grpc.codegen``.

The proto directory is mapped onto the package path so the generated gRPC module
imports its message module by absolute package name (no post-editing needed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "mii.proto"
PACKAGE_DIR = "mii_transport/grpc/generated"
GENERATED = ("mii_pb2.py", "mii_pb2.pyi", "mii_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` (the repository root for the real files); return the files."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        "grpc_tools.protoc", f"-I{PACKAGE_DIR}={PROTO.parent}", f"--python_out={out_root}",
        f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", f"{PACKAGE_DIR}/{PROTO.name}",
    ])
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {PROTO}")
    return [out_root / PACKAGE_DIR / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    """CLI entry: regenerate into the repository (or ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
