"""The batched sampler against transformers' logits processors and plain PyTorch references (CPU, float32)."""
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.generation import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                     TopKLogitsWarper, TopPLogitsWarper)

from nanovllm import SamplingParams
from nanovllm.layers.sampler import (count_tokens_, processed_logits, prompt_token_mask, row_noise_keys, sample,
                                     sampler_warm_up_tasks, sampling_tensors, token_counts, uniform_noise)
from nanovllm.utils.kernels import fused_kernels

CPU = torch.device("cpu")
# chi-square critical values at significance 0.001 (upper 0.999 quantiles), by degrees of freedom
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877,
            10: 29.588, 11: 31.264}

FILTERS = [
    dict(temperature=0.8),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.6, top_k=20, top_p=0.95),  # Qwen3's recommended settings
    dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.1),
    dict(temperature=1.5, top_p=0.3, min_p=0.2),
    dict(temperature=0.5, top_k=1),
    dict(temperature=1.0, top_p=1e-9),  # 1 - top_p rounds to 1 in float32: the likeliest token stays
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: a second intra-op thread only adds wake-ups (tens of ms on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_warped(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """transformers' sampling warpers, in generate()'s order."""
    scores = TemperatureLogitsWarper(sp.temperature)(None, logits.clone())
    if sp.top_k > 0:
        scores = TopKLogitsWarper(sp.top_k)(None, scores)
    if sp.top_p < 1:
        scores = TopPLogitsWarper(sp.top_p)(None, scores)
    if sp.min_p > 0:
        scores = MinPLogitsWarper(sp.min_p)(None, scores)
    return scores


def tensors_for(params, seeds=None, positions=None, **kwargs):
    if isinstance(params, SamplingParams):
        params = [params]
    seeds = list(range(len(params))) if seeds is None else seeds
    positions = [0] * len(params) if positions is None else positions
    return sampling_tensors(params, seeds, positions, CPU, **kwargs)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- the allowed set and its distribution --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", FILTERS)
def test_processed_logits_equal_hf_warpers(kwargs):
    sp = SamplingParams(**kwargs)
    logits = random_logits(16, 1000, seed=1)
    ours = processed_logits(logits, tensors_for([sp] * 16))
    hf = hf_warped(logits, sp)
    assert torch.equal(ours.isfinite(), hf.isfinite())
    assert torch.equal(ours[hf.isfinite()], hf[hf.isfinite()])
    # and the draws (the top-k candidates when every row has a top_k) stay inside that set, for many seeds
    for seed in range(20):
        tokens = sample(logits, tensors_for([sp] * 16, seeds=[seed * 16 + i for i in range(16)])).token_ids
        assert hf.isfinite()[torch.arange(16), tokens].all()


def test_a_mixed_batch_filters_each_row_by_its_own_settings():
    params = [SamplingParams(**FILTERS[i % len(FILTERS)]) for i in range(24)] + [SamplingParams(temperature=0)]
    logits = random_logits(len(params), 500, seed=2)
    ours = processed_logits(logits, tensors_for(params))
    for row, sp in enumerate(params[:-1]):
        hf = hf_warped(logits[row:row + 1], sp)[0]
        assert torch.equal(ours[row].isfinite(), hf.isfinite()), (row, sp)
        assert torch.equal(ours[row][hf.isfinite()], hf[hf.isfinite()])
    assert torch.equal(ours[-1], logits[-1])  # a greedy row's logits stay as they are


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0, top_p=0.95), dict(temperature=0.6, top_p=0.5, min_p=0.02),
                                    dict(temperature=1.0, min_p=0.05), dict(temperature=0.7, top_k=40, top_p=0.9)])
def test_thresholds_keep_what_hf_keeps_over_a_full_vocabulary(kwargs):
    """Qwen's 151,936 tokens, from flat to peaked rows: the bisection's cut (what a GPU samples from, no sort)
    equals HF's sorted one, and draws by thresholds equal draws from the CPU's full sort."""
    sp, vocab = SamplingParams(**kwargs), 151936
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(8)) * torch.tensor([[0.5], [1], [3], [8]])
    hf = hf_warped(logits, sp)
    ours = processed_logits(logits, tensors_for([sp] * 4))
    assert torch.equal(ours.isfinite(), hf.isfinite())
    assert torch.equal(ours[hf.isfinite()], hf[hf.isfinite()])
    t = tensors_for([sp] * 4, seeds=[3, 4, 5, 6])
    by_sort = sample(logits, t).token_ids
    t.by_thresholds = True
    assert torch.equal(sample(logits, t).token_ids, by_sort)


