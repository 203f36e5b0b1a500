"""Models whose layers see a sliding window (Mistral: every layer; Qwen2 with
use_sliding_window: some layers) give transformers' own greedy tokens through both
batch states, with prompts several windows long. Real forward passes, tiny models."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import CPU, GREEDY, PROMPTS, loop_for, make_loop, run, running
from test_fast_path import compiled_matching_eager, slot_state

from mii_core.config.models import ModelConfig
from mii_engines.runtime.kv.dynamic import DynamicState
from mii_engines.runtime.kv.rows import RowSpace
from mii_engines.runtime.kv.slots import SlotState
from mii_engines.runtime.runner.masks import MaskRule
from mii_engines.transformers.engine import TransformersEngine

WINDOW = 4
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, sliding_window=WINDOW)


def _save(kind: str, directory, tokenizer) -> str:
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SIZES, **ids))
    else:  # layer 0 full attention, layer 1 a sliding window
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, **ids, use_sliding_window=True,
                                             max_window_layers=1))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def sliding_model(request, tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    path = _save(request.param, tmp_path_factory.mktemp(request.param), tokenizer)
    loaded = TransformersEngine().load(ModelConfig(model_name_or_path=path), CPU)
    loaded.path = path  # for a fresh copy (the paged cache patches the model it serves)
    return loaded


def _reference(loaded, prompts, max_new_tokens):
    """Greedy tokens from transformers' own full-sequence forward, one prompt at a time
    and no cache: its mask functions apply the window. (Not ``generate``: it cannot go
    past EOS without banning it, which ignore_eos does not.)"""
    texts = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                logits = loaded.model(ids, use_cache=False).logits[0, -1]
                ids = torch.cat([ids, logits.argmax()[None, None]], dim=1)
            texts.append(loaded.tokenizer.decode(ids[0, start:], skip_special_tokens=True))
    return texts


def _generate(loaded, state):
    space = RowSpace(getattr(state, "max_len", loaded.context_length), "rows")
    with running(make_loop(loaded, state, space, max_batch_size=4, max_queue_size=8)) as loop:
        texts = run(loop, PROMPTS, **GREEDY).texts()
        return [texts[index] for index in range(len(PROMPTS))]


def _generate_paged(path: str):
    """The same prompts through the paged cache, on a fresh copy of the model."""
    loaded = TransformersEngine().load(ModelConfig(model_name_or_path=path), CPU)
    with running(loop_for(loaded, "paged", max_batch_size=4)) as loop:
        texts = run(loop, PROMPTS, **GREEDY).texts()
        return [texts[index] for index in range(len(PROMPTS))]


def test_the_rule_reads_the_layer_types(sliding_model):
    rule = MaskRule(sliding_model.model.config)
    assert rule.window == WINDOW
    assert rule.mixed == (sliding_model.model.config.model_type == "qwen2")


def test_both_batch_states_give_transformers_tokens(sliding_model, monkeypatch):
    assert max(len(sliding_model.tokenizer(p)["input_ids"]) for p in PROMPTS) > 2 * WINDOW
    expected = _reference(sliding_model, PROMPTS, GREEDY["max_new_tokens"])
    dynamic = _generate(sliding_model, DynamicState(sliding_model.model, sliding_model.device))
    paged = _generate_paged(sliding_model.path)
    static = _generate(sliding_model, slot_state(sliding_model))
    # The prefill-graph path (bucketed, left-padded prompts), run eagerly on the CPU.
    bucketed = _generate(sliding_model, SlotState(
        sliding_model.model, sliding_model.device, 4, 128, bucketed_prefill=True))
    assert dynamic == expected and static == expected and bucketed == expected
    assert paged == expected
    # The window changes the tokens: without it the same engine gives other text.
    monkeypatch.setattr(MaskRule, "build", lambda self, allowed, queries, keys: allowed)
    assert _generate(sliding_model, DynamicState(sliding_model.model,
                                                 sliding_model.device)) != expected


def test_a_multimodal_wrapper_s_window_is_read_from_its_text_config():
    """Gemma 3 from 4B up loads as Gemma3ForConditionalGeneration, whose config keeps the
    window and the layer types in text_config."""
    from transformers import Gemma3Config

    config = Gemma3Config(text_config=dict(
        num_hidden_layers=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"]))
    assert getattr(config, "sliding_window", None) is None  # not at the top level
    rule = MaskRule(config)
    assert rule.window == WINDOW and rule.mixed


def test_unknown_layer_types_are_refused_by_name():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="chunked_attention"):
        MaskRule(SimpleNamespace(layer_types=["full_attention", "chunked_attention"],
                                 sliding_window=None))


def test_compiled_decode_of_a_sliding_model_matches_eager(sliding_model):
    """One compiled layer serves full and sliding layers alike (the window is in the
    mask each layer is handed), with the eager step's logits."""
    compiled, graphs = compiled_matching_eager(sliding_model, max_rows=16)
    assert compiled.regions is not None and graphs == 1
