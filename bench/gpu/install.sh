#!/bin/bash
# Installs what the GPU image lacks into $SITE (default /tmp/site), offline, from .whl/:
#   1. the carried wheels the image does not have at that version or newer (pick_wheels.py),
#   2. deepspeed from its sdist (no CUDA ops are built: DS_BUILD_OPS=0),
#   3. mii itself, from a copy of the checkout, so that its entry points (engines,
#      schedulers, transports) exist; if pip cannot build it, only its dist-info is written
#      and the code is imported from the checkout.
# Then checks that the plugins load. Use with PYTHONPATH=$SITE:$REPO.
#   PY=python3 SITE=/tmp/site bash bench/gpu/install.sh
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WHL=${WHL:-$REPO/.whl}
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
PIP="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE"
mkdir -p "$SITE"
stamp="$SITE/.bench_wheels_$(ls "$WHL" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  env -u PYTHONPATH "$PY" "$REPO/bench/gpu/pick_wheels.py" "$WHL" > /tmp/bench_wheels.txt || exit 1
  if [ -s /tmp/bench_wheels.txt ]; then
    $PIP $(cat /tmp/bench_wheels.txt) || { echo "install.sh: wheel install failed"; exit 1; }
  fi
  if env -u PYTHONPATH "$PY" -c "import deepspeed" 2>/dev/null; then
    echo "install.sh: the image has deepspeed; not installing the sdist"
  else
    # a failure here still lets the transformers-engine and anchor phases run
    PYTHONPATH=$SITE $PIP --no-build-isolation "$WHL"/deepspeed-*.tar.gz ||
      { echo "install.sh: DEEPSPEED SDIST INSTALL FAILED"; ds_failed=1; }
  fi
  # bytecode now, so the first serve() does not pay for compiling deepspeed's modules
  "$PY" -m compileall -q -j 0 "$SITE" > /dev/null 2>&1
  [ -z "${ds_failed:-}" ] && touch "$stamp"
fi
# mii: always (it is the checkout under test). Built from a copy so that no build/ or
# *.egg-info appears in the checkout (a second copy of the metadata on PYTHONPATH).
rm -rf /tmp/mii_src && mkdir -p /tmp/mii_src
tar -C "$REPO" --exclude=./.git --exclude=./.whl --exclude=./.venv --exclude=./build \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.anchors -cf - . | tar -C /tmp/mii_src -xf -
rm -rf "$SITE"/mii_serve-*.dist-info
if ! PYTHONPATH=$SITE $PIP --no-build-isolation /tmp/mii_src; then
  echo "install.sh: pip could not build mii; writing its dist-info only (code from $REPO)"
  rm -rf "$SITE"/mii_serve-*.dist-info
  "$PY" "$REPO/bench/gpu/write_dist_info.py" "$REPO" "$SITE" || exit 1
fi
PYTHONPATH=$SITE:$REPO "$PY" - <<'EOF'
import importlib.metadata as md
import mii, mii_core
from mii_core.plugins.discovery import discover, load_driver
for kind in ("engine", "scheduler", "transport"):
    found = discover(kind)
    print(f"install.sh: {kind}s:", ", ".join(f"{p.name}{' (BROKEN: ' + p.error + ')' if p.error else ''}" for p in found))
load_driver("engine", "deepspeed"); load_driver("engine", "transformers"); load_driver("transport", "grpc")
import grpc, google.protobuf, pydantic, pluggy, stevedore
import importlib
for module in ("mii_core.control.supervisor", "mii_core.control.lb_main", "mii_core.control.launcher",
               "mii_transport.grpc.plugin", "mii_transport.grpc.server"):
    try:  # the torch-free part of the serving path; a missing dependency shows here
        importlib.import_module(module)
    except Exception as error:
        print(f"install.sh: WARNING: import {module} failed: {type(error).__name__}: {error}")
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc  # runtime version checks
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"
versions = {n: version(n) for n in ("grpcio", "grpcio-health-checking", "protobuf", "pydantic",
            "pydantic-core", "pluggy", "stevedore", "typing_extensions", "deepspeed", "mii-serve")}
print("install.sh: ok; mii from", mii_core.__file__, versions)
EOF
