"""Batched sampling of one step's logits [B, V] on the device: no per-row Python loop, no host sync.

What the runner passes each step (`sample(logits, tensors) -> SamplerOutput`):
  - `tensors = sampling_tensors(params, seeds, positions, device, eos_token_ids, output_counts, prompt_mask)`:
    per row its SamplingParams, its seed (the request's, or one the engine drew for it) and its output position
    (tokens generated so far, the one about to be sampled excluded); EOS and stop ids are banned while
    position < min_tokens;
  - only when a row has a penalty: `output_counts` [B, V] int32 (how often each token was generated) and
    `prompt_mask` [B, V] bool (which tokens the prompt holds). Keep one row per sequence on the device:
    `token_counts` / `prompt_token_mask` build them, `count_tokens_` adds a step's sampled ids.
  - only when a row has bad words: `bad_word_rows`, `bad_word_token_ids`, `bad_word_hits` set on the tensors
    (engine.penalties.OutputHistory finds the hits on the device).
Order as vLLM: the allow-list (allowed_token_ids), bad words, min_tokens' bans and logit_bias, penalties; greedy
rows take the argmax; sampled rows: / temperature, top-k, top-p, min-p, draw. `SamplerOutput.logprobs` is the
raw log-softmax of the logits, before any of that (vLLM's default).

A row's draw depends only on its logits, its seed and its output position: the noise of token v is a hash of
(seed, position, v), so a seeded request samples the same tokens alone or in any batch.
"""
import functools
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Sequence

import numpy as np
import torch

from nanovllm.layers.cpu_packed import in_token_chunks
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.kernels import fused_kernel
from nanovllm.utils.math import cdiv

TOP_K_OFF = 2**31 - 1  # a top_k no vocabulary reaches
_MASK32 = 0xFFFFFFFF
_MASK64 = 2**64 - 1
# xorshift-multiply constants with low bias from Wellons' hash-prospector list, chosen below 2**31 so that a
# 32-bit value times one fits in int64 (torch has no unsigned 32-bit arithmetic)
_MUL1, _MUL2 = 0x4BDC9AA5, 0x2729B469
_STEP = 0x61C88647  # odd Weyl step between consecutive token ids, also below 2**31
_POSITION_SALT = 0x2545F491  # keeps (seed 0, position 0) off the hash's fixed point 0
# On the CPU the full-vocabulary work runs this many rows at a time: a whole batch's temporaries (int64 hashes of
# 152k ids per row, float32 scores) are fresh, page-faulted mappings of tens of MB per op, a few rows' stay in
# cache (a temperature draw over 32 rows of 152k: 180 -> 25 ms). Every op is row-wise: the same bits.
CPU_ROW_CHUNK = 2
CPU_CHUNK_MIN_ELEMENTS = 1 << 18  # smaller work (e.g. top-k candidates) in one call


@dataclass(slots=True)
class SamplingTensors:
    """One step's per-row sampling settings on the device; a group no row uses is None and costs nothing."""
    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    noise_keys: torch.Tensor  # [B] int64 in [0, 2**32): hash of (seed, output position)
    top_k: torch.Tensor | None = None  # [B] int64, TOP_K_OFF where off
    top_p_complement: torch.Tensor | None = None  # [B] float32, 1 - top_p computed in float64 as HF does
    min_p: torch.Tensor | None = None  # [B] float32
    repetition_penalties: torch.Tensor | None = None  # [B] float32
    presence_penalties: torch.Tensor | None = None  # [B] float32
    frequency_penalties: torch.Tensor | None = None  # [B] float32
    output_counts: torch.Tensor | None = None  # [B, V] int32
    prompt_mask: torch.Tensor | None = None  # [B, V] bool
    banned_rows: torch.Tensor | None = None  # [N] int64: logits[banned_rows[i], banned_token_ids[i]] = -inf
    banned_token_ids: torch.Tensor | None = None  # [N] int64
    bias_rows: torch.Tensor | None = None  # [N] int64: logits[bias_rows[i], bias_token_ids[i]] += bias_values[i]
    bias_token_ids: torch.Tensor | None = None  # [N] int64
    bias_values: torch.Tensor | None = None  # [N] float32
    bad_word_rows: torch.Tensor | None = None  # [N] int64: -inf at (row, token id) where bad_word_hits[i]
    bad_word_token_ids: torch.Tensor | None = None  # [N] int64
    bad_word_hits: torch.Tensor | None = None  # [N] bool (on the device: no read-back)
    restricted_rows: torch.Tensor | None = None  # [R] int64: rows with allowed_token_ids, -inf outside the pairs
    allowed_rows: torch.Tensor | None = None  # [N] int64: (allowed_rows[i], allowed_token_ids[i]) stays
    allowed_token_ids: torch.Tensor | None = None  # [N] int64
    # host-side facts that pick the code path without reading the device
    any_greedy: bool = False
    any_plain: bool = False  # a sampled row without top-k / top-p / min-p: the full-vocabulary race
    any_filtered: bool = False
    max_top_k: int | None = None  # filtered rows draw from topk(max_top_k); None: from the whole vocabulary
    top_k_width: int | None = None  # the largest top_k of the filtered rows that have one
    # max_top_k None: thresholds found by bisection (off the CPU: a GPU sorts 152k-wide rows slowly) or a full sort
    # (the CPU, which sorts fast and pays for each of the bisection's passes); both keep the tokens HF keeps
    by_thresholds: bool = False
    max_num_logprobs: int | None = None


