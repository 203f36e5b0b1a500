"""Every error mii raises, each saying what went wrong and what to do next.

Errors that cross the wire carry their class name in gRPC trailing metadata so
that the client raises the same class (see ``mii_transport.grpc.status``).
"""
from __future__ import annotations


class MIIError(Exception):
    """Base class of all mii errors."""


class UnknownArgument(MIIError, ValueError):
    """A keyword argument matches no configuration field."""


class ConfigError(MIIError, ValueError):
    """A configuration value is invalid; the message names the field."""


class InvalidGenerateParams(MIIError, ValueError):
    """A generate parameter or prompt is invalid; the message names the field."""


class DeploymentNotFoundError(MIIError):
    """No running deployment has that name (or the recorded one has died)."""


class DeploymentExistsError(MIIError):
    """A live deployment with that name already exists."""


class PortInUseError(MIIError, OSError):
    """A port that the deployment needs is already bound."""


class DeploymentStartupError(MIIError, RuntimeError):
    """The deployment failed to start; the message includes the log tail."""


class DeploymentUnavailable(MIIError, ConnectionError):
    """The deployment is not reachable, shutting down, or lost the replica."""


class ServerOverloaded(MIIError):
    """The server's queue is full; retry later."""


class RequestCancelled(MIIError):
    """The request was cancelled before it finished."""


class DeadlineExceeded(MIIError, TimeoutError):
    """The request did not finish before its deadline."""


class AuthenticationError(MIIError, PermissionError):
    """The call carried no valid token for this deployment."""


class ServerError(MIIError, RuntimeError):
    """The server failed while handling the request; the message is the server's."""


class PluginError(MIIError):
    """A plugin could not be found or loaded; the message names it."""


class DistributedLaunchError(MIIError, RuntimeError):
    """serve() was called inside a distributed launch (RANK/WORLD_SIZE set)."""


ERROR_CLASSES: dict[str, type[MIIError]] = {
    cls.__name__: cls
    for cls in (
        UnknownArgument, ConfigError, InvalidGenerateParams, DeploymentNotFoundError,
        DeploymentExistsError, PortInUseError, DeploymentStartupError,
        DeploymentUnavailable, ServerOverloaded, RequestCancelled, DeadlineExceeded,
        AuthenticationError, ServerError, PluginError, DistributedLaunchError,
    )
}
