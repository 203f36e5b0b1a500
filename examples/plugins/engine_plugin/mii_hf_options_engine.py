"""``hf_options``: a mii engine that passes ``inference_engine_config`` to ``from_pretrained``.

    mii.serve(model, engine="hf_options",
              inference_engine_config={"attn_implementation": "eager", "revision": "main"})
"""
from mii.errors import ConfigError
from mii.plugins import LoadedModel, hookimpl

RESERVED = {"device_map", "tp_plan"}  # placement is mii's job, not from_pretrained's
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TOKENIZER_OPTIONS = ("revision", "trust_remote_code", "cache_dir", "token")


class HFOptionsEngine:
    """One process per replica, loaded with the user's ``from_pretrained`` keyword arguments."""

    name = "hf_options"

    @hookimpl
    def mii_validate_config(self, mii_config):
        """In the serve() caller, before any process starts: refuse what we cannot honour."""
        model = mii_config.model_conf
        if model.tensor_parallel != 1 or model.quantization_mode:
            raise ConfigError("hf_options engine: no tensor_parallel > 1, no quantization_mode")
        clash = RESERVED & set(model.inference_engine_config)
        if clash:
            raise ConfigError(f"inference_engine_config: {', '.join(sorted(clash))} is set by mii")

    def setup_distributed(self, rank):
        """Never called: mii_validate_config keeps every replica at one rank."""
        raise ConfigError("hf_options engine: no tensor parallelism")

    def load(self, model_config, rank):
        """Load model and tokenizer on this rank's device ("cpu" or "cuda:N")."""
        import torch  # imported here so that serve() validates without loading torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(rank.device)
        options = dict(model_config.inference_engine_config)
        if "dtype" not in options:  # fall back to ModelConfig.dtype
            name = model_config.dtype
            if name == "auto":
                name = "bfloat16" if device.type == "cuda" else "float32"
            options["dtype"] = getattr(torch, ALIASES.get(name, name))
        model = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path, **options)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, **{k: options[k] for k in TOKENIZER_OPTIONS if k in options})
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        shown = ", ".join(f"{key}={value}" for key, value in sorted(options.items()))
        return LoadedModel(model, tokenizer, device, model_config.max_length or limit,
                           f"hf_options {type(model).__name__} on {device} ({shown})")