def test_a_tie_at_the_top_p_cut_keeps_every_tied_token():
    """Probabilities .447, .164 x 3, .061: top_p .75 is reached inside the tied three, which all stay (a sort
    would keep an arbitrary two of them)."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    kept = processed_logits(logits, tensors_for(SamplingParams(temperature=1.0, top_p=0.75)))[0].isfinite()
    assert kept.tolist() == [True, True, True, True, False]


@settings(max_examples=60, deadline=None)
@given(grid=st.lists(st.integers(-400, 400), min_size=2, max_size=60, unique=True),
       temperature=st.floats(0.05, 3.0), top_k=st.integers(-1, 70), top_p=st.floats(0.01, 1.0),
       min_p=st.floats(0.0, 1.0), seed=st.integers(0, 2**64 - 1), position=st.integers(0, 10**6))
def test_every_sampled_token_lies_in_the_allowed_set(grid, temperature, top_k, top_p, min_p, seed, position):
    logits = torch.tensor(grid, dtype=torch.float32) / 50  # distinct values: no ties at a top-k boundary
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    allowed = hf_warped(logits.unsqueeze(0), sp)[0].isfinite()
    n = 32  # one row per draw: each its own seed and position
    t = tensors_for([sp] * n, seeds=[(seed + i) % 2**64 for i in range(n)], positions=[position + i for i in range(n)])
    tokens = sample(logits.expand(n, -1), t).token_ids
    assert allowed[tokens].all(), (tokens, allowed.nonzero())
    assert torch.equal(processed_logits(logits.unsqueeze(0), tensors_for(sp))[0].isfinite(), allowed)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.8), dict(temperature=1.0, top_k=4),
                                    dict(temperature=0.7, top_k=6, top_p=0.8), dict(temperature=1.2, top_p=0.9),
                                    dict(temperature=1.0, min_p=0.2), dict(temperature=2.0)])
@pytest.mark.parametrize("vary", ["seed", "position"])
def test_frequencies_match_the_renormalised_distribution(kwargs, vary):
    """Chi-square goodness of fit over the allowed tokens, at significance 0.001 (critical values in CHI2_999);
    the draws are deterministic, so this is a fixed-seed check that cannot flake."""
    sp = SamplingParams(**kwargs)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    n = 20000
    seeds, positions = (list(range(n)), [7] * n) if vary == "seed" else ([1234] * n, list(range(n)))
    tokens = sample(logits.expand(n, -1), tensors_for([sp] * n, seeds, positions)).token_ids
    observed = torch.bincount(tokens, minlength=10).double()
    warped = hf_warped(logits.unsqueeze(0), sp)[0]
    allowed = warped.isfinite()
    expected = torch.softmax(warped.double(), -1) * n
    assert observed[~allowed].sum() == 0
    chi2 = ((observed[allowed] - expected[allowed]) ** 2 / expected[allowed]).sum().item()
    assert chi2 < CHI2_999[int(allowed.sum()) - 1], (chi2, observed, expected)


def by_token_reference(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """vLLM's per-token settings on one row in plain PyTorch: the allow-list and the biases, before the warpers."""
    logits = logits.clone()
    if sp.allowed_token_ids is not None:
        kept = torch.zeros_like(logits, dtype=torch.bool)
        kept[sp.allowed_token_ids] = True
        logits = logits.masked_fill(~kept, float("-inf"))
    for token, bias in (sp.logit_bias or {}).items():
        logits[token] += bias
    return hf_warped(logits.unsqueeze(0), sp)[0] if sp.temperature > 0 else logits  # greedy: no warpers


BY_TOKEN = [
    dict(temperature=0.8, logit_bias={3: 2.5, 7: -1.0, 40: float("-inf")}),
    dict(temperature=1.0, top_k=5, allowed_token_ids=[1, 2, 3, 50, 60, 70, 80]),
    dict(temperature=1.2, top_p=0.9, logit_bias={2: 4.0}, allowed_token_ids=[2, 9, 11]),
    dict(temperature=0.7, min_p=0.1, logit_bias={"12": -0.5}),
    dict(temperature=1.0),
]


def test_per_token_settings_equal_a_plain_reference_row_by_row():
    params = [SamplingParams(**BY_TOKEN[i % len(BY_TOKEN)]) for i in range(15)]
    params.append(SamplingParams(temperature=0, allowed_token_ids=[5, 6]))
    logits = random_logits(len(params), 120, seed=9)
    ours = processed_logits(logits, tensors_for(params))
    for row, sp in enumerate(params):
        ref = by_token_reference(logits[row], sp)
        assert torch.equal(ours[row].isfinite(), ref.isfinite()), (row, sp)
        assert torch.equal(ours[row][ref.isfinite()], ref[ref.isfinite()]), (row, sp)
    tokens = sample(logits, tensors_for(params)).token_ids
    assert int(tokens[-1]) == 5 + int(logits[-1, 6] > logits[-1, 5])  # greedy within its two tokens
    for row, sp in enumerate(params):
        assert by_token_reference(logits[row], sp)[tokens[row]].isfinite(), (row, sp)


