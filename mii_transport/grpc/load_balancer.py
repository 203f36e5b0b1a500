"""The gRPC load balancer: the client-facing server that forwards each call to a replica.

Which replica serves a call is the router's decision (``mii_core.routing.router``);
this module probes the replicas' gRPC health services for it and forwards the calls.
The calls to replicas are ``forwarding``'s (grpc's synchronous client API: grpc.aio leaks
on every cancelled call, grpc/grpc#43360). Deadlines propagate (each forwarded call gets
the time its client has left), and so does cancellation: a handler whose client left is
cancelled by grpc, which cancels the forwarded call it awaits, and the CancelledError is
let through (a handler that returned would make grpc send a status on a cancelled call,
another leaked batch). A forwarded call the router abandons (its replica stopped
answering) is cancelled here, and one whose replica was lost or stopped answering is
sent again where ``Router.retry`` says, or fails with the error it raises.
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Callable, Dict, List, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mii_core.errors import MIIError
from mii_core.plugins.interfaces import Scheduler
from mii_core.routing.router import RoutedCall, Router
from mii_transport.grpc import status
from mii_transport.grpc.auth import auth_metadata
from mii_transport.grpc.forwarding import ForwardedStream, ForwardedUnary, UpstreamCancelled
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc
from mii_transport.grpc.server import CHANNEL_OPTIONS

# The router probes a replica every 0.05 s until it first answers, but a channel whose
# connects were refused (the replica still loading) retries only when its reconnect
# backoff ends, up to CHANNEL_OPTIONS' 0.5 s: a replica that starts listening was seen
# 0.36 s later (median of 8, max 0.52 s). With a 0.1 s cap: 0.06 s. Also after a restart.
REPLICA_CHANNEL_OPTIONS = [(key, value) for key, value in CHANNEL_OPTIONS
                           if key != "grpc.max_reconnect_backoff_ms"]
REPLICA_CHANNEL_OPTIONS.append(("grpc.max_reconnect_backoff_ms", 100))


class ReplicaChannel:
    """The gRPC channel and stubs of one replica."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=REPLICA_CHANNEL_OPTIONS)
        self.stub = mii_pb2_grpc.MIIServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def probe(self, timeout: float) -> Optional[bool]:
        """Whether the replica's health service answers SERVING within ``timeout``; None
        if it does not answer at all (frozen, hung, not listening)."""
        try:
            reply = await ForwardedUnary(self.health.Check, health_pb2.HealthCheckRequest(),
                                         timeout).reply()
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                return None
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        """Close the channel (calls still on it are cancelled)."""
        self.channel.close()


