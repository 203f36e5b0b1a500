"""The batched sampler (``mii_engines/runtime/sampling.py``) on small CPU tensors: the
per-row parameters, top-k / top-p at their edges, temperature, bans, and mixed batches;
draws use seeded generators, so every run is the same (written from mutation testing:
tools/mutation.py)."""
from __future__ import annotations

import math

import pytest
import torch

from mii_core.config.models import GenerateParamsConfig
from mii_engines.runtime.sampling import ARGMAX_CHUNK, argmax_rows, row_params, sample

CPU = torch.device("cpu")


def params(**kw):
    return GenerateParamsConfig(**kw)


def draws(logits, rows, count, seed=0, banned=()):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([sample(logits, rows, banned, generator=generator)
                        for _ in range(count)])


def frequencies(column, vocab):
    return torch.bincount(column, minlength=vocab).float() / len(column)


def test_all_greedy_rows_need_no_tensors():
    rows = row_params([params(do_sample=False)] * 2, 10, CPU)
    assert (rows.sampled, rows.temperature, rows.top_k, rows.top_p, rows.needs_sort) == \
        (None, None, None, None, False)


def test_row_params_of_a_mixed_batch():
    batch = [params(do_sample=False), params(do_sample=True, top_p=1.0),
             params(do_sample=False),
             params(do_sample=True, top_k=3, top_p=0.5, temperature=0.7),
             params(do_sample=True, top_k=50, top_p=1.0, temperature=2.0)]
    rows = row_params(batch, 10, CPU)
    assert rows.sampled.tolist() == [1, 3, 4] and rows.sampled.dtype == torch.long
    assert rows.temperature.shape == (3, 1) and rows.temperature.dtype == torch.float32
    assert rows.temperature[:, 0].tolist() == pytest.approx([1.0, 0.7, 2.0])
    assert rows.top_k.dtype == torch.long and rows.top_k[:, 0].tolist() == [10, 3, 10]
    assert rows.top_p.shape == (3, 1) and rows.top_p.dtype == torch.float32
    # top_p 1.0 is "keep everything" (inf), whatever a float32 cumsum reaches
    assert rows.top_p[:, 0].tolist() == [math.inf, 0.5, math.inf]
    assert rows.needs_sort


@pytest.mark.parametrize("kw, needs_sort", [
    ({"top_p": 1.0}, False), ({"top_p": 1.0, "top_k": 10}, False),
    ({"top_p": 1.0, "top_k": 11}, False), ({"top_p": 1.0, "top_k": 9}, True),
    ({"top_p": 0.99}, True), ({"top_p": 0.5, "top_k": 10}, True),
])
def test_sorting_is_needed_only_for_a_real_cut(kw, needs_sort):
    assert row_params([params(do_sample=True, **kw)], 10, CPU).needs_sort is needs_sort


def test_greedy_ban_takes_the_runner_up():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 1.0, 0.0, 0.0]])
    rows = row_params([params(do_sample=False)] * 2, 4, CPU)
    assert sample(logits.clone(), rows).tolist() == [1, 0]
    assert sample(logits.clone(), rows, banned=[1, None]).tolist() == [2, 0]
    assert sample(logits.clone(), rows, banned=[None, 0]).tolist() == [1, 1]
    assert sample(logits.clone(), rows, banned=[3, 0]).tolist() == [1, 1]
    half = logits.to(torch.bfloat16)
    assert sample(half, rows, banned=[1, 0]).tolist() == [2, 1]
    assert half[0, 1] == 3.0 and half[1, 0] == 5.0  # a bf16 input is copied, not changed


def test_sample_leaves_float32_logits_unchanged():
    # found by mutation testing: logits.float() is no copy for float32, and the ban wrote
    # -inf into the caller's tensor
    logits = torch.tensor([[0.0, 3.0, 2.0], [1.0, 0.5, 0.0]])
    rows = row_params([params(do_sample=False), params(do_sample=True, top_k=1)], 3, CPU)
    assert sample(logits, rows, banned=[1, 0]).tolist() == [2, 1]
    assert logits.tolist() == [[0.0, 3.0, 2.0], [1.0, 0.5, 0.0]]


def test_a_banned_token_is_never_sampled():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    rows = row_params([params(do_sample=True, top_p=1.0)], 3, CPU)
    got = draws(logits, rows, 300, banned=[1])
    assert set(got[:, 0].tolist()) == {0, 2}


def test_default_temperature_samples_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, -2.0]])
    rows = row_params([params(do_sample=True, top_p=1.0)], 4, CPU)
    freq = frequencies(draws(logits, rows, 6000, seed=3)[:, 0], 4)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.02, rtol=0)


