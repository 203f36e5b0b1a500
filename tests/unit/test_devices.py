"""Replica placement on hosts and GPUs, including two hosts from a hostfile."""
import socket

import pytest

from mii_core.deploy.devices import Placement, allocate, read_hostfile


def test_auto_fills_gpus_in_order():
    assert allocate({"localhost": 4}, 2, 2) == [Placement("localhost", [0, 1]),
                                                Placement("localhost", [2, 3])]


def test_auto_spreads_over_two_hosts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-1 slots=2\nworker-2 slots=2\n")
    pool = read_hostfile(str(hostfile))
    assert pool == {"worker-1": 2, "worker-2": 2}
    assert allocate(pool, 2, 2) == [Placement("worker-1", [0, 1]), Placement("worker-2", [0, 1])]
    assert allocate(pool, 1, 3) == [Placement("worker-1", [0]), Placement("worker-1", [1]),
                                    Placement("worker-2", [0])]


def test_explicit_map_over_two_hosts():
    pool = {"a": 4, "b": 4}
    placements = allocate(pool, 2, 3, {"a": [[0, 1], [2, 3]], "b": [[1, 2]]})
    assert placements[-1] == Placement("b", [1, 2])


def test_cpu_only_places_every_replica_on_cpu():
    assert allocate({"localhost": 0}, 2, 2) == [Placement("localhost", []), Placement("localhost", [])]


@pytest.mark.parametrize("pool, tp, replicas, device_map, match", [
    ({"localhost": 2}, 2, 2, "auto", r"needs 4 GPUs but only 2"),
    ({"localhost": 4}, 2, 2, {"localhost": [[0, 1]]}, "places 1 replicas but replica_num is 2"),
    ({"localhost": 4}, 2, 2, {"localhost": [[0, 1], [1, 2]]}, "GPU 1 is given to replicas 0 and 1"),
    ({"localhost": 2}, 2, 1, {"localhost": [[0, 5]]}, "names GPU 5 but localhost has 2 GPUs"),
    ({"a": 2}, 1, 1, {"z": [[0]]}, "host 'z'"),
    ({"localhost": 4}, 2, 1, {"localhost": [[0]]}, "has 1 devices but tensor_parallel is 2"),
    ({"localhost": 0}, 1, 1, {"localhost": [[0]]}, "no GPU is visible"),
])
def test_bad_placements_are_precise_value_errors(pool, tp, replicas, device_map, match):
    with pytest.raises(ValueError, match=match):
        allocate(pool, tp, replicas, device_map)


def test_bad_hostfile_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 gpus=2\n")
    with pytest.raises(ValueError, match="line 1"):
        read_hostfile(str(hostfile))
    assert read_hostfile(str(tmp_path / "missing")) is None


def test_remote_replica_is_started_by_the_deepspeed_launcher_with_the_hostfile(tmp_path):
    from mii_core.config.models import MIIConfig
    from mii_core.control.launcher import replica_spec
    from mii_core.deploy.registry import DeploymentRecord, ReplicaRecord

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=2\nworker-2 slots=2\n")
    config = MIIConfig(model_config={"model_name_or_path": "m", "tensor_parallel": 2},
                       hostfile=str(hostfile))
    record = DeploymentRecord(
        name="multi", config=config.model_dump(by_alias=True, mode="json"), host="127.0.0.1",
        port=1, log_path="/dev/null",
        replicas=[ReplicaRecord(index=0, hostname="worker-2", port=2, dist_port=29500,
                                gpu_indices=[0, 1])])
    spec = replica_spec(record, "/shared/record.json", record.replicas[0])
    assert spec.argv[1:4] == ["-m", "mii_core.control.remote_main", "launch"]
    assert spec.argv[5:13] == ["-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--include", "worker-2:0,1", "--master_addr", "worker-2"]
    # one remote host: still a multi-node launch (else DeepSpeed would start it here)
    assert "--force_multi" in spec.argv
    assert spec.argv[-5:] == ["mii_core.control.remote_main", "rank", "/shared/record.json",
                              "0", socket.gethostname()]
    local = record.replicas[0].model_copy(update={"hostname": "localhost"})
    assert "torch.distributed.run" in replica_spec(record, "/r.json", local).argv
    # A replica spanning hosts: every host in --include, rank 0's host is the master.
    spanning = record.replicas[0].model_copy(update={
        "hostname": "worker-1", "hosts": {"worker-1": [1], "worker-2": [0]}})
    argv = replica_spec(record, "/r.json", spanning).argv
    assert argv[argv.index("--include") + 1] == "worker-1:1@worker-2:0"
    assert argv[argv.index("--master_addr") + 1] == "worker-1"
    # A partly local one goes through the launcher too.
    mixed = spanning.model_copy(update={"hosts": {"localhost": [0], "worker-2": [0]}})
    assert "deepspeed.launcher.runner" in replica_spec(record, "/r.json", mixed).argv
    missing = config.model_copy(update={"hostfile": str(tmp_path / "none")})
    gone = record.model_copy(update={"config": missing.model_dump(by_alias=True, mode="json")})
    with pytest.raises(ValueError, match="hostfile .* does not exist"):
        replica_spec(gone, "/r.json", record.replicas[0])


