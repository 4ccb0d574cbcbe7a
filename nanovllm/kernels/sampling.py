"""The sampler's GPU kernels over logits [B, V]: the plain draw and the argmax split each row over up to 32
programs and merge their answers; the thresholds draw is one program per row, looping over the vocabulary.

They replace the PyTorch functions of nanovllm.layers.sampler on CUDA (see nanovllm.utils.kernels) and draw what
those draw: the same counter-based noise (a 32-bit hash of the row's key and the token id, in uint32 arithmetic
where the reference masks int64), the first index among equal maxima. The noise's logs are the GPU's
approximate ones (within 1e-6 of the reference's noise, see _log2_exponential) and the plain draw compares
logit + T * G rather than logit / T + G, so a near tie (scores a few ulps apart) can go the other way.

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
def _uniform(key, offs):
    """The row's U(0, 1) noise of tokens offs (uint32 key), as sampler.uniform_noise rounds it."""
    x = key + offs.to(tl.uint32) * tl.full((), _C_STEP, tl.uint32)
    x = x ^ (x >> 16)
    x = x * tl.full((), _C_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _C_MUL2, tl.uint32)
    x = x ^ (x >> 16)
    # (x + 0.5) * 2**-32 in one rounding (the scale is a power of two), at most 1 - 2**-24
    return tl.minimum(tl.fma(x.to(tl.float32), 2.3283064365386963e-10, 1.1641532182693481e-10),
                      1.0 - 5.960464477539063e-08)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:  # the GPU's approximation (one MUFU.LG2): absolute error about 2**-22.6
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:  # the Triton interpreter
        return tl.log2(x)


@triton.jit
def _reciprocal(x, FAST: tl.constexpr):
    if FAST:  # one MUFU.RCP, within an ulp
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _log2_exponential(key, offs, FAST: tl.constexpr):
    """log2(E) of the row's exponential noise E = -log1p(-U) of tokens offs; the Gumbel noise is -ln(2) times it.

    E to within 6e-7 of itself (float32's own log1p: 1e-7): for U >= 1/4 from log2(1 - U) (1 - U keeps U's
    bits); below, where 1 - U has lost U's low bits and E is small, E = 2 atanh(z), z = U / (2 - U) < 1/7, by its
    odd series to z**9 (the rest is below 2**-31 of E)."""
    u = _uniform(key, offs)
    e_log = _log2(1.0 - u, FAST) * -0.6931471805599453
    z = u * _reciprocal(2.0 - u, FAST)
    z2 = z * z
    p = z2 * (1.0 / 9.0) + (1.0 / 7.0)
    p = p * z2 + (1.0 / 5.0)
    p = p * z2 + (1.0 / 3.0)
    two_z = z + z
    e_series = two_z + two_z * (z2 * p)
    return _log2(tl.where(u >= 0.25, e_log, e_series), FAST)


@triton.jit
def _lane_best(best, best_idx, s, offs):
    """Each lane's running (max, first index of it) over blocks of scores s at increasing token ids offs: only a
    strictly larger score replaces the best, so a tie keeps the earlier token and NaN never enters."""
    better = s > best
    return tl.where(better, s, best), tl.where(better, offs, best_idx)


