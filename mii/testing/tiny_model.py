"""Offline builder for a tiny random-weight Llama model plus a real BPE tokenizer.

The result is a normal Hugging Face checkpoint directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` ...) that loads with
``AutoModelForCausalLM`` / ``AutoTokenizer``.  It exists so tests and demos can
exercise the full serving stack (tokenization, batching, KV cache, tensor
parallelism over 2 ranks) without network access or real weights.

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
FORMAT_VERSION = 1
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
# With the HF default (0.02) the logits are nearly flat (std ~0.16), so sampling
# knobs barely matter and greedy decoding sometimes falls into a 1-3 token loop.
# 0.5 gives peaked logits (std ~4) and varied greedy text, while activations stay
# in the hundreds, far inside float16 range.
INITIALIZER_RANGE = 0.5

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Weight init draws from torch's process-global RNG; concurrent builds in one
# process would interleave draws and lose determinism.
_INIT_LOCK = threading.Lock()

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


def _build_model(tokenizer: Any, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **MODEL_SIZES,
        hidden_act="silu",
        initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # fork_rng so building a model never perturbs the caller's global RNG stream;
    # the explicit CPU device keeps a caller's set_default_device("cuda") from
    # switching to the (different) CUDA generator.
    with _INIT_LOCK, torch.random.fork_rng(devices=[]), torch.device("cpu"):
        # Init draws in the default dtype, so a caller's set_default_dtype(float64)
        # would otherwise yield different float32 weights for the same seed.
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous_dtype)
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
        description="Build a tiny random-weight Llama model and BPE tokenizer offline.",
    )
    parser.add_argument("dir", metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default: 0)")
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
