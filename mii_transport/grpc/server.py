"""The gRPC server of a replica (rank 0): decode request -> GenerationService -> encode reply.

The servicer is thin on purpose: batching and caching live in the engine.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import AsyncIterator, Callable, Dict, List, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mii_core.config.kwargs import check_prompts
from mii_core.constants import GRPC_MAX_MSG_SIZE
from mii_core.errors import MIIError, PortInUseError, ServerError
from mii_core.plugins.interfaces import GenerationService, TokenEvent
from mii_transport.grpc import codec, status
from mii_transport.grpc.auth import TokenInterceptor
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
    ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE),
    # Without this a second server could silently share a busy port.
    ("grpc.so_reuseport", 0),
    # Let callers ping as often as CHANNEL_OPTIONS does (by default 2 pings within 5
    # minutes without data get the connection closed with "too_many_pings").
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]
# Peers that are still starting refuse connections; grpc's default reconnect backoff
# (1 s, growing) would then delay noticing them by seconds.
CHANNEL_OPTIONS = SERVER_OPTIONS[:2] + [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    # While calls are in flight, ping every 3 s and give up on a peer that has not
    # answered in 5 s: a call to a host whose link went down fails UNAVAILABLE instead
    # of waiting for TCP to give up (minutes). Pings are answered by grpc's own threads,
    # so a busy peer answers them too.
    ("grpc.keepalive_time_ms", 3000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
]


class ReplicaServicer(mii_pb2_grpc.MIIServiceServicer):
    """MIIService on one replica."""

    def __init__(self, service: GenerationService, replica: int, describe: Dict,
                 on_terminate: Callable[[], None]) -> None:
        self.service = service
        self.replica = replica
        self.describe = describe
        self.on_terminate = on_terminate

    async def _events(self, request: mii_pb2.GenerateRequest,
                      stream: bool) -> AsyncIterator[TokenEvent]:
        params = codec.params_from_proto(request.params)
        if stream != params.stream:
            params = params.model_copy(update={"stream": stream})
        prompts = check_prompts(list(request.prompts))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = self.service.submit(prompts, params,
                                     lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        remaining = len(prompts)
        try:
            while remaining:
                event = await queue.get()
                if event.finish_reason:
                    remaining -= 1
                if event.error is not None:
                    raise ServerError(f"prompt {event.index} failed: {event.error}")
                yield event
        finally:
            if remaining:  # the client went away or the call failed: free the batch slots
                handle.cancel()

    async def Generate(self, request, context):
        try:
            texts: Dict[int, List[str]] = {}
            final: Dict[int, TokenEvent] = {}
            async for event in self._events(request, stream=False):
                texts.setdefault(event.index, []).append(event.text)
                if event.finish_reason:
                    final[event.index] = event
            return mii_pb2.GenerateReply(replica=self.replica, completions=[
                _completion(final[i], "".join(texts[i])) for i in sorted(final)])
        except MIIError as error:
            await status.abort(context, error)

    async def GenerateStream(self, request, context):
        try:
            async for event in self._events(request, stream=True):
                yield mii_pb2.GenerateReply(replica=self.replica,
                                            completions=[_completion(event, event.text)])
        except MIIError as error:
            await status.abort(context, error)

    async def Info(self, request, context):
        info = dict(self.describe, stats=self.service.stats().to_dict(), pid=os.getpid())
        return mii_pb2.InfoReply(json=json.dumps(info))

    async def Terminate(self, request, context):
        asyncio.get_running_loop().call_later(0.05, self.on_terminate)
        return mii_pb2.TerminateReply(accepted=True)


def _completion(event: TokenEvent, text: str) -> mii_pb2.Completion:
    return mii_pb2.Completion(
        index=event.index, text=text, finish_reason=event.finish_reason or "",
        prompt_tokens=event.prompt_length, generated_tokens=event.token_count,
        time_to_first_token_s=event.time_to_first_token_s or 0.0,
        total_time_s=event.total_time_s or 0.0)


async def run_server(servicer: mii_pb2_grpc.MIIServiceServicer, address: str,
                     stop: asyncio.Event, on_started: Callable[[], None] = lambda: None,
                     serving: Callable[[], bool] = lambda: True,
                     token: Optional[str] = None,
                     tls: Optional[tuple[str, str]] = None) -> None:
    """Serve ``servicer`` plus grpc.health.v1 on ``address`` until ``stop`` is set.

    With ``token`` every call but the health check must carry it; ``tls`` is a
    (certificate file, key file) pair. SIGTERM and SIGINT set ``stop``; shutdown reports NOT_SERVING first, then gives
    in-flight calls a short grace period. Health is SERVING while ``serving()``.
    """
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    mii_pb2_grpc.add_MIIServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if tls:
            cert, key = (open(path, "rb").read() for path in tls)
            credentials = grpc.ssl_server_credentials([(key, cert)])
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise PortInUseError(f"cannot listen on {address}: the port is in use")
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_started()
    current = None
    while not stop.is_set():
        wanted = (health_pb2.HealthCheckResponse.SERVING if serving()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if wanted != current:
            await health_servicer.set("", wanted)
            current = wanted
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.1)
        except asyncio.TimeoutError:
            pass
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)

