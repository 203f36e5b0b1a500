"""Placing replicas on hosts and devices, checked before any process starts.

A resource pool maps host -> device slots (GPUs). Without GPUs, tensor-parallel
ranks are CPU processes and any count is allowed. Multi-node placement reads a
DeepSpeed-style hostfile (``host slots=N`` per line); when the machine that serves has
no GPU, the hostfile's slots are CPU processes (as for DeepSpeed's CPU accelerator).
A replica whose ``tensor_parallel`` exceeds every host's slots spans hosts (see
``allocate``); docs/multi-host.md describes running across machines.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Union

from mii_core.config.models import DEVICE_MAP_DEFAULT
from mii_core.deploy.addresses import LOOPBACK_NAMES, is_local

DeviceMap = Union[str, Dict[str, List[List[int]]]]


@dataclass(frozen=True)
class Placement:
    """Host and device ids of one replica (empty ``gpu_indices`` means CPU).

    ``hosts``: every host of the replica with the hostfile slots its ranks use, in rank
    order; set when the replica spans hosts or runs on CPU slots of a hostfile, empty
    otherwise (then it is ``{hostname: gpu_indices}``). ``hostname`` is rank 0's host.
    """

    hostname: str
    gpu_indices: List[int]
    hosts: Dict[str, List[int]] = field(default_factory=dict)


def count_local_gpus() -> int:
    """Visible NVIDIA GPUs, without importing torch (serve() validates before spawning)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return len(list(gpus.iterdir()))
    # Sandboxed runtimes may hide /proc/driver; ask the driver's tool instead.
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                     timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return 0


def read_hostfile(path: str) -> Optional[Dict[str, int]]:
    """Parse a DeepSpeed hostfile into {host: slots}; None if the file does not exist."""
    if not path or not os.path.isfile(path):
        return None
    pool: Dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            key, value = parts[1].split("=")
            assert key == "slots" and len(parts) == 2
            slots = int(value)
        except (AssertionError, IndexError, ValueError):
            raise ValueError(f"hostfile {path} line {number}: expected 'hostname slots=N', "
                             f"got {raw!r}") from None
        if parts[0] in pool:
            raise ValueError(f"hostfile {path} line {number}: host {parts[0]} listed twice")
        pool[parts[0]] = slots
    if not pool:
        raise ValueError(f"hostfile {path} lists no hosts")
    return pool


def local_pool(gpu_count: int) -> Dict[str, int]:
    """The resource pool of this machine alone."""
    return {"localhost": gpu_count}


def place(hostfile: str, tensor_parallel: int, replica_num: int,
          device_map: DeviceMap = DEVICE_MAP_DEFAULT) -> List[Placement]:
    """The placements ``serve()`` uses: over the hostfile's hosts if it exists, else over
    this machine's GPUs. Without a GPU here, the hostfile's slots are CPU processes."""
    gpus = count_local_gpus()
    pool = read_hostfile(hostfile)
    if pool is None:
        return allocate(local_pool(gpus), tensor_parallel, replica_num, device_map)
    return allocate(pool, tensor_parallel, replica_num, device_map, cpu=gpus == 0)


