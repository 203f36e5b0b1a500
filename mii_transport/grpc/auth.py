"""Optional shared-token authentication for every mii RPC except the health check.

Clients send ``authorization: Bearer <token>`` metadata; servers (load balancer and
replicas alike, since replica ports are reachable locally) refuse calls without
it with UNAUTHENTICATED before the servicer runs.
"""
from __future__ import annotations

import hmac
from typing import Optional, Tuple

import grpc

from mii_transport.grpc.status import ERROR_KEY

HEADER = "authorization"
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def auth_metadata(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is none)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


def token_matches(expected: str, header: Optional[str]) -> bool:
    """Constant-time comparison of an ``authorization`` header with the expected token."""
    return header is not None and hmac.compare_digest(header.encode(),
                                                      f"Bearer {expected}".encode())


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls whose metadata lacks the deployment's token."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        header = dict(details.invocation_metadata or ()).get(HEADER)
        if token_matches(self.token, header):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: pass the deployment's auth_token",
                                trailing_metadata=((ERROR_KEY, "AuthenticationError"),))

        async def deny_stream(request, context):
            await deny(request, context)
            yield  # pragma: no cover - abort raises first

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