def test_a_low_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    rows = row_params([params(do_sample=True, top_p=1.0, temperature=0.5)], 3, CPU)
    freq = frequencies(draws(logits, rows, 6000, seed=4)[:, 0], 3)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.5, -1), atol=0.02, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_exactly_the_k_most_likely(k):
    logits = torch.tensor([[0.1, 0.5, 0.4, 0.3, 0.2, 0.0]])  # nearly flat
    rows = row_params([params(do_sample=True, top_k=k, top_p=1.0)], 6, CPU)
    seen = set(draws(logits, rows, 400, seed=k)[:, 0].tolist())
    assert seen == {1, 2, 3}.intersection(set(torch.topk(logits[0], k).indices.tolist()))


def test_top_k_within_the_sorted_distribution_keeps_its_proportions():
    logits = torch.tensor([[0.0, 1.0, 2.0, -5.0]])
    rows = row_params([params(do_sample=True, top_k=2, top_p=1.0)], 4, CPU)
    freq = frequencies(draws(logits, rows, 6000, seed=5)[:, 0], 4)
    expected = torch.tensor([0.0, *torch.softmax(torch.tensor([1.0, 2.0]), -1).tolist(), 0.0])
    torch.testing.assert_close(freq, expected, atol=0.02, rtol=0)


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_p():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])  # exact in float32
    rows = row_params([params(do_sample=True, top_p=0.75)], 4, CPU)
    got = draws(torch.log(probs), rows, 600, seed=6)[:, 0]
    # the mass before token 2 is exactly 0.75: it is dropped
    assert set(got.tolist()) == {0, 1}
    torch.testing.assert_close(frequencies(got, 4), torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]),
                               atol=0.04, rtol=0)
    rows = row_params([params(do_sample=True, top_p=0.76)], 4, CPU)
    assert set(draws(torch.log(probs), rows, 600, seed=7)[:, 0].tolist()) == {0, 1, 2}


def test_top_p_always_keeps_the_first_token():
    logits = torch.tensor([[0.0, 5.0, 0.0]])
    rows = row_params([params(do_sample=True, top_p=1e-6)], 3, CPU)
    assert set(draws(logits, rows, 50)[:, 0].tolist()) == {1}


def test_top_p_and_top_k_together():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.25]])
    rows = row_params([params(do_sample=True, top_k=3, top_p=0.65)], 4, CPU)
    assert set(draws(torch.log(probs), rows, 400, seed=8)[:, 0].tolist()) == {1, 2}


def test_sampled_rows_land_at_their_own_index_in_a_mixed_batch():
    logits = torch.full((4, 6), -10.0)
    logits[0, 4] = logits[1, 2] = logits[2, 5] = logits[3, 1] = 10.0
    logits[1, 3] = 9.9  # a sampled row with two likely tokens
    batch = [params(do_sample=False), params(do_sample=True, top_k=2, top_p=1.0),
             params(do_sample=False), params(do_sample=True, top_k=1)]
    rows = row_params(batch, 6, CPU)
    got = draws(logits, rows, 200, seed=9)
    assert set(got[:, 0].tolist()) == {4} and set(got[:, 2].tolist()) == {5}
    assert set(got[:, 1].tolist()) == {2, 3} and set(got[:, 3].tolist()) == {1}
    assert got.dtype == torch.int64


def test_bf16_logits_are_sampled_in_float32():
    logits = torch.tensor([[1.0, 0.0, -1.0, -2.0]], dtype=torch.bfloat16)
    rows = row_params([params(do_sample=True, top_p=1.0)], 4, CPU)
    freq = frequencies(draws(logits, rows, 4000, seed=10)[:, 0], 4)
    torch.testing.assert_close(freq, torch.softmax(logits.float()[0], -1), atol=0.025, rtol=0)


def test_a_zero_probability_token_is_never_drawn():
    logits = torch.tensor([[0.0, -math.inf, 0.0]])
    rows = row_params([params(do_sample=True, top_p=1.0)], 3, CPU)
    assert 1 not in draws(logits, rows, 500)[:, 0].tolist()


@pytest.mark.parametrize("vocab", [4 * ARGMAX_CHUNK - 1, 4 * ARGMAX_CHUNK, 5 * ARGMAX_CHUNK + 9])
def test_chunked_argmax_matches_argmax_around_the_threshold(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=generator)
    logits[0, vocab - 1] = 50.0  # in the tail (or the last chunk)
    logits[1, ARGMAX_CHUNK] = 50.0  # the first element of the second chunk
    logits[2, 0] = 50.0
    assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()


def test_greedy_rows_of_a_large_vocabulary_with_a_ban():
    vocab = 4 * ARGMAX_CHUNK + 5
    logits = torch.zeros(2, vocab)
    logits[0, vocab - 2] = 9.0
    logits[0, 17] = 8.0
    logits[1, 3 * ARGMAX_CHUNK + 1] = 9.0
    rows = row_params([params(do_sample=False)] * 2, vocab, CPU)
    assert sample(logits, rows).tolist() == [vocab - 2, 3 * ARGMAX_CHUNK + 1]
    assert sample(logits, rows, banned=[vocab - 2, None]).tolist() == [17, 3 * ARGMAX_CHUNK + 1]