@pytest.mark.parametrize("kwargs", [dict(logit_bias={0: -1.5, 4: 2.0, 9: 3.0}),
                                    dict(allowed_token_ids=[0, 2, 5, 8]),
                                    dict(top_k=4, logit_bias={7: 2.5}, allowed_token_ids=[1, 3, 5, 7, 9])])
def test_biased_and_restricted_draws_match_their_distribution(kwargs):
    """Chi-square over the tokens left, as for the warpers above: the bias moves the probabilities by exp(bias)."""
    sp = SamplingParams(temperature=1.0, **kwargs)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    n = 20000
    tokens = sample(logits.expand(n, -1), tensors_for([sp] * n, list(range(n)), [3] * n)).token_ids
    observed = torch.bincount(tokens, minlength=10).double()
    warped = by_token_reference(logits, sp)
    allowed = warped.isfinite()
    expected = torch.softmax(warped.double(), -1) * n
    assert observed[~allowed].sum() == 0
    chi2 = ((observed[allowed] - expected[allowed]) ** 2 / expected[allowed]).sum().item()
    assert chi2 < CHI2_999[int(allowed.sum()) - 1], (chi2, observed, expected)


def test_greedy_rows_in_a_sampled_batch_stay_argmax():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.6, top_k=20, top_p=0.95), SamplingParams(temperature=0),
              SamplingParams(temperature=1.1, top_p=0.5)] * 8
    logits = random_logits(len(params), 300, seed=3)
    for groups in (params, params[:2] * 24, [params[0], params[3]] * 24):  # plain / filtered / both beside greedy
        tokens = sample(logits, tensors_for(groups)).token_ids
        greedy = torch.tensor([p.temperature == 0 for p in groups])
        assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
        assert not torch.equal(tokens[~greedy], logits[~greedy].argmax(-1))  # and the others do sample


def test_all_greedy_is_argmax():
    logits = random_logits(9, 100, seed=4)
    assert torch.equal(sample(logits, tensors_for([SamplingParams(temperature=0)] * 9)).token_ids,
                       logits.argmax(-1))


def test_greedy_takes_the_first_of_equal_maxima_in_bfloat16():
    """argmax's rule (transformers' greedy) where bfloat16 logits tie at the top, which 8 mantissa bits make
    common: 1.001 and 1.002 both round to 1.0."""
    logits = torch.zeros(4, 1000)
    logits[0, [3, 700]] = 2.0
    logits[1, [999, 5]] = 1.0
    logits[3, 10], logits[3, 11] = 1.001, 1.002
    tokens = sample(logits.to(torch.bfloat16), tensors_for([SamplingParams(temperature=0)] * 4)).token_ids
    assert tokens.tolist() == [3, 5, 0, 10]


# ---- seeds ----------------------------------------------------------------------------------------------------

def other_rows(count: int, vocab: int, seed: int) -> tuple[list[SamplingParams], torch.Tensor]:
    kinds = [dict(temperature=0), dict(temperature=0.9), dict(temperature=0.8, top_k=60),
             dict(temperature=1.2, top_p=0.7), dict(temperature=1.0, top_k=3, min_p=0.1)]
    return [SamplingParams(**kinds[(seed + i) % len(kinds)]) for i in range(count)], random_logits(count, vocab, seed)


