"""A replica with ranks on other hosts: the head's side and each host's side.

``python -m mii_core.control.remote_main launch ARGV...`` is the supervisor's child for
such a replica (``launcher.replica_spec``). It runs the DeepSpeed launcher command ARGV
(``deepspeed.launcher.runner``: pdsh, then one ssh client per host, each in a session of
its own) in a process group of its own, and stops all of it, ssh clients included, with
SIGKILL when it gets SIGTERM or the supervisor is gone. Not SIGTERM: on SIGTERM the
DeepSpeed launcher runs ``pdsh -w HOSTS pkill -f "python -u -m deepspeed.launcher.launch"``,
which ends every DeepSpeed job on those hosts, other deployments' too. Its exit status is
the launcher's, which is that of the ranks.

``python -m mii_core.control.remote_main rank RECORD REPLICA HEAD`` is each rank on each
host, started there by ``deepspeed.launcher.launch`` (which sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and CROSS_RANK: the host's index in the
replica). Before it runs ``replica_main`` it

- records ``HEAD``, the supervisor's hostname, as the deployment's head
  (``MII_HEAD_HOST``): this host's own name is then not taken for the head's, so rank 0
  binds every interface and the load balancer reaches it;
- sets the rank's threads for this host, its cores shared by the deployment's ranks
  here (the supervisor's count is the head's), unless ``MII_THREADS_PER_RANK`` is set;
- exits once its ssh session is gone: when the head kills the ssh client, sshd closes
  the session's pipes, which are this process's stdout and stderr (the remote
  counterpart of ``lifecycle.exit_with_supervisor``, since no pid of the head means
  anything here). A link that is down leaves the session, and the rank, in place until
  it comes back.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import stat
import subprocess
import sys
import threading
from typing import List, Optional

from mii_core.control import lifecycle
from mii_core.control.launcher import replica_hosts, threads_per_rank
from mii_core.deploy.addresses import HEAD_HOST_ENV
from mii_core.deploy.registry import SUPERVISOR_MODULE, load_file, pid_alive

log = logging.getLogger(__name__)
POLL_S = 0.2


# -- on the head ---------------------------------------------------------------------------
def launch(argv: List[str]) -> int:
    """Run the DeepSpeed launcher ``argv`` until it exits (its status), SIGTERM or the
    supervisor's end (then its whole tree is killed)."""
    from mii_core.deploy import logs

    logs.configure("remote-launcher")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    supervisor = lifecycle.supervisor_pid()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and not stopping.is_set():
            if supervisor and not pid_alive(supervisor, SUPERVISOR_MODULE):
                log.error("supervisor %d is gone; stopping the remote ranks", supervisor)
                break
            stopping.wait(POLL_S)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, its process group and every descendant (the ssh clients are in
    sessions of their own), and reap it."""
    import psutil  # DeepSpeed's launcher needs it too

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in tree:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=5)


# -- on each host ----------------------------------------------------------------------------
def ranks_on_this_host(record_file: str, replica: int) -> int:
    """Ranks of the whole deployment on the host this rank runs on (1 if unknown)."""
    record = load_file(record_file)
    if record is None:
        return 1
    tp = record.mii_config.model_conf.tensor_parallel
    mine = list(replica_hosts(record.replicas[replica], tp))
    node = int(os.environ.get("CROSS_RANK", "0"))
    host = mine[node] if node < len(mine) else mine[0]
    return sum(len(replica_hosts(r, tp).get(host, [])) for r in record.replicas) or 1


def exit_with_session(fds: tuple = (1, 2)) -> bool:
    """Exit this process at once when the reader of its stdout or stderr (sshd, for a
    rank started over ssh) goes away; False, and no watch, if neither is a pipe or socket."""
    watched = [fd for fd in fds if _is_stream(fd)]
    if not watched:
        return False
    poller = select.poll()
    for fd in watched:
        poller.register(fd, 0)  # POLLERR / POLLHUP are reported whatever the mask

    def watch() -> None:
        while not poller.poll():
            pass
        os._exit(3)

    threading.Thread(target=watch, name="session-watchdog", daemon=True).start()
    return True


def _is_stream(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def rank(record_file: str, replica: int, head: str) -> int:
    """Prepare this host's rank, then run it as ``replica_main`` does."""
    os.environ[HEAD_HOST_ENV] = head
    if not os.environ.get("MII_THREADS_PER_RANK"):
        threads = threads_per_rank(ranks_on_this_host(record_file, replica))
        os.environ["MII_THREADS_PER_RANK"] = os.environ["OMP_NUM_THREADS"] = str(threads)
    exit_with_session()
    from mii_core.control import replica_main

    return replica_main.main([record_file, str(replica)])


def main(argv: Optional[List[str]] = None) -> int:
    """``launch ARGV...`` (on the head) or ``rank RECORD REPLICA HEAD`` (on each host)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["launch"] and len(args) > 1:
        return launch(args[1:])
    if args[:1] == ["rank"] and len(args) == 4:
        return rank(args[1], int(args[2]), args[3])
    print("usage: python -m mii_core.control.remote_main launch ARGV... | "
          "rank RECORD REPLICA HEAD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
