"""Command lines of a deployment's children: replicas (direct or via torchrun) and the load balancer.

A tensor_parallel=1 replica is one plain Python process. A larger replica is
started by torchrun (``torch.distributed.run``), one process per rank, with its
own rendezvous port, so ranks get RANK/WORLD_SIZE/LOCAL_RANK the standard way.
A replica with a rank on another host of the hostfile is started by the DeepSpeed
launcher (``deepspeed_multinode_command``: pdsh, then ssh to each host), whose ranks
run ``remote_main`` there; docs/multi-host.md says what the hosts need.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from mii_core.control.lifecycle import RECORD_ENV, SUPERVISOR_PID_ENV
from mii_core.deploy.addresses import dial_host, is_local
from mii_core.deploy.registry import DeploymentRecord, ReplicaRecord, mii_home

REPLICA_MODULE = "mii_core.control.replica_main"
REMOTE_MODULE = "mii_core.control.remote_main"
LB_MODULE = "mii_core.control.lb_main"
GATEWAY_MODULE = "mii_core.control.gateway_main"


@dataclass
class ChildSpec:
    """How to start one child of the supervisor."""

    role: str
    argv: List[str]
    env: Dict[str, str]


def _base_env(record_file: str) -> Dict[str, str]:
    env = dict(os.environ)
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    env[RECORD_ENV] = record_file
    env.setdefault("PYTHONUNBUFFERED", "1")
    bytecode_cache_env(env)
    # Children must not think they run inside the caller's distributed job.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return env


def threads_per_rank(total_ranks: int) -> int:
    """CPU threads for each rank: the cores less one (kept for the serving threads), shared.

    Measured on the 2-core CI machine with the tiny model: one torch thread serves a
    request in ~5 ms, two threads (competing with gRPC and the engine loop's Python
    thread) take ~50 ms. ``MII_THREADS_PER_RANK`` overrides.
    """
    if os.environ.get("MII_THREADS_PER_RANK"):
        return int(os.environ["MII_THREADS_PER_RANK"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, ((cores or 1) - 1) // max(1, total_ranks))


def compile_cache_env(env: Dict[str, str]) -> None:
    """Point torch.compile's and Triton's on-disk caches at ``$MII_HOME/compile`` (private,
    like the rest of ``$MII_HOME``; a setting of the user's own wins): a second serve()
    of a model on this machine then reuses the first one's compiled kernels instead of
    compiling them again."""
    root = mii_home() / "compile"
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


# Folders of modules every replica imports, whose compiling cost most of a start where
# no bytecode sat beside them (the H200 image, 2026-12-02: torch and its sympy, dynamo
# and distributed tensors, transformers' generation, auto classes and integrations):
# (package, folder inside it). Any module there without bytecode turns the cache on.
HEAVY_FOLDERS = (("torch", ""), ("torch", "_dynamo"), ("torch", "distributed/tensor"),
                 ("sympy", ""), ("sympy", "core"), ("transformers", "generation"),
                 ("transformers", "models/auto"), ("transformers", "integrations"))


def bytecode_missing(folders: Sequence[Tuple[str, str]] = HEAVY_FOLDERS) -> bool:
    """Whether a module in ``folders`` has no bytecode beside it (found without importing
    anything: only the top-level packages are looked up on the path)."""
    for package, relative in folders:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = os.path.join(list(spec.submodule_search_locations)[0], relative)
        sources = os.listdir(folder) if os.path.isdir(folder) else []
        if any(name.endswith(".py") and not os.path.exists(
                importlib.util.cache_from_source(os.path.join(folder, name)))
               for name in sources):
            return True
    return False


def bytecode_cache_env(env: Dict[str, str],
                       folders: Sequence[Tuple[str, str]] = HEAVY_FOLDERS) -> None:
    """Where bytecode writing is off (``PYTHONDONTWRITEBYTECODE``, as container images
    often set) and the heavy modules have no bytecode beside them, let the children
    cache it under ``$MII_HOME/compile/bytecode`` instead.

    Otherwise every start compiles the source of each module it imports again: on the
    H200 image (2026-12-02) that was 10.8 s of a replica's 28 s to ready, transformers
    and torch's sympy and dynamo mostly, on every ``serve()``. The packages' own
    folders stay untouched, which is what the setting is for. Where the bytecode is
    there (pip writes it at install), nothing changes: with a prefix Python would read
    only the prefix's copies and compile every module once more. A prefix of the
    user's own wins; ``MII_BYTECODE_CACHE=0`` keeps bytecode writing off."""
    if (not env.get("PYTHONDONTWRITEBYTECODE") or env.get("PYTHONPYCACHEPREFIX")
            or env.get("MII_BYTECODE_CACHE") == "0" or not bytecode_missing(folders)):
        return
    env.pop("PYTHONDONTWRITEBYTECODE")
    env["PYTHONPYCACHEPREFIX"] = str(mii_home() / "compile" / "bytecode")


def replica_spec(record: DeploymentRecord, record_file: str, replica: ReplicaRecord) -> ChildSpec:
    """The command starting every rank of ``replica`` (here, or over ssh on its hosts)."""
    config = record.mii_config
    tp = config.model_conf.tensor_parallel
    env = _base_env(record_file)
    compile_cache_env(env)
    env["MII_THREADS_PER_RANK"] = str(threads_per_rank(tp * len(record.replicas)))
    env["OMP_NUM_THREADS"] = env["MII_THREADS_PER_RANK"]
    # The tokenizer's rayon pool off unless the user says otherwise: a lone long prompt is
    # encoded in pieces on the encoder's own threads (runtime/encode.py), and with the
    # pool on, a burst of 64 long prompts reached its first tokens ~2x later on the H200
    # machine (66 against 32-47 ms p50). Said explicitly, a process that forks later (a
    # compiler's subprocess) is not warned about a pool that was used.
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if replica.gpu_indices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in replica.gpu_indices)
    target = ["-m", REPLICA_MODULE, record_file, str(replica.index)]
    if not all(is_local(host) for host in replica_hosts(replica, tp)):
        return ChildSpec(f"replica-{replica.index}", [
            sys.executable, "-m", REMOTE_MODULE, "launch",
            *deepspeed_multinode_command(record, record_file, replica)], env)
    if tp == 1:
        return ChildSpec(f"replica-{replica.index}", [sys.executable, *target], env)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(tp), "--master_addr", "127.0.0.1",
            "--master_port", str(replica.dist_port), "--max_restarts", "0",
            "--monitor_interval", "0.5", *target]
    return ChildSpec(f"replica-{replica.index}", argv, env)


