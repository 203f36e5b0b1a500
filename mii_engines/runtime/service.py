"""Building a replica's runtime from a loaded model: what a replica process and
``mii.pipeline`` call, so that neither knows how the runtime is put together.

``build_state`` picks and warms up the KV state the configuration asks for (the
same on every rank); ``build_service`` wraps it in the batching loop on rank 0;
``follow`` runs the other ranks of a tensor-parallel replica.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from mii_core.config.models import ModelConfig
from mii_core.plugins.interfaces import LoadedModel, RankInfo, RequestInfo

log = logging.getLogger(__name__)


def build_state(model_config: ModelConfig, loaded: LoadedModel, rank: RankInfo):
    """The KV state for ``model_config`` on this rank, warmed up (graphs captured,
    compilation done) before the replica reports ready."""
    from mii_engines.runtime.kv.slots import make_state

    state = make_state(loaded, model_config.kv_cache, model_config.max_batch_size,
                       model_config.cuda_graphs, rank.world_size, model_config.torch_compile,
                       length_given=model_config.max_length is not None)
    if getattr(state, "use_graphs", False) or getattr(state, "compiled", False):
        log.info("[progress] rank %d: warming up the fast path (%s)", rank.rank,
                 "torch.compile, then CUDA graphs" if model_config.torch_compile else "CUDA graphs")
        log.info("[progress] rank %d: fast path ready in %.1fs", rank.rank, state.warm_up())
    return state


def build_service(loaded: LoadedModel, model_config: ModelConfig, rank: RankInfo,
                  max_queue_size: int,
                  on_started: Optional[Callable[[RequestInfo], None]] = None,
                  on_finished: Optional[Callable[[RequestInfo, str], None]] = None):
    """Rank 0's batching loop over a fresh KV state (broadcasting plans to the other
    ranks when the replica is tensor-parallel). Call ``run()`` on a thread of its own."""
    from mii_engines.runtime.loop import Generator

    broadcast = None
    if rank.world_size > 1:
        from mii_engines.runtime.distributed import PlanChannel

        broadcast = PlanChannel().send
    return Generator(loaded, rank.replica, model_config.max_batch_size, max_queue_size,
                     broadcast=broadcast, on_finished=on_finished, on_started=on_started,
                     sync_debug=model_config.sync_debug,
                     profile_model_time=model_config.profile_model_time,
                     state=build_state(model_config, loaded, rank))


def follow(loaded: LoadedModel, model_config: ModelConfig, rank: RankInfo) -> None:
    """Ranks > 0: apply rank 0's step plans until it shuts the replica down."""
    from mii_engines.runtime.distributed import PlanChannel
    from mii_engines.runtime.loop import follow as follow_plans

    follow_plans(build_state(model_config, loaded, rank), PlanChannel().receive)
