"""The ``deepspeed`` engine: DeepSpeed inference with automatic tensor parallelism (AutoTP).

Each rank loads the Hugging Face model and ``deepspeed.init_inference`` shards its
linear layers over the replica's ranks (tp_size = tensor_parallel). NCCL joins the
ranks on GPUs, gloo on CPU. DeepSpeed gives us sharding, not speed: the batching
loop, KV cache and sampling are mii's own, shared with the transformers engine.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any

from mii_core.config.models import MIIConfig, ModelConfig
from mii_core.errors import ConfigError
from mii_core.plugins.discovery import hookimpl
from mii_core.plugins.interfaces import LoadedModel, RankInfo

log = logging.getLogger(__name__)
# Followers wait in a collective between steps; rank 0 sends a heartbeat plan at least
# every few seconds (runtime.inbox.IDLE_HEARTBEAT_S), so a much longer silence means a peer died.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# init_inference options mii sets itself; users may not override them.
RESERVED_OPTIONS = {"tensor_parallel", "dtype", "replace_with_kernel_inject", "mp_size"}


class DeepSpeedEngine:
    """AutoTP-sharded Hugging Face models, one process per rank."""

    name = "deepspeed"

    @hookimpl
    def mii_validate_config(self, mii_config: MIIConfig) -> None:
        """Refuse options this engine cannot honour, before any process starts."""
        model = mii_config.model_conf
        clash = RESERVED_OPTIONS & set(model.inference_engine_config)
        if clash:
            raise ConfigError(f"inference_engine_config sets {', '.join(sorted(clash))}, which "
                              "mii derives from ModelConfig (tensor_parallel, dtype)")
        if model.quantization_mode:
            raise ConfigError(f"quantization_mode {model.quantization_mode!r} is not supported "
                              "by the deepspeed engine")

    def setup_distributed(self, rank: RankInfo) -> None:
        """Join the replica's process group: NCCL on GPU, gloo on CPU."""
        deepspeed = _import_deepspeed(rank)
        from mii_engines.deepspeed import cpu_allreduce as deepspeed_cpu

        backend = "nccl" if rank.device.startswith("cuda") else "gloo"
        if backend == "gloo":
            deepspeed_cpu.use_process_group_all_reduce()
        deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT,
                                   auto_mpi_discovery=False)
        if backend == "gloo":
            deepspeed_cpu.verify_process_group_all_reduce()
        log.info("joined process group (%s): rank %d of %d", backend, rank.rank, rank.world_size)

    def load(self, model_config: ModelConfig, rank: RankInfo) -> LoadedModel:
        """Load the model on every rank and shard it with AutoTP."""
        deepspeed = _import_deepspeed(rank)
        from mii_engines.loading import (
            context_length,
            device_of,
            load_hf_model,
            load_tokenizer,
            resolve_dtype,
        )

        device = device_of(rank)
        dtype = resolve_dtype(model_config.dtype, device)
        # Load on CPU: AutoTP moves only this rank's shard to the device.
        model = load_hf_model(model_config, dtype, _cpu())
        options: dict[str, Any] = dict(model_config.inference_engine_config)
        tensor_parallel: dict[str, Any] = {"tp_size": rank.world_size}
        if "tp_grain_size" in options:
            tensor_parallel["tp_grain_size"] = options.pop("tp_grain_size")
        if rank.world_size > 1:
            import torch.distributed as dist

            # AutoTP would otherwise make its own group with torch's 30-minute default
            # timeout; the world group carries COLLECTIVE_TIMEOUT (one replica per launch).
            tensor_parallel.update(mpu=_WorldGroup(), tp_group=dist.group.WORLD)
        engine = deepspeed.init_inference(model, tensor_parallel=tensor_parallel, dtype=dtype,
                                          replace_with_kernel_inject=False, **options)
        module = engine.module.to(device).eval()
        return LoadedModel(module, load_tokenizer(model_config), device,
                           context_length(model_config, module),
                           f"deepspeed {deepspeed.__version__} AutoTP tp={rank.world_size} "
                           f"{type(module).__name__} {dtype} on {device}")


class _WorldGroup:
    """DeepSpeed's "mpu" interface: the launcher's whole world is one tensor-parallel group."""

    def get_model_parallel_group(self) -> Any:
        import torch.distributed as dist

        return dist.group.WORLD

    def get_model_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def get_model_parallel_world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size()

    def get_data_parallel_group(self) -> None:
        return None

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _import_deepspeed(rank: RankInfo) -> Any:
    """Import DeepSpeed with the accelerator of ``rank`` (it is chosen once, at import)."""
    if not rank.device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed
