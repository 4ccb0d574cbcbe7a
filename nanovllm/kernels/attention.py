"""Paged / varlen attention in Triton: causal prefill and split-KV (flash-decoding) decode.

Keys are read from the paged cache through a block table. Key n of a sequence lives at

    page = block_table[seq, n // page_size]            (physical block id)
    k_cache[page, n % page_size, kv_head, :]

V may instead be stored key-major, in runs of n consecutive keys (`values_key_major`; the triton backend's
layout for an fp8 cache, see engine/kv_cache.py): v_cache is then [pages * page_size // n, n, kv_heads, head_dim]
with unit stride along its n slots, and key i of a page lives at

    v_cache[page * (page_size // n) + i // n, i % n, kv_head, :]                (n = page_size: V's shape is K's)

so that the decode kernel's P.V product reads V contiguously along its inner dimension, as Q.K^T reads K.

A KV tile of BLOCK_N keys either lies inside one page (BLOCK_N <= page_size: one scalar block-table read per
tile, because tiles start at multiples of BLOCK_N and BLOCK_N divides page_size) or spans several pages
(BLOCK_N > page_size: one block-table read per key).

Softmax runs online in fp32 (flash-attention): per query row a running max m, a running sum l and an
unnormalised accumulator, rescaled by exp2(m_old - m_new) whenever the max grows. Scores are taken in base 2,
log2(e) folded into the softmax scale, so every exponential is a single exp2.

An fp8 KV cache (KV_FP8) holds x / scale per KV head: the loop casts fp8 tiles to the dots' dtype (exactly;
float16 for 16-bit queries, see _fp8_dot_query) and the scales are applied once per program, K's folded into
the softmax scale and V's into the output. Unpaged prefill with an fp8 cache quantises the fresh K/V on load,
so it attends to exactly what the cache holds.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.kernels.store_kvcache import quantize_fp8, value_block_size, values_key_major
from nanovllm.layers.kv_quant import FP8_DTYPE
from nanovllm.utils.kernels import cuda_properties

try:  # the fp8 decode kernel in Gluon (Triton 3.6's API); without it the Triton kernel serves every case
    from nanovllm.kernels import gluon_decode
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed Triton
    gluon_decode = None

LOG2E = 1.4426950408889634


def head_block(head_dim: int) -> int:
    """BLOCK_D: head_dim padded to a power of two, and to 16 at least (tl.dot's smallest inner dimension; the
    padding lanes are masked, so a head_dim of 8 attends as 8)."""
    return max(16, triton.next_power_of_2(head_dim))


@dataclass(frozen=True, slots=True)
class TileConfig:
    block_m: int  # query rows per program (prefill) or padded query heads per program (decode)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas's cap on registers a thread (Triton's maxnreg); None: ptxas's own


# ----------------------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _kv_rows(bt_row_ptr, start_n, offs_n, mask_n, stride_page, stride_slot,
             PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, RUN: tl.constexpr):
    """Memory offset (int64, in elements) of keys offs_n of one sequence, without the head/dim part. RUN: the
    slots of one block of this cache (page_size, or the run of key-major values; stride_page is its block's).

    Unpaged: bt_row_ptr is unused and the keys are rows offs_n of a contiguous-token tensor.
    """
    if PAGED:
        if BLOCK_N <= PAGE_SIZE:
            page = tl.load(bt_row_ptr + start_n // PAGE_SIZE).to(tl.int64)
        else:
            page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        if RUN == PAGE_SIZE:
            return page * stride_page + slot * stride_slot
        else:
            return (page * (PAGE_SIZE // RUN) + slot // RUN) * stride_page + (slot % RUN) * stride_slot
    else:
        return offs_n.to(tl.int64) * stride_slot


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, bt_row_ptr, start_n, offs_n, mask_n, offs_d, mask_d,
                  stride_kpage, stride_kslot, stride_vpage, stride_vslot, k_scale, v_scale, dtype: tl.constexpr,
                  MASK_ROWS: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_D: tl.constexpr, KV_FP8: tl.constexpr, STRIDE_VD: tl.constexpr, V_RUN: tl.constexpr):
    """The K and V tiles ([BLOCK_N, BLOCK_D], as `dtype`) of keys offs_n of one sequence; k_ptr/v_ptr point at
    its KV head. KV_FP8: the values of the fp8 cache, unscaled (fresh unpaged K/V are quantised first).
    STRIDE_VD: V's stride along head_dim (1, or its run for key-major values); V_RUN: slots of a V block."""
    k_rows = _kv_rows(bt_row_ptr, start_n, offs_n, mask_n, stride_kpage, stride_kslot, PAGED, PAGE_SIZE, BLOCK_N,
                      PAGE_SIZE)
    v_rows = _kv_rows(bt_row_ptr, start_n, offs_n, mask_n, stride_vpage, stride_vslot, PAGED, PAGE_SIZE, BLOCK_N,
                      V_RUN)
    k = _load_2d(k_ptr + k_rows[:, None] + offs_d[None, :], mask_n, mask_d, MASK_ROWS, MASK_D)
    v = _load_2d(v_ptr + v_rows[:, None] + offs_d[None, :] * STRIDE_VD, mask_n, mask_d, MASK_ROWS, MASK_D)
    if KV_FP8:
        if not PAGED:
            k = quantize_fp8(k, k_scale)
            v = quantize_fp8(v, v_scale)
        k = k.to(dtype)
        v = v.to(dtype)
    return k, v


@triton.jit
def _load_2d(ptrs, mask_rows, mask_d, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    # masks are only built when needed: an all-true mask along head_dim would still block vectorised loads
    if MASK_ROWS:
        if MASK_D:
            return tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
    else:
        if MASK_D:
            return tl.load(ptrs, mask=mask_d[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, qk_scale, visible,
                         MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one KV tile into (acc, m_i, l_i). q: [M, D]; k, v: [N, D]; visible: [M, N] (used when MASKED)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N], base-2 logits
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row that has seen no visible key yet keeps m = -inf; shift it by 0 instead to avoid inf - inf = nan
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, qk_scale, KV_FP8: tl.constexpr):
    """(k_scale, v_scale, qk_scale with K's scale folded in) of one KV head; unused without an fp8 cache."""
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr + kv_head)
        return k_scale, tl.load(v_scale_ptr + kv_head), qk_scale * k_scale
    else:
        return 1.0, 1.0, qk_scale


@triton.jit
def _fp8_dot_query(q, KV_FP8: tl.constexpr):
    """With an fp8 cache a 16-bit query enters the dots as float16: e4m3 tiles convert to float16 directly and
    exactly (to bfloat16 only through float16 and float32), which took the decode kernel 24% less time on an
    H200. Queries past float16's range saturate rather than overflow; float32 queries stay float32."""
    if KV_FP8:
        if not q.dtype.is_fp32():
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


# ----------------------------------------------------------------------------------------------------------------
# prefill


@triton.jit
def _prefill_tile(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, start_n, offs_m, offs_d, mask_d, shift, k_len,
                  qk_scale, stride_kpage, stride_kslot, stride_vpage, stride_vslot, k_scale, v_scale,
                  MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_D: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr, STRIDE_VD: tl.constexpr,
                  V_RUN: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < k_len
    k, v = _load_kv_tile(k_ptr, v_ptr, bt_row_ptr, start_n, offs_n, mask_n, offs_d, mask_d, stride_kpage,
                         stride_kslot, stride_vpage, stride_vslot, k_scale, v_scale, q.dtype, MASKED, PAGED,
                         PAGE_SIZE, BLOCK_N, MASK_D, KV_FP8, STRIDE_VD, V_RUN)
    # query row i sits at key position shift + i (bottom-right causal alignment)
    visible = (offs_n[None, :] <= (shift + offs_m)[:, None]) & mask_n[None, :]
    return _online_softmax_step(acc, m_i, l_i, q, k, v, qk_scale, visible, MASKED, PRECISION)


# Integer arguments that change from step to step are kept out of Triton's specialisation (== 1, % 16), so a
# new batch shape never compiles a new variant in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, block_tables_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, qk_scale,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kpage, stride_kslot, stride_kh, stride_vpage, stride_vslot, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr, KV_FP8: tl.constexpr, STRIDE_VD: tl.constexpr, V_RUN: tl.constexpr,
):
    # the last query tiles of a sequence see the most keys: hand them out first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    kv_head = head // GROUP
    if PAGED:
        k_len = tl.load(cu_seqlens_k_ptr + seq + 1) - tl.load(cu_seqlens_k_ptr + seq)
        bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
    else:
        # keys are the new tokens themselves: rows q_start .. q_start + q_len of k and v
        k_len = q_len
        bt_row_ptr = block_tables_ptr
        k_base = k_ptr + q_start.to(tl.int64) * stride_kslot + kv_head * stride_kh
        v_base = v_ptr + q_start.to(tl.int64) * stride_vslot + kv_head * stride_vh
    shift = k_len - q_len
    k_scale, v_scale, qk_scale = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, qk_scale, KV_FP8)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_2d(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask_m, mask_d,
                 True, MASK_D)
    q = _fp8_dot_query(q, KV_FP8)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys [0, full_end) are visible to every row of this tile: no mask; [full_end, causal_end) straddle the
    # diagonal (or the end of the sequence) and are masked; keys past causal_end are seen by no row
    full_end = (shift + m_start + 1) // BLOCK_N * BLOCK_N
    causal_end = shift + tl.minimum(m_start + BLOCK_M, q_len)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_base, v_base, bt_row_ptr, start_n, offs_m, offs_d,
                                      mask_d, shift, k_len, qk_scale, stride_kpage, stride_kslot, stride_vpage,
                                      stride_vslot, k_scale, v_scale, False, PAGED, PAGE_SIZE, BLOCK_N, MASK_D,
                                      PRECISION, KV_FP8, STRIDE_VD, V_RUN)
    for start_n in range(full_end, causal_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_base, v_base, bt_row_ptr, start_n, offs_m, offs_d,
                                      mask_d, shift, k_len, qk_scale, stride_kpage, stride_kslot, stride_vpage,
                                      stride_vslot, k_scale, v_scale, True, PAGED, PAGE_SIZE, BLOCK_N, MASK_D,
                                      PRECISION, KV_FP8, STRIDE_VD, V_RUN)

    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * v_scale
    o_ptrs = o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    if MASK_D:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


