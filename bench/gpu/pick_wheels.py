"""Print the carried wheels this interpreter needs, one path per line (for pip --target).

A wheel is picked when its distribution is missing here or installed at a lower version,
so /tmp/site never shadows a newer package of the image (torch and transformers keep
theirs). Packages that must match each other travel together: pydantic with its exact
pydantic-core, grpcio-health-checking with grpcio and protobuf (major 7, which our
generated code needs). Run it WITHOUT /tmp/site on PYTHONPATH.

    python3 bench/gpu/pick_wheels.py .whl > /tmp/wheels.txt
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

# name -> names that must be installed with it, whatever the image has
COUPLED = {"pydantic": ["pydantic-core"], "pydantic-core": ["pydantic"],
           "grpcio-health-checking": ["grpcio", "protobuf"]}
SAME_MAJOR = {"protobuf", "pydantic", "pydantic-core"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def vkey(version: str) -> tuple:
    try:
        from packaging.version import Version

        return (Version(version),)
    except Exception:  # no packaging here: compare numeric parts
        return (tuple(int(p) for p in re.findall(r"\d+", version)[:4]),)


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main(folder: str) -> int:
    wheels = {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version = path.name.split("-")[:2]
        wheels[norm(name)] = (version, path)
    picked = set()
    for name, (version, _) in wheels.items():
        have = installed(name)
        need = have is None or vkey(have) < vkey(version)
        if have and name in SAME_MAJOR and have.split(".")[0] != version.split(".")[0]:
            need = True
        print(f"# {name}: carried {version}, image {have or '-'} -> "
              f"{'install' if need else 'keep image'}", file=sys.stderr)
        if need:
            picked.add(name)
    for name in list(picked):
        picked.update(n for n in COUPLED.get(name, []) if n in wheels)
    for name in sorted(picked):
        print(wheels[name][1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".whl"))