@dataclass(slots=True)
class TokenLogprobs:
    """Raw logprobs (log-softmax of the logits) of one token per row and of each row's top-N tokens."""
    token_logprobs: torch.Tensor  # [B] float32
    top_ids: torch.Tensor  # [B, N] int64, most likely first
    top_logprobs: torch.Tensor  # [B, N] float32
    token_ranks: torch.Tensor  # [B] int64: the token's rank, vLLM's: how many tokens are at least as likely

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.token_logprobs, self.top_ids, self.top_logprobs, self.token_ranks


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: TokenLogprobs | None = None  # when a row asked; N is the most any row asked for


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """Sample one token per row of logits [B, V] under the settings in t."""
    raw, logits = logits, _penalize_and_ban(logits, t)
    tokens = None  # what rows without top-k / top-p / min-p get
    if t.any_plain:
        tokens = _race(logits, t.temperatures, t.noise_keys)  # greedy rows get the argmax here too
    elif t.any_greedy:
        tokens = _greedy(logits)
    if t.any_filtered:
        if tokens is None:  # every row is filtered
            tokens = torch.empty(logits.size(0), dtype=torch.int64, device=logits.device)
        if t.by_thresholds:
            tokens = _draw_by_thresholds(logits, t.temperatures, _top_k_thresholds(logits, t), t.top_k,
                                         t.top_p_complement, t.min_p, t.noise_keys, tokens)
        else:
            if t.max_top_k is not None:  # a few PyTorch ops on [B, max_top_k] after the topk
                values, ids = logits.topk(min(t.max_top_k, logits.size(1)), -1)
                tokens = _in_cpu_row_chunks(_draw_sorted, values, ids, t.temperatures, t.noise_keys, t.top_k,
                                            t.top_p_complement, t.min_p, tokens)
            else:
                tokens = _in_cpu_row_chunks(_draw_by_candidates, logits, t.temperatures, t.noise_keys, t.top_k,
                                            t.top_p_complement, t.min_p, tokens)
    logprobs = None
    if t.max_num_logprobs is not None:
        logprobs = compute_logprobs(raw, tokens, t.max_num_logprobs)
    return SamplerOutput(tokens, logprobs)


def processed_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """[B, V] float32: what each row draws from, softmax of these (vLLM's "processed logits"): the logits after
    penalties, bans, temperature, top-k, top-p and min-p, -inf where dropped; greedy rows stop after the bans."""
    logits = _penalize_and_ban(logits, t).float()
    temperatures = t.temperatures.unsqueeze(1)
    out = logits / torch.where(temperatures > 0, temperatures, 1.0)
    if t.any_filtered:
        rows = _filtered_rows(t.temperatures, t.top_k, t.top_p_complement, t.min_p)
        kept = _threshold_filter(logits, t.temperatures, _top_k_thresholds(logits, t), t.top_p_complement, t.min_p)
        out = torch.where(rows.unsqueeze(1), kept, out)
    return out


