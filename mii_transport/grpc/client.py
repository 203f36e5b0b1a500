"""Client side of the gRPC transport: sync calls, streaming iterators and asyncio variants.

Every failed RPC is re-raised as the matching ``mii.errors`` exception.
"""
from __future__ import annotations

import asyncio
import atexit
import json
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mii_core.api.response import Response
from mii_core.config.models import GenerateParamsConfig
from mii_transport.grpc import codec, status
from mii_transport.grpc.auth import auth_metadata
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc
from mii_transport.grpc.server import CHANNEL_OPTIONS


class GrpcConnection:
    """A connection to a deployment (load balancer) or a single replica."""

    def __init__(self, host: str, port: int, token: Optional[str] = None,
                 tls_root_cert: Optional[str] = None) -> None:
        self.address = f"{host}:{port}"
        self._metadata = auth_metadata(token)
        self._credentials = _credentials(tls_root_cert)
        self._channel = _channel(self.address, self._credentials)
        # Closing at exit avoids grpc's occasional hang in interpreter shutdown.
        atexit.register(self._channel.close)
        self._stub = mii_pb2_grpc.MIIServiceStub(self._channel)
        self._aio: Dict[int, Any] = {}  # one aio channel per event loop

    def _raise(self, error: grpc.RpcError):
        raise status.from_rpc_error(error, self.address) from None

    def generate(self, prompts: List[str], params: GenerateParamsConfig,
                 timeout: Optional[float] = None) -> List[Response]:
        """Unary generate."""
        try:
            reply = self._stub.Generate(codec.request_to_proto(prompts, params), timeout=timeout,
                                        metadata=self._metadata)
        except grpc.RpcError as error:
            self._raise(error)
        return codec.responses_from_reply(reply)

    def stream(self, prompts: List[str], params: GenerateParamsConfig,
               timeout: Optional[float] = None) -> Iterator[Response]:
        """Streaming generate: incremental Responses (``.index`` says which prompt)."""
        call = self._stub.GenerateStream(codec.request_to_proto(prompts, params), timeout=timeout,
                                         metadata=self._metadata)
        try:
            for reply in call:
                for completion in reply.completions:
                    yield codec.completion_to_response(completion, reply.replica)
        except grpc.RpcError as error:
            self._raise(error)
        finally:
            call.cancel()  # no-op when finished; frees the server's slot if abandoned

    def _aio_stub(self) -> mii_pb2_grpc.MIIServiceStub:
        loop = asyncio.get_running_loop()
        key = id(loop)
        if key not in self._aio:
            channel = _channel(self.address, self._credentials, aio=True)
            self._aio[key] = (loop, channel, mii_pb2_grpc.MIIServiceStub(channel))
        return self._aio[key][2]

    async def agenerate(self, prompts: List[str], params: GenerateParamsConfig,
                        timeout: Optional[float] = None) -> List[Response]:
        """Unary generate for asyncio code."""
        try:
            reply = await self._aio_stub().Generate(codec.request_to_proto(prompts, params),
                                                    timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            self._raise(error)
        return codec.responses_from_reply(reply)

    async def astream(self, prompts: List[str], params: GenerateParamsConfig,
                      timeout: Optional[float] = None) -> AsyncIterator[Response]:
        """Streaming generate for asyncio code."""
        call = self._aio_stub().GenerateStream(codec.request_to_proto(prompts, params),
                                               timeout=timeout, metadata=self._metadata)
        try:
            async for reply in call:
                for completion in reply.completions:
                    yield codec.completion_to_response(completion, reply.replica)
        except grpc.RpcError as error:
            self._raise(error)
        finally:
            call.cancel()

    def info(self, timeout: float = 10.0) -> Dict[str, Any]:
        """The server's Info reply as a dict."""
        try:
            return json.loads(self._stub.Info(mii_pb2.InfoRequest(), timeout=timeout,
                                              metadata=self._metadata).json)
        except grpc.RpcError as error:
            self._raise(error)

    def terminate(self, timeout: float = 10.0) -> None:
        """Ask the deployment to stop."""
        try:
            self._stub.Terminate(mii_pb2.TerminateRequest(), timeout=timeout,
                                 metadata=self._metadata)
        except grpc.RpcError as error:
            self._raise(error)

    def is_serving(self, timeout: float = 1.0) -> bool:
        """True if the health service answers SERVING within ``timeout``."""
        return is_serving(self.address, timeout, channel=self._channel)

    def close(self) -> None:
        """Close channels (aio channels of other loops are dropped)."""
        atexit.unregister(self._channel.close)
        self._channel.close()
        self._aio.clear()


def _credentials(tls_root_cert: Optional[str]) -> Optional[grpc.ChannelCredentials]:
    if not tls_root_cert:
        return None
    with open(tls_root_cert, "rb") as handle:
        return grpc.ssl_channel_credentials(root_certificates=handle.read())


def _channel(address: str, credentials: Optional[grpc.ChannelCredentials], aio: bool = False):
    module = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(address, options=CHANNEL_OPTIONS)
    return module.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def is_serving(address: str, timeout: float = 1.0, channel: Optional[grpc.Channel] = None,
               tls_root_cert: Optional[str] = None) -> bool:
    """Health-check ``address`` (grpc.health.v1, overall service)."""
    own = channel is None
    channel = channel or _channel(address, _credentials(tls_root_cert))
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        if own:
            channel.close()
