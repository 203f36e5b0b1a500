"""What every child process of a deployment does to live and die with its supervisor."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Optional

from mii_core.deploy.registry import SUPERVISOR_MODULE, pid_alive

if TYPE_CHECKING:  # pragma: no cover
    from mii_core.deploy.registry import DeploymentRecord

log = logging.getLogger(__name__)
SUPERVISOR_PID_ENV = "MII_SUPERVISOR_PID"
RECORD_ENV = "MII_RECORD"


def supervisor_pid() -> int:
    """The supervisor's pid, from the environment the supervisor set."""
    return int(os.environ.get(SUPERVISOR_PID_ENV, "0"))


def request_deployment_shutdown() -> None:
    """Ask the supervisor to stop the whole deployment (used by the Terminate RPC)."""
    pid = supervisor_pid()
    if pid_alive(pid, SUPERVISOR_MODULE):
        log.info("terminate requested: signalling supervisor %d", pid)
        os.kill(pid, signal.SIGTERM)
    else:  # a process started by hand: stop just ourselves
        os.kill(os.getpid(), signal.SIGTERM)


def start_child(role: str, record_file: str) -> "Optional[DeploymentRecord]":
    """Common start of a deployment's child process: log as ``role``, die with the
    supervisor, and read the deployment record (None, logged, if it is unreadable)."""
    from mii_core.deploy import logs
    from mii_core.deploy.registry import load_file

    logs.configure(role)
    exit_with_supervisor()
    record = load_file(record_file)
    if record is None:
        log.error("cannot read deployment record %s", record_file)
    return record


def exit_with_supervisor(interval: float = 0.5) -> None:
    """Exit this process promptly if the supervisor dies, so nothing is orphaned."""
    pid = supervisor_pid()
    if not pid:
        return

    def watch() -> None:
        while pid_alive(pid, SUPERVISOR_MODULE):
            time.sleep(interval)
        log.error("supervisor %d is gone; exiting", pid)
        os._exit(3)

    threading.Thread(target=watch, name="supervisor-watchdog", daemon=True).start()
