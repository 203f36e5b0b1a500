"""The on-disk registry of deployments: one JSON file per deployment under ``$MII_HOME``.

The supervisor owns its record: it writes state changes and pids, and removes the
record when it exits. Readers treat a record whose supervisor is gone as stale and
delete it, so the registry tells the truth even after a crash.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from hashlib import sha1
from pathlib import Path
from typing import Dict, List, Optional

from pydantic import BaseModel, ValidationError

from mii_core.config.models import MIIConfig

SUPERVISOR_MODULE = "mii_core.control.supervisor"


class ReplicaRecord(BaseModel):
    """Where one replica runs."""

    index: int
    hostname: str
    port: int
    dist_port: int
    gpu_indices: List[int] = []
    hosts: Dict[str, List[int]] = {}
    """Every host of the replica with the hostfile slots its ranks use, in rank order (a
    replica spanning hosts, or CPU slots of a hostfile); empty: ``hostname`` alone."""


class DeploymentRecord(BaseModel):
    """Everything a client or the CLI needs to find and manage a deployment."""

    name: str
    config: Dict
    host: str
    port: int
    log_path: str
    state: str = "starting"  # starting | ready | failed | stopping
    supervisor_pid: Optional[int] = None
    pids: Dict[str, int] = {}
    replicas: List[ReplicaRecord] = []
    engine: str = ""
    created_at: float = 0.0
    ready_at: Optional[float] = None
    error: str = ""

    @property
    def mii_config(self) -> MIIConfig:
        """The deployment's configuration."""
        return MIIConfig.model_validate(self.config)


def mii_home() -> Path:
    """Root of mii's state: ``$MII_HOME`` or the user cache dir; created 0700."""
    root = os.environ.get("MII_HOME")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(cache, "mii")
    path = Path(root)
    for sub in (path, path / "deployments", path / "logs"):
        sub.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _file_stem(name: str) -> str:
    # Hub names contain '/', so keep readable characters and add a hash for uniqueness.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
    return f"{safe}-{sha1(name.encode()).hexdigest()[:8]}"


def record_path(name: str) -> Path:
    """Path of the record file for deployment ``name``."""
    return mii_home() / "deployments" / f"{_file_stem(name)}.json"


def log_path(name: str) -> Path:
    """Path of the log file for deployment ``name``."""
    return mii_home() / "logs" / f"{_file_stem(name)}.log"


def save(record: DeploymentRecord) -> Path:
    """Atomically write ``record`` with mode 0600."""
    path = record_path(record.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(record.model_dump_json(indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load(name: str) -> Optional[DeploymentRecord]:
    """The record of ``name``, or None if there is none or it cannot be read."""
    return load_file(record_path(name))


def load_file(path: Path) -> Optional[DeploymentRecord]:
    """Parse one record file; a corrupt file counts as absent (see ``read_problem``)."""
    try:
        return DeploymentRecord.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError, ValidationError):
        return None


def read_problem(path: Path) -> Optional[str]:
    """Why an existing record file cannot be used (None if fine or absent)."""
    try:
        DeploymentRecord.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def remove(name: str) -> None:
    """Delete the record of ``name`` if present."""
    with contextlib.suppress(FileNotFoundError):
        record_path(name).unlink()


def pid_alive(pid: Optional[int], must_contain: str = "") -> bool:
    """True if ``pid`` runs (not a zombie) and its command line contains ``must_contain``."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return must_contain in cmdline


def supervisor_alive(record: DeploymentRecord) -> bool:
    """True if the record's supervisor process still runs."""
    return pid_alive(record.supervisor_pid, SUPERVISOR_MODULE)


def find_live(name: str) -> Optional[DeploymentRecord]:
    """The record of a live deployment ``name``; stale records are deleted."""
    record = load(name)
    if record is None:
        return None
    if supervisor_alive(record):
        return record
    # A record still being created has no supervisor yet; give it a moment.
    if record.supervisor_pid is None and time.time() - record.created_at < 30:
        return record
    remove(name)
    return None


def list_records() -> List[DeploymentRecord]:
    """All readable records, live or not."""
    records = []
    for path in sorted((mii_home() / "deployments").glob("*.json")):
        record = load_file(path)
        if record is not None:
            records.append(record)
    return records


def get_mii_config(model_or_deployment_name: str) -> MIIConfig:
    """The configuration of the deployment named so, or of the model's default deployment
    name (DeepSpeed-MII's ``mii.config.get_mii_config``); DeploymentNotFoundError if
    neither has a record."""
    from mii_core.config.models import default_deployment_name
    from mii_core.errors import DeploymentNotFoundError

    names = [model_or_deployment_name, default_deployment_name(model_or_deployment_name)]
    for name in names:
        record = load(name)
        if record is not None:
            return record.mii_config
    raise DeploymentNotFoundError(f"could not find a deployment named {names[0]!r} or "
                                  f"{names[1]!r}")
