"""Building a replica's runtime from a loaded model: what a replica process and
``mii.pipeline`` call, so that neither knows how the runtime is put together.

``build_service`` picks the KV cache (``kv/choose.py``), warms it up and wraps it in
rank 0's loop; ``follow`` runs the other ranks of a tensor-parallel replica. Every
rank builds its cache first and joins the plan channel second, in the same order.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from mii_core.config.models import ModelConfig
from mii_core.plugins.interfaces import LoadedModel, RankInfo, RequestInfo
from mii_core.routing.stats import ServingMetrics

log = logging.getLogger(__name__)


def build_kv(model_config: ModelConfig, loaded: LoadedModel, rank: RankInfo):
    """The KV cache for ``model_config`` on this rank, warmed up (graphs captured,
    compilation done) before the replica reports ready."""
    from mii_engines.runtime.kv.choose import build

    setup = build(loaded, model_config, rank.world_size)
    log.info("[progress] rank %d: %s KV cache, at most %d sequences at once", rank.rank,
             setup.kind, setup.max_batch_size)
    seconds = setup.state.warm_up()
    if seconds:
        log.info("[progress] rank %d: fast path ready in %.1fs", rank.rank, seconds)
    return setup


def build_service(loaded: LoadedModel, model_config: ModelConfig, rank: RankInfo,
                  max_queue_size: int,
                  on_started: Optional[Callable[[RequestInfo], None]] = None,
                  on_finished: Optional[Callable[[RequestInfo, str], None]] = None):
    """Rank 0's batching loop over a fresh KV cache (broadcasting plans to the other
    ranks when the replica is tensor-parallel). Call ``run()`` on a thread of its own."""
    from mii_engines.runtime.executor import Executor
    from mii_engines.runtime.intake import Intake
    from mii_engines.runtime.loop import EngineLoop
    from mii_engines.runtime.output import Outputs
    from mii_engines.runtime.scheduler import Scheduler

    setup = build_kv(model_config, loaded, rank)
    broadcast = None
    if rank.world_size > 1:
        from mii_engines.runtime.distributed import PlanChannel

        broadcast = PlanChannel().send
    single_gpu = rank.world_size == 1 and loaded.device.type == "cuda"
    executor = Executor(setup.state, loaded.device, setup.max_batch_size, broadcast=broadcast,
                        pipelined=single_gpu and setup.state.takes_device_tokens,
                        sync_debug=model_config.sync_debug,
                        profile_model_time=model_config.profile_model_time)
    intake = Intake(loaded.tokenizer, loaded.context_length, setup.space.max_tokens(),
                    rank.replica)
    return EngineLoop(intake, Scheduler(setup.space, setup.max_batch_size, setup.budgets),
                      executor, Outputs(loaded.tokenizer, ServingMetrics(), on_finished),
                      max_queue_size, on_started=on_started)


def follow(loaded: LoadedModel, model_config: ModelConfig, rank: RankInfo) -> None:
    """Ranks > 0: apply rank 0's step plans until it shuts the replica down."""
    from mii_engines.runtime.distributed import PlanChannel
    from mii_engines.runtime.loop import follow as follow_plans

    setup = build_kv(model_config, loaded, rank)
    follow_plans(setup.state, PlanChannel().receive)
