"""Write each new token's K and V into its slot of the paged KV cache.

    slot_mapping[t] = block_id * block_size + offset        (-1: padding token, not stored)

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]
                 |           |
             slot // bs   slot % bs

(any strides; unit stride along head_dim for K, along head_dim or, key-major values, along the slots for V).
Key-major values in runs of n slots are value blocks of n slots (engine/kv_cache.py): V's block and offset are
slot // n and slot % n.

One program per token copies its whole [num_kv_heads, head_dim] row of K and of V. An fp8 cache gets
fp8(clamp(x / scale[head], -448, 448)) (see nanovllm.layers.kv_quant).
"""
import torch
import triton
import triton.language as tl

from nanovllm.layers.kv_quant import FP8_DTYPE, FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def quantize_fp8(x, scale):
    """x / scale saturated to the e4m3 range, as float8 e4m3 (division by a power of two: exact); NaN -> 0, so
    that an fp8 cache never holds a NaN (see nanovllm.layers.kv_quant)."""
    x = tl.math.div_rn(x.to(tl.float32), scale)
    x = tl.where(x != x, 0.0, x)
    return tl.clamp(x, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK_ROW: tl.constexpr,
    FP8: tl.constexpr, STRIDE_VCD: tl.constexpr, V_BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK_ROW)  # over num_kv_heads * head_dim, padded to a power of two
    mask = offs < ROW
    head, dim = offs // HEAD_DIM, offs % HEAD_DIM
    t = token.to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + dim, mask=mask)
    if FP8:
        k = quantize_fp8(k, tl.load(k_scale_ptr + head, mask=mask, other=1.0))
        v = quantize_fp8(v, tl.load(v_scale_ptr + head, mask=mask, other=1.0))
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + head * stride_kch + dim, k, mask=mask)
    block, offset = slot // V_BLOCK_SIZE, slot % V_BLOCK_SIZE
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + head * stride_vch + dim * STRIDE_VCD, v,
             mask=mask)


def values_key_major(v_cache: torch.Tensor) -> bool:
    """Whether a [value_blocks, n, num_kv_heads, head_dim] V cache is stored key-major within its blocks
    (unit stride along the slots, n along head_dim: one head's values of a block as [head_dim, n]); otherwise
    it must have unit stride along head_dim."""
    if v_cache.stride(3) == 1:
        return False
    assert v_cache.stride(1) == 1 and v_cache.stride(3) == v_cache.size(1), "unsupported V cache layout"
    return True


def value_block_size(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Slots in one block of the V cache: K's block size, or for key-major values in runs of n slots, n (a
    divisor of it; V then has block_size // n times K's blocks, the same slots). Asserts the shapes agree."""
    block_size, run = k_cache.size(1), v_cache.size(1)
    assert k_cache.shape[2:] == v_cache.shape[2:] and block_size % run == 0, "K and V caches do not match"
    assert v_cache.size(0) * run == k_cache.size(0) * block_size, "K and V caches do not match"
    assert run == block_size or values_key_major(v_cache), "only key-major values come in runs"
    return run


def check_store_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Asserts the shapes a kernel writing k, v to the cache needs (shared by the rotary kernel's fused store);
    returns whether the cache is fp8."""
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.shape[2:] == k.shape[1:] and k_cache.stride(3) == 1
    values_key_major(v_cache)  # V: unit stride along head_dim, or key-major (asserts the layout)
    value_block_size(k_cache, v_cache)
    assert slot_mapping.numel() == k.size(0)
    fp8 = k_cache.dtype == FP8_DTYPE
    assert fp8 == (k_scale is not None and v_scale is not None)
    return fp8


def row_warps(block_elems: int) -> int:
    """Warps for a kernel whose program works on one row of block_elems elements: about 256 elements a warp, 1 to
    8 (16 measured no faster on 8B's 4,096-wide rows)."""
    return max(1, min(8, block_elems // 256))


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (any token/head strides, unit last stride). An fp8 cache
    needs k_scale, v_scale: float32 [num_kv_heads]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    fp8 = check_store_args(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    _store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale if fp8 else k, v_scale if fp8 else v,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_SIZE=k_cache.size(1), HEAD_DIM=head_dim, ROW=row, BLOCK_ROW=triton.next_power_of_2(row),
        FP8=fp8, STRIDE_VCD=v_cache.stride(3), V_BLOCK_SIZE=v_cache.size(1),
        num_warps=row_warps(triton.next_power_of_2(row)),
    )