class LoadBalancerServicer(mii_pb2_grpc.MIIServiceServicer):
    """MIIService that forwards to the replica the router picks."""

    def __init__(self, addresses: List[str], scheduler: Scheduler, describe: Dict,
                 on_terminate: Callable[[], None], token: Optional[str] = None) -> None:
        self.metadata = auth_metadata(token)  # replicas check the same token
        self.router = Router(addresses, scheduler)
        self.channels = [ReplicaChannel(a) for a in addresses]
        self.describe = describe
        self.on_terminate = on_terminate

    @property
    def serving(self) -> bool:
        """What the health service reports (see ``Router.serving``)."""
        return self.router.serving

    async def watch_health(self, stop: asyncio.Event) -> None:
        """Probe every replica's health until ``stop``."""
        while not stop.is_set():
            timeout = self.router.probe_timeout
            answers = await asyncio.gather(*(c.probe(timeout) for c in self.channels))
            for index, serving in enumerate(answers):
                if serving is None:
                    self.router.unanswered(index)
                else:
                    self.router.set_health(index, serving)
            try:
                await asyncio.wait_for(stop.wait(), self.router.health_interval())
            except asyncio.TimeoutError:
                pass

    def _retry_or_raise(self, call: RoutedCall, error: Exception, delivered: bool) -> None:
        """The forwarded call ended with ``error``: if its replica was lost (UNAVAILABLE) or
        stopped answering (the router abandoned it, cancelling it), ``call`` is moved to
        another replica (``Router.retry``, which raises when that is not safe); otherwise
        re-raise. (A handler whose own client left gets CancelledError instead, which is
        never caught: its call is not retried.)"""
        if isinstance(error, UpstreamCancelled):
            if not call.abandoned:
                raise error
        elif isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE:
            self.router.lost(call.replica)
        else:
            raise error
        self.router.retry(call, delivered)

    async def Generate(self, request, context):
        call = None
        try:
            call = self.router.route()
            while True:
                forwarded: ForwardedUnary[mii_pb2.GenerateReply] = ForwardedUnary(
                    self.channels[call.replica.index].stub.Generate, request,
                    context.time_remaining(), self.metadata)
                call.on_abandon = forwarded.cancel
                try:
                    return await forwarded.reply()
                except (UpstreamCancelled, grpc.RpcError) as error:
                    self._retry_or_raise(call, error, False)
        except (MIIError, grpc.RpcError) as error:
            await _fail(context, error)
        finally:
            if call is not None:
                self.router.done(call)

    async def GenerateStream(self, request, context):
        call = forwarded = None
        delivered = False
        try:
            call = self.router.route()
            while True:
                forwarded: ForwardedStream[mii_pb2.GenerateReply] = ForwardedStream(
                    self.channels[call.replica.index].stub.GenerateStream, request,
                    context.time_remaining(), self.metadata)
                call.on_abandon = forwarded.cancel
                try:
                    async for reply in forwarded:
                        delivered = True
                        await _write(context, reply)
                    return
                except (UpstreamCancelled, grpc.RpcError) as error:
                    self._retry_or_raise(call, error, delivered)
        except (MIIError, grpc.RpcError) as error:
            await _fail(context, error)
        finally:
            # The client left (the handler was cancelled, or a write to it failed): stop
            # the replica's generation now. A no-op on a call that ended.
            if forwarded is not None:
                forwarded.cancel()
            if call is not None:
                self.router.done(call)

    async def Info(self, request, context):
        async def describe(entry: Dict, channel: ReplicaChannel) -> Dict:
            try:
                reply = await ForwardedUnary(channel.stub.Info, mii_pb2.InfoRequest(), 2.0,
                                             self.metadata).reply()
                entry.update(json.loads(reply.json))
            except grpc.RpcError as error:
                entry["error"] = error.details() or str(error.code())
            return entry

        # All at once: a frozen replica costs the whole answer its 2 s timeout once,
        # not once per frozen replica.
        replicas = await asyncio.gather(*(describe(entry, channel) for entry, channel
                                          in zip(self.router.describe(), self.channels)))
        info = dict(self.describe, role="load_balancer", pid=os.getpid(),
                    replicas=list(replicas))
        return mii_pb2.InfoReply(json=json.dumps(info))

    async def Terminate(self, request, context):
        asyncio.get_running_loop().call_later(0.05, self.on_terminate)
        return mii_pb2.TerminateReply(accepted=True)

    async def close(self) -> None:
        """Close replica channels (calls still on them are cancelled)."""
        for channel in self.channels:
            channel.close()


def _consume(write: asyncio.Future) -> None:
    """Look at a finished write's outcome (no "exception never retrieved" warning for a
    write that failed because the client had left)."""
    if not write.cancelled():
        write.exception()


async def _write(context: grpc.aio.ServicerContext, reply: mii_pb2.GenerateReply) -> None:
    """Send ``reply`` to the client in a task of its own, which a cancel of the handler
    (its client left) does not interrupt: grpc.aio frees a write's batch only when the
    task awaiting it sees it complete (grpc/grpc#43360). A write on a call its client
    already cancelled fails and leaks all the same (~300 B), so the loop is given one
    turn first: a cancel grpc has already seen then lands here, before the write
    (abandoned streams whose last write leaked, bench/lb_memory.py: 41 % as an async
    generator, 24 % with the task, 15 % with the turn too)."""
    await asyncio.sleep(0)
    write = asyncio.ensure_future(context.write(reply))
    write.add_done_callback(_consume)
    await asyncio.shield(write)


async def _fail(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, grpc.RpcError):
        error = status.from_rpc_error(error)
    await status.abort(context, error)

