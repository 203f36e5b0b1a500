"""``serve()`` and ``client()``: start a persistent deployment, reconnect to one by name.

``serve`` validates everything it can in the caller (keys, values, model path,
heads vs tensor_parallel, devices, ports, name clashes, the TLS certificate against the
address it dials), writes the registry record, starts the supervisor in a new session
and returns once the deployment answers its health check. On failure it raises with
the reason and the tail of the deployment log and leaves no process behind; a reason
the supervisor could not write down (a full disk) comes through a pipe.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

from mii_core.api.client import MIIClient
from mii_core.config.kwargs import REQUEST_LIMITS, parse_serve_kwargs
from mii_core.config.models import MIIConfig, check_deployment_name, default_deployment_name
from mii_core.deploy import devices, home, logs, registry, tls
from mii_core.deploy.addresses import parse_address
from mii_core.deploy.model_source import (check_model_limits, check_tensor_parallel,
                                         check_tokenizer, model_dir_config)
from mii_core.deploy.ports import free_port, free_ports, is_port_free, require_free
from mii_core.deploy.registry import DeploymentRecord, ReplicaRecord
from mii_core.errors import (
    ConfigError,
    DeploymentExistsError,
    DeploymentNotFoundError,
    DeploymentStartupError,
    DistributedLaunchError,
    MIIError,
)
from mii_core.plugins.discovery import (
    driver_hooks,
    hooks,
    load_driver,
    resolve_engine_name,
)

SUPERVISOR_MODULE = registry.SUPERVISOR_MODULE
SUPERVISOR_COMMAND = (sys.executable, "-m", SUPERVISOR_MODULE)
"""How ``launch`` starts the supervisor; it appends the record file and ``--status-fd N``."""


def _progress(message: str) -> None:
    if os.environ.get("MII_QUIET", "0") in ("0", ""):
        print(f"[mii] {message}", file=sys.stderr, flush=True)


def _refuse_inside_distributed_launch() -> None:
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        raise DistributedLaunchError(
            "mii.serve() was called in a process started by a distributed launcher (RANK/"
            "LOCAL_RANK are set): every rank would start its own deployment. Run the script "
            "with plain `python`; serve() launches the tensor-parallel ranks itself.")


def prepare(mii_config: MIIConfig) -> MIIConfig:
    """Run plugin hooks and every check that needs no new process; returns the config to serve."""
    hooks().mii_adjust_config(mii_config=mii_config)
    model = mii_config.model_conf
    model.engine = resolve_engine_name(model)
    engine = load_driver("engine", model.engine)()
    scheduler = load_driver("scheduler", mii_config.scheduler)(model.replica_num)
    load_driver("transport", mii_config.transport)
    model_json = model_dir_config(model)
    check_tensor_parallel(model_json, model.tensor_parallel)
    check_model_limits(model_json, model)
    check_tokenizer(model)
    for field in ("tls_cert_file", "tls_key_file"):
        path = getattr(mii_config, field)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{field}: {path} does not exist")
    if mii_config.tls_cert_file:
        problem = tls.certificate_problem(
            mii_config.tls_cert_file, mii_config.tls_key_file,
            tls.dialed_hosts(mii_config.host, mii_config.enable_restful_api))
        if problem:
            raise ConfigError(problem)
    # The chosen engine's and scheduler's own hooks vote, as plugins' hooks do.
    with driver_hooks(engine, "engine"), driver_hooks(scheduler, "scheduler"):
        try:
            hooks().mii_validate_config(mii_config=mii_config)
        except MIIError:
            raise
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return mii_config


def _placements(mii_config: MIIConfig) -> List[devices.Placement]:
    model = mii_config.model_conf
    if model.replica_configs:
        return [devices.Placement(r.hostname or "localhost", list(r.gpu_indices))
                for r in model.replica_configs]
    try:
        return devices.place(mii_config.hostfile, model.tensor_parallel, model.replica_num,
                             model.device_map)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _ports(mii_config: MIIConfig) -> tuple[int, List[int], List[int]]:
    """Client-facing port, replica ports and torch.distributed ports, all checked free."""
    model = mii_config.model_conf
    port = mii_config.port_number
    if "port_number" in mii_config.model_fields_set:
        require_free(port, "port_number", mii_config.host)
    elif not is_port_free(port, mii_config.host):
        busy, port = port, free_port(mii_config.host)
        _progress(f"default port {busy} is busy; using port {port}")
    count = model.replica_num
    given = model.replica_configs
    replica_ports = [r.tensor_parallel_ports[0] for r in given if r.tensor_parallel_ports]
    if len(replica_ports) != count:
        replica_ports = [p for p in free_ports(count + 1) if p != port][:count]
    for index, replica_port in enumerate(replica_ports):
        require_free(replica_port, f"replica {index}")
    dist_ports = []
    explicit = "torch_dist_port" in model.model_fields_set
    for index in range(count):
        wanted = (given[index].torch_dist_port if given and given[index].torch_dist_port
                  else model.torch_dist_port + 100 * index)
        if model.tensor_parallel == 1:
            dist_ports.append(wanted)  # unused: a single rank needs no rendezvous
        elif is_port_free(wanted):
            dist_ports.append(wanted)
        elif explicit:
            require_free(wanted, f"torch_dist_port of replica {index}")
        else:
            dist_ports.append(free_port())
    return port, replica_ports, dist_ports


def serve(model_name_or_path: str = "", model_config: Optional[Mapping] = None,
          mii_config: Optional[Mapping] = None, **kwargs: Any) -> MIIClient:
    """Start a persistent deployment of a Hugging Face causal LM and return its client.

    Accepts every ``ModelConfig`` / ``MIIConfig`` field as a keyword or inside the
    ``model_config`` / ``mii_config`` dicts, as DeepSpeed-MII does.
    """
    _refuse_inside_distributed_launch()
    config = prepare(parse_serve_kwargs(model_name_or_path, model_config, mii_config, **kwargs))
    return launch(config, plan(config))


def plan(config: MIIConfig) -> DeploymentRecord:
    """The record of a new deployment of ``config``: placements and ports chosen (and
    ``config.port_number`` set to the port picked); DeploymentExistsError if one of that
    name runs."""
    name = config.deployment_name
    live = registry.find_live(name)
    if live is not None:
        raise DeploymentExistsError(f"deployment {name!r} is already running on port {live.port} "
                                    f"(supervisor pid {live.supervisor_pid}); use "
                                    f"mii.client({name!r}) or terminate it first")
    placements = _placements(config)
    port, replica_ports, dist_ports = _ports(config)
    if config.enable_restful_api:
        require_free(config.restful_api_port, "restful_api_port")
    config.port_number = port
    return DeploymentRecord(
        name=name, config=config.model_dump(by_alias=True, mode="json"), host=config.host,
        port=port, log_path=str(registry.log_path(name)), engine=config.model_conf.engine,
        created_at=time.time(), replicas=[
            ReplicaRecord(index=i, hostname=p.hostname, port=replica_ports[i],
                          dist_port=dist_ports[i], gpu_indices=p.gpu_indices, hosts=p.hosts)
            for i, p in enumerate(placements)])


def launch(config: MIIConfig, record: DeploymentRecord,
           supervisor: tuple = SUPERVISOR_COMMAND) -> MIIClient:
    """Write ``record`` and its log, start ``supervisor`` on them in a new session and
    return the client once the deployment answers; DeploymentStartupError (naming the
    file, the errno and the space left) if a file cannot be written."""
    name = record.name
    # The log first: a link or another user's file planted there is refused before anything
    # is written (home.open_private), and its descriptor is what every process writes to.
    try:
        log_fd = home.open_private(record.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as error:
        raise DeploymentStartupError(f"deployment {name!r}: cannot open its log: "
                                     f"{home.refusal(record.log_path, error)}") from None
    status_read, status_write = os.pipe()
    try:
        try:
            record_file = registry.save(record)
        except OSError as error:
            raise DeploymentStartupError(
                f"deployment {name!r}: cannot write its registry record: "
                f"{home.describe_os_error(error, registry.record_path(name))}") from None
        _progress(f"starting deployment {name!r} ({config.model_conf.engine} engine, "
                  f"{len(record.replicas)} replica(s) x tensor_parallel="
                  f"{config.model_conf.tensor_parallel}) on port {record.port}; log: "
                  f"{record.log_path}")
        follower = logs.ProgressFollower(record.log_path)
        proc = subprocess.Popen([*supervisor, str(record_file), "--status-fd", str(status_write)],
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                pass_fds=(status_write,), start_new_session=True)
    except BaseException:
        os.close(status_read)
        registry.remove(name)
        raise
    finally:
        os.close(log_fd)
        os.close(status_write)  # the supervisor holds the only write end now
    try:
        _wait_until_serving(config, record, proc, follower, status_read)
    except BaseException:
        _abort(proc, name)
        raise
    finally:
        os.close(status_read)
    return MIIClient(config, host=config.host)


def _wait_until_serving(config: MIIConfig, record: DeploymentRecord, proc: subprocess.Popen,
                        follower: logs.ProgressFollower, status_fd: int) -> None:
    transport = load_driver("transport", config.transport)()
    address = f"{config.host}:{record.port}"
    started = time.time()
    deadline = started + config.startup_timeout
    delay = 0.02
    while True:
        for line in follower.new_lines():
            _progress(line)
        # Ready means the supervisor has seen it too: until then it treats a child's
        # death as a failed start-up rather than restarting it.
        current = registry.load(record.name)
        if current is not None and current.state == "ready" and transport.is_serving(
                address, timeout=0.5, tls_root_cert=config.tls_cert_file):
            _progress(f"deployment {record.name!r} ready in {time.time() - started:.1f}s")
            return
        code = proc.poll()
        if code is not None:
            failed = registry.load(record.name)
            why = (_read_status(status_fd) or (failed.error if failed else "")
                   or f"supervisor exited with {code}")
            raise DeploymentStartupError(
                f"deployment {record.name!r} failed to start: {why}\n"
                f"--- last lines of {record.log_path} ---\n{logs.tail(record.log_path)}")
        if time.time() > deadline:
            raise DeploymentStartupError(
                f"deployment {record.name!r} did not answer within startup_timeout="
                f"{config.startup_timeout}s\n--- last lines of {record.log_path} ---\n"
                f"{logs.tail(record.log_path)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)  # a poll costs ~0.2 ms CPU; a long one delays the return


def _read_status(fd: int) -> str:
    """What the supervisor, now gone, wrote to its status pipe: why its start-up failed,
    when it could not write that into the record (``supervisor.StatusPipe``)."""
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # empty, yet still open: a process it left holds the pipe
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def _abort(proc: subprocess.Popen, name: str) -> None:
    """Stop a deployment whose start failed or was interrupted; the supervisor cleans up."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    registry.remove(name)


