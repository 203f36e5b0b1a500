"""The ``transformers`` engine: one process, the model as Hugging Face loads it."""
from __future__ import annotations

from mii_core.config.models import MIIConfig, ModelConfig
from mii_core.errors import ConfigError
from mii_core.plugins.discovery import hookimpl
from mii_core.plugins.interfaces import LoadedModel, RankInfo


class TransformersEngine:
    """Reference engine on CPU or one GPU; no tensor parallelism."""

    name = "transformers"

    @hookimpl
    def mii_validate_config(self, mii_config: MIIConfig) -> None:
        """Refuse tensor_parallel > 1 (this engine cannot shard) and quantization."""
        model = mii_config.model_conf
        if model.tensor_parallel > 1:
            raise ConfigError(f"tensor_parallel={model.tensor_parallel}: the transformers "
                              "engine runs one process per replica; use engine='deepspeed' "
                              "for tensor parallelism")
        if model.quantization_mode:
            raise ConfigError(f"quantization_mode {model.quantization_mode!r} is not supported "
                              "by the transformers engine")

    def setup_distributed(self, rank: RankInfo) -> None:
        """Never called: the engine refuses world_size > 1."""
        raise ConfigError("the transformers engine does not support tensor parallelism")

    def load(self, model_config: ModelConfig, rank: RankInfo) -> LoadedModel:
        """Load model and tokenizer onto the rank's device."""
        # Imported here so that serve() can validate with this class without importing torch.
        from mii_engines.loading import (
            context_length,
            device_of,
            load_hf_model,
            load_tokenizer,
            resolve_dtype,
        )

        device = device_of(rank)
        dtype = resolve_dtype(model_config.dtype, device)
        model = load_hf_model(model_config, dtype, device)
        return LoadedModel(model, load_tokenizer(model_config), device,
                           context_length(model_config, model),
                           f"transformers {type(model).__name__} {dtype} on {device}")
