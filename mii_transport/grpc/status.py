"""Mapping mii errors to gRPC status codes and back, so clients raise typed exceptions."""
from __future__ import annotations

from typing import Optional

import grpc

from mii_core import errors

ERROR_KEY = "mii-error"
_CODES = {
    errors.InvalidGenerateParams: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ServerOverloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeploymentUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RequestCancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
}
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidGenerateParams,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ServerOverloaded,
    grpc.StatusCode.UNAVAILABLE: errors.DeploymentUnavailable,
    grpc.StatusCode.CANCELLED: errors.RequestCancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
}


def code_for(error: BaseException) -> grpc.StatusCode:
    """The status code that represents ``error`` (INTERNAL for anything unexpected)."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def describe(error: BaseException) -> str:
    """The message sent to the client: the error's own text, or its type if it has none."""
    return str(error) or type(error).__name__


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the RPC with ``error``'s code, message and class name."""
    name = type(error).__name__ if isinstance(error, errors.MIIError) else "ServerError"
    message = describe(error)
    if name == "ServerError" and not isinstance(error, errors.MIIError):
        message = f"{type(error).__name__}: {message}"
    await context.abort(code_for(error), message, trailing_metadata=((ERROR_KEY, name),))


def from_rpc_error(error: grpc.RpcError, where: str = "") -> errors.MIIError:
    """The mii exception that a failed RPC stands for."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    name: Optional[str] = None
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == ERROR_KEY:
            name = value
    cls = errors.ERROR_CLASSES.get(name or "") or _BY_CODE.get(code, errors.ServerError)
    if code == grpc.StatusCode.UNAVAILABLE and name is None:
        details = f"deployment at {where} is not reachable ({details})" if where else details
    return cls(details)
