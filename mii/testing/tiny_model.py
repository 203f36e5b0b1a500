"""Offline builder for a tiny Llama model plus a real BPE tokenizer.

The result is a normal Hugging Face checkpoint directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` ...) that loads with
``AutoModelForCausalLM`` / ``AutoTokenizer``.  It exists so tests and demos can
exercise the full serving stack (tokenization, batching, KV cache, tensor
parallelism over 2 ranks) without network access or real weights.  The weights
are trained for a few seconds on paragraphs of the bundled corpus, so greedy
decoding continues a prompt with words from it instead of byte salad, and the
build is reproducible to the byte on any machine (see ``_to_stored``).

Usage::

    python -m mii.testing.tiny_model DIR [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "build_tiny_model",
    "default_tiny_model_dir",
    "ensure_tiny_model",
    "main",
]

# Bump whenever the produced files would change for the same seed, so cached
# directories written by an older builder get rebuilt instead of reused.
FORMAT_VERSION = 2
MARKER_FILE = "mii_tiny_model.json"

CORPUS_PATH = pathlib.Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"

# Llama convention for the first ids; <pad> gets its own id so padding never
# masks a real end-of-sequence.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS
VOCAB_SIZE = 512

# Every head / hidden / FFN dimension is even so tensor_parallel=2 splits evenly.
MODEL_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

# Training.  Memorising the whole corpus (~10.6k tokens) would take minutes on a
# CPU; these six paragraphs (~730 tokens) take seconds, and they open with the
# prompts of the README's quickstart and the tests.  The tokenizer still learns
# from the whole corpus.
TRAINING_OPENINGS = (
    "DeepSpeed is",
    "A city is",
    "Seattle is",
    "Weather is",
    "The sea covers",
    "Science is",
)
TRAIN_STEPS = 100
BATCH_SIZE = 8
WINDOW = 64  # tokens a training sequence holds
LEARNING_RATE = 1e-2
ADAM_BETAS = (0.9, 0.99)
WARMUP_STEPS = 10
COOLDOWN_FRACTION = 0.4  # share of the steps over which the rate falls to zero
# Half-widths of the uniform initial weights, matched by name (first hit wins);
# powers of two keep the draws exact.  The output projections of attention and MLP
# start at zero, so each layer starts as the identity and the first steps only
# shape embeddings and head (a bigram model), which speeds up the short run.
INIT_RANGES = (
    ("embed_tokens", 2.0**-1),
    ("lm_head", 2.0**-5),
    ("o_proj", 0.0),
    ("down_proj", 0.0),
    ("", 2.0**-3),
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# A build changes process-global torch state (thread count, default dtype, RNG);
# concurrent builds in one process must not interleave those changes.
_BUILD_LOCK = threading.Lock()

_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER_FILE,
)


def default_tiny_model_dir() -> pathlib.Path:
    """Cache location: ``$MII_TINY_MODEL_DIR``, else ``$XDG_CACHE_HOME/mii/tiny-llama``
    (``~/.cache/mii/tiny-llama`` when XDG_CACHE_HOME is unset)."""
    override = os.environ.get("MII_TINY_MODEL_DIR")
    if override:
        return pathlib.Path(override).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(cache_home).expanduser() / "mii" / "tiny-llama"


def _marker(seed: int) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "seed": seed, "kind": "mii-tiny-llama"}


def _read_marker(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(path: pathlib.Path, seed: int) -> bool:
    marker = _read_marker(path)
    if marker is None:
        return False
    if marker.get("format_version") != FORMAT_VERSION or marker.get("seed") != seed:
        return False
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _train_tokenizer() -> Any:
    """Train the byte-level BPE on the bundled corpus and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = CORPUS_PATH.read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x for arbitrary strings.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # Seeding the full byte alphabet means no input is ever out-of-vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        # Plain encoding: callers add <s> themselves (the chat template does).
        add_bos_token=False,
        add_eos_token=False,
        # The default cleanup rewrites " ." to "." and breaks round-tripping.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SIZES["max_position_embeddings"],
    )


def _llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        **MODEL_SIZES,
        hidden_act="silu",
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