def _penalize_and_ban(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Every step out of place: the caller's logits stay raw for the logprobs. The biases come before the
    penalties (a repetition penalty divides or multiplies the biased logit, as in vLLM and HF); the -inf of the
    bans and the allow-list are the same in any order."""
    if t.bias_rows is not None:  # in float32, as the reference adds a float32 bias
        logits = logits.float().index_put((t.bias_rows, t.bias_token_ids), t.bias_values, accumulate=True)
    if t.repetition_penalties is not None:
        logits = _apply_penalties(logits, t.output_counts, t.prompt_mask, t.repetition_penalties,
                                  t.presence_penalties, t.frequency_penalties)
    if t.banned_rows is not None:
        minus_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
        logits = logits.index_put((t.banned_rows, t.banned_token_ids), minus_inf)
    if t.bad_word_rows is not None:  # adds -inf where a word hits, 0 (no change) elsewhere
        ban = torch.where(t.bad_word_hits, float("-inf"), 0.0).to(logits.dtype)
        logits = logits.index_put((t.bad_word_rows, t.bad_word_token_ids), ban, accumulate=True)
    if t.restricted_rows is not None:
        kept = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        kept[t.restricted_rows] = False
        kept[t.allowed_rows, t.allowed_token_ids] = True
        logits = logits.masked_fill(~kept, float("-inf"))
    return logits


LOGPROB_ROWS = 1024  # rows per float32 log-softmax: a long prompt's scores need not hold [N, V] twice over
CPU_LOGPROB_ROWS = 8  # on the CPU fewer: the float32 rows stay in cache (32 rows of 152k: 20.7 -> 8.5 ms)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int,
                     rows: torch.Tensor | None = None) -> TokenLogprobs:
    """Raw logprobs of token_ids [B] under logits [B, V] (or under logits[rows], rows [B]), their ranks, and each
    row's num_top most likely tokens (also what prompt logprobs need: the logits of each prompt position and the
    prompt token that follows). Runs LOGPROB_ROWS rows at a time (row-wise: the same bits), so the float32 copies stay small
    for long prompts."""
    num_rows = token_ids.size(0)
    block = min(LOGPROB_ROWS, CPU_LOGPROB_ROWS) if logits.device.type == "cpu" else LOGPROB_ROWS
    if num_rows > block:  # a block of consecutive rows is a view; picked rows are gathered block by block
        parts = [compute_logprobs(logits[i:i + block], token_ids[i:i + block], num_top) if rows is None else
                 compute_logprobs(logits, token_ids[i:i + block], num_top, rows[i:i + block])
                 for i in range(0, num_rows, block)]
        return TokenLogprobs(*(torch.cat(column) for column in zip(*(p.tensors() for p in parts))))
    if rows is not None:
        logits = logits.index_select(0, rows)
    logprobs = torch.log_softmax(logits.float(), -1)
    top_logprobs, top_ids = logprobs.topk(num_top, -1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs >= chosen).sum(-1)  # the token itself counts: rank 1 is the most likely
    return TokenLogprobs(chosen.squeeze(1), top_ids, top_logprobs, ranks)


def sampler_warm_up_tasks(vocab_size: int, dtype: torch.dtype, device: torch.device) -> list[Callable[[], None]]:
    """Tasks that compile, before serving, every kernel variant a step could otherwise compile mid-way: the race,
    the greedy argmax, the filtered draw and the penalties, on the model's logits dtype and, after penalties, on
    float32. One task per kind of sampling, independent of each other (the runner runs them at once through
    utils.kernels.run_warm_up)."""
    rows = 2
    kinds = (dict(), dict(temperature=0), dict(top_k=2), dict(top_p=0.5), dict(repetition_penalty=1.5),
             dict(repetition_penalty=1.5, temperature=0), dict(repetition_penalty=1.5, top_k=2),
             dict(repetition_penalty=1.5, top_p=0.5), dict(repetition_penalty=1.5, logit_bias={0: 1.0}))

    @torch.inference_mode()
    def task(kwargs: dict) -> None:
        logits = torch.zeros(rows, vocab_size, dtype=dtype, device=device)
        counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)
        mask = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        params = [SamplingParams(**{"temperature": 1.0, **kwargs})] * rows
        sample(logits, sampling_tensors(params, [0] * rows, [0] * rows, device, output_counts=counts,
                                        prompt_mask=mask))

    return [functools.partial(task, kwargs) for kwargs in kinds]


# ---- the device functions (Triton kernels on CUDA) ----------------------------------------------------------------

def _in_cpu_row_chunks(fn, *rows: torch.Tensor) -> torch.Tensor:
    """fn(*rows) for a row-wise fn, CPU_ROW_CHUNK rows at a time on the CPU (see CPU_ROW_CHUNK)."""
    return in_token_chunks(fn, *rows, max_rows=CPU_ROW_CHUNK, min_elements=CPU_CHUNK_MIN_ELEMENTS)


@fused_kernel("sampling", "apply_penalties")
def _apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                     repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties: repetition on tokens of the prompt or the output (divide positive logits, multiply
    negative ones), then frequency (times the output count) and presence (once if in the output). Float32 out."""
    # on the CPU only the tokens a penalty changes; elsewhere every logit (nonzero would wait for the device)
    penalize = _penalize_touched if logits.device.type == "cpu" else _penalize_rows
    return penalize(logits, output_counts, prompt_mask, repetition, presence, frequency)