@triton.jit
def _first_best(best, best_idx):
    """The lanes' (max, first index of it)."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, best_idx, 2147483647), 0)


@triton.jit
def _race_part_kernel(logits_ptr, temps_ptr, keys_ptr, part_ptr, stride_row, V, CHUNK, NUM_PARTS,
                      SAMPLE: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    """Program (row, part): the (best score, first index of it) of the row's tokens [part * CHUNK, + CHUNK).

    A sampled row's score is logit + T * G, the reference's logit / T + G times T: the same order up to a
    rounding, for one multiply-add a token instead of an IEEE division and an add."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lo = part * CHUNK
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = lo + tl.arange(0, BLOCK)  # an all -inf chunk answers its first token, as argmax would
    if SAMPLE:
        t = tl.load(temps_ptr + row)
        key = tl.load(keys_ptr + row).to(tl.uint32)
        noise_scale = tl.where(t > 0, t * -0.6931471805599453, 0.0)  # T * G = -ln(2) T log2(E); greedy adds 0
    for start in range(lo, tl.minimum(lo + CHUNK, V), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if SAMPLE:
            s = tl.fma(noise_scale, _log2_exponential(key, offs, FAST), s)
        best, best_idx = _lane_best(best, best_idx, s, offs)
    top, top_idx = _first_best(best, best_idx)
    at = part_ptr + (row * NUM_PARTS + part) * 2
    tl.store(at, top.to(tl.int32, bitcast=True))
    tl.store(at + 1, top_idx)


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


def _hardware_math(logits: torch.Tensor) -> bool:
    """Whether the kernels may use the GPU's approximate log2 and reciprocal (PTX): on an NVIDIA GPU, not in the
    Triton interpreter (CPU tensors), which computes them exactly."""
    return logits.is_cuda and torch.version.hip is None


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
                                  SAMPLE=sample, BLOCK=_PART_BLOCK, FAST=_hardware_math(logits), num_warps=4)
    _race_merge_kernel[(B,)](partial, out, parts, PARTS=_PARTS, num_warps=1)
    return out


def race(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature == 0, else the Gumbel-max draw from softmax(logits / temperature)."""
    return _race_launch(logits, temperatures, noise_keys, sample=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima)."""
    return _race_launch(logits, logits, logits, sample=False)


@triton.jit
def _noise_kernel(keys_ptr, out_ptr, V, BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    tl.store(out_ptr + row.to(tl.int64) * V + offs, _log2_exponential(key, offs, FAST), mask=offs < V)


def exponential_noise_log2(noise_keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """log2 of the exponential noise E the draws use for token ids 0..vocab-1 of each row key: [B, vocab] float32
    (the reference's is -log1p(-sampler.uniform_noise(...))); for checking the kernels' arithmetic."""
    out = torch.empty(noise_keys.size(0), vocab, dtype=torch.float32, device=noise_keys.device)
    block = 1024
    _noise_kernel[(noise_keys.size(0), triton.cdiv(vocab, block))](noise_keys, out, vocab, BLOCK=block,
                                                                   FAST=_hardware_math(noise_keys), num_warps=4)
    return out


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
                       out_ptr, stride_row, V, BLOCK: tl.constexpr, FAST: tl.constexpr):
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
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(base, offs, V, t, kth)
        keys = _order_key(s).to(tl.int64)
        # top-p keeps keys above the cut and always the likeliest; min-p then compares with the likeliest, whose
        # probability after top-p's renormalisation is the largest, as the reference's softmax over the kept
        kept = ((keys > cut) | (keys == top_key)) & (tl.exp(s - m) >= min_p)
        noisy = tl.fma(_log2_exponential(key, offs, FAST), -0.6931471805599453, s)  # s + G
        best, best_idx = _lane_best(best, best_idx, tl.where(kept, noisy, float("-inf")), offs)
    tl.store(out_ptr + row, _first_best(best, best_idx)[1].to(tl.int64))


def draw_by_thresholds(logits: torch.Tensor, temperatures: torch.Tensor, kth: torch.Tensor, top_k: torch.Tensor,
                       top_p_complement: torch.Tensor, min_p: torch.Tensor, noise_keys: torch.Tensor,
                       other: torch.Tensor) -> torch.Tensor:
    """A draw on each filtered row after top-k (logits below kth dropped), top-p and min-p; other rows keep
    other."""
    assert logits.stride(1) == 1
    out = torch.empty(logits.size(0), dtype=torch.int64, device=logits.device)
    _thresholds_kernel[(logits.size(0),)](logits, temperatures, kth, top_k, top_p_complement, min_p, noise_keys,
                                          other, out, logits.stride(0), logits.size(1), BLOCK=_BLOCK,
                                          FAST=_hardware_math(logits), num_warps=_NUM_WARPS)
    return out