def test_a_replica_wider_than_every_host_spans_hosts_in_hostfile_order():
    assert allocate({"a": 1, "b": 1}, 2, 1) == [Placement("a", [0], {"a": [0], "b": [0]})]
    assert allocate({"a": 3, "b": 3}, 4, 1) == [Placement("a", [0, 1, 2], {"a": [0, 1, 2],
                                                                          "b": [0]})]
    assert allocate({"a": 2, "b": 2, "c": 2, "d": 2}, 4, 2) == [
        Placement("a", [0, 1], {"a": [0, 1], "b": [0, 1]}),
        Placement("c", [0, 1], {"c": [0, 1], "d": [0, 1]})]
    # one host that fits keeps MII's rule (no spanning), and too few slots stay an error
    assert allocate({"a": 2, "b": 1}, 2, 1) == [Placement("a", [0, 1])]
    with pytest.raises(ValueError, match="needs 4 GPUs but only 2"):
        allocate({"a": 1, "b": 1}, 2, 2)
    with pytest.raises(ValueError, match="not 'localhost'"):
        allocate({"localhost": 1, "b": 1}, 2, 1)


def test_hostfile_slots_are_cpu_processes_on_a_machine_without_gpus(tmp_path, monkeypatch):
    from mii_core.deploy import devices

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")
    monkeypatch.setattr(devices, "count_local_gpus", lambda: 0)
    assert devices.place(str(hostfile), 1, 2, {"host-a": [[0]], "host-b": [[0]]}) == [
        Placement("host-a", [], {"host-a": [0]}), Placement("host-b", [], {"host-b": [0]})]
    assert devices.place(str(hostfile), 2, 1) == [
        Placement("host-a", [], {"host-a": [0], "host-b": [0]})]
    with pytest.raises(ValueError, match="names GPU 1 but host-b has 1"):
        devices.place(str(hostfile), 1, 1, {"host-b": [[1]]})
    monkeypatch.setattr(devices, "count_local_gpus", lambda: 2)
    assert devices.place(str(hostfile), 1, 1, {"host-b": [[0]]}) == [Placement("host-b", [0])]
    assert devices.place(str(tmp_path / "none"), 1, 2) == [Placement("localhost", [0]),
                                                           Placement("localhost", [1])]


def test_replicas_keep_their_compile_caches_under_mii_home(tmp_path, monkeypatch):
    from mii_core.control.launcher import compile_cache_env

    monkeypatch.setenv("MII_HOME", str(tmp_path))
    env = {}
    compile_cache_env(env)
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile" / "inductor"),
                   "TRITON_CACHE_DIR": str(tmp_path / "compile" / "triton")}
    own = {"TRITON_CACHE_DIR": "/mine"}
    compile_cache_env(own)
    assert own["TRITON_CACHE_DIR"] == "/mine"  # the user's setting wins


def test_one_address_rule_for_every_role():
    """A hostfile naming this machine by its hostname: the replica binds the loopback and
    the load balancer dials the loopback (it used to dial the hostname)."""
    import socket

    from mii_core.deploy.addresses import (dial_host, gateway_bind_host, is_local,
                                           replica_bind_host, replica_dial_host)

    me = socket.gethostname()
    for name in ("", "localhost", "127.0.0.1", me):
        assert is_local(name)
        assert replica_bind_host(name) == replica_dial_host(name) == "127.0.0.1"
    assert not is_local("worker-2")
    assert (replica_bind_host("worker-2"), replica_dial_host("worker-2")) == ("0.0.0.0",
                                                                             "worker-2")
    assert [dial_host(h) for h in ("0.0.0.0", "", "::", "10.0.0.5")] == [
        "127.0.0.1", "127.0.0.1", "::1", "10.0.0.5"]
    assert gateway_bind_host("localhost") == "127.0.0.1" and gateway_bind_host("::") == "::"


def test_on_another_host_its_own_name_is_not_the_heads(monkeypatch):
    """A rank on worker-2 (remote_main sets MII_HEAD_HOST): worker-2 is not the head, so
    the replica there binds every interface; the loopback names still mean the head."""
    import socket

    from mii_core.deploy.addresses import HEAD_HOST_ENV, is_local, replica_bind_host

    monkeypatch.setattr(socket, "gethostname", lambda: "worker-2")
    assert is_local("worker-2")
    monkeypatch.setenv(HEAD_HOST_ENV, "head-1")
    assert not is_local("worker-2") and replica_bind_host("worker-2") == "0.0.0.0"
    assert is_local("head-1") and is_local("localhost")


def test_children_cache_bytecode_under_mii_home_where_writing_it_is_off(tmp_path, monkeypatch):
    import py_compile
    import subprocess
    import sys

    from mii_core.control.launcher import bytecode_cache_env

    monkeypatch.setenv("MII_HOME", str(tmp_path))
    prefix = tmp_path / "compile" / "bytecode"
    package = tmp_path / "src" / "mii_heavy_probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    folders = [("mii_heavy_probe", ""), ("not_installed_anywhere", "core")]
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/bin"}
    bytecode_cache_env(env, folders)
    assert env == {"PYTHONPYCACHEPREFIX": str(prefix), "PATH": "/bin"}
    for kept in ({}, {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/mine"},
                 {"PYTHONDONTWRITEBYTECODE": "1", "MII_BYTECODE_CACHE": "0"}):
        before = dict(kept)
        bytecode_cache_env(kept, folders)
        assert kept == before  # writing on already, the user's prefix, or the opt-out
    # A child started with that environment writes its bytecode there, not beside the source.
    child = dict(env, PYTHONPATH=str(tmp_path / "src"))
    subprocess.run([sys.executable, "-c", "import mii_heavy_probe.layers"], env=child, check=True)
    assert list(prefix.rglob("layers*.pyc"))
    assert not (package / "__pycache__").exists()
    # Bytecode beside the sources (pip writes it at install): nothing changes, since with
    # a prefix every module would be compiled once more.
    for name in ("__init__.py", "layers.py"):
        py_compile.compile(str(package / name), doraise=True)
    unchanged = {"PYTHONDONTWRITEBYTECODE": "1"}
    bytecode_cache_env(unchanged, folders)
    assert unchanged == {"PYTHONDONTWRITEBYTECODE": "1"}
