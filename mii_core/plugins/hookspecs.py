"""Every extension point of mii, in one place.

Plugins implement these with ``@mii.hookimpl`` (``mii_core.plugins.discovery.hookimpl``) in a
module or object registered under the ``mii.plugins`` entry-point group. Drivers
(groups ``mii.engines``, ``mii.schedulers``, ``mii.transports``) are not hook plugins
by themselves, except that the chosen engine (during ``serve()``'s validation and in
its replica processes) and scheduler (in the load balancer) are registered, so they
can implement hooks below as methods.

Hooks are called with keyword arguments; an implementation may accept any subset.
Unless marked ``firstresult``, every implementation runs and results are ignored.
An exception in an implementation propagates, naming the plugin that raised it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from mii_core.config.models import MIIConfig, ModelConfig
    from mii_core.deploy.registry import DeploymentRecord
    from mii_core.plugins.interfaces import LoadedModel, RankInfo, RequestInfo

hookspec = pluggy.HookspecMarker("mii")


@hookspec
def mii_adjust_config(mii_config: "MIIConfig") -> None:
    """Change configuration fields before the deployment is validated and started.

    Called in the process that calls ``serve()``, once, after keyword arguments are
    parsed and before devices, ports or the model are checked. Implementations
    assign to fields of ``mii_config`` / ``mii_config.model_conf`` in place
    (assignments are validated). Return value ignored.
    """


@hookspec
def mii_validate_config(mii_config: "MIIConfig") -> None:
    """Refuse a configuration by raising ``mii.errors.ConfigError`` (or ValueError).

    Called in the process that calls ``serve()``, after ``mii_adjust_config`` and
    mii's model checks (path, heads vs tensor_parallel), before the name, device and
    port checks and before any process starts. Engines use it to check that
    the model fits their constraints (e.g. tensor_parallel divides the heads).
    """


@hookspec
def mii_engine_loaded(model_config: "ModelConfig", loaded: "LoadedModel",
                      rank: "RankInfo") -> None:
    """Observe a freshly loaded model (e.g. to log its size or patch modules).

    Called on every rank of every replica, right after the engine loaded the
    model and before the replica serves requests.
    """


@hookspec
def mii_request_started(request: "RequestInfo") -> None:
    """Observe a request admitted by a replica.

    Called on rank 0 of the replica, in the transport's thread, when a generate
    request was tokenized and its lengths checked, just before it is queued. Must
    be quick: it is on the request path. Raising rejects the request.
    """


@hookspec
def mii_request_finished(request: "RequestInfo", outcome: str) -> None:
    """Observe the end of a request: ``outcome`` is ok, cancelled or error.

    Called on rank 0 of the replica, in the engine loop's thread, when the last
    prompt of the request finished. Must be quick: it runs between steps.
    """


@hookspec
def mii_deployment_started(record: "DeploymentRecord") -> None:
    """Observe a deployment that answers its health check for the first time.

    Called in the supervisor process, once per deployment.
    """


@hookspec
def mii_deployment_stopped(record: "DeploymentRecord", reason: str) -> None:
    """Observe the end of a deployment (``reason``: terminated, interrupted, hangup, failed).

    Called in the supervisor process after every child exited, before the
    registry record is removed.
    """


@hookspec
def mii_add_cli_commands(subparsers: Any) -> None:
    """Add sub-commands to the ``mii`` console script.

    Called in the CLI process while building its argparse parser; ``subparsers``
    is the object returned by ``ArgumentParser.add_subparsers``. A command sets
    ``func=callable(args) -> int`` with ``set_defaults``.
    """