@pytest.mark.parametrize("kwargs", FILTERS + [dict(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.3)])
def test_a_seeded_row_draws_the_same_alone_or_in_any_batch(kwargs):
    sp, vocab = SamplingParams(**kwargs), 400
    logits = random_logits(10, vocab, seed=5, scale=1.0)
    seeds, positions = [11 + 1000 * i for i in range(10)], [3 * i for i in range(10)]
    counts = token_counts([[1, 2, 2]] * 64, vocab, CPU)
    mask = prompt_token_mask([[5, 6]] * 64, vocab, CPU)

    def draw(rows_params, rows_logits, rows_seeds, rows_positions):
        n = len(rows_params)
        t = sampling_tensors(rows_params, rows_seeds, rows_positions, CPU, output_counts=counts[:n],
                             prompt_mask=mask[:n])
        return sample(rows_logits, t).token_ids

    alone = [draw([sp], logits[i:i + 1], seeds[i:i + 1], positions[i:i + 1]).item() for i in range(10)]
    for batch_size, where in [(2, 1), (7, 0), (64, 40), (64, 63)]:
        params, batch_logits = other_rows(batch_size, vocab, seed=batch_size + where)
        for i in range(10):
            params[where] = sp
            batch_logits[where] = logits[i]
            batch_seeds = [seeds[i] if r == where else 77 * r for r in range(batch_size)]
            batch_positions = [positions[i] if r == where else r for r in range(batch_size)]
            tokens = draw(params, batch_logits, batch_seeds, batch_positions)
            assert tokens[where].item() == alone[i], (batch_size, where, i)
    assert len(set(alone)) > 1  # and the draws are draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_draws_a_few_rows_at_a_time_as_in_one_call(monkeypatch, dtype):
    """Full-vocabulary work runs CPU_ROW_CHUNK rows at a time on the CPU (cache-sized temporaries): the same
    tokens as one call over the whole batch, for every filter, penalties and greedy rows mixed."""
    from nanovllm.layers import sampler
    vocab, rows = 30_000, 11  # 330k logits: past CPU_CHUNK_MIN_ELEMENTS, and an odd last chunk
    assert rows * vocab >= sampler.CPU_CHUNK_MIN_ELEMENTS and rows % sampler.CPU_ROW_CHUNK
    logits = random_logits(rows, vocab, seed=8).to(dtype)
    counts = token_counts([[1, 2, 2, 7]] * rows, vocab, CPU)
    mask = prompt_token_mask([[5, 6, 7]] * rows, vocab, CPU)
    cases = [[SamplingParams(**kw)] * rows for kw in FILTERS if kw.get("top_k") is None]
    cases.append([SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.2)] * rows)
    cases.append([SamplingParams(**FILTERS[i % len(FILTERS)]) if i % 3 else SamplingParams(temperature=0)
                  for i in range(rows)])
    for params in cases:
        t = tensors_for(params, seeds=[3 * i for i in range(rows)], positions=list(range(rows)),
                        output_counts=counts, prompt_mask=mask)
        chunked = sample(logits, t).token_ids
        with monkeypatch.context() as m:
            m.setattr(sampler, "CPU_ROW_CHUNK", rows)
            whole = sample(logits, t).token_ids
        assert torch.equal(chunked, whole), params[1]


def test_the_cpu_draws_top_p_and_min_p_from_candidates_as_from_the_sorted_row(monkeypatch):
    """Rows without a common top-k draw from the largest NUCLEUS_CANDIDATES logits when those provably hold every
    token the filters keep, else from the whole sorted row: the same tokens either way, over peaked rows (the
    candidates hold the nucleus) and flat ones (they do not: the sort), top-p, min-p, top-k above and below the
    candidates, and plain and greedy rows in the batch."""
    from nanovllm.layers import sampler
    vocab, rows, k = 12000, 24, 200  # 288k logits: two rows at a time (see CPU_ROW_CHUNK)
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    peaked = torch.arange(rows) % 3 != 0
    spikes = torch.randint(vocab, (rows, 8), generator=gen)
    logits[peaked] = logits[peaked].scatter_add(1, spikes[peaked], torch.full((int(peaked.sum()), 8), 14.0))
    kinds = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, min_p=0.05), dict(temperature=1.3, top_p=0.8,
             min_p=0.02), dict(temperature=0.9, top_k=50, top_p=0.9), dict(temperature=1.0, top_k=400),
             dict(temperature=0.8), dict(temperature=0)]
    used = []
    real_draw = sampler._draw_sorted
    monkeypatch.setattr(sampler, "_draw_sorted", lambda values, *a, **kw: used.append(values.size(1)) or
                        real_draw(values, *a, **kw))
    for dtype in (torch.float32, torch.bfloat16):
        for shift in range(len(kinds)):
            params = [SamplingParams(**kinds[(i + shift) % len(kinds)]) for i in range(rows)]
            t = tensors_for(params, seeds=[5 * i + shift for i in range(rows)], positions=[shift] * rows)
            monkeypatch.setattr(sampler, "NUCLEUS_CANDIDATES", k)
            by_candidates = sample(logits.to(dtype), t).token_ids
            monkeypatch.setattr(sampler, "NUCLEUS_CANDIDATES", vocab)  # never fewer than the row: the sort
            by_sort = sample(logits.to(dtype), t).token_ids
            assert torch.equal(by_candidates, by_sort), (dtype, shift)
    assert k in used and vocab in used  # both ways were taken