def _penalize_rows(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                   repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """The penalties over every logit of each row: the plain definition."""
    logits = logits.float()
    generated = output_counts > 0
    rep = torch.where(prompt_mask | generated, repetition.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    return logits - frequency.unsqueeze(1) * output_counts - presence.unsqueeze(1) * generated


def _penalize_touched(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                      repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """_penalize_rows' bits, computing only the logits a penalty can change: tokens of the prompt or the output,
    a few hundred per row of 152k (elsewhere it divides or multiplies by 1 and subtracts 0, which leaves a float
    as it is). One float32 copy and a scan of the tables instead of five float32 passes over the rows: a greedy
    draw with repetition_penalty over 32 rows of 152k on the CPU, 24 -> 9 ms."""
    out = logits.float() if logits.dtype != torch.float32 else logits.clone()  # the raw logits stay for logprobs
    rows, tokens = (prompt_mask | (output_counts > 0)).nonzero(as_tuple=True)
    if rows.numel():
        counts = output_counts[rows, tokens]
        values, rep = out[rows, tokens], repetition[rows]
        values = torch.where(values > 0, values / rep, values * rep)
        out[rows, tokens] = values - frequency[rows] * counts - presence[rows] * (counts > 0)
    return out


@fused_kernel("sampling", "race")
def _race(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature == 0, else a draw from softmax(logits / temperature) over the whole vocabulary.

    The Gumbel-max trick: argmax_i(logits_i / T + G_i) with G_i i.i.d. Gumbel picks i with probability
    softmax(logits / T)_i; no softmax, no cumulative sum, and the kernel makes both argmaxes one pass."""
    return _in_cpu_row_chunks(_race_rows, logits, temperatures, noise_keys)


def _race_rows(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    t = temperatures.unsqueeze(1)
    vocab = torch.arange(logits.size(1), device=logits.device)
    scores = logits / torch.where(t > 0, t, 1.0) + _gumbel(noise_keys.unsqueeze(1), vocab)
    return torch.where(temperatures > 0, scores.argmax(-1), logits.argmax(-1))


@fused_kernel("sampling", "greedy", cpu=True)
def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax. On the CPU max over bfloat16 is ~1.8x faster than argmax over a float32 copy, and
    argmax over bfloat16 slower still; max's index is the first of equal maxima there."""
    return logits.max(-1).indices


# Rows with top-k / top-p / min-p draw among candidates: values [B, C] are their logits sorted in descending
# order (the top max_k, or all) and ids their token ids. HF's warpers apply in order: / temperature, top-k,
# top-p, min-p; a token outside the top C has probability 0 already.

def _scale_and_top_k(values: torch.Tensor, temperatures: torch.Tensor,
                     top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' logits / temperature, -inf past each row's top_k, and their softmax."""
    t = temperatures.unsqueeze(1)
    scaled = values.float() / torch.where(t > 0, t, 1.0)
    ranks = torch.arange(values.size(1), device=values.device)
    scaled = scaled.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    return scaled, scaled.softmax(-1)


def _tail_mass(probs: torch.Tensor) -> torch.Tensor:
    """Mass of each candidate and all less likely ones, summed from the least likely up as HF does, so that the
    top-p cut falls where HF's does."""
    return probs.flip(-1).cumsum(-1).flip(-1)


def _top_p_and_min_p(scaled: torch.Tensor, tail_mass: torch.Tensor, top_p_complement: torch.Tensor,
                     min_p: torch.Tensor) -> torch.Tensor:
    """top-p drops a candidate whose tail mass is at most 1 - top_p, min-p one less likely than min_p times the
    likeliest (column 0, which neither drops)."""
    ranks = torch.arange(scaled.size(1), device=scaled.device)
    scaled = scaled.masked_fill((tail_mass <= top_p_complement.unsqueeze(1)) & (ranks > 0), float("-inf"))
    probs = scaled.softmax(-1)
    return scaled.masked_fill(probs < min_p.unsqueeze(1) * probs[:, :1], float("-inf"))


def _draw_sorted(values: torch.Tensor, ids: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor,
                 top_k: torch.Tensor, top_p_complement: torch.Tensor, min_p: torch.Tensor, other: torch.Tensor,
                 outside: torch.Tensor | None = None) -> torch.Tensor:
    """The filtered rows' draws from their candidates sorted most likely first (values, ids [B, C]). outside: the
    candidates are the top C of a longer row, and outside [B] is the probability mass of the rest of it: rows
    without top_k then take their probabilities and tail masses from the whole row (the rest adding its mass to
    every tail); rows with top_k (at most C) from their top_k alone."""
    scaled, probs = _scale_and_top_k(values, temperatures, top_k)
    tail_mass = _tail_mass(probs)
    if outside is not None:
        outside = outside.unsqueeze(1)
        whole_row = (top_k >= TOP_K_OFF).unsqueeze(1)
        tail_mass = torch.where(whole_row, _tail_mass(probs * (1.0 - outside)) + outside, tail_mass)
    return _draw_filtered(scaled, tail_mass, ids, temperatures, noise_keys, top_k, top_p_complement, min_p, other)


# The CPU's draw for rows without a common top-k: the NUCLEUS_CANDIDATES largest logits (a topk, not a sort of
# 152k) when they provably hold every token top-k / top-p / min-p could keep, else the whole row sorted. Held:
# with top_k, when top_k <= the candidates; with top_p, when the mass outside them is below 1 - top_p (every
# outside token's tail mass is at most that, so HF drops it), with BOUND_SLACK to spare for float32 sums; with
# min_p alone, when the last candidate is below min_p times the likeliest token (every outside token is too).
NUCLEUS_CANDIDATES = 1024
BOUND_SLACK = 1e-3


def _draw_by_candidates(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor,
                        top_k: torch.Tensor, top_p_complement: torch.Tensor, min_p: torch.Tensor,
                        other: torch.Tensor) -> torch.Tensor:
    k = NUCLEUS_CANDIDATES
    if logits.size(1) > 2 * k:
        values, ids = logits.topk(k, -1)
        t = temperatures.unsqueeze(1)
        t = torch.where(t > 0, t, 1.0)
        top = values[:, :1].float() / t
        row_mass = torch.exp(logits.float() / t - top).sum(-1)
        inside = torch.exp(values.float() / t - top).sum(-1)
        outside = ((row_mass - inside) / row_mass).clamp(min=0.0)
        last = values[:, -1].float() / t[:, 0] - top[:, 0]  # log of the last candidate's share of the top's
        held = torch.where(top_k < TOP_K_OFF, top_k <= k,
                           (outside * (1 + BOUND_SLACK) + 1e-7 < top_p_complement)
                           | ((min_p > 0) & (last < torch.log(min_p.clamp(min=1e-30)) - BOUND_SLACK)))
        held |= ~_filtered_rows(temperatures, top_k, top_p_complement, min_p)
        if bool(held.all()):
            return _draw_sorted(values, ids, temperatures, noise_keys, top_k, top_p_complement, min_p, other,
                                outside)
    values, ids = logits.sort(-1, descending=True)
    return _draw_sorted(values, ids, temperatures, noise_keys, top_k, top_p_complement, min_p, other)


def _draw_filtered(scaled: torch.Tensor, tail_mass: torch.Tensor, ids: torch.Tensor, temperatures: torch.Tensor,
                   noise_keys: torch.Tensor, top_k: torch.Tensor, top_p_complement: torch.Tensor,
                   min_p: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A draw among each filtered row's kept candidates; other rows keep `other`."""
    kept = _top_p_and_min_p(scaled, tail_mass, top_p_complement, min_p)
    choice = ids.gather(1, (kept + _gumbel(noise_keys.unsqueeze(1), ids)).argmax(-1, keepdim=True)).squeeze(1)
    return torch.where(_filtered_rows(temperatures, top_k, top_p_complement, min_p), choice, other)


# Filtered rows off the CPU when some have no top_k: top-k, top-p and min-p as thresholds on each row's logits
# over the whole vocabulary, no sort (a full sort of 152k logits per row cost ~80 ms per 256-row step on an H200).
# The top-p cut is found by bisection over the logits' order: 33 masked sums, each one pass over the row (one
# kernel on CUDA).

_BISECTION_STEPS = 33  # the keys below span 2**32 + 1 values
_BELOW_EVERY_KEY = -2**31 - 1


def _top_k_thresholds(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """[B] each top-k row's k-th largest logit (ties included, as HF's TopK), -inf for the other rows."""
    kth = torch.full((logits.size(0),), float("-inf"), dtype=logits.dtype, device=logits.device)
    if t.top_k_width is not None:
        width = min(t.top_k_width, logits.size(1))
        values = logits.topk(width, -1).values
        kth = torch.where(t.top_k < TOP_K_OFF, values.gather(1, (t.top_k.clamp(max=width) - 1).unsqueeze(1))
                          .squeeze(1), kth)
    return kth


@fused_kernel("sampling", "draw_by_thresholds")
def _draw_by_thresholds(logits: torch.Tensor, temperatures: torch.Tensor, kth: torch.Tensor, top_k: torch.Tensor,
                        top_p_complement: torch.Tensor, min_p: torch.Tensor, noise_keys: torch.Tensor,
                        other: torch.Tensor) -> torch.Tensor:
    """A draw on every filtered row from _threshold_filter's logits; other rows keep other."""
    kept = _threshold_filter(logits, temperatures, kth, top_p_complement, min_p)
    choice = (kept + _gumbel(noise_keys.unsqueeze(1), torch.arange(logits.size(1), device=logits.device))).argmax(-1)
    return torch.where(_filtered_rows(temperatures, top_k, top_p_complement, min_p), choice, other)


def _threshold_filter(logits: torch.Tensor, temperatures: torch.Tensor, kth: torch.Tensor,
                      top_p_complement: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[B, V] float32: HF's warpers (temperature, top-k, top-p, min-p) on every row, -inf where dropped.
    A tie at a cut keeps every tied token, where a sort would keep an arbitrary part of them."""
    t = temperatures.unsqueeze(1)
    t = torch.where(t > 0, t, 1.0)
    scaled = logits.float() / t
    scaled = scaled.masked_fill(scaled < kth.float().unsqueeze(1) / t, float("-inf"))
    bits = scaled.view(torch.int32)
    keys = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 bit patterns ordered as the floats
    probs, top_key = scaled.softmax(-1), keys.amax(-1).long()
    lo, hi = torch.full_like(top_key, _BELOW_EVERY_KEY), top_key
    for _ in range(_BISECTION_STEPS):
        # halve [lo, hi] towards the largest key whose tokens at or below it hold at most 1 - top_p of the mass
        # (HF drops exactly those: the mass summed from the least likely up stays <= 1 - top_p)
        mid = (lo + hi + 1).div(2, rounding_mode="floor")
        fits = torch.where(keys <= mid.unsqueeze(1), probs, 0.0).sum(-1) <= top_p_complement
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid - 1)
    # drop keys at or below the top-p cut (never the likeliest), then min-p on the renormalised rest
    cut = torch.where(top_p_complement > 0, lo, _BELOW_EVERY_KEY)
    scaled = scaled.masked_fill((keys <= cut.unsqueeze(1)) & (keys != top_key.unsqueeze(1)), float("-inf"))
    probs = scaled.softmax(-1)
    return scaled.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), float("-inf"))


def _filtered_rows(temperatures: torch.Tensor, top_k: torch.Tensor, top_p_complement: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    return (temperatures > 0) & ((top_k < TOP_K_OFF) | (top_p_complement > 0) | (min_p > 0))


def _gumbel(noise_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise -log(E), E ~ Exp(1) = -log(1 - U), for each (row key, token id) pair (broadcast)."""
    return -torch.log(-torch.log1p(-uniform_noise(noise_keys, token_ids)))


def uniform_noise(noise_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """U(0, 1) float32 from a 32-bit hash of (row key, token id): a counter-based generator, no state.

    U is at least 2**-33 (so E = -log(1 - U) resolves tokens down to probability ~1e-10) and at most
    1 - 2**-24 (E stays finite)."""
    h = _mix32((noise_keys + token_ids * _STEP) & _MASK32)
    return ((h.float() + 0.5) * 2.0**-32).clamp(max=1.0 - 2.0**-24)


def _mix32(x):
    """A bijective 32-bit hash with full avalanche; x holds values in [0, 2**32) in int64 (a tensor or numpy)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


# ---- host side: building a step's tensors ---------------------------------------------------------------------

def row_noise_keys(seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """Per-row keys of the noise, int64 in [0, 2**32): a hash of (seed mod 2**64, output position)."""
    try:
        seeds = np.asarray(seeds, dtype=np.int64)  # negative ones are already their two's complement
    except OverflowError:
        seeds = np.array([s & _MASK64 for s in seeds], dtype=np.uint64).view(np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    x = _mix32((positions + _POSITION_SALT) & _MASK32)
    x = _mix32(x ^ ((seeds >> 32) & _MASK32))
    return _mix32(x ^ (seeds & _MASK32))


def sampling_tensors(params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int],
                     device: torch.device, eos_token_ids: Sequence[int] = (),
                     output_counts: torch.Tensor | None = None,
                     prompt_mask: torch.Tensor | None = None) -> SamplingTensors:
    """Build one step's SamplingTensors and send them to the device in one copy.

    params, seeds, positions: per row its settings, its seed and its output position (tokens generated so
    far). eos_token_ids: banned, with each row's stop_token_ids, while position < min_tokens (also under
    ignore_eos). output_counts / prompt_mask [B, V]: needed when a row has a penalty, ignored otherwise."""
    if not params or not len(params) == len(seeds) == len(positions):
        raise ValueError(f"need one seed and one position per row, got {len(params)} rows, {len(seeds)} seeds "
                         f"and {len(positions)} positions")
    device = torch.device(device)
    settings, kind_of_row = _distinct_settings(params)
    temperature, top_k, top_p, min_p, repetition, presence, frequency, min_tokens = settings.T
    # which rows sample and which filter, decided on the float32 values the device tests (_filtered_rows): a
    # min_p below float32's range is 0 there, and such a row must not wait for a filtered draw it never gets
    temperature, top_p_complement, min_p = (x.astype(np.float32) for x in (temperature, 1.0 - top_p, min_p))
    sampled = temperature > 0
    filtered = sampled & ((top_k > 0) | (top_p_complement > 0) | (min_p > 0))
    penalized = bool(((repetition != 1) | (presence != 0) | (frequency != 0)).any())
    # SamplingTensors' field -> its host values (float32 or int64), sent in one copy
    fields = {"temperatures": temperature[kind_of_row], "noise_keys": row_noise_keys(seeds, positions)}
    if filtered.any():
        fields["top_p_complement"] = top_p_complement[kind_of_row]
        fields["min_p"] = min_p[kind_of_row]
        fields["top_k"] = np.where(top_k > 0, top_k, TOP_K_OFF).astype(np.int64)[kind_of_row]
    if penalized:
        if output_counts is None or prompt_mask is None:
            raise ValueError("a row has a penalty: pass output_counts and prompt_mask")
        for name, column in (("repetition_penalties", repetition), ("presence_penalties", presence),
                             ("frequency_penalties", frequency)):
            fields[name] = column.astype(np.float32)[kind_of_row]
    if (min_tokens > 0).any():
        fields.update(_bans(params, positions, eos_token_ids))
    if any(map(_LOGIT_BIAS, params)) or any(map(_ALLOWED, params)):
        fields.update(_by_token(params))
    t = SamplingTensors(**_upload(fields, device), any_greedy=not sampled.all(),
                        any_plain=bool((sampled & ~filtered).any()), any_filtered=bool(filtered.any()))
    logprobs = [n for n in map(_LOGPROBS, params) if n is not None]
    t.max_num_logprobs = max(logprobs) if logprobs else None
    if t.any_filtered:
        t.max_top_k = None if (top_k[filtered] <= 0).any() else int(top_k[filtered].max())
        if (top_k[filtered] > 0).any():
            t.top_k_width = int(top_k[filtered].max())
        t.by_thresholds = t.max_top_k is None and device.type != "cpu"
    if penalized:
        t.output_counts, t.prompt_mask = output_counts, prompt_mask
    return t


_SETTINGS = attrgetter("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                       "frequency_penalty", "min_tokens")
_LOGPROBS = attrgetter("logprobs")
# per-token settings: None or non-empty (SamplingParams makes them so), so any() over them runs at C speed
_LOGIT_BIAS, _ALLOWED = attrgetter("logit_bias"), attrgetter("allowed_token_ids")


def _distinct_settings(params: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct _SETTINGS of the rows as float64 [kinds, 8], and each row's kind. Runs every step, for
    hundreds of rows that usually share a few settings: numpy works on the few kinds only."""
    if len(set(map(id, params))) == 1:
        return np.array([_SETTINGS(params[0])], dtype=np.float64), np.zeros(len(params), dtype=np.intp)
    number: dict[tuple, int] = {}
    kind_of_row = [number.setdefault(row, len(number)) for row in map(_SETTINGS, params)]
    return np.array(list(number), dtype=np.float64), np.array(kind_of_row, dtype=np.intp)


def _bans(params: Sequence[SamplingParams], positions: Sequence[int],
          eos_token_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """EOS and the stop ids of the rows still short of min_tokens, as (row, token id) pairs; EOS also under
    ignore_eos, as vLLM holds it back (ignore_eos only keeps it from ending the completion)."""
    rows, ids = [], []
    for row, (p, position) in enumerate(zip(params, positions)):
        if position < p.min_tokens:
            banned = [*p.stop_token_ids, *eos_token_ids]
            rows += [row] * len(banned)
            ids += banned
    if not rows:
        return {}
    return {"banned_rows": np.array(rows, dtype=np.int64), "banned_token_ids": np.array(ids, dtype=np.int64)}


def _by_token(params: Sequence[SamplingParams]) -> dict[str, np.ndarray]:
    """The rows' logit biases as (row, token id, bias) and their allow-lists as the restricted rows and (row,
    token id) pairs; nothing for a kind no row has."""
    bias_rows, bias_ids, biases, restricted, allowed_rows, allowed_ids = [], [], [], [], [], []
    for row, p in enumerate(params):
        if p.logit_bias is not None:
            bias_rows += [row] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            biases += p.logit_bias.values()
        if p.allowed_token_ids is not None:
            restricted.append(row)
            allowed_rows += [row] * len(p.allowed_token_ids)
            allowed_ids += p.allowed_token_ids
    out = {}
    if bias_rows:
        out.update(bias_rows=np.array(bias_rows, dtype=np.int64), bias_token_ids=np.array(bias_ids, dtype=np.int64),
                   bias_values=np.array(biases, dtype=np.float32))
    if restricted:
        out.update(restricted_rows=np.array(restricted, dtype=np.int64),
                   allowed_rows=np.array(allowed_rows, dtype=np.int64),
                   allowed_token_ids=np.array(allowed_ids, dtype=np.int64))
    return out


def _upload(fields: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Arrays of float32 and of int64 values, in one host buffer and one copy; back as views on the device, each
    starting 16-byte aligned: Triton compiles a variant of a kernel for each alignment of its pointers."""
    offsets, size = [], 0
    for array in fields.values():
        offsets.append(size)
        size += cdiv(array.nbytes, 16) * 16
    host = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    buf = host.numpy()
    for array, offset in zip(fields.values(), offsets):
        buf[offset:offset + array.nbytes] = array.view(np.uint8)
    dev = host.to(device, non_blocking=True)
    return {name: dev[offset:offset + array.nbytes].view(torch.float32 if array.dtype == np.float32 else torch.int64)
            for (name, array), offset in zip(fields.items(), offsets)}


# ---- per-sequence token counts for the penalties --------------------------------------------------------------

def token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_ids), vocab_size] int32: how often each token id occurs in each row's list."""
    rows = [row for row, ids in enumerate(token_ids) for _ in ids]
    flat = [t for ids in token_ids for t in ids]
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int32, device=device)
    if flat:
        index = _to_device(torch.tensor([rows, flat], dtype=torch.int64), device)
        count_tokens_(counts, index[1], index[0])
    return counts


def prompt_token_mask(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_ids), vocab_size] bool: which token ids occur in each row's list."""
    return token_counts(token_ids, vocab_size, device) > 0


def count_tokens_(counts: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Add one occurrence of token_ids[i] to counts[rows[i]] in place (rows: 0..B-1 when None), counts being a
    contiguous [rows, V] table. The ids may still be on their way from the sampler: nothing waits for them."""
    if rows is None:
        rows = torch.arange(token_ids.size(0), device=counts.device)
    flat = rows * counts.size(1) + token_ids  # one scatter over the flattened table, repeats accumulate
    counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.device(device).type == "cuda":  # pinned, non-blocking: a pageable copy waits for the queued steps
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