@contextlib.contextmanager
def _isolated_torch() -> Iterator[None]:
    """Pin the process-global torch state a build depends on, and restore it after.

    One thread: on one machine the float64 results are then bit-identical whatever
    the caller's thread count (a parallel reduction splits its sums per thread).
    fork_rng: the transformers constructor draws a throwaway init from the global
    RNG, which must not move the caller's stream.  The CPU device and disabled
    autocast keep a caller's set_default_device("cuda") / autocast from moving the
    work to another device or dtype; training needs autograd even when the caller
    runs under no_grad or inference_mode.
    torch.use_deterministic_algorithms is deliberately not set: single-threaded
    CPU ops are deterministic already, and the flag is process-wide, so it would
    make CUDA kernels that other threads of the caller run raise errors.
    """
    import torch

    with _BUILD_LOCK:
        threads = torch.get_num_threads()
        dtype = torch.get_default_dtype()
        torch.set_num_threads(1)
        # Parameters take the default dtype: a caller's float64 would be saved as such.
        torch.set_default_dtype(torch.float32)
        try:
            with (
                torch.random.fork_rng(devices=[]),
                torch.device("cpu"),
                torch.autocast("cpu", enabled=False),
                torch.inference_mode(False),
                torch.enable_grad(),
            ):
                yield
        finally:
            torch.set_default_dtype(dtype)
            torch.set_num_threads(threads)


def _training_ids(tokenizer: Any) -> Any:
    """Token ids of the corpus paragraphs that open with ``TRAINING_OPENINGS``."""
    import torch

    paragraphs = CORPUS_PATH.read_text(encoding="utf-8").split("\n\n")
    chosen = []
    for opening in TRAINING_OPENINGS:
        matches = [p.strip() for p in paragraphs if p.startswith(opening)]
        if len(matches) != 1:
            raise ValueError(f"{len(matches)} corpus paragraphs open with {opening!r}; expected 1")
        chosen.append(matches[0])
    # The blank line between paragraphs is learned too, so generation can move on
    # to another paragraph instead of inventing words at a paragraph's end.
    text = "".join(paragraph + "\n\n" for paragraph in chosen)
    # The backend encoder: the wrapper warns that the text exceeds model_max_length.
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def _initial_weights(model: Any, generator: Any) -> dict[str, Any]:
    """float64 starting weights for ``model``'s parameters, drawn with ``generator``.

    Uniform draws with power-of-two ranges: torch.rand turns integer generator
    output into doubles and the scaling is exact, so the start is the same bits on
    every machine (normal draws go through log/cos, whose last bits vary by CPU).
    """
    import torch

    weights = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(param.shape, dtype=torch.float64)
            continue
        scale = next(value for key, value in INIT_RANGES if key in name)
        if scale == 0.0:
            weights[name] = torch.zeros(param.shape, dtype=torch.float64)
            continue
        uniform = torch.rand(param.shape, generator=generator, dtype=torch.float64)
        weights[name] = (uniform * 2 - 1) * scale
    return weights


def _rope_tables(length: int, config: Any) -> tuple[Any, Any]:
    """cos/sin tables as transformers' Llama builds them, but in float64 (it uses float32)."""
    import torch

    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rms_norm(x: Any, weight: Any) -> Any:
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS) * weight


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention(w: dict[str, Any], prefix: str, h: Any, rope: tuple[Any, Any], config: Any) -> Any:
    import torch.nn.functional as F

    batch, length, _ = h.shape
    head_dim = config.hidden_size // config.num_attention_heads
    cos, sin = (table[:length] for table in rope)

    def heads(proj: str, count: int) -> Any:
        out = h @ w[f"{prefix}self_attn.{proj}.weight"].T
        return out.view(batch, length, count, head_dim).transpose(1, 2)

    q = _rotate(heads("q_proj", config.num_attention_heads), cos, sin)
    k = _rotate(heads("k_proj", config.num_key_value_heads), cos, sin)
    v = heads("v_proj", config.num_key_value_heads)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, length, -1) @ w[f"{prefix}self_attn.o_proj.weight"].T


