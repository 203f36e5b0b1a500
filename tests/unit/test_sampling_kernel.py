"""The GPU sampling kernel (``kernels/triton_sampling.py``) in Triton's interpreter on CPU
tensors: draws against the sorted-cumsum reference distribution (chi-square, fixed
seeds), greedy rows and bans, seeds, rows that span several tiles, and ``sample`` with
the kernel in a mixed batch and in the engine loop. Each interpreted program takes tens
of milliseconds, so the vocabularies are small and each draw is one row of one launch."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton", reason="triton is not installed")

from engine_helpers import load, loop_for, run, running  # noqa: E402

from mii_core.config.models import GenerateParamsConfig  # noqa: E402
from mii_engines.runtime import sampling  # noqa: E402
from mii_engines.runtime.kernels import triton_sampling  # noqa: E402
from mii_engines.runtime.kernels.triton_sampling import run_sample  # noqa: E402
from mii_engines.runtime.sampling import row_params, sample  # noqa: E402

CPU = torch.device("cpu")
# chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails
# one seed in a thousand, and these seeds are fixed
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def launch(logits, temperature, top_p, seeds, bans=None, step_seed=0):
    """``seeds``: a list of per-row seeds, or None (``step_seed + row``)."""
    return run_sample(logits, torch.tensor(temperature, dtype=torch.float32),
                      torch.tensor(top_p, dtype=torch.float32), step_seed,
                      None if seeds is None else torch.tensor(seeds),
                      None if bans is None else torch.tensor(bans))


def draws(logits_row, count, temperature, top_p, seed):
    """``count`` draws from one row: one launch of ``count`` rows with distinct seeds."""
    return launch(logits_row.expand(count, -1).contiguous(), [temperature] * count,
                  [top_p] * count, None, step_seed=seed * 1_000_003)


def nucleus(logits_row, temperature, top_p):
    """The reference distribution: softmax, sorted, cut once the mass before reaches top_p."""
    probs = torch.softmax(logits_row / temperature, -1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p
    expected = torch.zeros_like(probs)
    expected[order[keep]] = ordered[keep] / ordered[keep].sum()
    return expected


def chi_square(got, expected, count):
    observed = torch.bincount(got, minlength=len(expected)).double()
    kept = expected > 0
    assert observed[~kept].sum() == 0, f"drawn outside the nucleus: {observed.tolist()}"
    want = expected[kept].double() * count
    return float(((observed[kept] - want) ** 2 / want).sum()), int(kept.sum()) - 1


@pytest.mark.parametrize("temperature, top_p, seed", [(1.0, 0.8, 1), (0.7, 2.0, 2)])
def test_draws_follow_the_reference_distribution(temperature, top_p, seed):
    logits = torch.tensor([1.2, 0.9, 0.7, 0.4, 0.1, -0.3, -1.0, -2.5])
    expected = nucleus(logits, temperature, min(top_p, 1.0))
    if top_p < 1:  # the cut is real: some tokens are out, several are in
        assert 2 < int((expected > 0).sum()) < len(logits)
    statistic, df = chi_square(draws(logits, 320, temperature, top_p, seed), expected, 320)
    assert statistic < CHI2_999[df], (statistic, df)


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    got = draws(torch.log(probs), 60, 1.0, 0.75, 3)
    assert set(got.tolist()) == {0, 1}  # the mass before token 2 is 0.75
    assert set(draws(torch.log(probs), 60, 1.0, 0.76, 4).tolist()) == {0, 1, 2}
    assert set(draws(torch.log(probs), 20, 1.0, 1e-6, 5).tolist()) == {0}


def test_tokens_tied_at_the_cut_are_all_kept():
    # the sort keeps one of two equal tokens, whichever it put first; the kernel keeps
    # both (the mass strictly above each is 0.75 < 0.76)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])  # exact in float32
    assert set(draws(torch.log(probs), 60, 1.0, 0.76, 4).tolist()) == {0, 1, 2, 3}


def test_greedy_rows_take_the_first_maximum_and_bans_the_runner_up():
    logits = torch.tensor([[0.0, 3.0, 2.0, 3.0], [5.0, 1.0, 0.0, 0.0], [1.0, 1.0, 9.0, 1.0]])
    assert launch(logits, [0.0] * 3, [2.0] * 3, [1, 2, 3]).tolist() == [1, 0, 2]
    assert launch(logits, [0.0] * 3, [0.5] * 3, [1, 2, 3], bans=[1, 0, -1]).tolist() == [3, 1, 2]
    sampled = launch(torch.zeros(40, 4), [1.0] * 40, [2.0] * 40, list(range(40)),
                     bans=[2] * 40)
    assert 2 not in sampled.tolist() and len(set(sampled.tolist())) == 3


def test_the_seed_decides_the_draw():
    logits = torch.zeros(12, 16)  # uniform: every token equally likely
    keyed = [7] * 6 + [(1 << 32) + 100 + r for r in range(6)]
    first = launch(logits, [1.0] * 12, [2.0] * 12, keyed)
    again = launch(logits, [1.0] * 12, [2.0] * 12, keyed)
    assert first.tolist() == again.tolist()
    assert len(set(first[:6].tolist())) == 1 and len(set(first[6:].tolist())) > 1
    # without per-row seeds, row r is keyed 2**32 + step_seed + r: rows differ
    stepped = launch(logits, [1.0] * 12, [2.0] * 12, None, step_seed=100)
    assert stepped[:6].tolist() == first[6:].tolist()
    assert launch(logits, [1.0] * 12, [2.0] * 12, None, step_seed=100).tolist() == \
        stepped.tolist()


def test_rows_of_adjacent_seeds_draw_independently():
    """Row r's seed is step_seed + r: a hash that only permuted the noise among the
    positions (index XOR seed) made neighbouring rows' tokens follow each other."""
    got = launch(torch.zeros(256, 16), [1.0] * 256, [2.0] * 256, None, step_seed=12345)
    uniform = torch.full((16,), 1 / 16)
    for values in (got, (got[1:] - got[:-1]) % 16):  # tokens, and neighbours' differences
        statistic, df = chi_square(values, uniform, len(values))
        assert statistic < 37.70, (statistic, values.tolist())  # df 15, p = 0.001


