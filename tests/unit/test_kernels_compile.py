"""The paged-attention kernels compile for a Hopper GPU (sm_90) on this CPU machine
(``tools/compile_kernels.py``, in a process of its own: the kernel tests run triton's
interpreter, under which kernels cannot be compiled)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not imported here: triton reads TRITON_INTERPRET once, at import, and the kernel tests
# of this process set it before they import it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")
REPO = Path(__file__).resolve().parents[2]


def test_every_launch_compiles_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "compile_kernels.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 15, done.stdout  # 5 launches x 3 shapes