@functools.lru_cache(maxsize=None)
def prefill_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Tiles for H100/H200. 64 x 64 with 4 warps and 2 stages was the best or within 5% of the best of ten
    configurations on an H200 (bf16, head_dim 64 and 128, varlen and paged, 512-8192 tokens per sequence)."""
    block_d = head_block(head_dim)
    if block_d <= 128:
        cfg = TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    else:  # keep (BLOCK_M + 2 * BLOCK_N) * BLOCK_D * 2 bytes per stage within shared memory
        cfg = TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # twice the bytes per element: keep the same shared-memory footprint
        cfg = TileConfig(cfg.block_m, cfg.block_n // 2, cfg.num_warps, min(cfg.num_stages, 2))
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would lose ~3 decimal digits); 16-bit inputs ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      max_seqlen_q: int, block_tables: torch.Tensor | None, scale: float,
                      config: TileConfig | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal varlen prefill. q: [num_tokens, num_heads, head_dim]; returns the same shape (in `out` if given:
    a tensor of q's shape and dtype with unit stride along head_dim, e.g. a slice of a larger output).

    block_tables None: keys/values are k, v ([num_tokens, num_kv_heads, head_dim], k_len == q_len).
    Otherwise they come from k_cache/v_cache (v_cache may be key-major, see decode_attention) through
    block_tables ([num_seqs, max_blocks] int32), with cu_seqlens_k giving each sequence's key count (cached
    prefix + new tokens). An fp8 cache needs k_scale, v_scale (float32 [num_kv_heads]); then fresh k, v are
    attended as the cache would hold them.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.numel() - 1
    out = _output(q, out)
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = config or prefill_config(head_dim, q.dtype)
    paged = block_tables is not None
    if paged:
        kt, vt = k_cache, v_cache
        page_size, v_run = k_cache.size(1), value_block_size(k_cache, v_cache)
        strides_k = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        strides_v = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        tables, stride_bt = block_tables, block_tables.stride(0)
    else:
        kt, vt = k, v
        page_size = v_run = 1
        strides_k = (0, k.stride(0), k.stride(1))
        strides_v = (0, v.stride(0), v.stride(1))
        tables, stride_bt = cu_seqlens_q, 0  # a dummy pointer, never read
    num_kv_heads = kt.size(-2)
    assert q.stride(2) == 1 and kt.stride(3 if paged else 2) == 1 and num_heads % num_kv_heads == 0
    assert vt.stride(-1) == 1 or paged and values_key_major(v_cache)
    fp8 = _check_kv_scales(k_cache, k_scale, v_scale)
    grid = (triton.cdiv(max_seqlen_q, cfg.block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, kt, vt, out, tables, cu_seqlens_q, cu_seqlens_k, scale * LOG2E,
        k_scale if fp8 else q, v_scale if fp8 else q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides_k, *strides_v, stride_bt,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGED=paged, PAGE_SIZE=page_size,
        PRECISION=_dot_precision(q.dtype), KV_FP8=fp8, STRIDE_VD=vt.stride(-1), V_RUN=v_run,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers,
    )
    return out


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    return out


def _check_kv_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether the cache is fp8; such a cache comes with one float32 scale per KV head for K and for V."""
    fp8 = k_cache.dtype == FP8_DTYPE
    assert fp8 == (k_scale is not None and v_scale is not None)
    assert not fp8 or k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.numel() == k_cache.size(2)
    return fp8


