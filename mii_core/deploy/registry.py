"""The on-disk registry of deployments: one JSON file per deployment under ``$MII_HOME``.

The supervisor owns its record: it writes state changes and pids, and removes the
record when it exits. Readers treat a record whose supervisor is gone as stale and
delete it, so the registry tells the truth even after a crash. Readers also ignore (and
warn once about) a record that is not a private regular file of the current user: see
``mii_core.deploy.home``, which checks ``$MII_HOME`` itself.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from hashlib import sha1
from pathlib import Path
from typing import Dict, List, Optional

from pydantic import BaseModel, ValidationError, field_validator

from mii_core.config.kwargs import describe_validation_error
from mii_core.config.models import MIIConfig, check_deployment_name
from mii_core.deploy import home
from mii_core.errors import ConfigError

log = logging.getLogger(__name__)
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

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_deployment_name(value)  # the rule of MIIConfig.deployment_name

    @property
    def mii_config(self) -> MIIConfig:
        """The deployment's configuration."""
        return MIIConfig.model_validate(self.config)


def mii_home() -> Path:
    """Root of mii's state: ``$MII_HOME`` or the user cache dir, checked private to this
    user and created 0700 (``home.safe_home``; ConfigError if unsafe)."""
    return home.safe_home()


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


def save(record: DeploymentRecord, path: Optional[Path] = None) -> Path:
    """Atomically write ``record`` (to ``path``, default its path in the registry) with
    mode 0600; OSError (a full disk: ENOSPC) leaves the previous version in place."""
    path = Path(path) if path is not None else record_path(record.name)
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
    """The record of ``name``, or None if there is none or it cannot be used."""
    return load_file(record_path(name))


def load_file(path: Path | str) -> Optional[DeploymentRecord]:
    """Parse one record file; a corrupt file counts as absent (see ``read_problem``), and so
    does one that is not this user's private file (with a warning, once per file)."""
    try:
        return _parse(path)
    except (ConfigError, OSError) as error:
        if not isinstance(error, FileNotFoundError):
            _warn_ignored(path, error)
        return None
    except (ValueError, ValidationError):
        return None


def _parse(path: Path | str) -> DeploymentRecord:
    return DeploymentRecord.model_validate(json.loads(home.read_private(path)))


_warned: set = set()


def _warn_ignored(path: Path | str, error: Exception) -> None:
    """Say once per file why a record is ignored: a planted or foreign record must not be
    trusted, and must not be silent either."""
    reason = home.refusal(path, error) if isinstance(error, OSError) else str(error)
    if (str(path), reason) not in _warned:
        _warned.add((str(path), reason))
        log.warning("ignoring deployment record: %s", reason)


def read_problem(path: Path) -> Optional[str]:
    """Why an existing record file cannot be used (None if fine or absent)."""
    try:
        _parse(path)
    except FileNotFoundError:
        return None
    except ConfigError as error:
        return str(error)
    except OSError as error:
        return home.refusal(path, error)
    except ValidationError as error:
        return f"invalid record: {describe_validation_error(error)}"
    except ValueError as error:
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