def allocate(pool: Dict[str, int], tensor_parallel: int, replica_num: int,
             device_map: DeviceMap = DEVICE_MAP_DEFAULT, cpu: bool = False) -> List[Placement]:
    """One placement per replica, or a ValueError saying precisely what does not fit.

    With no GPU anywhere in ``pool`` every replica runs on CPU of the first host. With
    ``cpu`` the pool's slots are CPU processes: placed as GPUs would be, with the slots
    in ``hosts`` and no ``gpu_indices``. ``"auto"`` fills each host in order (MII's rule);
    if ``tensor_parallel`` exceeds every host's slots, each replica takes the slots of
    consecutive hosts instead (its ranks then talk over the network).
    """
    if cpu:
        return [replace(p, gpu_indices=[],
                        hosts=p.hosts or ({p.hostname: p.gpu_indices} if p.gpu_indices else {}))
                for p in allocate(pool, tensor_parallel, replica_num, device_map)]
    if sum(pool.values()) == 0:
        if device_map != DEVICE_MAP_DEFAULT:
            raise ValueError(f"device_map {device_map!r} names GPU ids but no GPU is visible")
        host = next(iter(pool))
        return [Placement(host, []) for _ in range(replica_num)]
    if device_map == DEVICE_MAP_DEFAULT:
        needed = tensor_parallel * replica_num
        if tensor_parallel > max(pool.values()) and sum(pool.values()) >= needed:
            return _spanning(pool, tensor_parallel, replica_num)
        capacity = sum(slots // tensor_parallel for slots in pool.values()) * tensor_parallel
        if capacity < needed:
            raise ValueError(
                f"replica_num ({replica_num}) x tensor_parallel ({tensor_parallel}) needs "
                f"{needed} GPUs but only {sum(pool.values())} are available "
                f"({', '.join(f'{h}: {n}' for h, n in pool.items())})")
        placements: List[Placement] = []
        for host, slots in pool.items():
            for start in range(0, slots - tensor_parallel + 1, tensor_parallel):
                if len(placements) < replica_num:
                    placements.append(Placement(host, list(range(start, start + tensor_parallel))))
        return placements
    return _explicit(pool, tensor_parallel, replica_num, device_map)


def _spanning(pool: Dict[str, int], tensor_parallel: int,
              replica_num: int) -> List[Placement]:
    """Replicas over consecutive hosts' slots, in hostfile order (the order the DeepSpeed
    launcher numbers ranks in), when no host has ``tensor_parallel`` slots."""
    slots = [(host, slot) for host, count in pool.items() for slot in range(count)]
    placements = []
    for start in range(0, replica_num * tensor_parallel, tensor_parallel):
        hosts: Dict[str, List[int]] = {}
        for host, slot in slots[start:start + tensor_parallel]:
            hosts.setdefault(host, []).append(slot)
        loopback = [h for h in hosts if h in LOOPBACK_NAMES]
        if loopback:
            raise ValueError(f"a replica spanning hosts {', '.join(hosts)} needs each host "
                             f"by a name the others resolve, not {loopback[0]!r}; name this "
                             f"machine in the hostfile by its hostname or address")
        first = next(iter(hosts))
        placements.append(Placement(first, hosts[first], hosts))
    return placements


def _explicit(pool: Dict[str, int], tensor_parallel: int, replica_num: int,
              device_map: Dict[str, List[List[int]]]) -> List[Placement]:
    mapped = sum(len(groups) for groups in device_map.values())
    if mapped != replica_num:
        raise ValueError(f"device_map places {mapped} replicas but replica_num is "
                         f"{replica_num}; give exactly one device list per replica")
    placements = []
    for host, groups in device_map.items():
        slots = _slots_of(pool, host)
        used: Dict[int, int] = {}
        for replica, ids in enumerate(groups):
            if len(ids) != tensor_parallel:
                raise ValueError(f"device_map[{host!r}][{replica}] has {len(ids)} devices but "
                                 f"tensor_parallel is {tensor_parallel}")
            for gpu in ids:
                if not 0 <= gpu < slots:
                    raise ValueError(f"device_map[{host!r}][{replica}] names GPU {gpu} but "
                                     f"{host} has {slots} GPUs (ids 0..{slots - 1})")
                if gpu in used:
                    raise ValueError(f"device_map[{host!r}]: GPU {gpu} is given to replicas "
                                     f"{used[gpu]} and {replica}; device sets must not overlap")
                used[gpu] = replica
            placements.append(Placement(host, list(ids)))
    return placements


def _slots_of(pool: Dict[str, int], host: str) -> int:
    if host in pool:
        return pool[host]
    if is_local(host):
        for name in pool:
            if is_local(name):
                return pool[name]
    raise ValueError(f"device_map names host {host!r}, which is not among the known hosts "
                     f"({', '.join(pool)}); add it to the hostfile")
