"""Stop deployments the benchmark started and that are still alive; keep their log tails.

Only processes named in our own registry records ($MII_HOME/deployments/*.json, written
by the serve() calls of this benchmark) are signalled: the supervisor, then the process
group of every child it recorded. Nothing is killed by name.

    python3 bench/gpu/cleanup.py PHASE_TAG     # after each phase (run.sh does this)
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _alive(pid: Optional[int]) -> bool:
    from mii_core.deploy import registry

    return registry.pid_alive(pid)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # children run in their own session: pgid == pid
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def stop_record(record, reason: str, grace: float = 20.0) -> List[int]:
    """SIGTERM the supervisor (it tears down its children); then SIGKILL what is left.

    Returns the pids that had to be killed.
    """
    from mii_core.deploy import registry

    pids = [p for p in record.pids.values() if p]
    killed = []
    if record.supervisor_pid and registry.supervisor_alive(record):
        _signal_group(record.supervisor_pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and registry.supervisor_alive(record):
            time.sleep(0.2)
    for pid in [record.supervisor_pid, *pids]:
        if pid and _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            killed.append(pid)
    common.append_deploy_log(f"{record.name}: stopped by cleanup ({reason}); killed {killed}",
                             _tail(record.log_path))
    return killed


def _tail(path: str, lines: int = 60) -> str:
    from mii_core.deploy import logs

    return logs.tail(path, lines)


def stop_named(name: str, reason: str) -> Optional[List[int]]:
    """Stop deployment ``name`` if its record still shows a live process."""
    from mii_core.deploy import registry

    record = registry.load(name)
    if record is None:
        return None
    live = [p for p in [record.supervisor_pid, *record.pids.values()] if p and _alive(p)]
    if not live:
        return None
    return stop_record(record, reason)


def main(tag: str) -> int:
    from mii_core.deploy import registry

    leftovers = []
    for record in registry.list_records():
        killed = stop_named(record.name, f"left over after phase {tag}")
        if killed is not None:
            leftovers.append({"deployment": record.name, "killed": killed})
        elif record.state == "failed":
            common.append_deploy_log(f"{record.name}: failed record ({record.error[:200]})",
                                     _tail(record.log_path))
            registry.remove(record.name)
    if leftovers:
        common.log(phase=tag, kind="cleanup", leftovers=leftovers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "?"))