def _mlp(w: dict[str, Any], prefix: str, h: Any) -> Any:
    import torch.nn.functional as F

    gate = F.silu(h @ w[f"{prefix}mlp.gate_proj.weight"].T)
    return (gate * (h @ w[f"{prefix}mlp.up_proj.weight"].T)) @ w[f"{prefix}mlp.down_proj.weight"].T


def _forward(w: dict[str, Any], ids: Any, rope: tuple[Any, Any], config: Any) -> Any:
    """Logits of transformers' Llama for ``ids``, computed in the dtype of ``w``.

    Written out rather than calling LlamaForCausalLM in float64, because that
    module computes RMSNorm and the rotary tables in float32 whatever the weights'
    dtype, and float32 rounding noise is what training must stay clear of.
    """
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        h = _rms_norm(x, w[f"{prefix}input_layernorm.weight"])
        x = x + _attention(w, prefix, h, rope, config)
        x = x + _mlp(w, prefix, _rms_norm(x, w[f"{prefix}post_attention_layernorm.weight"]))
    return _rms_norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _learning_rate(step: int) -> float:
    """Linear warm-up, flat, then a linear cool-down to zero over the last steps."""
    cooldown = TRAIN_STEPS * COOLDOWN_FRACTION
    return LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS, (TRAIN_STEPS - step) / cooldown)


def _train(weights: dict[str, Any], ids: Any, config: Any, generator: Any) -> None:
    """Adam on random windows of ``ids``, next-token cross-entropy, in place."""
    import torch
    import torch.nn.functional as F

    params = [w.requires_grad_(True) for w in weights.values()]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, betas=ADAM_BETAS, foreach=False)
    rope = _rope_tables(WINDOW, config)
    windows = ids.unfold(0, WINDOW + 1, 1)  # every (input, shifted target) window
    for step in range(TRAIN_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step)
        batch = windows[torch.randint(len(windows), (BATCH_SIZE,), generator=generator)]
        logits = _forward(weights, batch[:, :-1], rope, config)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for w in params:
        w.requires_grad_(False)


def _to_stored(weight: Any) -> Any:
    """Round a trained float64 weight to the nearest bfloat16 value, kept as float32.

    Why the stored bytes are the same on every x86 CPU, whatever its thread count:
    - Nothing random depends on the machine: the generator's integer stream is
      fixed by the seed, and _initial_weights maps it to doubles exactly.
    - Training is IEEE arithmetic on doubles.  What can differ between CPUs (and
      library builds) is only the last bits: MKL and ATen pick kernels per
      instruction set (AVX2, AVX-512, ...) that sum a matrix product in another
      order, fuse multiply-adds, or take exp/log from another vectorised routine.
      Each such op is off by ~1e-16 relative and training amplifies that: the
      trained weights differ by up to 9e-14 between ATEN_CPU_CAPABILITY=default
      and avx2 and up to 4e-13 between MKL_CBWR=COMPATIBLE and AUTO.  The same run
      in float32 differs by ~3e-5 and rounds hundreds of weights differently,
      which is why training is float64 although it is slower.
    - bfloat16 keeps 8 significant bits, so neighbouring stored values lie at
      least 2**-8 of the weight apart, ~1e9 times the drift.  Two machines store
      different bytes only where a weight lies within the drift of a rounding
      midpoint; the chance of that anywhere in the model, the sum over weights
      of drift / bf16 spacing, came to 2e-5 for the runs above: not zero, which
      nothing short of exact arithmetic gives, but no machine was seen to hit it.
      The rounding itself (float64 -> float32 -> bfloat16, each round-to-nearest-
      even) is exactly specified, so it adds no variation of its own.
    bf16-representable float32 also loads losslessly as bfloat16.
    """
    import torch

    return weight.to(torch.float32).to(torch.bfloat16).to(torch.float32)


