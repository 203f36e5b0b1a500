"""Shared fixtures: an isolated MII_HOME, the tiny model, deployments that always clean up,
and a check after every test that it left no process of ours running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

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


def our_processes() -> Dict[int, str]:
    """pid -> deployment record path, for processes started by this session's deployments."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        records = [a for a in args if a.startswith(_HOME)]
        if records and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found[int(entry)] = records[0]
    return found


def kill_deployment(name: str) -> None:
    """Cleanup after a failed test: SIGKILL the processes of deployment ``name`` only."""
    from mii_core.deploy import registry

    record = str(registry.record_path(name))
    for pid, path in our_processes().items():
        if path == record:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def deployed(model: str, name: str, **kwargs: Any) -> Iterator[Any]:
    """``mii.serve`` on a free port; the deployment is terminated on the way out, and its
    processes killed by pid if terminating fails (the failure is still raised)."""
    import mii
    from mii_core.deploy.ports import free_port

    kwargs.setdefault("port_number", free_port())
    client = mii.serve(model, deployment_name=name, **kwargs)
    try:
        yield client
    finally:
        try:
            client.terminate_server()
        except Exception:
            kill_deployment(name)
            raise


def kill_ours() -> None:
    """Last-resort cleanup of this session's processes (only ours, by pid)."""
    for pid in our_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves processes of a deployment it started running.

    Deployments that were already running before the test (module fixtures) may
    restart their processes; anything belonging to a new deployment must be gone.
    """
    existing = set(our_processes().values())
    yield

    def leaked() -> List[int]:
        return sorted(p for p, record in our_processes().items() if record not in existing)

    deadline = time.time() + 10
    while leaked() and time.time() < deadline:
        time.sleep(0.1)
    left = leaked()
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"test leaked processes {left}")


def pytest_sessionfinish(session, exitstatus) -> None:
    kill_ours()


@pytest.fixture(scope="session")
def mii_home() -> Path:
    """The registry/log root of this session."""
    return Path(_HOME)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the offline tiny Llama (built once per session)."""
    from mii.testing.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def free_port() -> int:
    """A port that was free a moment ago."""
    from mii_core.deploy.ports import free_port as pick

    return pick()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same environment) and return the result."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """A module-wide deployment of the tiny model (transformers engine), terminated at the end."""
    with deployed(tiny_model, f"tiny-{tmp_path_factory.mktemp('d').name}",
                  engine="transformers") as client:
        yield client
