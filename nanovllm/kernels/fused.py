"""The layers' element-wise ops as Triton kernels: RMSNorm (with or without the residual add), rotary embedding
(with or without Qwen3's per-head q/k RMSNorm) and SiLU-and-mul. Each wrapper has the signature of the PyTorch
function it replaces in nanovllm.layers, which stays the CPU path and the reference.

One program per token row (SiLU-and-mul: per token and column block). The token count only sets the grid: it is
never a kernel argument, so each kernel compiles once per model (Triton specialises int arguments equal to 1 or
divisible by 16) and a CUDA graph captured at one batch size meets the variant eager steps compiled.

Math is float32, rounded to the output dtype once, except where the reference rounds on purpose: the residual
sum is rounded before it is normalised, and RMSNorm rounds the normalised row before the weight multiply, so the
norms equal PyTorch's up to the order of the sum of squares.

    qkv row of one token:  | q head 0 | q head 1 | ... | k head 0 | ... | v ... |     head = | x1 | x2 |
                                                                                          HALF  HALF
    rotated head = | x1 * cos - x2 * sin | x2 * cos + x1 * sin |    (cos, sin: [HALF] at the token's position)
"""
import functools

import torch
import triton
import triton.language as tl

from nanovllm.kernels.store_kvcache import check_store_args, quantize_fp8, row_warps


# ---- shared pieces -------------------------------------------------------------------------------------------


@triton.jit
def _rstd(sum_sq, N: tl.constexpr, eps):
    # the mean as a multiply by 1/N: torch's CUDA mean does the same
    return tl.math.rsqrt(sum_sq * (1.0 / N) + eps)


@triton.jit
def _weigh(x, rstd, w, dtype: tl.constexpr):
    """weight * (x * rstd).to(dtype), as rms_norm writes it: the normalised row is rounded, then weighed."""
    return w * (x * rstd).to(dtype).to(tl.float32)


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the PyTorch reference returns (in the models, all inputs share one dtype)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


# ---- RMSNorm -------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps, stride_x, stride_r,
                     N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # the sum is rounded to x's dtype, stored as the new residual and normalised as rounded
        x += tl.load(residual_ptr + t * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + t * N + offs, x, mask=mask)
        x = x.to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _weigh(x, _rstd(tl.sum(x * x, axis=0), N, eps), w, x_ptr.dtype.element_ty)
    tl.store(out_ptr + t * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor | None):
    num_tokens, n = x.shape
    assert x.stride(1) == 1 and weight.shape == (n,) and weight.is_contiguous()
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(num_tokens,)](
        x, x if residual is None else residual, weight, out, out if residual_out is None else residual_out, eps,
        x.stride(0), x.stride(0) if residual is None else residual.stride(0),
        N=n, BLOCK=block, ADD=residual is not None, num_warps=row_warps(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden] (any row stride, unit last stride); weight: [hidden]."""
    out = torch.empty(x.shape, dtype=_result_dtype(x, weight), device=x.device)
    _launch_rms_norm(x, None, weight, eps, out, None)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); x, residual: [num_tokens, hidden] of one dtype."""
    out = torch.empty(x.shape, dtype=_result_dtype(x, weight), device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


# ---- rotary embedding, with or without the per-head q/k norm -------------------------------------------------


@triton.jit
def _rotate_heads(x_ptr, stride_h, w_ptr, out_ptr, cos, sin, eps, NUM_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  NORM: tl.constexpr):
    """One token's [NUM_HEADS, HEAD_DIM] heads, normalised (NORM) and rotated, into out's contiguous row.
    Returns the two rotated halves as stored ([BLOCK_HEADS, BLOCK_HALF] each, in out's dtype)."""
    half: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, BLOCK_HEADS)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_d < half)
    x1_ptrs = x_ptr + offs_h * stride_h + offs_d
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if NORM:  # rounded to the output dtype before the rotation, like rms_norm's result
        rstd = _rstd(tl.sum(x1 * x1 + x2 * x2, axis=1), HEAD_DIM, eps)[:, None]
        w1 = tl.load(w_ptr + offs_d, mask=offs_d < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + offs_d, mask=offs_d < half, other=0.0).to(tl.float32)
        x1 = _weigh(x1, rstd, w1, x_ptr.dtype.element_ty).to(dtype).to(tl.float32)
        x2 = _weigh(x2, rstd, w2, x_ptr.dtype.element_ty).to(dtype).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(dtype)
    y2 = (x2 * cos + x1 * sin).to(dtype)
    out1_ptrs = out_ptr + offs_h * HEAD_DIM + offs_d
    tl.store(out1_ptrs, y1, mask=mask)
    tl.store(out1_ptrs + half, y2, mask=mask)
    return y1, y2


