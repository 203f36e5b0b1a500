"""Shared fixtures: an isolated MII_HOME, the tiny model, deployments that always clean up,
and a check after every test that it left no process of ours running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = tempfile.mkdtemp(prefix="mii-test-home-")
# Set before anything imports mii so every child process inherits the same registry.
os.environ["MII_HOME"] = _HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RANK", None)
os.environ.pop("LOCAL_RANK", None)


def our_processes() -> List[int]:
    """Pids of processes started by this test session's deployments (found by MII_HOME)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if _HOME in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_ours() -> None:
    """Last-resort cleanup of this session's processes (only ours, by pid)."""
    for pid in our_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def no_leaked_processes(request) -> Iterator[None]:
    """Fail a test that leaves a deployment process behind (module deployments excepted)."""
    before = set(our_processes())
    yield
    deadline = time.time() + 10
    leaked = set(our_processes()) - before
    while leaked and time.time() < deadline:
        time.sleep(0.1)
        leaked = set(our_processes()) - before
    if leaked:
        kill_ours_from = sorted(leaked)
        for pid in kill_ours_from:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"test leaked processes {kill_ours_from}")


def pytest_sessionfinish(session, exitstatus) -> None:
    kill_ours()


@pytest.fixture(scope="session")
def mii_home() -> Path:
    """The registry/log root of this session."""
    return Path(_HOME)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the offline tiny Llama (built once per session)."""
    from mii_engines.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def free_port() -> int:
    """A port that was free a moment ago."""
    from mii_core.ports import free_port as pick

    return pick()


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same environment) and return the result."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """A module-wide deployment of the tiny model (transformers engine), terminated at the end."""
    import mii
    from mii_core.ports import free_port as pick

    name = f"tiny-{tmp_path_factory.mktemp('d').name}"
    client = mii.serve(tiny_model, deployment_name=name, port_number=pick(),
                       engine="transformers")
    try:
        yield client
    finally:
        try:
            client.terminate_server()
        except Exception:
            kill_ours()