def test_rows_longer_than_one_tile_and_strided_bf16_logits():
    vocab = 4096 + 300  # two tiles of 4096
    wide = torch.zeros(2, vocab + 7, dtype=torch.bfloat16)
    logits = wide[:, :vocab]  # rows further apart than the vocabulary
    logits[0, 4100] = 9.0
    logits[0, 17] = 9.0  # a tie across tiles: the first stays
    logits[1, 4200] = 8.0
    logits[1, 5] = 7.0
    assert launch(logits, [0.0, 0.0], [2.0, 2.0], [1, 2]).tolist() == [17, 4200]
    assert launch(logits, [0.0, 0.0], [2.0, 2.0], [1, 2], bans=[17, 4200]).tolist() == [4100, 5]
    # a sharp nucleus in the second tile: top-p keeps only the top token
    assert launch(logits, [0.05, 0.05], [0.5, 0.5], [3, 4]).tolist() == [17, 4200]


def test_sample_uses_the_kernel_and_torch_for_top_k_rows():
    logits = torch.full((4, 6), -10.0)
    logits[0, 4] = logits[1, 2] = logits[2, 5] = logits[3, 1] = 10.0
    logits[1, 3] = 9.9  # sampled rows with two likely tokens
    logits[3, 0] = 9.9
    batch = [GenerateParamsConfig(do_sample=False),
             GenerateParamsConfig(do_sample=True, top_p=1.0, seed=11),
             GenerateParamsConfig(do_sample=False),
             GenerateParamsConfig(do_sample=True, top_k=2, top_p=1.0)]
    rows = row_params(batch, 6, CPU, use_kernel=True)
    assert rows.kernel is not None and rows.sampled_rows == (3,) and rows.needs_indices
    generator = torch.Generator().manual_seed(0)
    got = torch.stack([sample(logits, rows, generator=generator, indices=[0, i, 0, 0])
                       for i in range(24)])
    assert set(got[:, 0].tolist()) == {4} and set(got[:, 2].tolist()) == {5}
    assert set(got[:, 1].tolist()) == {2, 3} and set(got[:, 3].tolist()) == {0, 1}
    # the seeded row draws the same token at the same index, whatever the generator
    again = [sample(logits, rows, generator=torch.Generator().manual_seed(9),
                    indices=[0, i, 0, 0])[1] for i in range(24)]
    assert [int(t) for t in again] == got[:, 1].tolist()
    banned = sample(logits, rows, banned=[4, 2, None, 1], generator=generator, indices=[0] * 4)
    assert banned.tolist() == [0, 3, 5, 0]  # row 0: the first of the -10s