def test_other_seeds_and_positions_draw_otherwise():
    logits = torch.zeros(1000)  # uniform: 20 draws collide rarely (about 0.19 expected pairs)
    sp = SamplingParams(temperature=1.0)
    by_seed = sample(logits.expand(20, -1), tensors_for([sp] * 20, seeds=list(range(20)), positions=[0] * 20))
    by_position = sample(logits.expand(20, -1), tensors_for([sp] * 20, seeds=[0] * 20, positions=list(range(20))))
    assert len(set(by_seed.token_ids.tolist())) >= 18
    assert len(set(by_position.token_ids.tolist())) >= 18
    # seeds beyond 64 bits wrap, negative ones are their two's complement; the high word matters
    assert torch.equal(torch.from_numpy(row_noise_keys([2**64 + 5, -1], [0, 0])),
                       torch.from_numpy(row_noise_keys([5, 2**64 - 1], [0, 0])))
    assert len(set(row_noise_keys([1, 1 + 2**32, 1 + 2**63], [0, 0, 0]).tolist())) == 3


def test_the_noise_is_uniform_and_independent():
    """The counter-based uniforms, 512 rows (32 seeds x 16 positions) x 2048 token ids = 1M draws: chi-square
    over 1000 bins (critical value 1142.8 at 0.001, df 999), Kolmogorov-Smirnov (sqrt(n) D < 1.949 at 0.001),
    and chi-square over 32 x 32 bins of pairs of neighbouring token ids, positions and seeds (critical value
    1168.5 at 0.001, df 1023); Wilson-Hilferty quantiles."""
    seeds = [s for s in range(32) for _ in range(16)]
    positions = [p for _ in range(32) for p in range(16)]
    u = uniform_noise(torch.from_numpy(row_noise_keys(seeds, positions)).unsqueeze(1), torch.arange(2048)).double()
    assert 0 < u.min() and u.max() < 1
    n = u.numel()
    expected = n / 1000
    chi2 = ((torch.bincount((u * 1000).long().flatten(), minlength=1000) - expected) ** 2 / expected).sum()
    assert chi2 < 1142.8
    ranked = u.flatten().sort().values
    step = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((step - ranked).max(), (ranked - (step - 1 / n)).max()) * math.sqrt(n)
    assert ks < 1.949
    grid = u.view(32, 16, 2048)
    for a, b in [(grid[..., :-1], grid[..., 1:]), (grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:])]:
        cells = ((a * 32).long() * 32 + (b * 32).long()).flatten()
        expected = cells.numel() / 1024
        assert ((torch.bincount(cells, minlength=1024) - expected) ** 2 / expected).sum() < 1168.5


# ---- penalties and bans ---------------------------------------------------------------------------------------

PROMPTS = [[3, 7, 7, 100], [5], [250, 251, 3], [9, 9, 9, 9], [1, 2, 3, 4, 5, 6]]
OUTPUTS = [[7, 8, 8, 8], [], [3, 40], [9], [200, 201, 200, 5, 5, 5]]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_hf(penalty):
    vocab = 300
    logits = random_logits(len(PROMPTS), vocab, seed=6)
    sp = SamplingParams(temperature=1.0, repetition_penalty=penalty)  # temperature 1 leaves the logits exact
    t = tensors_for([sp] * len(PROMPTS), output_counts=token_counts(OUTPUTS, vocab, CPU),
                    prompt_mask=prompt_token_mask(PROMPTS, vocab, CPU))
    ours = processed_logits(logits, t)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for row, (prompt, output) in enumerate(zip(PROMPTS, OUTPUTS)):
        expected = hf(torch.tensor([prompt + output]), logits[row:row + 1].clone())[0]
        assert torch.equal(ours[row], expected)
    # greedy decoding picks HF's argmax of the penalised logits
    greedy = tensors_for([SamplingParams(temperature=0, repetition_penalty=penalty)] * len(PROMPTS),
                         output_counts=t.output_counts, prompt_mask=t.prompt_mask)
    assert torch.equal(sample(logits, greedy).token_ids, ours.argmax(-1))


