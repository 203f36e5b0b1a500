"""Peer anchors on the GPU: plain transformers ``generate`` (dynamic and static cache).

Adapted from shared/anchors/peer_probe.py (phases ``build`` and ``hf`` only; the
DeepSpeed-MII FastGen and DeepSpeed v1 phases are left out). Same model, same prompts,
same measurement: prompt 128 tokens, 128 new tokens forced, batch 1 / 16 / 64, one warm-up
call per batch size, then one timed call.

    python3 bench/gpu/anchors.py build   # the 1.50B random-weight bf16 Llama -> $MODEL_DIR
    python3 bench/gpu/anchors.py hf      # hf_dynamic, hf_static + the greedy reference

ANCHOR_STATIC=0 skips the static-cache runs (~30 s of compilation per batch size); with
BENCH_TINY=1 (the tiny model on CPU) they are skipped unless ANCHOR_STATIC=1.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import MODEL_DIR, TINY, G, log  # noqa: E402

PHASE = sys.argv[1] if len(sys.argv) > 1 else "hf"
DEVICE = "cpu" if TINY else "cuda"


def build() -> None:
    if TINY:
        from mii.testing.tiny_model import ensure_tiny_model

        path = ensure_tiny_model(MODEL_DIR)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        log(phase="build", saved=str(path), prompt_tokens=len(tok(common.prompts(1)[0])["input_ids"]))
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    started = time.time()
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(MODEL_DIR)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, cfg.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(MODEL_DIR)
    ids = fast(common.prompts(1)[0])["input_ids"]
    log(phase="build", saved=MODEL_DIR, params_b=round(params / 1e9, 3), prompt_tokens=len(ids),
        build_s=round(time.time() - started, 1))


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    started = time.time()
    result = fn()
    sync()
    return result, time.time() - started


def input_ids(tok, texts):
    """Token ids of ``texts`` as one tensor (cut to the shortest; the real prompts are all P)."""
    import torch

    rows = [tok(t)["input_ids"] for t in texts]
    width = min(len(r) for r in rows)
    return torch.tensor([r[len(r) - width:] for r in rows], device=DEVICE)


def hf_like(model, tok, tag: str, static: bool) -> None:
    import torch
    from transformers import GenerationConfig

    for bs in common.BATCHES:
        try:
            ids = input_ids(tok, common.prompts(bs))
            gc = GenerationConfig(max_new_tokens=G, min_new_tokens=G, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            if static:
                gc.cache_implementation = "static"
            run = lambda: model.generate(ids, attention_mask=torch.ones_like(ids),  # noqa: E731
                                         generation_config=gc)
            _, warm = timed(run)
            out, dt = timed(run)
            new = out.shape[1] - ids.shape[1]
            log(phase="A_hf", engine=tag, mode="generate", bs=bs, prompt_len=ids.shape[1],
                tokens=bs * new, wall_s=round(dt, 3), tok_s=round(bs * new / dt, 1),
                warmup_s=round(warm, 1))
        except Exception as ex:  # noqa: BLE001 - one batch size failing must not hide the rest
            traceback.print_exc()
            log(phase="A_hf", engine=tag, bs=bs, error=repr(ex)[:400])


def greedy_reference(model, tok) -> None:
    """Greedy tokens of transformers generate for the shared 4 prompts (one batch)."""
    import torch
    from transformers import GenerationConfig

    texts = common.greedy_prompts()
    rows = [tok(t)["input_ids"] for t in texts]
    gc = GenerationConfig(max_new_tokens=common.GREEDY_TOKENS,
                          min_new_tokens=common.GREEDY_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    if len({len(r) for r in rows}) == 1:
        ids = torch.tensor(rows, device=DEVICE)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        generated = [row[ids.shape[1]:] for row in out.tolist()]
        how = "one batch"
    else:  # tiny prompts tokenize to different lengths: one at a time, no padding
        generated = []
        for row in rows:
            ids = torch.tensor([row], device=DEVICE)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            generated.append(out[0, ids.shape[1]:].tolist())
        how = "one prompt at a time"
    decoded = [tok.decode(g, skip_special_tokens=True) for g in generated]
    log(phase="A_hf", kind="greedy", source="hf_generate", how=how, texts=decoded,
        token_ids=generated)


def hf() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(phase="A_hf", kind="versions", **common.python_info())
    dtype = torch.float32 if TINY else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).to(DEVICE).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    try:
        greedy_reference(model, tok)
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc()
        log(phase="A_hf", kind="greedy", source="hf_generate", error=repr(ex)[:400])
    hf_like(model, tok, "hf_dynamic", False)
    if os.environ.get("ANCHOR_STATIC", "0" if TINY else "1") == "1":
        hf_like(model, tok, "hf_static", True)
    if DEVICE == "cuda":
        log(phase="A_hf", kind="memory",
            torch_max_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20))


if __name__ == "__main__":
    common.exit_on_sigterm()
    try:
        {"build": build, "hf": hf}[PHASE]()
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc()
        log(phase="A_hf" if PHASE == "hf" else PHASE, error=repr(ex)[:600])
        sys.exit(1)
