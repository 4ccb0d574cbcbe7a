"""The sampler's GPU kernels over logits [B, V]: the plain draw and the argmax split each row over up to 32
programs and merge their answers; the thresholds draw is one program per row, looping over the vocabulary.

They replace the PyTorch functions of nanovllm.layers.sampler on CUDA (see nanovllm.utils.kernels) and draw what
those draw: the same counter-based noise (a 32-bit hash of the row's key and the token id, in uint32 arithmetic
where the reference masks int64), IEEE division by the temperature, the first index among equal maxima. A float
rounding of log() that differs from torch's by an ulp can still flip a near tie.

The thresholds draw (top-k, top-p, min-p without sorting) recomputes each token's scaled logit in every pass
rather than keeping [B, V] float32 buffers: one pass for the max, one for the softmax's sum, 33 halvings of the
top-p cut over the order keys (only for rows with top-p), one for the draw.
"""
import torch
import triton
import triton.language as tl

from nanovllm.layers.sampler import (_BELOW_EVERY_KEY, _BISECTION_STEPS, _MUL1, _MUL2, _STEP, TOP_K_OFF)

_C_MUL1, _C_MUL2, _C_STEP = tl.constexpr(_MUL1), tl.constexpr(_MUL2), tl.constexpr(_STEP)
_C_BELOW, _C_STEPS = tl.constexpr(_BELOW_EVERY_KEY), tl.constexpr(_BISECTION_STEPS)
_C_TOP_K_OFF = tl.constexpr(TOP_K_OFF)
_BLOCK = 2048  # tokens per loop step
_PARTS, _PART_BLOCK = 32, 1024  # race / greedy: programs per row (at most), tokens per loop step
_NUM_WARPS = 8


@triton.jit
def _gumbel(key, offs):
    """Gumbel noise of tokens offs for a row whose noise key is key (uint32): -log(-log1p(-U))."""
    x = key + offs.to(tl.uint32) * tl.full((), _C_STEP, tl.uint32)
    x = x ^ (x >> 16)
    x = x * tl.full((), _C_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _C_MUL2, tl.uint32)
    x = x ^ (x >> 16)
    u = tl.minimum((x.to(tl.float32) + 0.5) * 2.3283064365386963e-10, 1.0 - 5.960464477539063e-08)  # 2**-32, 2**-24
    # E = -log1p(-u) to a few ulps by Goldberg's trick (w = 1 - u rounded; exact where w == 1): Triton's
    # interpreter has no libdevice, and this keeps one kernel for both
    w = 1.0 - u
    e = tl.where(w == 1.0, u, -tl.log(w) * (u / (1.0 - w)))
    return -tl.log(e)


@triton.jit
def _argmax_update(best, best_idx, s, offs):
    """Running (max, first index of the max) over blocks of scores s at token ids offs."""
    block_best = tl.max(s, 0)
    block_idx = tl.min(tl.where(s == block_best, offs, 2147483647), 0)
    better = block_best > best
    return tl.where(better, block_best, best), tl.where(better, block_idx, best_idx)