# ----------------------------------------------------------------------------------------------------------------
# decode: split-KV (flash-decoding)
#
#   keys of sequence b:  [ split 0 | split 1 | split 2 | ... | split S-1 ]     each split_size keys
#                        |<------- context_lens[b] ------->|                   later splits: nothing to do
#
# Kernel 1, grid (B, num_kv_heads, S): one program attends all query heads of one KV head (the GQA group, padded
# to BLOCK_H rows) to one split, loading each K/V tile once for the group, and writes that split's normalised
# output and log-sum-exp. Kernel 2, grid (B, num_heads): merges the splits a sequence really has.
# S and split_size depend only on shapes, so the launch is the same for every step of a captured CUDA graph.


@triton.jit(do_not_specialize=["split_size", "num_splits", "stride_bt", "stride_pb", "stride_ph", "stride_ps",
                               "stride_lb", "stride_lh"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, context_lens_ptr, block_tables_ptr, o_ptr, part_o_ptr, part_lse_ptr,
    seq_order_ptr, qk_scale, k_scale_ptr, v_scale_ptr, split_size, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kpage, stride_kh, stride_vpage, stride_vh, stride_bt,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    ORDERED: tl.constexpr, NUM_KV_HEADS: tl.constexpr, STRIDE_KSLOT: tl.constexpr, STRIDE_VSLOT: tl.constexpr,
    STRIDE_VD: tl.constexpr, V_RUN: tl.constexpr,
):
    if ORDERED:  # grid (num_seqs * num_kv_heads, 1, splits): every head of the longest sequence first
        pid = tl.program_id(0)
        seq = tl.load(seq_order_ptr + pid // NUM_KV_HEADS).to(tl.int32)
        kv_head = pid % NUM_KV_HEADS
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + seq)
    start = split * split_size
    if (num_splits > 1) & (start >= ctx_len):
        return  # the merge kernel only reads splits below ctx_len; a single split always writes (zeros if empty)
    end = tl.minimum(start + split_size, ctx_len)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    seq64 = seq.to(tl.int64)
    q = _load_2d(q_ptr + seq64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask_h, mask_d,
                 True, MASK_D)
    q = _fp8_dot_query(q, KV_FP8)

    bt_row_ptr = block_tables_ptr + seq64 * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    k_scale, v_scale, qk_scale = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, qk_scale, KV_FP8)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    arange_n = tl.arange(0, BLOCK_N)
    # A tile inside one page (fp8 or key-major values): its elements' offsets from its first key are the same for
    # every tile (the strides are compile-time constants), so they are computed once here and the loop adds one
    # scalar address per tile. K rows past the end are read unmasked (they stay inside the tile's page, allocated
    # memory, and only reach scores the softmax replaces by -inf, whatever they hold). V rows past the end meet
    # zero weights, but a NaN there would survive 0 * v: they are masked, except in an fp8 cache, which never
    # holds a NaN (it starts zeroed and stores NaN as 0, see kv_quant). So: fp8 slot-major values 1,042 instead
    # of 1,243 loop instructions a tile and thread (sm_90), 3.3-3.5% less time on an H200; fp8 key-major values
    # (the triton backend's layout for fp8, see TritonBackend.key_major_values) enter the P.V product like K
    # enters Q.K^T, 8 bytes a shared-memory load instead of one: 689 instructions, 12% less time than slot-major
    # (graph-replayed over bench.py's decode batches). A bf16 cache (slot-major values) keeps per-key addresses
    # and masks: hoisted it was no faster and took more registers; its constant strides cut its loop from 830
    # to 655 instructions (0.6% less time).
    V_KEY_MAJOR: tl.constexpr = STRIDE_VD != 1
    HOIST: tl.constexpr = (KV_FP8 or V_KEY_MAJOR) and BLOCK_N <= PAGE_SIZE
    if HOIST:
        tile_k = arange_n[:, None] * STRIDE_KSLOT + offs_d[None, :]
        if V_KEY_MAJOR:  # [BLOCK_D, BLOCK_N]: V^T, from one run of keys or from BLOCK_N // V_RUN runs
            if V_RUN >= BLOCK_N:
                tile_v = offs_d[:, None] * STRIDE_VD + arange_n[None, :]
            else:
                tile_v = (offs_d[:, None] * STRIDE_VD + (arange_n // V_RUN).to(tl.int64)[None, :] * stride_vpage
                          + (arange_n % V_RUN)[None, :])
        else:
            tile_v = arange_n[:, None] * STRIDE_VSLOT + offs_d[None, :]
    for start_n in range(start, end, BLOCK_N):
        mask_n = arange_n < end - start_n
        if HOIST:
            page = tl.load(bt_row_ptr + start_n // PAGE_SIZE).to(tl.int64)
            # tiles start at multiples of BLOCK_N (split_size is one): key-major rows are aligned runs
            row = tl.multiple_of(start_n % PAGE_SIZE, BLOCK_N)
            k = _load_2d(k_base + page * stride_kpage + row * STRIDE_KSLOT + tile_k, mask_n, mask_d, False, MASK_D)
            k = k.to(q.dtype)
            if V_KEY_MAJOR:  # rows: head_dim, columns: keys
                v_block = page * (PAGE_SIZE // V_RUN) + row // V_RUN  # V's block (a run) of the tile's first key
                vt = _load_2d(v_base + v_block * stride_vpage + row % V_RUN + tile_v, mask_d, mask_n, MASK_D,
                              not KV_FP8)
                v = tl.trans(vt.to(q.dtype))
            else:
                v = _load_2d(v_base + page * stride_vpage + row * STRIDE_VSLOT + tile_v, mask_n, mask_d, True,
                             MASK_D).to(q.dtype)
        else:
            offs_n = start_n + arange_n
            k, v = _load_kv_tile(k_base, v_base, bt_row_ptr, start_n, offs_n, mask_n, offs_d, mask_d,
                                 stride_kpage, STRIDE_KSLOT, stride_vpage, STRIDE_VSLOT, k_scale, v_scale, q.dtype,
                                 True, True, PAGE_SIZE, BLOCK_N, MASK_D, KV_FP8, STRIDE_VD, V_RUN)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, qk_scale, mask_n[None, :], True, PRECISION)

    # an empty split or sequence (l = 0, acc = 0) yields 0, not nan
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if KV_FP8:
        out = out * v_scale
    if num_splits == 1:
        o_ptrs = o_ptr + seq64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:
        p_ptrs = part_o_ptr + seq64 * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
        tl.store(p_ptrs, out, mask=mask_h[:, None] & mask_d[None, :])
        lse = m_i + tl.math.log2(l_i)  # base 2
        tl.store(part_lse_ptr + seq64 * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit(do_not_specialize=["split_size", "stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh"])
def _decode_merge_kernel(
    part_o_ptr, part_lse_ptr, context_lens_ptr, o_ptr, split_size,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq64 = seq.to(tl.int64)
    num_valid = tl.cdiv(tl.load(context_lens_ptr + seq), split_size)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_valid
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + seq64 * stride_lb + head * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.math.exp2(lse - lse_max)  # [BLOCK_S]; 0 for splits past the sequence
    parts = tl.load(part_o_ptr + seq64 * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(o_ptr + seq64 * stride_ob + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=mask_d)


def _target_programs(device: torch.device) -> int:
    # enough split programs for about two waves over the GPU's multiprocessors
    if device.type != "cuda":
        return 8  # the Triton interpreter on CPU: any value works, small keeps it quick
    return 2 * cuda_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def decode_config(head_dim: int, group: int, dtype: torch.dtype, kv_fp8: bool = False,
                  values_key_major: bool = False) -> TileConfig:
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    block_d = head_block(head_dim)
    # 128 keys, 4 warps, 2 stages: the best of 54 configurations (32-128 keys, 1-4 warps, 2-3 stages, with and
    # without extra splits) on an H200 at bench.py's decode batches (62-256 sequences, 8 KV heads of 128), for
    # bf16 and fp8 caches alike; 64 keys with 3 stages took 1.5% (bf16) and 8% (fp8) longer. 64 keys with 2 stages
    # were 1.5-2% faster alone over head-major blocks but made bench.py 1.5-3% slower, so 128 stays. Still the best
    # for the fp8 cache's key-major values, of 27 tiles (32-128 keys, 2-8 warps, 2-4 stages; `--sweep` of
    # benchmarks/decode_attention.py): the next, 2 warps, took 2.1-2.8% longer
    block_n = 128 if block_d <= 128 else 32
    if dtype == torch.float32:
        block_n //= 2
    # An fp8 cache's 128-key kernel takes 168 registers a thread (sm_90), so 3 programs an SM; capped at 128 it
    # fits (compiled for head_dims up to 128, 1-16 query heads a KV head: no spills, or one register spilled
    # outside the loop and reloaded once a tile at head_dim 128 with 2 or 4 query heads) and 4 programs do:
    # bench.py's 0.6B fp8 run 1.7% faster on an H200 (32.1k vs 31.5k tok/s, 8B 10.5k either way). The bf16
    # kernel (138 registers) is held at 3 programs by shared memory and spills under the cap. With key-major
    # values the fp8 kernel takes 157 registers (3 programs) and ran 3% faster uncapped than capped at 128.
    # On a Hopper GPU that case runs the Gluon kernel instead (gluon_decode: the same 128-key tiles, the fp8
    # bytes straight into warpgroup MMAs, two copy buffers that take turns): 7-9% faster at bench.py's decode
    # batches on an H200.
    max_registers = 128 if kv_fp8 and not values_key_major and block_n == 128 and block_h == 16 else None
    return TileConfig(block_m=block_h, block_n=block_n, num_warps=4, num_stages=2, max_registers=max_registers)


MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)  # every layer of a step asks with the same shapes
def decode_splits(max_keys: int, num_seqs: int, num_kv_heads: int, block_n: int,
                  target_programs: int) -> tuple[int, int]:
    """(num_splits, split_size) from shapes alone; split_size is a multiple of block_n."""
    wanted = triton.cdiv(target_programs, num_seqs * num_kv_heads)
    num_splits = max(1, min(wanted, max_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))
    split_size = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    return triton.cdiv(max_keys, split_size), split_size


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, config: TileConfig | None = None,
                     num_splits: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, seq_order: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """One new query token per sequence against its paged context. q: [B, num_heads, head_dim] -> same shape
    (in `out` if given, as prefill_attention's).

    v_cache may be key-major, in runs of any power-of-two number of keys up to page_size (values_key_major; the
    triton backend's layout for an fp8 cache; see the module docstring).
    context_lens: [B] int32 keys per sequence (the new token included, already stored);
    block_tables: [B, max_blocks] int32; k_scale, v_scale: an fp8 cache's float32 [num_kv_heads] scales.
    seq_order: [B] the sequences in the order their programs start (e.g. longest first), or None (0..B-1).
    No host sync: safe under CUDA graph capture.
    kernel: "auto" runs the split step in Gluon where gluon_decode.applies (an fp8 cache on a Hopper GPU; the
    same result within the cache's rounding, fp8 MMAs and a deeper copy pipeline) and no config is given (a
    config is the Triton kernel's tiles), else in Triton; "triton" always in Triton.
    """
    if kernel not in ("auto", "triton"):
        raise ValueError(f"kernel must be 'auto' or 'triton', got {kernel!r}")
    num_seqs, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.size(1), k_cache.size(2)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and num_heads % num_kv_heads == 0
    key_major, v_run = values_key_major(v_cache), value_block_size(k_cache, v_cache)
    fp8 = _check_kv_scales(k_cache, k_scale, v_scale)
    group = num_heads // num_kv_heads
    cfg = config or decode_config(head_dim, group, q.dtype, fp8, key_major)
    assert cfg.block_m >= group
    out = _output(q, out)
    if num_seqs == 0:
        return out
    max_keys = block_tables.size(1) * page_size
    if num_splits is None:
        num_splits, split_size = decode_splits(max_keys, num_seqs, num_kv_heads, cfg.block_n,
                                               _target_programs(q.device))
    else:
        split_size = triton.cdiv(triton.cdiv(max_keys, num_splits), cfg.block_n) * cfg.block_n
        num_splits = triton.cdiv(max_keys, split_size)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if num_splits == 1:
        # not read by the kernel; float32 like the real buffers, so one compiled variant serves both cases
        part_o = part_lse = torch.empty(1, dtype=torch.float32, device=q.device)
        part_strides = (0, 0, 0, 0, 0)
    else:
        part_o = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_strides = (part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1))
    block_d = head_block(head_dim)
    ordered = seq_order is not None
    grid = (num_seqs * num_kv_heads, 1, num_splits) if ordered else (num_seqs, num_kv_heads, num_splits)
    # the split kernel's runtime arguments, the same for the Gluon kernel
    args = (q, k_cache, v_cache, context_lens, block_tables, out, part_o, part_lse, seq_order if ordered else q,
            scale * LOG2E, k_scale if fp8 else q, v_scale if fp8 else q, split_size, num_splits,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(2), v_cache.stride(0), v_cache.stride(2), block_tables.stride(0),
            *part_strides)
    if (kernel == "auto" and config is None and gluon_decode is not None
            and gluon_decode.applies(q, k_cache, v_cache, cfg.block_n)):
        gluon_decode.decode_split(grid, args, q, k_cache, ordered)
    else:
        _decode_split_kernel[grid](
            *args, GROUP=group, BLOCK_H=cfg.block_m, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=cfg.block_n,
            PAGE_SIZE=page_size, PRECISION=_dot_precision(q.dtype), KV_FP8=fp8, ORDERED=ordered,
            NUM_KV_HEADS=num_kv_heads, STRIDE_KSLOT=k_cache.stride(1), STRIDE_VSLOT=v_cache.stride(1),
            STRIDE_VD=v_cache.stride(3), V_RUN=v_run, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            maxnreg=cfg.max_registers,
        )
    if num_splits > 1:
        # one tile width for every split count (masked past num_splits): no per-shape variants
        _decode_merge_kernel[(num_seqs, num_heads)](
            part_o, part_lse, context_lens, out, split_size, *part_strides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS, num_warps=4,
        )
    return out