def replica_hosts(replica: ReplicaRecord, tensor_parallel: int) -> Dict[str, List[int]]:
    """Host -> slot ids of every rank of ``replica``, in rank order."""
    return dict(replica.hosts) or {
        replica.hostname: list(replica.gpu_indices) or list(range(tensor_parallel))}


def deepspeed_multinode_command(record: DeploymentRecord, record_file: str,
                                replica: ReplicaRecord) -> List[str]:
    """The DeepSpeed launcher command for a replica with ranks on other hosts.

    ``remote_main launch`` runs it on the head. The launcher reaches each host over
    pdsh/ssh and runs ``deepspeed.launcher.launch`` there, which starts that host's ranks
    as ``remote_main rank``. The record file, the model and this interpreter must be at
    the same paths on every host. ``--force_multi``: a replica on one remote host is
    still launched there (without it, an ``--include`` that leaves a single host is
    started on this machine). ``--master_addr``: rank 0's host, by the name the hostfile
    gives it (else the launcher asks it over ssh for ``hostname -I``).
    """
    config = record.mii_config
    if not os.path.isfile(config.hostfile):
        raise ValueError(f"replica {replica.index} is placed on {replica.hostname}, another "
                         f"host, but the hostfile {config.hostfile!r} the DeepSpeed launcher "
                         f"reaches it with does not exist")
    hosts = replica_hosts(replica, config.model_conf.tensor_parallel)
    include = "@".join(f"{host}:{','.join(str(s) for s in slots)}"
                       for host, slots in hosts.items())
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", config.hostfile,
            "--include", include, "--master_addr", next(iter(hosts)),
            "--master_port", str(replica.dist_port), "--force_multi", "--no_local_rank",
            "--module", REMOTE_MODULE, "rank", record_file, str(replica.index),
            socket.gethostname()]


def load_balancer_spec(record_file: str) -> ChildSpec:
    """The command starting the load balancer."""
    return ChildSpec("load-balancer", [sys.executable, "-m", LB_MODULE, record_file],
                     _base_env(record_file))


def gateway_spec(record_file: str) -> ChildSpec:
    """The command starting the REST gateway (``enable_restful_api``)."""
    return ChildSpec("rest-gateway", [sys.executable, "-m", GATEWAY_MODULE, record_file],
                     _base_env(record_file))


def wait_until_listening(host: str, port: int, proc: subprocess.Popen, timeout: float,
                         should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Wait until ``host:port`` accepts connections; False if ``proc`` exited, the wait was
    stopped or ``timeout`` passed (the caller's watch loop then reports the child)."""
    address = dial_host(host)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not should_stop():
        try:
            with socket.create_connection((address, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False
