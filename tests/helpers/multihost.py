"""Several "hosts" on this machine for multi-host tests: network namespaces joined by a
bridge, each with its own address, hostname (a UTS namespace) and sshd, reached from this
machine (the head: the root namespace, where serve() runs the supervisor and the load
balancer) by key-based ssh with a throwaway key, as the DeepSpeed launcher reaches real
hosts (pdsh, then ssh).

What the namespaces share with the head, unlike real hosts: the filesystem (the venv, the
model and the deployment record are at the same paths everywhere, which real hosts must
arrange, see docs/multi-host.md), the process table (a process "on" a host is visible,
and killable, from the head; tests only look, except where they kill a rank on purpose)
and the CPU.

Names are resolved everywhere through a block of /etc/hosts lines (added at start, removed
at the end, the file otherwise left byte for byte as it was). Addresses are in a /24 of
10.213.0.0/16 that no route of this machine uses, and only on the bridge: nothing outside
the machine can reach them (no forwarding or NAT is set up), and the sshds listen on their
namespace's address only.

Everything made is unmade by ``Cluster.close()``: every process in the namespaces (sshd,
ssh sessions, ranks) killed by pid, the namespaces, veths and bridge deleted, the /etc/hosts
lines and a /run/sshd made for sshd (once no run uses it) removed, the keys and configs
(a temporary directory) deleted; then it checks that none of it is left. State left by a
run that was killed (named after its pid, which is gone) is removed at the next start.

Needs root, ``ip`` (iproute2), ``unshare`` (util-linux), ``sshd`` (openssh-server), ``ssh``
and ``ssh-keygen`` (openssh-client) and ``pdsh``; without them ``Unavailable`` says what is
missing (the fixture turns it into a skip). It never installs anything: a test that ran
``apt-get install openssh-server`` would need the network and the package mirror, change
the machine for everything else running on it, and may start a system sshd listening on
every interface.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
from conftest import wait_until

HOSTS_FILE = Path("/etc/hosts")
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
PREFIX = "miimh"  # namespaces "miimh<pid>-<host>", links "mh<pid><host>{0,1}" / "mh<pid>br"
SUBNET = "10.213"
START_TIMEOUT_S = 30.0


class Unavailable(Exception):
    """This machine cannot simulate hosts; the message says why and what to install."""


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def check_prerequisites() -> None:
    """Raise ``Unavailable`` naming the first thing this machine lacks."""
    if os.geteuid() != 0:
        raise Unavailable("root (network namespaces and sshd need it)")
    tools = {"ip": "iproute2", "unshare": "util-linux", "ssh": "openssh-client",
             "ssh-keygen": "openssh-client", "pdsh": "pdsh"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool}: install {package} (apt-get install {package})")
    if not os.access(SSHD, os.X_OK):
        raise Unavailable(f"{SSHD}: install openssh-server (apt-get install openssh-server)")
    if importlib.util.find_spec("deepspeed") is None:  # its launcher reaches the hosts
        raise Unavailable("the DeepSpeed launcher: install deepspeed")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        raise Unavailable(f"network namespaces (ip netns add: {made.stderr.strip()})")
    _run("ip", "netns", "del", probe, check=False)


@dataclass
class Host:
    """One simulated host: a network namespace with an address, a hostname and maybe sshd."""

    name: str  # its hostname, in /etc/hosts
    netns: str
    address: str
    veth: str  # the end on the head's bridge: ``cut()`` sets it down
    sshd: Optional[subprocess.Popen] = None
    sshd_log: Optional[Path] = None

    def command(self, argv: Sequence[str]) -> List[str]:
        """``argv`` run on this host (its network namespace)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], timeout: float = 120,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True,
                              timeout=timeout, env=env)

    def pids(self) -> List[int]:
        """Every process on this host (in its network namespace)."""
        out = _run("ip", "netns", "pids", self.netns, check=False).stdout
        return sorted(int(p) for p in out.split() if p.isdigit() and _pid_alive(int(p)))

    def processes(self) -> Dict[int, str]:
        """pid -> command line of every process on this host but its sshd listener."""
        found = {}
        for pid in self.pids():
            if self.sshd is not None and pid == self.sshd.pid:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        return found

    def cut(self) -> None:
        """Take this host off the network (its link to the bridge goes down)."""
        _run("ip", "link", "set", self.veth, "down")

    def restore(self) -> None:
        """Put this host back on the network."""
        _run("ip", "link", "set", self.veth, "up")