@pytest.mark.parametrize("presence, frequency, repetition", [(0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (-1.5, 2.0, 1.0),
                                                             (1.0, -0.3, 1.4)])
def test_presence_and_frequency_penalties_equal_a_plain_reference(presence, frequency, repetition):
    vocab = 300
    logits = random_logits(len(PROMPTS), vocab, seed=7)
    sp = SamplingParams(temperature=1.0, presence_penalty=presence, frequency_penalty=frequency,
                        repetition_penalty=repetition)
    t = tensors_for([sp] * len(PROMPTS), output_counts=token_counts(OUTPUTS, vocab, CPU),
                    prompt_mask=prompt_token_mask(PROMPTS, vocab, CPU))
    ours = processed_logits(logits, t)
    for row, (prompt, output) in enumerate(zip(PROMPTS, OUTPUTS)):
        expected = logits[row].clone()
        for token in set(prompt) | set(output):  # repetition first, as vLLM
            value = expected[token]
            expected[token] = value / repetition if value > 0 else value * repetition
        for token, count in Counter(output).items():
            expected[token] -= frequency * count + presence
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_computed_on_the_touched_tokens_equal_the_dense_definition(dtype):
    """The penalties run only on tokens of each row's prompt or output: the same bits as the definition over every
    logit, for every penalty, rows with and without them, infinite and zero logits; the caller's logits stay."""
    from nanovllm.layers.sampler import _penalize_rows, _penalize_touched
    rows, vocab = 6, 3000
    g = torch.Generator().manual_seed(11)
    logits = random_logits(rows, vocab, seed=12).to(dtype)
    logits[0, :5] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e-30])
    counts = torch.randint(0, 4, (rows, vocab), generator=g, dtype=torch.int32)
    counts *= torch.rand(rows, vocab, generator=g) < 0.05
    counts[0, :5] = 2
    counts[5] = 0  # a row of the zero slot: no prompt, no output
    mask = torch.rand(rows, vocab, generator=g) < 0.05
    mask[5] = False
    repetition = torch.tensor([1.3, 1.0, 0.7, 2.0, 1.0, 1.5])
    presence = torch.tensor([0.5, 0.0, -1.0, 0.0, 0.3, 0.2])
    frequency = torch.tensor([0.2, 0.0, 0.4, -0.3, 0.0, 0.1])
    raw = logits.clone()
    touched = _penalize_touched(logits, counts, mask, repetition, presence, frequency)
    dense = _penalize_rows(logits, counts, mask, repetition, presence, frequency)
    assert touched.dtype == torch.float32 and torch.equal(touched, dense)
    assert not torch.equal(touched[0], logits[0].float())  # the penalties did something
    assert torch.equal(logits, raw)


def test_rows_without_penalties_keep_their_logits_in_a_penalised_batch():
    vocab = 300
    logits = random_logits(2, vocab, seed=8)
    params = [SamplingParams(temperature=1.0, repetition_penalty=1.7), SamplingParams(temperature=1.0)]
    t = tensors_for(params, output_counts=token_counts(OUTPUTS[:2], vocab, CPU),
                    prompt_mask=prompt_token_mask(PROMPTS[:2], vocab, CPU))
    ours = processed_logits(logits, t)
    assert torch.equal(ours[1], logits[1])
    assert not torch.equal(ours[0], logits[0])


def test_a_min_p_below_float32_s_range_samples_as_min_p_0():
    """The device reads min_p as float32, where 1e-300 is 0: the row is then unfiltered there, and the host's choice
    of draw must agree (it waited for a filtered draw and returned uninitialised token ids)."""
    logits = random_logits(4, 50, seed=8)
    seeds = [11, 12, 13, 14]
    tiny = sample(logits, tensors_for([SamplingParams(temperature=1.0, min_p=1e-300)] * 4, seeds=seeds))
    off = sample(logits, tensors_for([SamplingParams(temperature=1.0)] * 4, seeds=seeds))
    assert torch.equal(tiny.token_ids, off.token_ids)


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    vocab, eos = 50, 49
    logits = torch.zeros(4, vocab)
    logits[:, [eos, 3, 4]] = 10.0  # the banned ones are the likeliest
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3]),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3]),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3], ignore_eos=True),
              SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[4, 3])]
    t = tensors_for(params, positions=[2, 3, 0, 4], eos_token_ids=[eos])
    banned = processed_logits(logits, t).isinf()
    assert banned[0].nonzero().flatten().tolist() == [3, eos]
    assert not banned[1].any()  # three tokens exist: nothing is banned any more
    assert banned[2].nonzero().flatten().tolist() == [3, eos]  # as vLLM: also with ignore_eos
    assert banned[3].nonzero().flatten().tolist() == [3, 4, eos]
    tokens = sample(logits, t).token_ids.tolist()
    assert tokens[0] == 4 and tokens[1] == 3 and tokens[2] == 4 and tokens[3] not in (3, 4, eos)


