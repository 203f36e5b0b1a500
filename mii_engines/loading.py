"""Loading pieces shared by the engines: dtype, device, tokenizer, context length."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from mii_core.config.models import ModelConfig
from mii_core.errors import ConfigError
from mii_core.plugins.interfaces import RankInfo

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (CPU half precision is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def device_of(rank: RankInfo) -> torch.device:
    """The torch device of ``rank``; checks the GPU exists."""
    device = torch.device(rank.device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or device.index >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank.rank} of replica {rank.replica} was given {device} but "
                              f"only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(device)
        # cuDNN's attention builds a new execution plan for every new key length, i.e.
        # every decode step with a mask: 3-5 ms per layer call on an H100 (measured).
        # The memory-efficient and flash kernels have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def load_tokenizer(model_config: ModelConfig) -> Any:
    """The tokenizer named by ``model_config.tokenizer`` (defaults to the model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_config.tokenizer)


def load_hf_model(model_config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in eval mode, logging how long it took."""
    from transformers import AutoModelForCausalLM

    if model_config.quantization_mode:
        raise ConfigError(f"quantization_mode {model_config.quantization_mode!r} is not "
                          "supported by this engine")
    started = time.time()
    log.info("[progress] loading %s (%s) on %s", model_config.model_name_or_path, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path, dtype=dtype)
    model = model.to(device).eval()
    log.info("[progress] loaded %.0fM parameters in %.1fs",
             sum(p.numel() for p in model.parameters()) / 1e6, time.time() - started)
    return model


def context_length(model_config: ModelConfig, model: Any) -> int:
    """Longest sequence served: ``ModelConfig.max_length`` or the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    if model_config.max_length is not None:
        if model_config.max_length > limit:
            raise ConfigError(f"max_length ({model_config.max_length}) exceeds the model's "
                              f"max_position_embeddings ({limit})")
        return model_config.max_length
    return limit
