"""The tiny model speaks: mii.testing.tiny_model trains it briefly on its corpus, so greedy
continuations are made of corpus words, and the trained weights are the same bytes on
every machine."""

from __future__ import annotations

import hashlib
import os
import pathlib
import string
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mii.testing import tiny_model as tm  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Prompts that open paragraphs the model was trained on, as the quickstart's do.
PROMPTS = ("DeepSpeed is", "Seattle is", "A city is", "The sea", "Science is")
MAX_NEW_TOKENS = 32  # as the quickstart
# model.safetensors of the seed-0 build with the pinned torch / transformers / tokenizers.
# The builder promises these bytes on any x86 CPU; if a deliberate change to the builder
# moves them, bump tiny_model.FORMAT_VERSION and put the new digest here.
EXPECTED_SHA256 = "ba58eb49736ec0bd76e195a63149903e14bbb45a4bcacc2f06f06c50741c61e5"


def _words(text: str) -> list[str]:
    """Whitespace-separated words with surrounding punctuation stripped ("States." -> "States")."""
    return [token.strip(string.punctuation) for token in text.split()]


CORPUS_WORDS = frozenset(_words(tm.CORPUS_PATH.read_text(encoding="utf-8")))


def _unknown_words(prompt: str, completion: str) -> list[str]:
    """Words of prompt + completion that the corpus never uses.

    The completion is joined to the prompt because its first token may finish the
    prompt's last word; a last word that max_new_tokens cut off mid-word is left out.
    """
    words = _words(prompt + completion)
    if completion[-1:].isalnum():
        words = words[:-1]
    return [word for word in words if word not in CORPUS_WORDS]


def _greedy(model_dir: pathlib.Path | str, prompts: tuple[str, ...]) -> dict[str, str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    completions = {}
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        completions[prompt] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    return completions


def _sha256(model_dir: pathlib.Path | str) -> str:
    return hashlib.sha256((pathlib.Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture()
def untrained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip training: the builder then writes its initial (random) weights."""
    monkeypatch.setattr(tm, "_train", lambda *args, **kwargs: None)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_is_corpus_words(tiny_model: str, prompt: str) -> None:
    completion = _greedy(tiny_model, (prompt,))[prompt]
    assert not _unknown_words(prompt, completion), repr(completion)
    # Words, and not one word over and over.
    assert len(set(_words(completion))) >= 8, repr(completion)


def test_word_check_rejects_an_untrained_model(untrained, tmp_path: pathlib.Path) -> None:
    completions = _greedy(tm.build_tiny_model(tmp_path / "untrained"), PROMPTS)
    assert all(_unknown_words(p, c) for p, c in completions.items()), completions


def test_unknown_words_sees_byte_salad_and_spares_a_cut_word() -> None:
    assert _unknown_words("Seattle is", " a city in the northwest. Seattle is sur") == []
    assert _unknown_words("Seattle is", " a city\ufffd in") == ["city\ufffd"]
    assert _unknown_words("The sea", "ward and") == ["seaward"]  # the prompt's word, finished


def test_training_forward_matches_transformers(tiny_model: str) -> None:
    # Training runs its own float64 copy of the Llama forward pass; it must be the
    # network that transformers (and the engines) run from the saved weights.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tokenizer("Seattle is a city in the northwest corner", return_tensors="pt")["input_ids"]
    weights = {name: p.detach().double() for name, p in model.named_parameters()}
    ours = tm._forward(weights, ids, tm._rope_tables(ids.shape[1], model.config), model.config)
    with torch.no_grad():
        theirs = model(ids).logits
    torch.testing.assert_close(ours.float(), theirs, atol=1e-3, rtol=1e-4)


def test_stored_weights_are_bfloat16_values(tiny_model: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.equal(param.bfloat16().float(), param), name


def test_weights_match_the_pinned_digest(tiny_model: str) -> None:
    assert _sha256(tiny_model) == EXPECTED_SHA256, (
        "the seed-0 tiny model has other bytes than on the machine that pinned them: either "
        "the builder changed (bump FORMAT_VERSION and the digest) or it is not reproducible here")


def test_other_cpu_kernels_and_thread_count_write_the_same_bytes(
    tiny_model: str, tmp_path: pathlib.Path
) -> None:
    # Another CPU runs other kernels.  Forcing ATen's generic (non-AVX) code path and MKL's
    # vendor-neutral one changes how sums are ordered and how exp/log are vectorised, as
    # another machine would; the thread variables change the count the build starts with.
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE",
               OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    target = tmp_path / "other-kernels"
    subprocess.run([sys.executable, "-m", "mii.testing.tiny_model", str(target)], env=env,
                   check=True, capture_output=True, timeout=240)
    assert _sha256(target) == _sha256(tiny_model)


def test_build_restores_the_callers_thread_count(untrained, tmp_path: pathlib.Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tm.build_tiny_model(tmp_path / "m")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