def test_token_count_helpers():
    counts = token_counts([[1, 2, 2], [], [4]], 6, CPU)
    assert counts.tolist() == [[0, 1, 2, 0, 0, 0], [0] * 6, [0, 0, 0, 0, 1, 0]]
    assert counts.dtype == torch.int32
    count_tokens_(counts, torch.tensor([2, 0, 4]))
    assert counts.tolist() == [[0, 1, 3, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 2, 0]]
    count_tokens_(counts, torch.tensor([5, 5]), rows=torch.tensor([2, 0]))
    assert counts.tolist() == [[0, 1, 3, 0, 0, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 2, 1]]
    assert prompt_token_mask([[0, 0, 3]], 4, CPU).tolist() == [[True, False, False, True]]


# ---- logprobs -------------------------------------------------------------------------------------------------

def test_logprobs_are_the_raw_log_softmax():
    vocab = 300
    logits = random_logits(6, vocab, seed=9)
    params = [SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.7, top_p=0.9, logprobs=5),
              SamplingParams(temperature=1.0, logprobs=1, min_tokens=2, stop_token_ids=[int(logits[4].argmax())]),
              SamplingParams(temperature=0, logprobs=2)]
    t = tensors_for(params, output_counts=token_counts(OUTPUTS + [[]], vocab, CPU),
                    prompt_mask=prompt_token_mask(PROMPTS + [[]], vocab, CPU))
    out = sample(logits, t)
    reference = torch.log_softmax(logits, -1)  # before penalties, bans and temperature (vLLM's raw logprobs)
    torch.testing.assert_close(out.logprobs.token_logprobs, reference[torch.arange(6), out.token_ids],
                               rtol=0, atol=1e-6)
    top = reference.topk(5, -1)  # the most any row asked for
    assert torch.equal(out.logprobs.top_ids, top.indices)
    torch.testing.assert_close(out.logprobs.top_logprobs, top.values, rtol=0, atol=1e-6)