def _build_model(tokenizer: Any, seed: int) -> Any:
    """The tiny Llama, trained briefly on the corpus so greedy decoding yields its words."""
    import torch
    from transformers import LlamaForCausalLM

    config = _llama_config(tokenizer)
    with _isolated_torch():
        model = LlamaForCausalLM(config)  # supplies names and shapes; weights replaced below
        generator = torch.Generator().manual_seed(seed)
        weights = _initial_weights(model, generator)
        _train(weights, _training_ids(tokenizer), config, generator)
        model.load_state_dict({name: _to_stored(w) for name, w in weights.items()}, strict=True)
    model.eval()
    return model


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' one-shard "Writing model shards" bar for this block only."""
    from transformers.utils import logging as hf_logging

    # A tqdm hook is scoped and restorable, unlike disable_progress_bar(), which
    # also flips huggingface_hub's global switch (and warns under its env var).
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return
    previous = set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_hook(previous)


def _write_model(target: pathlib.Path, seed: int) -> None:
    tokenizer = _train_tokenizer()
    model = _build_model(tokenizer, seed)
    with _quiet_progress_bars():
        model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # transformers 5 records its internal class name "TokenizersBackend", which
    # transformers 4 (and tools pinned to it) cannot resolve; the v4 name loads
    # the same tokenizer.json on both.
    config_path = target / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # Written last: its presence means every other file is already on disk.
    (target / MARKER_FILE).write_text(
        json.dumps(_marker(seed), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    # mkdtemp (and the safetensors writer) use private modes; a shared cache
    # directory must stay readable by other users.
    for entry in target.iterdir():
        entry.chmod(0o644)
    target.chmod(0o755)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _swap_in(tmp: pathlib.Path, dest: pathlib.Path, seed: int, replace: bool) -> None:
    """Atomically move ``tmp`` to ``dest``; losing a race to an equivalent build is fine."""
    for _ in range(10):
        try:
            # POSIX rename replaces a missing or empty directory atomically.
            os.rename(tmp, dest)
            return
        except OSError:
            if not dest.exists():
                continue  # the occupant vanished between our calls; retry
        if not replace and _is_complete(dest, seed):
            _remove(tmp)  # a concurrent caller finished the same build first
            return
        # Move the stale occupant aside (atomic), then retry the rename.
        graveyard = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(dest, graveyard)
        except FileNotFoundError:
            continue
        _remove(graveyard)
        replace = False  # once the stale copy is gone, any complete build wins
    _remove(tmp)
    raise RuntimeError(f"could not install tiny model at {dest}")


def build_tiny_model(
    output_dir: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    """Build the tiny Llama checkpoint + tokenizer into ``output_dir`` and return its path.

    A directory already holding a complete build with the same seed and format
    version is reused unless ``overwrite``.  A stale build (other seed/version)
    is replaced; a non-empty directory that is not ours raises FileExistsError
    unless ``overwrite``.  Files appear atomically, so concurrent callers are safe.
    """
    # resolve() so a symlinked cache location is filled, not replaced by a directory.
    dest = pathlib.Path(output_dir).expanduser().resolve()
    if not overwrite and _is_complete(dest, seed):
        return dest
    if dest.exists() and not overwrite:
        if not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is not a directory")
        if _read_marker(dest) is None and any(dest.iterdir()):
            raise FileExistsError(
                f"{dest} is not empty and holds no tiny model; pass overwrite=True (--force)"
            )

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as dest so the final rename stays on one filesystem (atomic).
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_model(tmp, seed)
    except BaseException:
        _remove(tmp)
        raise
    _swap_in(tmp, dest, seed, replace=overwrite)
    return dest


def ensure_tiny_model(path: str | os.PathLike[str] | None = None, *, seed: int = 0) -> pathlib.Path:
    """Return a ready tiny model directory, building it (once) if missing.

    ``path`` defaults to :func:`default_tiny_model_dir`.
    """
    return build_tiny_model(default_tiny_model_dir() if path is None else path, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m mii.testing.tiny_model DIR [--seed N] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mii.testing.tiny_model",
        description="Build a tiny Llama, trained on a bundled corpus, and its tokenizer offline.",
    )
    parser.add_argument("dir", metavar="DIR", help="output directory")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the initial weights and of the training batches (default: 0)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if DIR already holds this build"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        path = build_tiny_model(args.dir, seed=args.seed, overwrite=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tiny model ready at {path} ({time.perf_counter() - start:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