@dataclass
class Cluster:
    """Hosts on one bridge, the head's address on it, and what ssh needs to reach them."""

    tag: str
    workdir: Path
    head_name: str
    head_address: str
    bridge: str
    hosts: Dict[str, Host] = field(default_factory=dict)
    hosts_block: str = ""

    # -- use -----------------------------------------------------------------------------
    def __getitem__(self, short: str) -> Host:
        return self.hosts[short]

    def env(self, remote_env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for serve(): ``ssh`` on PATH is a wrapper using this cluster's key and
        known hosts (what a user's ~/.ssh/config does for real hosts), and DS_ENV_FILE names
        a file of variables the DeepSpeed launcher exports to the remote ranks (its
        ~/.deepspeed_env mechanism)."""
        values = {key: os.environ[key] for key in
                  ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")
                  if key in os.environ}
        values.update(remote_env or {})
        env_file = self.workdir / f"deepspeed_env-{len(list(self.workdir.glob('deepspeed_env-*')))}"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return {"PATH": f"{self.workdir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                "DS_ENV_FILE": str(env_file)}

    def hostfile(self, slots: Dict[str, int]) -> str:
        """A DeepSpeed hostfile over these hosts ({short name: slots}), in that order."""
        path = self.workdir / f"hostfile-{'-'.join(f'{h}{n}' for h, n in slots.items())}"
        path.write_text("".join(f"{self.hosts[h].name} slots={n}\n" for h, n in slots.items()))
        return str(path)

    def ssh(self, short: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        """``command`` run on host ``short`` over ssh, as the launcher runs it."""
        return subprocess.run([str(self.workdir / "bin" / "ssh"), self.hosts[short].name,
                               command], capture_output=True, text=True, timeout=timeout)

    @contextmanager
    def cut(self, short: str) -> Iterator[Host]:
        """Host ``short`` off the network for the block (restored however it ends)."""
        host = self.hosts[short]
        host.cut()
        try:
            yield host
        finally:
            host.restore()

    # -- start ---------------------------------------------------------------------------
    @classmethod
    def start(cls, ssh_hosts: Sequence[str] = ("a", "b"),
              clients: Sequence[str] = ("c",)) -> "Cluster":
        """Hosts ``ssh_hosts`` (sshd, reachable by ssh) and ``clients`` (address only)."""
        check_prerequisites()
        remove_stale()
        pid = os.getpid()
        net = f"{SUBNET}.{_free_octet(pid)}"
        cluster = cls(tag=str(pid), workdir=Path(tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-")),
                      head_name=f"mh{pid}-head", head_address=f"{net}.1",
                      bridge=f"mh{pid}br")
        try:
            cluster._build(net, list(ssh_hosts), list(clients))
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _build(self, net: str, ssh_hosts: List[str], clients: List[str]) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.head_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for number, short in enumerate(ssh_hosts + clients, 2):
            host = Host(name=f"mh{self.tag}-{short}", netns=f"{PREFIX}{self.tag}-{short}",
                        address=f"{net}.{number}", veth=f"mh{self.tag}{short}0")
            self.hosts[short] = host
            inner = f"mh{self.tag}{short}1"
            _run("ip", "netns", "add", host.netns)
            _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", inner,
                 "netns", host.netns)
            _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", inner)
            _run("ip", "-n", host.netns, "link", "set", inner, "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        self._add_hosts_block()
        self._make_keys(ssh_hosts)
        _claim_privsep_dir(self.tag)
        for short in ssh_hosts:
            self._start_sshd(self.hosts[short])
        for short in ssh_hosts:
            host = self.hosts[short]
            if not wait_until(lambda s=short: self.ssh(s, "true").returncode == 0,
                              START_TIMEOUT_S, 0.2):
                result = self.ssh(short, "true")
                log = host.sshd_log.read_text() if host.sshd_log else ""
                raise RuntimeError(f"ssh to {host.name} does not work: {result.stderr.strip()}"
                                   f"\n--- sshd log ---\n{log}")

    def _add_hosts_block(self) -> None:
        lines = [f"{self.head_address} {self.head_name}"] + [
            f"{h.address} {h.name}" for h in self.hosts.values()]
        self.hosts_block = (f"# {PREFIX} {self.tag} begin\n" + "\n".join(lines)
                            + f"\n# {PREFIX} {self.tag} end\n")
        text = HOSTS_FILE.read_text()
        separator = "" if not text or text.endswith("\n") else "\n"
        # In place: /etc/hosts may be a bind mount, which a rename cannot replace.
        HOSTS_FILE.write_text(text + separator + self.hosts_block)

    def _make_keys(self, ssh_hosts: List[str]) -> None:
        work = self.workdir
        (work / "bin").mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mii-multihost-client",
             "-f", str(work / "client_key"))
        shutil.copy(work / "client_key.pub", work / "authorized_keys")
        known = []
        for short in ssh_hosts:
            host = self.hosts[short]
            key = work / f"host_key_{short}"
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(key))
            kind, blob = Path(f"{key}.pub").read_text().split()[:2]
            known.append(f"{host.name},{host.address} {kind} {blob}\n")
        (work / "known_hosts").write_text("".join(known))
        (work / "ssh_config").write_text(
            "Host *\n"
            f"  IdentityFile {work / 'client_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {work / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 5\n"
            "  ControlMaster no\n  LogLevel ERROR\n")
        wrapper = work / "bin" / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {work / 'ssh_config'} "
                           '"$@"\n')
        wrapper.chmod(0o755)

    def _start_sshd(self, host: Host) -> None:
        short = host.name.rsplit("-", 1)[1]
        config = self.workdir / f"sshd_config_{short}"
        config.write_text(
            f"ListenAddress {host.address}\nPort 22\n"
            f"HostKey {self.workdir / f'host_key_{short}'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "PidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitUserEnvironment no\nPrintMotd no\nPrintLastLog no\nX11Forwarding no\n"
            "AllowTcpForwarding no\nAllowAgentForwarding no\nPermitTunnel no\n"
            "LogLevel INFO\n")
        host.sshd_log = self.workdir / f"sshd_{short}.log"
        with open(host.sshd_log, "w") as log:
            # Its own UTS namespace: the host's own hostname, which sessions inherit.
            host.sshd = subprocess.Popen(
                host.command(["unshare", "--uts", "sh", "-c",
                              'hostname "$0" && exec "$1" -D -e -f "$2"',
                              host.name, SSHD, str(config)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Unmake everything ``start`` made, then check that nothing of it is left."""
        errors: List[str] = []
        for host in self.hosts.values():
            _kill_netns_processes(host.netns, errors)
            if host.sshd is not None:
                try:
                    host.sshd.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    errors.append(f"sshd of {host.name} (pid {host.sshd.pid}) did not exit")
        for host in self.hosts.values():
            _run("ip", "link", "del", host.veth, check=False)  # both ends go
            _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        if self.hosts_block:
            _remove_hosts_block(self.tag)
        _release_privsep_dir(self.tag)
        shutil.rmtree(self.workdir, ignore_errors=True)
        wait_until(lambda: not leftovers(self.tag), 10)  # links may go a moment after their netns
        errors += leftovers(self.tag)
        if errors:
            raise RuntimeError("multi-host teardown left state behind: " + "; ".join(errors))


def _kill_netns_processes(netns: str, errors: List[str]) -> None:
    """SIGKILL every process in ``netns`` (only this harness's: sshd and what ran over it)."""
    def alive() -> List[int]:
        out = _run("ip", "netns", "pids", netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and _pid_alive(int(p))
                and not _zombie(int(p))]

    for pid in alive():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not wait_until(lambda: not alive(), 10):
        errors.append(f"processes {alive()} in {netns} survived SIGKILL")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _claim_privsep_dir(tag: str) -> None:
    """sshd needs /run/sshd. Each run that uses it leaves a mark in it, and one that had to
    make it says so; the last run out (``_release_privsep_dir``) removes what was made."""
    if not PRIVSEP_DIR.exists():
        PRIVSEP_DIR.mkdir(mode=0o755)
        (PRIVSEP_DIR / f".{PREFIX}-made").touch()
    (PRIVSEP_DIR / f".{PREFIX}{tag}").touch()


def _release_privsep_dir(tag: str) -> None:
    """Drop ``tag``'s mark and those of runs that are gone; if no mark of a live run is
    left and a run made the directory, remove it."""
    if not PRIVSEP_DIR.is_dir():
        return
    for mark in PRIVSEP_DIR.glob(f".{PREFIX}[0-9]*"):
        owner = mark.name[len(PREFIX) + 1:]
        if owner == tag or not _pid_alive(int(owner)):
            mark.unlink(missing_ok=True)
    made = PRIVSEP_DIR / f".{PREFIX}-made"
    if made.exists() and [p.name for p in PRIVSEP_DIR.iterdir()] == [made.name]:
        made.unlink()
        PRIVSEP_DIR.rmdir()


def _remove_hosts_block(tag: str) -> None:
    text = HOSTS_FILE.read_text()
    pattern = re.compile(rf"^# {PREFIX} {re.escape(tag)} begin\n.*?^# {PREFIX} "
                         rf"{re.escape(tag)} end\n", re.DOTALL | re.MULTILINE)
    stripped = pattern.sub("", text)
    if stripped != text:
        HOSTS_FILE.write_text(stripped)


def _free_octet(pid: int) -> int:
    """A third octet for SUBNET.X.0/24 that no address or route here uses."""
    used = _run("ip", "-4", "route", "show", "table", "all", check=False).stdout + \
        _run("ip", "-4", "addr", check=False).stdout
    for offset in range(250):
        octet = (pid + offset) % 250 + 1
        if f"{SUBNET}.{octet}." not in used:
            return octet
    raise Unavailable(f"a free /24 in {SUBNET}.0.0/16")


def leftovers(tag: str) -> List[str]:
    """What of the cluster ``tag`` still exists (namespaces, links, /etc/hosts lines, files)."""
    found = []
    namespaces = _run("ip", "netns", "list", check=False).stdout.split()
    found += [f"namespace {n}" for n in namespaces if n.startswith(f"{PREFIX}{tag}-")]
    links = _run("ip", "-o", "link", check=False).stdout
    found += [f"link {m}" for m in re.findall(rf"\d+: (mh{tag}[a-z0-9]+)[@:]", links)]
    if f"# {PREFIX} {tag} begin" in HOSTS_FILE.read_text():
        found.append("/etc/hosts lines")
    found += [f"directory {d}" for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}{tag}-*")]
    found += [f"{mark}" for mark in PRIVSEP_DIR.glob(f".{PREFIX}{tag}")]
    return found


def remove_stale() -> None:
    """Remove what a killed run (whose pid is gone) left: namespaces, links, /etc/hosts lines,
    its temporary directory."""
    tags = set(re.findall(rf"^{PREFIX}(\d+)-", _run("ip", "netns", "list", check=False).stdout,
                          re.MULTILINE))
    tags |= set(re.findall(rf"^# {PREFIX} (\d+) begin$", HOSTS_FILE.read_text(), re.MULTILINE))
    tags |= set(re.findall(r"\d+: mh(\d+)br[@:]", _run("ip", "-o", "link", check=False).stdout))
    for tag in tags:
        if _pid_alive(int(tag)):  # a run still going (this one included)
            continue
        errors: List[str] = []
        for netns in _run("ip", "netns", "list", check=False).stdout.split():
            if netns.startswith(f"{PREFIX}{tag}-"):
                _kill_netns_processes(netns, errors)
                _run("ip", "netns", "del", netns, check=False)
        links = _run("ip", "-o", "link", check=False).stdout
        for link in re.findall(rf"\d+: (mh{tag}[a-z0-9]+)[@:]", links):
            _run("ip", "link", "del", link, check=False)
        _remove_hosts_block(tag)
    _release_privsep_dir("none")
    for workdir in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        tag = workdir.name[len(PREFIX):].split("-", 1)[0]
        if tag.isdigit() and not _pid_alive(int(tag)):
            shutil.rmtree(workdir, ignore_errors=True)


def python_on(host: Host, code: str, timeout: float = 120,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``code`` with this interpreter on ``host``."""
    return host.run([sys.executable, "-c", code], timeout=timeout,
                    env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Hosts ``a`` and ``b`` (sshd) and ``c`` (a client), unmade after the module; the
    tests skip, saying what is missing, where this machine cannot make them."""
    try:
        made = Cluster.start()
    except Unavailable as missing:
        pytest.skip(f"multi-host tests need {missing}")
    try:
        yield made
    finally:
        made.close()