def test_logprobs_of_many_rows_are_computed_in_blocks_with_the_same_bits(monkeypatch):
    """A long prompt's scores run LOGPROB_ROWS rows at a time (a small float32 copy; on the CPU CPU_LOGPROB_ROWS):
    equal to one call."""
    from nanovllm.layers import sampler
    logits = random_logits(23, 300, seed=4).bfloat16()
    ids = torch.randint(300, (23,), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(sampler, "CPU_LOGPROB_ROWS", 10 ** 6)
    whole = sampler.compute_logprobs(logits, ids, 4)
    rows = torch.randperm(23, generator=torch.Generator().manual_seed(2))[:17]  # some rows, in another order
    picked = sampler.compute_logprobs(logits[rows], ids[:17], 4)
    monkeypatch.setattr(sampler, "LOGPROB_ROWS", 5)  # 23 rows: four blocks of 5 and one of 3
    blocks = sampler.compute_logprobs(logits, ids, 4)
    assert all(torch.equal(a, b) for a, b in zip(whole.tensors(), blocks.tensors(), strict=True))
    by_rows = sampler.compute_logprobs(logits, ids[:17], 4, rows)
    assert all(torch.equal(a, b) for a, b in zip(picked.tensors(), by_rows.tensors(), strict=True))


def test_no_logprobs_unless_asked():
    logits = random_logits(3, 50, seed=10)
    assert sample(logits, tensors_for([SamplingParams(temperature=1.0)] * 3)).logprobs is None
    only_sampled = sample(logits, tensors_for([SamplingParams(temperature=1.0, logprobs=0)] * 3)).logprobs
    assert only_sampled.top_ids.shape == (3, 0)


# ---- the record and its building ------------------------------------------------------------------------------

def test_the_temperature_only_case_builds_nothing_else():
    t = tensors_for([SamplingParams(temperature=0.6)] * 4)
    assert t.temperatures.tolist() == pytest.approx([0.6] * 4)
    assert [t.top_k, t.top_p_complement, t.min_p, t.repetition_penalties, t.output_counts, t.banned_rows] == [None] * 6
    assert (t.any_plain, t.any_greedy, t.any_filtered, t.max_num_logprobs) == (True, False, False, None)
    t = tensors_for([SamplingParams(temperature=0.6, top_k=20), SamplingParams(temperature=1, top_k=7, top_p=0.9)])
    assert (t.any_plain, t.any_filtered, t.max_top_k) == (False, True, 20)  # top-k candidates, no full sort
    t = tensors_for([SamplingParams(temperature=0.6, top_k=20), SamplingParams(temperature=1, top_p=0.9)])
    assert t.max_top_k is None  # a row has top-p without top-k: a full sort


def test_bad_builds_say_what_is_missing():
    with pytest.raises(ValueError, match="a row has a penalty: pass output_counts and prompt_mask"):
        tensors_for(SamplingParams(presence_penalty=0.5))
    with pytest.raises(ValueError, match="got 2 rows, 1 seeds and 2 positions"):
        sampling_tensors([SamplingParams()] * 2, [1], [0, 0], CPU)


# ---- mixed batches: the thresholds against the sort, the kernels against the PyTorch functions -------------

def run_mixed_batches(vocab: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                      thresholds: bool = False):
    """thresholds: rows without a top_k cap take the GPU's way (bisection) on any device."""
    kinds = [[SamplingParams(temperature=0.7)], [SamplingParams(temperature=0), SamplingParams(temperature=1.0)],
             [SamplingParams(temperature=0.6, top_k=20, top_p=0.95)],
             [SamplingParams(temperature=0.6, top_k=1), SamplingParams(temperature=1, top_k=50, min_p=0.1)],
             [SamplingParams(temperature=0.9, top_p=0.9), SamplingParams(temperature=0)],
             [SamplingParams(temperature=1, repetition_penalty=1.2, min_tokens=2, stop_token_ids=[0], logprobs=2)],
             [SamplingParams(temperature=1, presence_penalty=0.5, top_k=5)]]
    results = []
    for batch in (1, 2, 3, 17, 64):
        logits = random_logits(batch, vocab, seed=batch).to(device, dtype)
        counts = token_counts([[i % vocab, 7 * i % vocab] for i in range(batch)], vocab, device)
        mask = prompt_token_mask([[i % vocab] for i in range(batch)], vocab, device)
        for params in kinds:
            rows = [params[i % len(params)] for i in range(batch)]
            t = sampling_tensors(rows, list(range(batch)), [5] * batch, device, eos_token_ids=[vocab - 1],
                                 output_counts=counts, prompt_mask=mask)
            t.by_thresholds |= thresholds and t.max_top_k is None
            results.append(sample(logits, t).token_ids.cpu())
    return results


def test_thresholds_draw_what_the_sort_draws_in_mixed_batches():
    """On float32 logits (no ties) the thresholds keep what the CPU's sort keeps, with penalties, bans, top-k alone
    and greedy rows in the batch."""
    by_thresholds = run_mixed_batches(300, thresholds=True)
    assert all(torch.equal(a, b) for a, b in zip(by_thresholds, run_mixed_batches(300)))


# ---- CUDA -----------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("kwargs", FILTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_kernels_draw_what_the_cpu_draws_and_stay_batch_invariant(kwargs, dtype):
    """The Triton kernels draw what the CPU's PyTorch code draws (the noise is integer arithmetic), and a row
    draws the same in a batch of 64 as alone."""
    sp, vocab, n = SamplingParams(**kwargs), 151936, 64
    logits = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    seeds, positions = [1000 + i for i in range(n)], [i * 5 for i in range(n)]
    gpu = sample(logits.cuda(), sampling_tensors([sp] * n, seeds, positions, torch.device("cuda"))).token_ids
    on_cpu = tensors_for([sp] * n, seeds, positions)
    on_cpu.by_thresholds = on_cpu.max_top_k is None  # as the GPU: bfloat16 ties at a cut all stay, a sort splits them
    cpu = sample(logits.float(), on_cpu).token_ids
    assert (gpu.cpu() == cpu).float().mean() > 0.98  # the kernels' approximate logs may flip a near tie
    alone = [sample(logits[i:i + 1].cuda(), sampling_tensors([sp], seeds[i:i + 1], positions[i:i + 1],
                                                             torch.device("cuda"))).token_ids.item()
             for i in range(8)]
    assert alone == gpu[:8].tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_warm_up_compiles_every_kernel_and_the_kernels_draw_as_pytorch():
    from triton import knobs
    device, vocab, compiled = torch.device("cuda"), 151936, []
    for task in sampler_warm_up_tasks(vocab, torch.bfloat16, device):
        task()
    knobs.runtime.jit_cache_hook = lambda **kw: compiled.append(kw["fn"].name if "fn" in kw else "?")
    try:
        with torch.inference_mode():  # as the runner samples
            kernels = run_mixed_batches(vocab, device, torch.bfloat16)
    finally:
        knobs.runtime.jit_cache_hook = None
    assert compiled == []
    with fused_kernels(False):  # the PyTorch functions on the GPU
        reference = run_mixed_batches(vocab, device, torch.bfloat16)
    agree = sum(int((a == b).sum()) for a, b in zip(kernels, reference)) / sum(a.numel() for a in kernels)
    assert agree > 0.99, agree  # the kernels' approximate logs may round a near tie the other way
