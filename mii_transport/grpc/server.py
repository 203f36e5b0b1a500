"""The gRPC server of a replica (rank 0): decode request -> GenerationService -> encode reply,
and ``run_server``, which serves it and the load balancer alike.

The servicer is thin on purpose: batching and caching live in the engine. What both
servers refuse before a servicer runs (a body that does not decode, a request beyond
the deployment's limits) is ``RequestGate``'s; a request's bytes are bounded before
that by the gRPC message limit ``receive_limit`` derives from the same limits.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import os
import signal
from typing import AsyncIterator, Callable, Dict, List, Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mii_core.config.kwargs import check_prompt_count, check_prompts
from mii_core.config.models import GenerateParamsConfig, MIIConfig
from mii_core.constants import GRPC_MAX_MSG_SIZE
from mii_core.errors import InvalidGenerateParams, MIIError, PortInUseError, ServerError
from mii_core.plugins.interfaces import GenerationService, RequestHandle, TokenEvent
from mii_transport.grpc import codec, status
from mii_transport.grpc.auth import TokenInterceptor
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc

_COMMON_OPTIONS = [
    # Without this a second server could silently share a busy port.
    ("grpc.so_reuseport", 0),
    # Let callers ping as often as CHANNEL_OPTIONS does (by default 2 pings within 5
    # minutes without data get the connection closed with "too_many_pings").
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]
# What a request may hold besides its prompts' text: field tags and lengths (at most 6
# bytes a prompt) and the generate parameters, stop strings included.
FRAMING_PER_PROMPT = 16
PARAMS_ALLOWANCE = 2 ** 20


def receive_limit(limits: Optional[MIIConfig]) -> int:
    """The largest message a server accepts: the biggest request ``limits`` allow
    (grpc refuses a larger one RESOURCE_EXHAUSTED before anything decodes it)."""
    if limits is None:
        return GRPC_MAX_MSG_SIZE
    return (limits.max_request_bytes + FRAMING_PER_PROMPT * limits.max_prompts_per_request
            + PARAMS_ALLOWANCE)


def server_options(limits: Optional[MIIConfig] = None) -> list:
    """grpc server options: replies up to GRPC_MAX_MSG_SIZE, requests up to ``receive_limit``."""
    return [("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
            ("grpc.max_receive_message_length", receive_limit(limits))] + _COMMON_OPTIONS


# Peers that are still starting refuse connections; grpc's default reconnect backoff
# (1 s, growing) would then delay noticing them by seconds.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MSG_SIZE),
    ("grpc.max_receive_message_length", GRPC_MAX_MSG_SIZE),
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


SERVICE = mii_pb2.DESCRIPTOR.services_by_name["MIIService"].full_name


class RequestGate(grpc.aio.ServerInterceptor):
    """Decodes every MIIService request itself and checks a GenerateRequest's prompts
    (``check_prompts`` against ``limits``) before the servicer runs.

    grpc's own decoding answers a body that is not the method's message with UNKNOWN
    ("Unexpected DecodeError"); here it is INVALID_ARGUMENT, saying so. The load
    balancer refuses an oversized request itself instead of shipping it to a replica.
    """

    def __init__(self, limits: Optional[MIIConfig]) -> None:
        self.limits = limits

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        return _gated(handler, details.method, self._check)

    def _check(self, request) -> None:
        if isinstance(request, mii_pb2.GenerateRequest):
            if self.limits is not None:  # before list(): the count bounds what it copies
                check_prompt_count(len(request.prompts), self.limits)
            check_prompts(list(request.prompts), self.limits)


def _gated(handler: grpc.RpcMethodHandler, method: str,
           check: Callable[[object], None]) -> grpc.RpcMethodHandler:
    """``handler`` receiving raw bytes, decoding and checking them first."""
    decode = handler.request_deserializer

    async def admitted(raw: bytes, context):
        try:
            request = decode(raw)
        except DecodeError as error:
            await status.abort(context, InvalidGenerateParams(
                f"the request to {method} could not be decoded as its protobuf message "
                f"({error})"))
        try:
            check(request)
        except MIIError as error:
            await status.abort(context, error)
        return request

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(raw, context):
            return await behavior(await admitted(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream
        if inspect.isasyncgenfunction(streaming):
            async def stream(raw, context):
                async for reply in streaming(await admitted(raw, context), context):
                    yield reply
        else:  # a handler that writes its replies with context.write
            async def stream(raw, context):
                return await streaming(await admitted(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)
    return handler  # MIIService has no client-streaming methods


# Threads that tokenize submitted requests (GenerationService.submit): off the event loop,
# so that health checks and other calls are answered meanwhile; a few, so that one long
# prompt does not hold up every other request's tokenization.
INTAKE_THREADS = 4


def _cancel_when_submitted(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


class ReplicaServicer(mii_pb2_grpc.MIIServiceServicer):
    """MIIService on one replica (served by ``run_server``, whose gate has checked the
    prompts); ``close()`` when the server has stopped."""

    def __init__(self, service: GenerationService, replica: int, describe: Dict,
                 on_terminate: Callable[[], None]) -> None:
        self.service = service
        self.replica = replica
        self.describe = describe
        self.on_terminate = on_terminate
        self._intake = concurrent.futures.ThreadPoolExecutor(INTAKE_THREADS,
                                                             thread_name_prefix="intake")

    async def _submit(self, prompts: List[str], params: GenerateParamsConfig,
                      sink: Callable[[TokenEvent], None]) -> RequestHandle:
        """``service.submit`` (which tokenizes) on an intake thread. A caller that leaves
        meanwhile leaves nothing behind: a request that was queued anyway is cancelled."""
        future = self._intake.submit(self.service.submit, prompts, params, sink)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_cancel_when_submitted)  # at once if it is done
            raise

    async def _events(self, request: mii_pb2.GenerateRequest,
                      stream: bool) -> AsyncIterator[TokenEvent]:
        params = codec.params_from_proto(request.params)
        if stream != params.stream:
            params = params.model_copy(update={"stream": stream})
        prompts = list(request.prompts)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = await self._submit(prompts, params, lambda event: loop.call_soon_threadsafe(
            queue.put_nowait, event))
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

    def close(self) -> None:
        """Stop the intake threads (tokenizations not yet started are dropped)."""
        self._intake.shutdown(wait=False, cancel_futures=True)


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
                     tls: Optional[tuple[str, str]] = None,
                     limits: Optional[MIIConfig] = None) -> None:
    """Serve ``servicer`` plus grpc.health.v1 on ``address`` until ``stop`` is set.

    With ``token`` every call but the health check must carry it; ``tls`` is a
    (certificate file, key file) pair; ``limits`` (the deployment's MIIConfig) bound
    the requests accepted (``receive_limit``, ``RequestGate``). SIGTERM and SIGINT set
    ``stop``; shutdown reports NOT_SERVING first, then gives in-flight calls a short
    grace period. Health is SERVING while ``serving()``.
    """
    # The token is checked first: a caller without it gets nothing decoded.
    interceptors = ([TokenInterceptor(token)] if token else []) + [RequestGate(limits)]
    server = grpc.aio.server(options=server_options(limits), interceptors=interceptors)
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

