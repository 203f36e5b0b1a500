"""The supervisor: the long-lived parent of every process of one deployment.

``python -m mii_core.control.supervisor RECORD`` is started by ``serve()`` in a new
session, so it outlives the caller and ignores the caller's Ctrl-C. It starts
the replicas and the load balancer, each in its own process group, records
their pids, restarts a child that crashes after start-up (with backoff, at most
``max_restarts`` times each; the load balancer is stateless and comes back on the
same port, replicas are routed around meanwhile), and on SIGTERM / Terminate stops every process group,
verifies every pid is gone and removes the registry record.

Its own writes may fail (a full disk: ENOSPC) without costing a process: once the
deployment is ready, a record that cannot be written is logged once and retried every
``RECORD_RETRY_S`` while everything keeps serving (until then the record on disk keeps
its last state: the supervisor, ports and config, which do not change, and older child
pids). During start-up the deployment could not be found by name, so start-up fails,
and the reason reaches ``serve()`` through its status pipe, since neither the record nor
the log (the same disk) may hold it. A failed deployment keeps its record for
post-mortem only if its failed state could be written: a record is never left saying
"ready" for a supervisor that is gone.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional

from mii_core.control.launcher import (
    ChildSpec,
    gateway_spec,
    load_balancer_spec,
    replica_spec,
    wait_until_listening,
)
from mii_core.deploy import home, logs, registry, tls
from mii_core.deploy.addresses import gateway_bind_host
from mii_core.deploy.registry import DeploymentRecord
from mii_core.errors import MIIError
from mii_core.plugins.discovery import hooks, load_driver

log = logging.getLogger(__name__)
POLL_S = 0.1
STARTUP_POLL_S = 0.05  # until ready: serve() waits on this probe (see "Start-up time")
STOP_GRACE_S = 8.0
GATEWAY_WAIT_S = 20.0
RECORD_RETRY_S = 2.0  # a record that could not be written is tried again this often
TLS_CHECK_S = 1.0  # during start-up with TLS: how often a failing probe checks the handshake
STATUS_MAX = 4000  # bytes of a status report (one write below PIPE_BUF is never interleaved)
SaveRecord = Callable[[DeploymentRecord, Path], Path]


class StatusPipe:
    """The write end of the pipe ``serve()`` reads when the supervisor exits during
    start-up: why it failed reaches the caller even when neither the record nor the log
    can be written. Closed once the deployment is ready (``serve()`` has returned)."""

    def __init__(self, fd: Optional[int] = None) -> None:
        self.fd = fd

    def report(self, message: str) -> None:
        """Send ``message`` (once; nothing after ``close``) and close the pipe."""
        if self.fd is not None:
            try:
                os.write(self.fd, message.encode(errors="replace")[:STATUS_MAX])
            except OSError:  # serve() is gone: nobody to tell
                pass
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


@dataclass
class Child:
    """A running child process group and its restart bookkeeping."""

    spec: ChildSpec
    proc: subprocess.Popen
    restarts: int = 0
    restart_at: Optional[float] = None
    pids_seen: set = field(default_factory=set)


class Supervisor:
    """Starts, watches and stops the children of one deployment."""

    def __init__(self, record_file: str, save: SaveRecord = registry.save,
                 status: Optional[StatusPipe] = None) -> None:
        self.record_file = record_file
        record = registry.load_file(Path(record_file))
        if record is None:
            raise SystemExit(f"cannot read deployment record {record_file}")
        self.record: DeploymentRecord = record
        self.config = record.mii_config
        self.children: Dict[str, Child] = {}
        self.stop_reason: Optional[str] = None
        self.save = save
        self.status = status or StatusPipe()
        self.unsaved: Optional[str] = None  # why the last write of the record failed
        self.retry_at = 0.0
        self.tls_check_at = 0.0

    @cached_property
    def transport(self):
        """The transport driver, loaded at first use (the readiness probe), so that the
        replicas, whose imports are most of the start-up, are spawned before grpc is imported."""
        return load_driver("transport", self.config.transport)()

    # -- record ------------------------------------------------------------------------
    def _save(self, **changes) -> bool:
        """Apply ``changes`` and write the record; False if the disk refused (logged once
        per outage, retried by the watch loop): never an exception, which would end the
        supervisor and with it every process of the deployment."""
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.record.pids = {role: c.proc.pid for role, c in self.children.items()}
        try:
            self.save(self.record, Path(self.record_file))
        except OSError as error:
            why = home.describe_os_error(error, self.record_file)
            if self.unsaved is None:
                log.error("cannot write the registry record: %s; the deployment's processes "
                          "keep running, the write is retried every %.0fs", why, RECORD_RETRY_S)
            self.unsaved = why
            self.retry_at = time.time() + RECORD_RETRY_S
            return False
        if self.unsaved is not None:
            log.warning("registry record %s written again", self.record_file)
            self.unsaved = None
        return True

    # -- children ----------------------------------------------------------------------
    def _spawn(self, spec: ChildSpec) -> subprocess.Popen:
        log.info("starting %s: %s", spec.role, " ".join(spec.argv))
        return subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.DEVNULL,
                                stdout=sys.stdout, stderr=sys.stderr, start_new_session=True)

    def start(self) -> None:
        """Start every replica, the REST gateway (if enabled) and the load balancer."""
        for replica in self.record.replicas:
            spec = replica_spec(self.record, self.record_file, replica)
            self.children[spec.role] = Child(spec, self._spawn(spec))
        if self.config.enable_restful_api:  # bound before the deployment answers, so that
            spec = gateway_spec(self.record_file)  # serve() returning means REST is up too
            child = self.children[spec.role] = Child(spec, self._spawn(spec))
            wait_until_listening(gateway_bind_host(self.config.restful_api_host),
                                 self.config.restful_api_port, child.proc, GATEWAY_WAIT_S,
                                 lambda: self.stop_reason is not None)
        spec = load_balancer_spec(self.record_file)
        self.children[spec.role] = Child(spec, self._spawn(spec))
        if not self._save(supervisor_pid=os.getpid()):  # mii.client(name) could not find it
            self._fail(f"cannot write its registry record: {self.unsaved}")

    def request_stop(self, reason: str) -> None:
        """Signal handler: leave the watch loop and tear down."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def watch(self) -> int:
        """Run until asked to stop or start-up fails; return the exit status."""
        deadline = time.time() + self.config.startup_timeout
        address = f"{self.config.host}:{self.config.port_number}"
        while self.stop_reason is None:
            for role, child in self.children.items():
                code = child.proc.poll()
                if code is None or child.restart_at is not None:
                    continue
                if self.record.state != "ready":
                    self._fail(f"{role} exited with status {_describe_status(code)} during start-up")
                    return 1
                if child.restarts >= self.config.max_restarts:
                    self._fail(f"{role} exited with status {_describe_status(code)}; "
                               f"no restarts left (max_restarts={self.config.max_restarts})")
                    return 1
                child.restart_at = time.time() + min(8.0, 0.5 * 2 ** child.restarts)
                log.warning("%s exited with status %s; restart %d of %d in %.1fs", role,
                            _describe_status(code), child.restarts + 1, self.config.max_restarts,
                            child.restart_at - time.time())
            self._restart_due()
            if self.unsaved is not None and time.time() >= self.retry_at:
                self._save()
            if self.record.state == "starting":
                if self.transport.is_serving(address, timeout=0.2,
                                             tls_root_cert=self.config.tls_cert_file):
                    if not self._save(state="ready", ready_at=time.time()):
                        self._fail(f"cannot write its registry record: {self.unsaved}")
                        return 1
                    self.status.close()
                    log.info("deployment %s ready on %s after %.1fs",
                             self.record.name, address, time.time() - self.record.created_at)
                    hooks().mii_deployment_started(record=self.record)
                elif self._tls_refused():
                    return 1
                elif time.time() > deadline:
                    self._fail(f"not serving after startup_timeout={self.config.startup_timeout}s")
                    return 1
            time.sleep(STARTUP_POLL_S if self.record.state == "starting" else POLL_S)
        return 1 if self.stop_reason == "failed" else 0

    def _tls_refused(self) -> bool:
        """With TLS, a probe that fails may fail for ever: a client of ``host`` refusing the
        certificate (serve() checks it up front; this catches what it could not see, such
        as a certificate file replaced since). At most once per ``TLS_CHECK_S``."""
        if not self.config.tls_cert_file or time.time() < self.tls_check_at:
            return False
        self.tls_check_at = time.time() + TLS_CHECK_S
        problem = tls.handshake_problem(self.config.host, self.config.port_number,
                                        self.config.tls_cert_file, timeout=0.5)
        if problem:
            self._fail(problem)
        return problem is not None

    def _restart_due(self) -> None:
        for role, child in self.children.items():
            if child.restart_at is not None and time.time() >= child.restart_at:
                self._kill_group(child, signal.SIGKILL)  # leftovers of the crashed group
                child.restarts += 1
                child.restart_at = None
                child.proc = self._spawn(child.spec)
                self._save()

    def _fail(self, why: str) -> None:
        log.error("deployment %s failed: %s", self.record.name, why)
        self._save(state="failed", error=why)
        self.stop_reason = "failed"

    # -- teardown ----------------------------------------------------------------------
    def _track_pids(self, child: Child) -> None:
        child.pids_seen |= set(_group_members(child.proc.pid)) | set(_descendants(child.proc.pid))

    def _kill_group(self, child: Child, sig: int) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        """Stop every child group: SIGTERM, a grace period, then SIGKILL; verify all are gone.
        A failed start-up tells serve() why through the status pipe."""
        if self.stop_reason == "failed":
            self.status.report(self.record.error or "failed")
        self._save(state="failed" if self.stop_reason == "failed" else "stopping")
        for child in self.children.values():
            self._track_pids(child)
            self._kill_group(child, signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_S
        while time.time() < deadline and self._survivors():
            time.sleep(0.05)
        for pid in self._survivors():
            log.warning("pid %d ignored SIGTERM; killing it", pid)
            for child in self.children.values():
                self._kill_group(child, signal.SIGKILL)
            _kill(pid)
        for child in self.children.values():
            child.proc.wait(timeout=5)
        left = self._survivors()
        if left:
            log.error("processes still alive after teardown: %s", left)
        log.info("[progress] deployment %s stopped (%s)", self.record.name, self.stop_reason)
        hooks().mii_deployment_stopped(record=self.record, reason=self.stop_reason or "terminated")

    def _survivors(self) -> List[int]:
        alive = []
        for child in self.children.values():
            child.proc.poll()  # reap the direct child
            self._track_pids(child)
            alive += [pid for pid in child.pids_seen if registry.pid_alive(pid)]
        return sorted(set(alive))


def _group_members(pgid: int) -> List[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (launchers may put ranks in sessions of their own)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    kids = [int(k) for k in handle.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe_status(code: int) -> str:
    if code < 0:
        return f"{code} (killed by {signal.Signals(-code).name})"
    return str(code)


def main(argv: Optional[List[str]] = None, save: SaveRecord = registry.save) -> int:
    """Supervise the deployment whose record is ``argv[0]`` (``--status-fd N``: the pipe
    serve() reads, see ``StatusPipe``); ``save`` writes the record."""
    args = sys.argv[1:] if argv is None else argv
    logs.configure("supervisor")
    pipe = StatusPipe(int(args[args.index("--status-fd") + 1]) if "--status-fd" in args else None)
    supervisor = Supervisor(args[0], save=save, status=pipe)
    for sig, reason in ((signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted"),
                        (signal.SIGHUP, "hangup")):
        signal.signal(sig, lambda *_, r=reason: supervisor.request_stop(r))
    status = 1
    try:
        supervisor.start()
        status = supervisor.watch()
    except Exception as error:
        log.exception("supervisor failed")
        supervisor.stop_reason = supervisor.stop_reason or "failed"
        supervisor.record.error = supervisor.record.error or \
            f"supervisor failed: {type(error).__name__}: {error} (see log)"
    finally:
        supervisor.stop()
        # A failed deployment's record stays for post-mortem, unless writing the failure
        # failed: then the record on disk still says what was true before, and would lie.
        if supervisor.stop_reason != "failed" or supervisor.unsaved is not None:
            try:
                registry.remove(supervisor.record.name)
            except (OSError, MIIError) as error:  # readers drop it: its supervisor is gone
                log.error("cannot remove the registry record: %s", error)
    return status


if __name__ == "__main__":
    sys.exit(main())
