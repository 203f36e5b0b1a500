"""The committed generated modules match proto/mii.proto."""
from pathlib import Path

from mii_transport.grpc import codegen


def test_generated_modules_are_current(tmp_path):
    fresh = codegen.generate(tmp_path)
    committed = Path(codegen.ROOT) / codegen.PACKAGE_DIR
    for path in fresh:
        assert path.read_bytes() == (committed / path.name).read_bytes(), (
            f"{path.name} is stale: run `python -m mii_transport.grpc.codegen`")