@triton.jit
def _race_part_kernel(logits_ptr, temps_ptr, keys_ptr, part_ptr, stride_row, V, CHUNK, NUM_PARTS,
                      SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, part): the (best score, first index of it) of the row's tokens [part * CHUNK, + CHUNK)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    if SAMPLE:
        t = tl.load(temps_ptr + row)
        key = tl.load(keys_ptr + row).to(tl.uint32)
    lo = part * CHUNK
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = lo  # an all -inf chunk answers its first token, as argmax would
    for start in range(lo, tl.minimum(lo + CHUNK, V), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        s = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if SAMPLE:
            s = tl.where(t > 0, tl.math.div_rn(s, tl.where(t > 0, t, 1.0)) + _gumbel(key, offs), s)
            s = tl.where(mask, s, float("-inf"))
        best, best_idx = _argmax_update(best, best_idx, s, offs)
    at = part_ptr + (row * NUM_PARTS + part) * 2
    tl.store(at, best.to(tl.int32, bitcast=True))
    tl.store(at + 1, best_idx)


@triton.jit
def _race_merge_kernel(part_ptr, out_ptr, NUM_PARTS, PARTS: tl.constexpr):
    """A row's answer from its parts, taken in token order: the first part holding the best score."""
    row = tl.program_id(0)
    p = tl.arange(0, PARTS)
    at = part_ptr + (row * NUM_PARTS + p) * 2
    valid = p < NUM_PARTS
    best = tl.load(at, mask=valid, other=0).to(tl.float32, bitcast=True)
    best = tl.where(valid, best, float("-inf"))
    idx = tl.load(at + 1, mask=valid, other=0)
    top = tl.max(best, 0)
    # a part only wins past an earlier one with a strictly larger best, as one loop over the row would have it
    first = tl.min(tl.where(valid & (best == top), p, PARTS), 0)
    tl.store(out_ptr + row, tl.sum(tl.where(p == first, idx, 0), 0).to(tl.int64))


def _race_launch(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor,
                 sample: bool) -> torch.Tensor:
    """Each row's vocabulary split over up to _PARTS programs (one program per row walked 75 blocks of Qwen3's
    152k tokens one after another: ~110 us even for one row), then a merge per row."""
    assert logits.stride(1) == 1
    B, V = logits.shape
    chunk = triton.cdiv(triton.cdiv(V, _PARTS), _PART_BLOCK) * _PART_BLOCK
    parts = triton.cdiv(V, chunk)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    partial = torch.empty(B, parts, 2, dtype=torch.int32, device=logits.device)
    _race_part_kernel[(B, parts)](logits, temperatures, noise_keys, partial, logits.stride(0), V, chunk, parts,
                                  SAMPLE=sample, BLOCK=_PART_BLOCK, num_warps=4)
    _race_merge_kernel[(B,)](partial, out, parts, PARTS=_PARTS, num_warps=1)
    return out


def race(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature == 0, else the Gumbel-max draw from softmax(logits / temperature)."""
    return _race_launch(logits, temperatures, noise_keys, sample=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima)."""
    return _race_launch(logits, logits, logits, sample=False)


@triton.jit
def _penalties_kernel(logits_ptr, counts_ptr, prompt_ptr, rep_ptr, pres_ptr, freq_ptr, out_ptr, V,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    at = row.to(tl.int64) * V + offs  # the three [B, V] tables are contiguous
    x = tl.load(logits_ptr + at, mask=mask, other=0.0).to(tl.float32)
    counts = tl.load(counts_ptr + at, mask=mask, other=0)
    in_prompt = tl.load(prompt_ptr + at, mask=mask, other=0) != 0
    generated = counts > 0
    rep = tl.where(in_prompt | generated, tl.load(rep_ptr + row), 1.0)
    x = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep)
    x = x - tl.load(freq_ptr + row) * counts.to(tl.float32)
    x = x - tl.load(pres_ptr + row) * generated.to(tl.float32)
    tl.store(out_ptr + at, x, mask=mask)


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """vLLM's repetition, frequency and presence penalties; float32 [B, V]."""
    B, V = logits.shape
    assert logits.is_contiguous() and output_counts.is_contiguous() and prompt_mask.is_contiguous()
    out = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    block = 1024
    _penalties_kernel[(B, triton.cdiv(V, block))](logits, output_counts, prompt_mask.view(torch.uint8), repetition,
                                                  presence, frequency, out, V, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _order_key(s):
    """int32 keys ordered as the float32 values s."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _scaled(base, offs, V, t, kth_scaled):
    """A block's logits / temperature, -inf past the vocabulary and below the row's top-k threshold."""
    mask = offs < V
    s = tl.math.div_rn(tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32), t)
    return tl.where(mask & (s >= kth_scaled), s, float("-inf"))


@triton.jit
def _thresholds_kernel(logits_ptr, temps_ptr, kth_ptr, top_k_ptr, top_p_c_ptr, min_p_ptr, keys_ptr, other_ptr,
                       out_ptr, stride_row, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temps_ptr + row)
    top_p_c = tl.load(top_p_c_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    filtered = (t > 0) & ((tl.load(top_k_ptr + row) < _C_TOP_K_OFF) | (top_p_c > 0) | (min_p > 0))
    if not filtered:
        tl.store(out_ptr + row, tl.load(other_ptr + row))
        return
    base = logits_ptr + row.to(tl.int64) * stride_row
    kth = tl.math.div_rn(tl.load(kth_ptr + row).to(tl.float32), t)
    m = tl.full((), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        m = tl.maximum(m, tl.max(_scaled(base, start + tl.arange(0, BLOCK), V, t, kth), 0))
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        total += tl.sum(tl.exp(_scaled(base, start + tl.arange(0, BLOCK), V, t, kth) - m), 0)
    top_key = _order_key(m).to(tl.int64)
    cut = tl.full((), _C_BELOW, tl.int64)
    if top_p_c > 0:
        # the largest key whose tokens at or below it hold at most 1 - top_p of the mass (HF drops those)
        hi = top_key
        for _ in range(_C_STEPS):
            mid = (cut + hi + 1) >> 1  # floor((lo + hi + 1) / 2), also for negative keys
            below = tl.full((), 0.0, tl.float32)
            for start in range(0, V, BLOCK):
                s = _scaled(base, start + tl.arange(0, BLOCK), V, t, kth)
                below += tl.sum(tl.where(_order_key(s).to(tl.int64) <= mid, tl.exp(s - m), 0.0), 0)
            fits = below / total <= top_p_c
            cut = tl.where(fits, mid, cut)
            hi = tl.where(fits, hi, mid - 1)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(base, offs, V, t, kth)
        keys = _order_key(s).to(tl.int64)
        # top-p keeps keys above the cut and always the likeliest; min-p then compares with the likeliest, whose
        # probability after top-p's renormalisation is the largest, as the reference's softmax over the kept
        kept = ((keys > cut) | (keys == top_key)) & (tl.exp(s - m) >= min_p)
        best, best_idx = _argmax_update(best, best_idx, tl.where(kept, s + _gumbel(key, offs), float("-inf")), offs)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def draw_by_thresholds(logits: torch.Tensor, temperatures: torch.Tensor, kth: torch.Tensor, top_k: torch.Tensor,
                       top_p_complement: torch.Tensor, min_p: torch.Tensor, noise_keys: torch.Tensor,
                       other: torch.Tensor) -> torch.Tensor:
    """A draw on each filtered row after top-k (logits below kth dropped), top-p and min-p; other rows keep
    other."""
    assert logits.stride(1) == 1
    out = torch.empty(logits.size(0), dtype=torch.int64, device=logits.device)
    _thresholds_kernel[(logits.size(0),)](logits, temperatures, kth, top_k, top_p_complement, min_p, noise_keys,
                                          other, out, logits.stride(0), logits.size(1), BLOCK=_BLOCK,
                                          num_warps=_NUM_WARPS)
    return out
