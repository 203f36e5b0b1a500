"""Checks on the model to serve that run in the caller, before any process starts."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from mii_core.config.models import ModelConfig
from mii_core.errors import ConfigError


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def model_dir_config(model_config: ModelConfig) -> Optional[Dict[str, Any]]:
    """The model's ``config.json`` as a dict (local dir or local HF cache), None if unknown.

    Raises ConfigError for a local path that is missing or holds no model, and for a
    hub name that is not cached while the hub is offline.
    """
    name = model_config.model_name_or_path
    if _looks_local(name):
        path = Path(os.path.expanduser(name))
        if not path.exists():
            raise ConfigError(f"model_name_or_path: {name} does not exist")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model_name_or_path: {name} is not a model directory "
                              "(no config.json)")
        try:
            return json.loads((path / "config.json").read_text())
        except ValueError as error:
            raise ConfigError(f"model_name_or_path: {path / 'config.json'} is not valid JSON "
                              f"({error})") from None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError(f"model_name_or_path: {name!r} is neither a local directory nor in "
                          "the Hugging Face cache, and HF_HUB_OFFLINE is set")
    return None  # will be downloaded by the replicas


def check_tensor_parallel(config: Optional[Dict[str, Any]], tensor_parallel: int) -> None:
    """Refuse a tensor_parallel that does not divide the attention (and KV) heads."""
    if not config or tensor_parallel == 1:
        return
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    for label, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count and count % tensor_parallel:
            raise ConfigError(f"tensor_parallel ({tensor_parallel}) does not divide the model's "
                              f"{label} ({count}); choose a divisor of {count}")


def check_model_limits(config: Optional[Dict[str, Any]], model_config: ModelConfig) -> None:
    """Refuse a ``max_length`` beyond the model's position limit (the replica would)."""
    if not config or model_config.max_length is None:
        return
    limit = config.get("max_position_embeddings") or (
        config.get("text_config") or {}).get("max_position_embeddings")
    if isinstance(limit, int) and model_config.max_length > limit:
        raise ConfigError(f"max_length ({model_config.max_length}) exceeds the model's "
                          f"max_position_embeddings ({limit})")


def check_tokenizer(model_config: ModelConfig) -> None:
    """Refuse a ``tokenizer`` given as a local path that does not exist."""
    name = model_config.tokenizer
    if name and name != model_config.model_name_or_path and _looks_local(name):
        if not Path(os.path.expanduser(name)).exists():
            raise ConfigError(f"tokenizer: {name} does not exist")
