"""Tests for the offline tiny Llama builder (mii.testing.tiny_model)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mii.testing import tiny_model as tm  # noqa: E402
from mii.testing.tiny_model import (  # noqa: E402
    build_tiny_model,
    default_tiny_model_dir,
    ensure_tiny_model,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "DeepSpeed is a library"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The builder must never need the Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _subprocess_env() -> dict[str, str]:
    # Keep the caller's env (works when mii is pip-installed) but make the
    # source tree importable when it is not.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_layout_and_marker(model_dir: pathlib.Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    marker = json.loads((model_dir / tm.MARKER_FILE).read_text())
    assert marker["seed"] == 0
    assert marker["format_version"] == tm.FORMAT_VERSION


def test_loads_with_auto_classes(model, tokenizer) -> None:
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tokenizer) == tm.VOCAB_SIZE


def test_sizes_split_for_tensor_parallel_2(model) -> None:
    cfg = model.config
    for value in (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.hidden_size // cfg.num_attention_heads,  # head_dim
    ):
        assert value % 2 == 0, value
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0


def test_special_token_ids_match_config(model, tokenizer) -> None:
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.bos_token_id == model.config.bos_token_id == 1
    assert tokenizer.eos_token_id == model.config.eos_token_id == 2
    assert tokenizer.pad_token_id == model.config.pad_token_id == 3
    assert tokenizer.unk_token_id == 0
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize(
    "text", [PROMPT, "Seattle is  rainy.\nThe sea, at night!", "héllo wörld 日本 🙂", " leading space"]
)
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_no_automatic_special_tokens(tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.eos_token_id not in ids
    # A trained BPE should merge common words, not fall back to bytes.
    assert len(ids) < len(PROMPT.encode())


def test_chat_template(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<s>user: Hi\nassistant:"


def test_greedy_generation_is_varied(model, tokenizer) -> None:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new_tokens) == 16
    assert len(set(new_tokens)) >= 4, new_tokens


def test_same_seed_is_byte_identical(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_different_seed_changes_weights_not_tokenizer(
    model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_and_dtype_alone(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_model(tmp_path / "m", seed=0)
    assert torch.equal(torch.rand(4), expected)
    assert torch.get_default_dtype() == torch.float32


def test_existing_build_is_reused(tmp_path: pathlib.Path) -> None:
    path = build_tiny_model(tmp_path / "m", seed=0)
    # A sentinel survives only if the directory is reused rather than rebuilt.
    sentinel = path / "sentinel"
    sentinel.write_text("")
    assert build_tiny_model(path, seed=0) == path
    assert sentinel.exists()

    build_tiny_model(path, seed=0, overwrite=True)
    assert not sentinel.exists()

    # A build for another seed is stale and gets replaced without overwrite.
    build_tiny_model(path, seed=3)
    assert json.loads((path / tm.MARKER_FILE).read_text())["seed"] == 3
    # No temp or graveyard directories are left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_refuses_to_clobber_foreign_directory(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(target)
    assert (target / "notes.txt").read_text() == "keep me"
    build_tiny_model(target, overwrite=True)
    assert not (target / "notes.txt").exists()


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv("MII_TINY_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_tiny_model_dir() == tmp_path / "xdg" / "mii" / "tiny-llama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_tiny_model_dir() == pathlib.Path.home() / ".cache" / "mii" / "tiny-llama"
    monkeypatch.setenv("MII_TINY_MODEL_DIR", str(tmp_path / "explicit"))
    assert default_tiny_model_dir() == tmp_path / "explicit"


def test_ensure_tiny_model_builds_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, model_dir: pathlib.Path
) -> None:
    monkeypatch.setenv("MII_TINY_MODEL_DIR", str(tmp_path / "cache" / "tiny"))
    path = ensure_tiny_model()
    assert path == (tmp_path / "cache" / "tiny").resolve()
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_and_concurrent_builders(tmp_path: pathlib.Path, model_dir: pathlib.Path) -> None:
    target = tmp_path / "cli"
    cmd = [sys.executable, "-m", "mii.testing.tiny_model", str(target), "--seed", "0"]
    # Two racing builders must both succeed and leave one intact model.
    procs = [
        subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert str(target) in out
    assert (target / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]

    # Reuse path, then a foreign directory is refused with a clean error.
    rerun = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    refused = subprocess.run(
        [sys.executable, "-m", "mii.testing.tiny_model", str(foreign)],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    assert "--force" in refused.stderr
