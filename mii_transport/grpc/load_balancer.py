"""The load balancer: the client-facing server that forwards each call to one replica.

The scheduler plugin picks among replicas that pass their health check. Picking
happens without awaiting, so on the single event loop the order of picks is the
order of arrival (exact round-robin even under concurrent clients). Cancellation
and deadlines propagate because the forwarded call runs inside the handler.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Callable, Dict, List, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mii_core.errors import DeploymentUnavailable, MIIError
from mii_core.plugins.interfaces import Scheduler
from mii_transport.grpc import status
from mii_transport.grpc.auth import auth_metadata
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc
from mii_transport.grpc.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 0.25
STARTUP_HEALTH_INTERVAL_S = 0.05  # poll faster until every replica answered once


class Replica:
    """Connection and health of one replica as the load balancer sees it."""

    def __init__(self, index: int, address: str) -> None:
        self.index = index
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = mii_pb2_grpc.MIIServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.healthy = False
        self.ever_healthy = False
        self.routed = 0

    async def check(self) -> bool:
        """Refresh ``healthy`` from the replica's health service."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != self.healthy:
            log.info("replica %d at %s is %s", self.index, self.address,
                     "healthy" if healthy else "unhealthy")
        self.healthy = healthy
        self.ever_healthy |= healthy
        return healthy


class LoadBalancerServicer(mii_pb2_grpc.MIIServiceServicer):
    """MIIService that forwards to replicas chosen by a scheduler."""

    def __init__(self, addresses: List[str], scheduler: Scheduler, describe: Dict,
                 on_terminate: Callable[[], None], token: Optional[str] = None) -> None:
        self.metadata = auth_metadata(token)  # replicas check the same token
        self.replicas = [Replica(i, a) for i, a in enumerate(addresses)]
        self.scheduler = scheduler
        self.describe = describe
        self.on_terminate = on_terminate

    @property
    def serving(self) -> bool:
        """SERVING once every replica answered once, and while any replica is healthy."""
        return (all(r.ever_healthy for r in self.replicas)
                and any(r.healthy for r in self.replicas))

    async def watch_health(self, stop: asyncio.Event) -> None:
        """Poll every replica's health until ``stop``."""
        while not stop.is_set():
            await asyncio.gather(*(r.check() for r in self.replicas))
            try:
                started = all(r.ever_healthy for r in self.replicas)
                await asyncio.wait_for(stop.wait(), HEALTH_INTERVAL_S if started
                                       else STARTUP_HEALTH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    def _pick(self) -> Replica:
        candidates = [r.index for r in self.replicas if r.healthy]
        if not candidates:
            raise DeploymentUnavailable("no replica of the deployment is healthy right now")
        chosen = self.replicas[self.scheduler.pick(candidates)]
        chosen.routed += 1
        self.scheduler.started(chosen.index)
        return chosen

    async def _fail(self, context, replica: Optional[Replica], error: Exception) -> None:
        if isinstance(error, grpc.aio.AioRpcError):
            if error.code() == grpc.StatusCode.UNAVAILABLE and replica is not None:
                replica.healthy = False
                error = DeploymentUnavailable(
                    f"replica {replica.index} was lost while serving the request; retry")
            else:
                error = status.from_rpc_error(error)
        await status.abort(context, error)

    async def Generate(self, request, context):
        replica = None
        try:
            replica = self._pick()
            return await replica.stub.Generate(request, timeout=context.time_remaining(),
                                              metadata=self.metadata)
        except (MIIError, grpc.aio.AioRpcError) as error:
            await self._fail(context, replica, error)
        finally:
            if replica is not None:
                self.scheduler.finished(replica.index)

    async def GenerateStream(self, request, context):
        replica = call = None
        try:
            replica = self._pick()
            call = replica.stub.GenerateStream(request, metadata=self.metadata,
                                               timeout=context.time_remaining())
            async for reply in call:
                yield reply
        except (MIIError, grpc.aio.AioRpcError) as error:
            await self._fail(context, replica, error)
        finally:
            if call is not None:
                call.cancel()  # the client left: stop the replica's generation now
            if replica is not None:
                self.scheduler.finished(replica.index)

    async def Info(self, request, context):
        replicas = []
        for replica in self.replicas:
            entry = {"index": replica.index, "address": replica.address,
                     "healthy": replica.healthy, "routed": replica.routed}
            try:
                reply = await replica.stub.Info(mii_pb2.InfoRequest(), timeout=2.0,
                                                metadata=self.metadata)
                entry.update(json.loads(reply.json))
            except grpc.aio.AioRpcError as error:
                entry["error"] = error.details() or str(error.code())
            replicas.append(entry)
        info = dict(self.describe, role="load_balancer", pid=os.getpid(), replicas=replicas)
        return mii_pb2.InfoReply(json=json.dumps(info))

    async def Terminate(self, request, context):
        asyncio.get_running_loop().call_later(0.05, self.on_terminate)
        return mii_pb2.TerminateReply(accepted=True)

    async def close(self) -> None:
        """Close replica channels."""
        await asyncio.gather(*(r.channel.close() for r in self.replicas))
