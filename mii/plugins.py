"""What a plugin author imports: the hook marker and the typed objects hooks and drivers see.

An engine is a class with ``name``, ``setup_distributed(rank)`` and
``load(model_config, rank) -> LoadedModel``; a scheduler is a class built as
``cls(replica_count)`` with ``pick``, ``started`` and ``finished``. Register them
under the ``mii.engines`` / ``mii.schedulers`` entry-point groups; hook
implementations go under ``mii.plugins``. See docs/plugins.md.
"""
from mii_core.plugins.discovery import PluginInfo, discover, hookimpl
from mii_core.plugins.interfaces import (
                                 Engine,
                                 GenerationService,
                                 LoadedModel,
                                 RankInfo,
                                 RequestInfo,
                                 Scheduler,
                                 TokenEvent,
                                 Transport,
)

__all__ = ["hookimpl", "Engine", "Scheduler", "Transport", "GenerationService", "LoadedModel",
           "RankInfo", "RequestInfo", "TokenEvent", "PluginInfo", "discover"]