def client(model_or_deployment_name: str, host: Optional[str] = None,
           port: Optional[int] = None, token: Optional[str] = None,
           tls_root_cert: Optional[str] = None) -> MIIClient:
    """Connect to a running deployment by deployment name, model name/path, or ``host:port``
    (a target with ':' is an address, unless it is the path of a model directory)."""
    target = model_or_deployment_name
    try:
        address = None if port is not None or os.path.exists(target) else parse_address(target)
    except ValueError as error:
        raise DeploymentNotFoundError(str(error)) from None
    if address is not None:
        return _remote_client(*address, token, tls_root_cert)
    if port is not None:
        return _remote_client(host or "localhost", port, token, tls_root_cert)
    names = [target] + ([default_deployment_name(target)]
                        if default_deployment_name(target) != target else [])
    for name in names:
        record = registry.find_live(name)
        if record is not None:
            return MIIClient(record.mii_config, host=host or record.host, port=record.port,
                             token=token)
    for name in names:
        problem = registry.read_problem(registry.record_path(name))
        if problem:
            raise DeploymentNotFoundError(f"the registry record of {name!r} is unreadable "
                                          f"({problem}); delete {registry.record_path(name)}")
    running = [r.name for r in registry.list_records() if registry.supervisor_alive(r)]
    raise DeploymentNotFoundError(
        f"no running deployment named {' or '.join(repr(n) for n in names)}; running: "
        f"{', '.join(running) or 'none'}. Start one with mii.serve(...)")


def _remote_client(host: str, port: int, token: Optional[str],
                   tls_root_cert: Optional[str]) -> MIIClient:
    """A client for a deployment known only by address; its config comes from Info."""
    probe = MIIClient(MIIConfig(model_config={"model_name_or_path": "remote"}), host, port,
                      token=token, tls_root_cert=tls_root_cert)
    info: Dict[str, Any] = probe.info()
    limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
    name = info.get("deployment", "")
    try:  # a server of an older mii may carry a name the rule now refuses
        check_deployment_name(name)
    except ValueError:
        name = "remote"
    config = MIIConfig(deployment_name=name, port_number=port,
                       scheduler=info.get("scheduler", "round_robin"),
                       model_config={"model_name_or_path": info.get("model", "remote"),
                                     "engine": info.get("engine", "auto")},
                       # the servers' request limits, so that this client checks the same
                       **{k: limits[k] for k in REQUEST_LIMITS if isinstance(limits.get(k), int)})
    return MIIClient(config, host, port, token=token, tls_root_cert=tls_root_cert)
