"""Entry point of one rank of a replica: ``python -m mii_core.control.replica_main RECORD REPLICA``.

Started directly for tensor_parallel=1 and by a launcher (torchrun) for larger
groups, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_PORT. Rank 0 serves the
transport and runs the batching loop; the other ranks follow its step plans.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from mii_core.control import lifecycle
from mii_core.deploy import logs
from mii_core.deploy.addresses import replica_bind_host
from mii_core.deploy.registry import DeploymentRecord, load_file
from mii_core.plugins.discovery import hooks, load_driver, register_driver
from mii_core.plugins.interfaces import RankInfo
from mii_engines.runtime import service

log = logging.getLogger(__name__)


def rank_info(record: DeploymentRecord, replica: int) -> RankInfo:
    """This process's place in its replica, from the launcher's environment."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    placement = record.replicas[replica]
    # The supervisor narrowed CUDA_VISIBLE_DEVICES to this replica's GPUs.
    device = f"cuda:{local_rank}" if placement.gpu_indices else "cpu"
    return RankInfo(replica=replica, rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    local_rank=local_rank, device=device, dist_port=placement.dist_port,
                    master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"))


def _limit_threads() -> None:
    import torch

    threads = int(os.environ.get("MII_THREADS_PER_RANK", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Load the engine, then serve (rank 0) or follow (other ranks) until shutdown."""
    args = sys.argv[1:] if argv is None else argv
    record_file, replica = args[0], int(args[1])
    record = load_file(record_file)
    if record is None:
        print(f"cannot read deployment record {record_file}", file=sys.stderr)
        return 2
    rank = rank_info(record, replica)
    logs.configure(f"replica-{replica}/rank-{rank.rank}")
    lifecycle.exit_with_supervisor()
    _limit_threads()
    config = record.mii_config
    engine = load_driver("engine", config.model_conf.engine)()
    register_driver(engine, "engine")
    log.info("engine %s (rank %d of %d, device %s)", engine.name, rank.rank, rank.world_size,
             rank.device)
    if rank.world_size > 1:
        engine.setup_distributed(rank)
    started = time.time()
    loaded = engine.load(config.model_conf, rank)
    hooks().mii_engine_loaded(model_config=config.model_conf, loaded=loaded, rank=rank)
    log.info("[progress] replica %d rank %d ready in %.1fs: %s", replica, rank.rank,
             time.time() - started, loaded.description)
    if rank.rank == 0:
        serve(record, replica, loaded, rank)
    else:
        service.follow(loaded, config.model_conf, rank)
    log.info("rank %d exits", rank.rank)
    return 0


def serve(record: DeploymentRecord, replica: int, loaded, rank: RankInfo) -> None:
    """Rank 0: run the batching loop in a thread and the transport in this one."""
    config = record.mii_config
    generator = service.build_service(
        loaded, config.model_conf, rank, config.max_queue_size,
        on_started=lambda info: hooks().mii_request_started(request=info),
        on_finished=lambda info, outcome: hooks().mii_request_finished(request=info,
                                                                       outcome=outcome))

    def run_loop() -> None:
        try:
            generator.run()
        except Exception:  # logged by the generator; stop serving so we get restarted
            os.kill(os.getpid(), signal.SIGTERM)

    loop = threading.Thread(target=run_loop, name="engine-loop", daemon=True)
    loop.start()
    transport = load_driver("transport", config.transport)()
    try:
        placement = record.replicas[replica]
        # A replica on another host must accept the load balancer's connections.
        transport.serve_replica(generator, config, replica, placement.port,
                                lifecycle.request_deployment_shutdown,
                                host=replica_bind_host(placement.hostname))
    finally:
        generator.stop()
        loop.join(timeout=30)
    if generator.failed is not None:
        raise SystemExit(f"engine loop failed: {generator.failed!r}")


if __name__ == "__main__":
    sys.exit(main())