@triton.jit
def _store_half_rows(cache_ptr, base, stride_ch, scale_ptr, x1, x2, NUM_HEADS: tl.constexpr,
                     HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, FP8: tl.constexpr,
                     STRIDE_CD: tl.constexpr):
    """One token's heads, given as halves [BLOCK_HEADS, BLOCK_HALF], into its cache slot at `base`; an fp8
    cache gets them quantised with its per-head scales, as store_kvcache does. STRIDE_CD: the cache's stride
    along head_dim (1, or the block size for key-major values)."""
    offs_h = tl.arange(0, BLOCK_HEADS)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_d < HALF)
    ptrs = cache_ptr + base + offs_h * stride_ch + offs_d * STRIDE_CD
    if FP8:
        scale = tl.load(scale_ptr + offs_h + offs_d * 0, mask=mask, other=1.0)  # [BLOCK_HEADS, BLOCK_HALF]
        x1, x2 = quantize_fp8(x1, scale), quantize_fp8(x2, scale)
    dtype = cache_ptr.dtype.element_ty
    tl.store(ptrs, x1.to(dtype), mask=mask)
    tl.store(ptrs + HALF * STRIDE_CD, x2.to(dtype), mask=mask)


# positions and slot_mapping are slices of the step's packed inputs: not specialised on their alignment, so any
# offset is fine (the unused slot_mapping of a plain rotation is a dummy pointer as misaligned as positions)
@triton.jit(do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])
def _rope_kernel(positions_ptr, q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                 eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
                 v_ptr, stride_vt, stride_vh, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr,
                 v_scale_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                 NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 NORM: tl.constexpr, STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
                 STRIDE_VCD: tl.constexpr, V_BLOCK_SIZE: tl.constexpr):
    """Grid (num_tokens, 2): program (t, 0) does token t's q heads, (t, 1) its k heads and, with STORE, writes
    the rotated k and the v heads to the token's cache slot (none for slot -1, a padded token)."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HEAD_DIM // 2
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr + t * stride_qt, stride_qh, q_weight_ptr, q_out_ptr + t * (NUM_Q_HEADS * HEAD_DIM),
                      cos, sin, eps, NUM_Q_HEADS, HEAD_DIM, BLOCK_Q_HEADS, BLOCK_HALF, NORM)
    else:
        k1, k2 = _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_weight_ptr,
                               k_out_ptr + t * (NUM_K_HEADS * HEAD_DIM), cos, sin, eps, NUM_K_HEADS, HEAD_DIM,
                               BLOCK_K_HEADS, BLOCK_HALF, NORM)
        if STORE:
            slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
            if slot >= 0:
                half: tl.constexpr = HEAD_DIM // 2
                block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
                _store_half_rows(k_cache_ptr, block * stride_kcb + offset * stride_kcs, stride_kch, k_scale_ptr,
                                 k1, k2, NUM_K_HEADS, half, BLOCK_K_HEADS, BLOCK_HALF, FP8, 1)
                offs_h = tl.arange(0, BLOCK_K_HEADS)[:, None]
                mask = (offs_h < NUM_K_HEADS) & (offs_d[None, :] < half)
                v1_ptrs = v_ptr + t * stride_vt + offs_h * stride_vh + offs_d[None, :]
                v1 = tl.load(v1_ptrs, mask=mask, other=0.0)
                v2 = tl.load(v1_ptrs + half, mask=mask, other=0.0)
                block, offset = slot // V_BLOCK_SIZE, slot % V_BLOCK_SIZE  # key-major values' runs, see kv_cache
                _store_half_rows(v_cache_ptr, block * stride_vcb + offset * stride_vcs, stride_vch, v_scale_ptr,
                                 v1, v2, NUM_K_HEADS, half, BLOCK_K_HEADS, BLOCK_HALF, FP8, STRIDE_VCD)


def _launch_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                 store: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """store: (v, k_cache, v_cache, slot_mapping, k_scale, v_scale) to write k and v to the cache too."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.size(1)
    assert head_dim % 2 == 0 and k.shape == (num_tokens, num_k_heads, head_dim) and q.dtype == k.dtype
    assert q.stride(2) == 1 and k.stride(2) == 1 and positions.shape == (num_tokens,)
    assert cos_cache.size(1) == head_dim // 2 and cos_cache.stride(1) == 1 and sin_cache.stride(1) == 1
    norm = q_weight is not None
    out_dtype = _result_dtype(q, cos_cache, *((q_weight, k_weight) if norm else ()))
    q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=out_dtype, device=k.device)
    if store is not None:
        v, k_cache, v_cache, slot_mapping, k_scale, v_scale = store
        fp8 = check_store_args(k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        cache_args = (v, v.stride(0), v.stride(1), k_cache, v_cache, slot_mapping, k_scale if fp8 else q,
                      v_scale if fp8 else q, *k_cache.stride()[:3], *v_cache.stride()[:3])
        block_size, stride_vcd, v_block_size = k_cache.size(1), v_cache.stride(3), v_cache.size(1)
    else:  # dummy pointers and strides, never read
        fp8, block_size, stride_vcd, v_block_size = False, 1, 1, 1
        cache_args = (k, 0, 0, k, k, positions, q, q, 0, 0, 0, 0, 0, 0)
    block_half = triton.next_power_of_2(head_dim // 2)
    block_q_heads, block_k_heads = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_k_heads)
    _rope_kernel[(num_tokens, 2)](
        positions, q, k, q_weight if norm else q, k_weight if norm else k, cos_cache, sin_cache, q_out, k_out, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0), sin_cache.stride(0), *cache_args,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim, BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=block_k_heads, BLOCK_HALF=block_half, NORM=norm, STORE=store is not None,
        BLOCK_SIZE=block_size, FP8=fp8, STRIDE_VCD=stride_vcd, V_BLOCK_SIZE=v_block_size,
        num_warps=row_warps(2 * block_q_heads * block_half),
    )
    return q_out, k_out


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
         sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k likewise (any token/head strides, unit last stride);
    positions: int32 or int64 [num_tokens]; cos_cache, sin_cache: [max_position, head_dim // 2]."""
    return _launch_rope(positions, q, k, None, None, 0.0, cos_cache, sin_cache)


def norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
              k_weight: torch.Tensor, eps: float, cos_cache: torch.Tensor,
              sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope of rms_norm(q, q_weight, eps) and rms_norm(k, k_weight, eps), per head; weights: [head_dim]."""
    assert q_weight.shape == (q.size(2),) and k_weight.shape == (k.size(2),)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    return _launch_rope(positions, q, k, q_weight, k_weight, eps, cos_cache, sin_cache)


def rope_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
               k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_rope (weights given) or rope, and the rotated k and v written to the paged cache as store_kvcache
    writes them: v: [num_tokens, num_kv_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
    head_dim] (V may be key-major); slot_mapping: [num_tokens] (-1: not stored); k_scale, v_scale: an fp8
    cache's per-head scales."""
    if q_weight is not None:
        assert q_weight.shape == (q.size(2),) and k_weight.shape == (k.size(2),)
        assert q_weight.is_contiguous() and k_weight.is_contiguous()
    return _launch_rope(positions, q, k, q_weight, k_weight, eps, cos_cache, sin_cache,
                        (v, k_cache, v_cache, slot_mapping, k_scale, v_scale))


# ---- SiLU-and-mul --------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (num_tokens, cdiv(N, BLOCK)); x row = [gate (N) | up (N)]."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + N + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up  # F.silu's formula
    tl.store(out_ptr + t * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * n] (any row stride, unit last stride) -> silu(x[:, :n]) * x[:, n:]."""
    num_tokens, width = x.shape
    assert width % 2 == 0 and x.stride(1) == 1
    n = width // 2
    out = torch.empty((num_tokens, n), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n), 1024)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](x, out, x.stride(0), N=n, BLOCK=block,
                                                               num_warps=row_warps(block))
    return out
