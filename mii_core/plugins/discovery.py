"""Plugin discovery (stevedore) and hook calling (pluggy).

Drivers are chosen by name from an entry-point group; mii's own engines, schedulers
and transports are registered through entry points exactly like a third party's.
A plugin that fails to import is reported by name, never silently dropped.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import pluggy
from stevedore import ExtensionManager

from mii_core.config.models import ModelConfig
from mii_core.constants import (
    ENGINE_GROUP,
    PLUGIN_GROUP,
    SCHEDULER_GROUP,
    TRANSPORT_GROUP,
)
from mii_core.errors import PluginError
from mii_core.plugins import hookspecs

log = logging.getLogger(__name__)
hookimpl = pluggy.HookimplMarker("mii")
GROUPS = {"engine": ENGINE_GROUP, "scheduler": SCHEDULER_GROUP,
          "transport": TRANSPORT_GROUP, "plugin": PLUGIN_GROUP}


@dataclass
class PluginInfo:
    """One discovered entry point, loadable or not."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    error: str = ""


def _manager(group: str, failures: list) -> ExtensionManager:
    def failed(_manager: Any, entry_point: Any, error: BaseException) -> None:
        failures.append((entry_point, error))

    return ExtensionManager(group, invoke_on_load=False, on_load_failure_callback=failed)


def _owners(group: str) -> dict:
    """(name, target) -> (distribution, version) for every entry point of ``group``."""
    owners = {}
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group == group:
                owners[(entry_point.name, entry_point.value)] = (dist.metadata["Name"],
                                                                 dist.version)
    return owners


def _describe(kind: str, entry_point: Any, owners: dict, error: str = "") -> PluginInfo:
    dist, version = owners.get((entry_point.name, entry_point.value), ("?", "?"))
    return PluginInfo(kind, entry_point.name, entry_point.value, dist, version, error)


def discover(kind: str) -> List[PluginInfo]:
    """Every entry point of ``kind`` (engine, scheduler, transport, plugin), broken ones included."""
    failures: list = []
    manager = _manager(GROUPS[kind], failures)
    owners = _owners(GROUPS[kind])
    found = [_describe(kind, ext.entry_point, owners) for ext in manager.extensions]
    found += [_describe(kind, ep, owners, f"{type(err).__name__}: {err}") for ep, err in failures]
    return sorted(found, key=lambda info: info.name)


def load_driver(kind: str, name: str) -> type:
    """The class registered as ``name`` in the ``kind`` group.

    Raises PluginError listing the installed names if ``name`` is unknown, or naming
    the plugin and its import error if it cannot be loaded.
    """
    failures: list = []
    manager = _manager(GROUPS[kind], failures)
    for ext in manager.extensions:
        if ext.name == name:
            return ext.plugin
    for entry_point, error in failures:
        if entry_point.name == name:
            raise PluginError(f"{kind} plugin {name!r} ({entry_point.value}) failed to load: "
                              f"{type(error).__name__}: {error}") from error
    names = sorted({ext.name for ext in manager.extensions} | {ep.name for ep, _ in failures})
    raise PluginError(f"unknown {kind} {name!r}; installed {kind}s: "
                      f"{', '.join(names) or '(none)'}")


def resolve_engine_name(model: ModelConfig) -> str:
    """``model.engine``, with ``auto`` mapped to the engine that serves it fastest.

    ``deepspeed`` (where it is installed) when ranks share the model (tensor_parallel > 1)
    or ``inference_engine_config`` carries options for it; else ``transformers``: at
    tensor_parallel=1 AutoTP shards nothing and both engines run the same loop and KV
    cache, but importing DeepSpeed costs a replica ~0.3 s on a CPU and seconds on a GPU
    machine (its accelerator and op probes), and it loads the model on the CPU first.
    """
    name = model.engine
    if name != "auto":
        return name
    if model.tensor_parallel > 1 or model.inference_engine_config:
        names = {info.name for info in discover("engine") if not info.error}
        if "deepspeed" in names and importlib.util.find_spec("deepspeed") is not None:
            return "deepspeed"
    return "transformers"


_PM: Optional[pluggy.PluginManager] = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with every ``mii.plugins`` entry point registered."""
    global _PM
    if _PM is None:
        manager = pluggy.PluginManager("mii")
        manager.add_hookspecs(hookspecs)
        failures: list = []
        for ext in _manager(PLUGIN_GROUP, failures).extensions:
            manager.register(ext.plugin, name=f"{ext.name} ({ext.entry_point.value})")
        if failures:
            entry_point, error = failures[0]
            raise PluginError(f"plugin {entry_point.name!r} ({entry_point.value}) failed to "
                              f"load: {type(error).__name__}: {error}") from error
        _PM = manager
    return _PM


def register_driver(driver: Any, kind: str) -> Optional[str]:
    """Register a loaded driver instance so that its ``@hookimpl`` methods are called.

    Returns the plugin name if this call registered it, None if it already was.
    """
    manager = plugin_manager()
    name = f"{kind}:{type(driver).__module__}.{type(driver).__qualname__}"
    if manager.get_plugin(name) is not None:
        return None
    manager.register(driver, name=name)
    return name


@contextlib.contextmanager
def driver_hooks(driver: Any, kind: str) -> Iterator[None]:
    """Register ``driver``'s hooks for the duration of a block (one ``serve()`` call),
    so a driver chosen by an earlier deployment in the same process does not vote."""
    added = register_driver(driver, kind)
    try:
        yield
    finally:
        if added:
            plugin_manager().unregister(name=added)


def hooks() -> Any:
    """``plugin_manager().hook``: call as ``hooks().mii_request_started(request=...)``."""
    return plugin_manager().hook
