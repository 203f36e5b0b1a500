"""The ``grpc`` transport plugin: replica servers, the load balancer and client connections."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, List, Optional

from mii_core.config.kwargs import request_limits
from mii_core.config.models import MIIConfig
from mii_core.plugins.interfaces import GenerationService, Scheduler
from mii_transport.grpc.client import GrpcConnection, is_serving
from mii_transport.grpc.load_balancer import LoadBalancerServicer
from mii_transport.grpc.server import ReplicaServicer, run_server

log = logging.getLogger(__name__)


def describe(config: MIIConfig, **fields) -> dict:
    """What Info reports of the deployment, with ``fields``: its names and its request
    limits (a client that knows the deployment only by address checks them too)."""
    return {"deployment": config.deployment_name, "model": config.model_conf.model_name_or_path,
            "engine": config.model_conf.engine, "limits": request_limits(config), **fields}


class GrpcTransport:
    """gRPC (grpc.aio) with the standard grpc.health.v1 service."""

    name = "grpc"

    def serve_replica(self, service: GenerationService, config: MIIConfig, replica: int,
                      port: int, on_terminate: Callable[[], None],
                      host: str = "127.0.0.1") -> None:
        """Serve one replica on ``host``:``port`` until SIGTERM (blocks)."""
        async def main() -> None:
            stop = asyncio.Event()
            servicer = ReplicaServicer(service, replica,
                                       describe(config, role="replica", replica=replica),
                                       on_terminate)
            try:
                await run_server(servicer, f"{host}:{port}", stop,
                                 on_started=lambda: log.info("[progress] replica %d serving on "
                                                             "port %d", replica, port),
                                 token=config.auth_token, limits=config)
            finally:
                servicer.close()

        asyncio.run(main())

    def serve_load_balancer(self, config: MIIConfig, replica_addresses: List[str],
                            scheduler: Scheduler, on_terminate: Callable[[], None]) -> None:
        """Serve the deployment's client-facing port until SIGTERM (blocks)."""
        async def main() -> None:
            stop = asyncio.Event()
            servicer = LoadBalancerServicer(replica_addresses, scheduler,
                                            describe(config, scheduler=config.scheduler),
                                            on_terminate, token=config.auth_token)
            watcher = asyncio.create_task(servicer.watch_health(stop))
            try:
                await run_server(servicer, f"{config.host}:{config.port_number}", stop,
                                 serving=lambda: servicer.serving, token=config.auth_token,
                                 tls=(config.tls_cert_file, config.tls_key_file)
                                 if config.tls_cert_file else None, limits=config)
            finally:
                stop.set()
                await watcher
                await servicer.close()

        asyncio.run(main())

    def is_serving(self, address: str, timeout: float,
                   tls_root_cert: Optional[str] = None) -> bool:
        """Health check of ``host:port`` (over TLS when a root certificate is given)."""
        return is_serving(address, timeout, tls_root_cert=tls_root_cert)

    def connect(self, host: str, port: int, token: Optional[str] = None,
                tls_root_cert: Optional[str] = None) -> GrpcConnection:
        """A client connection (sending ``token`` with every call if given)."""
        return GrpcConnection(host, port, token, tls_root_cert)