def test_the_engine_loop_on_the_kernel_reproduces_a_seeded_request(tiny_model, monkeypatch):
    monkeypatch.setattr(sampling, "kernel_wanted", lambda device: True)
    launched = []

    def counted(logits, *args):
        launched.append(logits.shape[0])
        return run_sample(logits, *args)

    monkeypatch.setattr(triton_sampling, "run_sample", counted)
    seeded = dict(do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=8,
                  ignore_eos=True, seed=5)
    prompts = ["DeepSpeed is", "Seattle is"]
    with running(loop_for(load(tiny_model), "paged", pipelined=True)) as loop:
        greedy = run(loop, prompts, do_sample=False, max_new_tokens=8, ignore_eos=True)
        first = run(loop, prompts, **seeded).texts()
        assert run(loop, prompts, **seeded).texts() == first
        other = run(loop, prompts, **dict(seeded, seed=6)).texts()
    assert launched and max(launched) == 2  # both prompts' rows in one step of the kernel
    monkeypatch.setattr(sampling, "kernel_wanted", lambda device: False)
    with running(loop_for(load(tiny_model), "paged", pipelined=True)) as loop:
        assert run(loop, prompts, do_sample=False, max_new_tokens=8,
                   ignore_eos=True).texts() == greedy.texts()
    assert other != first


@pytest.mark.parametrize("vocab", [5, 4096, 10_000])
def test_the_argmax_kernel_is_torchs_argmax(vocab):
    """Ties (the first maximum wins, also across chunks), NaN (the first NaN wins), rows
    of -inf, and rows further apart than the vocabulary (a view of wider logits)."""
    from mii_engines.runtime.kernels.triton_argmax import run_argmax

    gen = torch.Generator().manual_seed(vocab)
    wide = torch.randn(7, vocab + 3, generator=gen).to(torch.bfloat16)
    logits = wide[:, :vocab]
    logits[1] = 1.0  # all tied: index 0
    logits[2, vocab // 2:] = 50.0  # tied maxima in the later chunks: the first of them
    logits[3, vocab - 1] = float("nan")
    logits[3, vocab // 3] = float("nan")  # the first NaN wins
    logits[4] = float("-inf")
    logits[5, vocab - 1] = 100.0  # the last token
    assert logits.stride(0) == vocab + 3
    assert run_argmax(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert run_argmax(logits.float()).tolist() == logits.float().argmax(dim=-1).tolist()


def test_greedy_sampling_takes_the_argmax_kernel_where_kernels_run(monkeypatch):
    from mii_engines.runtime.kernels import triton_argmax

    calls = []
    monkeypatch.setattr(sampling, "kernel_wanted", lambda device: True)
    real = triton_argmax.run_argmax
    monkeypatch.setattr(triton_argmax, "run_argmax", lambda x: calls.append(x.shape) or real(x))
    logits = torch.randn(3, 9000, generator=torch.Generator().manual_seed(1))
    rows = row_params([GenerateParamsConfig(do_sample=False)] * 3, 9000, CPU)
    assert sample(logits, rows).tolist() == logits.argmax(dim=-1).tolist()
    assert calls == [(3, 9000)]
