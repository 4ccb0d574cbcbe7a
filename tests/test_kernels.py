"""Triton kernels and the GPU attention backends, checked against the pure-PyTorch TorchBackend.

Two kinds of tests live here:

* Interpreter tests (run anywhere Triton is installed, CPU only): Triton reads TRITON_INTERPRET when a kernel is
  decorated, i.e. when nanovllm.kernels is first imported, so one process cannot hold both interpreted and
  compiled kernels. These checks therefore run in ONE child process (`python tests/test_kernels.py --interpret`
  with TRITON_INTERPRET=1) that reports a verdict per check as JSON; the pytest process never imports the kernels
  in interpreter mode, and GPU tests in the same session keep compiled kernels. fp32 only (the interpreter runs
  on numpy) and tiny shapes with small tiles, so that every loop and mask path is crossed quickly.
* `@pytest.mark.cuda` tests (skipped without a GPU): store, prefill and decode of the triton and flash_attn
  backends against TorchBackend in bf16, including shuffled block tables, cached prefixes, chunked prefill,
  GQA, long split-KV contexts and decode under CUDA graph capture.

The layers' fused element-wise kernels (RMSNorm, rotary embedding, SiLU-and-mul) and the sampler's (race, greedy,
penalties, thresholds) are checked against the PyTorch functions they replace (the CPU path, or `fn.reference`):
in the interpreter here, on CUDA in tests/test_sampler.py and the end of this file.

fp8 KV cache cases convert a case's caches to float8 e4m3 with per-KV-head scales and compare the kernels with
TorchBackend given the same scales. The interpreter loads and stores float8, but its float32 -> float8 conversion
rounds half up and lets a mantissa carry corrupt the exponent (1.99 -> 1.0, Triton 3.6), so its checks feed the
kernels values already on the fp8 grid (and far-out ones, which saturate); the rounding itself is checked on
CUDA, byte for byte against torch.
"""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback

import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.backends.torch_sdpa import TorchBackend
from nanovllm.layers.kv_quant import FP8_DTYPE, KVScales, fp8_round_trip, quantize_fp8
from nanovllm.layers.layernorm import RMSNorm, add_rms_norm, rms_norm
from nanovllm.layers.rotary_embedding import QKRotation, RotaryEmbedding, default_inv_freq, norm_rope, rope
from nanovllm.utils.context import Context
from nanovllm.utils.kernels import run_warm_up

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_CUDA = torch.cuda.is_available()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")


# ----------------------------------------------------------------------------------------------------------------
# building test batches


def make_block_tables(k_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Each sequence gets distinct, shuffled physical blocks; unused entries are -1."""
    width = max((k + block_size - 1) // block_size for k in k_lens)
    needed = sum((k + block_size - 1) // block_size for k in k_lens)
    assert needed <= num_blocks
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(k_lens), width), -1, dtype=torch.int32)
    for i, k in enumerate(k_lens):
        n = (k + block_size - 1) // block_size
        tables[i, :n] = torch.tensor(free[:n], dtype=torch.int32)
        free = free[n:]
    return tables


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return k_cache, v_cache


def prefill_case(q_lens, k_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, device, paged, seed=0):
    """(q, k, v, k_cache, v_cache, ctx). Paged: keys live in the cache (as after store_kvcache); else in k, v."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    num_blocks = sum((kl + block_size - 1) // block_size for kl in k_lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen)
    tables = make_block_tables(k_lens, block_size, num_blocks, gen).to(device) if paged else None
    ctx = Context(is_prefill=True, cu_seqlens_q=cu_seqlens(q_lens).to(device),
                  cu_seqlens_k=cu_seqlens(k_lens).to(device), max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
                  block_tables=tables)
    return q, k, v, k_cache, v_cache, ctx


def decode_case(context_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, device, seed=0, extra_width=0,
                spare_blocks=3):
    """(q, k_cache, v_cache, ctx); block tables get extra_width more -1 columns (like a CUDA graph's buffer)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    num_blocks = sum((c + block_size - 1) // block_size for c in context_lens) + spare_blocks
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen)
    tables = make_block_tables(context_lens, block_size, num_blocks, gen)
    tables = torch.cat([tables, torch.full((len(context_lens), extra_width), -1, dtype=torch.int32)], 1)
    ctx = Context(is_prefill=False, context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
                  block_tables=tables.to(device))
    return q, k_cache, v_cache, ctx


def with_decode_rows(ctx: Context, num_decode_rows: int) -> Context:
    """The prefill context as the runner builds it for a backend that reads a mixed step's trailing one-token rows
    as decode rows (step_inputs.prefill_layout): their key counts, block tables and longest-first order."""
    assert num_decode_rows and ctx.block_tables is not None
    cu_k = ctx.cu_seqlens_k.tolist()
    lens = [b - a for a, b in zip(cu_k[-num_decode_rows - 1:], cu_k[-num_decode_rows:])]
    assert (ctx.cu_seqlens_q[-num_decode_rows:] - ctx.cu_seqlens_q[-num_decode_rows - 1:-1]).eq(1).all()
    device = ctx.block_tables.device
    order = sorted(range(len(lens)), key=lens.__getitem__, reverse=True)
    return dataclasses.replace(ctx, num_decode_rows=num_decode_rows,
                               context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                               decode_block_tables=ctx.block_tables[-num_decode_rows:].contiguous(),
                               decode_order=torch.tensor(order, dtype=torch.int32, device=device))


def fill_stale_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context) -> None:
    """In every cache slot that holds no key of ctx's sequences, the worst an earlier owner of its block can leave
    there: NaN in a float cache; in an fp8 cache, which never holds NaN (kv_quant), e4m3's largest value (448)."""
    block_size = k_cache.size(1)
    stale = torch.ones(k_cache.shape[:2], dtype=torch.bool)
    for row, n in zip(ctx.block_tables.tolist(), ctx.context_lens.tolist()):
        for i in range(n):
            stale[row[i // block_size], i % block_size] = False
    stale = stale.to(k_cache.device)
    for cache in (k_cache, v_cache):
        mask = stale.reshape(cache.shape[:2])  # key-major values in runs: value blocks of fewer slots, same order
        if cache.dtype == FP8_DTYPE:
            cache.view(torch.uint8)[mask] = 0x7E
        else:
            cache[mask] = float("nan")

def store_case(num_tokens, num_slots_free, block_size, num_kv_heads, head_dim, dtype, device, seed=0):
    """k, v as non-contiguous views of a fused qkv-like tensor, slots distinct with some -1 (padding)."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k, v = fused[:, num_kv_heads:2 * num_kv_heads], fused[:, 2 * num_kv_heads:]
    num_blocks = (num_slots_free + block_size - 1) // block_size
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[::3] = -1
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen)
    return k, v, k_cache, v_cache, slots.to(device)


def fp8_scales(num_kv_heads: int, device, seed=3) -> KVScales:
    """Powers of two from 1/8 to 2, different per head (random caches hold values up to ~5)."""
    exps = torch.randint(-3, 2, (2, num_kv_heads), generator=torch.Generator().manual_seed(seed)).float()
    return KVScales(k=(2.0 ** exps[0]).to(device), v=(2.0 ** exps[1]).to(device))


def with_fp8_cache(case, kv_scales: KVScales):
    """The same case with its caches rounded to fp8 (the k, v of new tokens stay as they are)."""
    if len(case) == 6:
        q, k, v, k_cache, v_cache, ctx = case
        return q, k, v, quantize_fp8(k_cache, kv_scales.k), quantize_fp8(v_cache, kv_scales.v), ctx
    q, k_cache, v_cache, ctx = case
    return q, quantize_fp8(k_cache, kv_scales.k), quantize_fp8(v_cache, kv_scales.v), ctx


def run_backend(backend, kind, case, scale, kv_scales=None):
    if kind == "prefill":
        q, k, v, k_cache, v_cache, ctx = case
        return backend.prefill(q, k, v, k_cache, v_cache, ctx, scale, kv_scales)
    q, k_cache, v_cache, ctx = case
    return backend.decode(q, k_cache, v_cache, ctx, scale, kv_scales)


def assert_matches_torch(kind, case, out, scale=0.3, atol=1e-4, rtol=1e-4, kv_scales=None):
    """`out` (a kernel's or a backend's) equals the plain-PyTorch backend's result on the same case (whose V cache
    it reads in K's shape: values in runs are reshaped, the same slots in the same order)."""
    k_cache, v_cache = case[-3], case[-2]
    case = (*case[:-2], v_cache.reshape(k_cache.shape), case[-1])
    torch.testing.assert_close(out, run_backend(TorchBackend(), kind, case, scale, kv_scales), atol=atol, rtol=rtol)


def assert_backend_matches_torch(backend, kind, case, scale, atol, rtol, kv_scales=None):
    assert_matches_torch(kind, case, run_backend(backend, kind, case, scale, kv_scales), scale, atol, rtol, kv_scales)


# ----------------------------------------------------------------------------------------------------------------
# interpreter checks: run in the child process only (see the module docstring)


def _check_store_kvcache():
    from nanovllm.kernels.store_kvcache import store_kvcache
    for head_dim in (32, 24):  # 2 * 24 = 48 values per token: masked to a 64-wide block
        k, v, k_cache, v_cache, slots = store_case(9, 64, 16, 2, head_dim, torch.float32, "cpu")
        expect_k, expect_v = k_cache.clone(), v_cache.clone()
        TorchBackend().store_kvcache(k, v, expect_k, expect_v, slots)
        store_kvcache(k, v, k_cache, v_cache, slots)
        assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


def _check_prefill_varlen():
    from nanovllm.kernels.attention import TileConfig, prefill_attention
    q_lens = [1, 17, 40, 16]
    for config in (TileConfig(16, 16, 4, 1), None):  # small tiles cross many tiles; None = the GPU default
        case = prefill_case(q_lens, q_lens, 16, 4, 2, 32, torch.float32, "cpu", paged=False)
        q, k, v, k_cache, v_cache, ctx = case
        out = prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                None, 0.3, config)
        assert_matches_torch("prefill", case, out)


def _check_prefill_paged():
    from nanovllm.kernels.attention import TileConfig, prefill_attention
    q_lens, k_lens = [1, 17, 33, 5, 20], [5, 40, 33, 70, 20]  # prefixes, chunks, a plain prompt, one token
    # tiles within a page (scalar block-table read), equal to a page, and spanning two pages (per-key read)
    for block_size, block_n in ((32, 16), (16, 16), (16, 32)):
        case = prefill_case(q_lens, k_lens, block_size, 6, 2, 32, torch.float32, "cpu", paged=True)
        q, k, v, k_cache, v_cache, ctx = case
        out = prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                ctx.block_tables, 0.3, TileConfig(16, block_n, 4, 1))
        assert_matches_torch("prefill", case, out)


def _check_prefill_with_decode_rows():
    """The triton backend's mixed step: chunks through the prefill kernel, the trailing one-token rows through the
    decode kernel into the same output; the same result as the torch backend's prefill over every row."""
    from nanovllm.layers.backends.triton_attn import TritonBackend
    # chunks (one a single token before longer rows), then decodes (one of a single key); then decodes alone
    for q_lens, k_lens, tail in (([1, 17, 40, 1, 1, 1], [5, 40, 40, 90, 16, 1], 3), ([1, 1, 1], [5, 33, 1], 3)):
        for block_size in (16, 64):
            case = prefill_case(q_lens, k_lens, block_size, 6, 2, 32, torch.float32, "cpu", paged=True)
            q, k, v, k_cache, v_cache, ctx = case
            out = TritonBackend().prefill(q, k, v, k_cache, v_cache, with_decode_rows(ctx, tail), 0.3)
            assert_matches_torch("prefill", case, out)


def _check_decode():
    from nanovllm.kernels.attention import TileConfig, decode_attention
    lens = [1, 16, 17, 90, 33]
    for block_size, block_n, num_splits in ((16, 16, None), (16, 32, 3), (32, 16, 4), (16, 16, 7)):
        # 6 query heads on 2 KV heads: a group of 3, padded to 16 rows
        case = decode_case(lens, block_size, 6, 2, 32, torch.float32, "cpu", extra_width=2)
        q, k_cache, v_cache, ctx = case
        out = decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.3,
                               TileConfig(16, block_n, 4, 1), num_splits)
        assert_matches_torch("decode", case, out)
        # programs started in another order of the sequences (longest first, or any): the same result
        for order in (torch.argsort(ctx.context_lens, descending=True), torch.tensor([3, 0, 4, 2, 1])):
            again = decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.3,
                                     TileConfig(16, block_n, 4, 1), num_splits, seq_order=order)
            assert torch.equal(again, out)


def _check_odd_head_dim():
    from nanovllm.kernels.attention import TileConfig, decode_attention, head_block, prefill_attention
    # 40 -> 64 padded; 8 -> 16 (tl.dot's smallest inner dimension)
    assert head_block(40) == 64 and head_block(8) == 16
    for head_dim in (40, 8):
        case = prefill_case([3, 20], [10, 20], 16, 2, 1, head_dim, torch.float32, "cpu", paged=True)
        q, k, v, k_cache, v_cache, ctx = case
        out = prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                ctx.block_tables, 0.3, TileConfig(16, 16, 4, 1))
        assert_matches_torch("prefill", case, out)
        case = decode_case([7, 40], 16, 2, 1, head_dim, torch.float32, "cpu")
        q, k_cache, v_cache, ctx = case
        out = decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.3,
                               TileConfig(16, 16, 4, 1), 2)
        assert_matches_torch("decode", case, out)


def _check_decode_empty_rows():
    """CUDA-graph padding rows have context length 0: they must give zeros, not nan, with and without splits."""
    from nanovllm.kernels.attention import TileConfig, decode_attention
    q, k_cache, v_cache, ctx = decode_case([20, 20], 16, 2, 2, 32, torch.float32, "cpu")
    ctx.context_lens[1] = 0
    for num_splits in (1, 2):
        out = decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.3,
                               TileConfig(16, 16, 4, 1), num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out[0].isnan().any()


def _check_store_kvcache_fp8():
    """Same bytes as the torch store, saturating far-out values at +-448 * scale."""
    from nanovllm.kernels.store_kvcache import store_kvcache
    for head_dim in (32, 24):
        k, v, k_cache, v_cache, slots = store_case(9, 64, 16, 2, head_dim, torch.float32, "cpu")
        scales = fp8_scales(2, "cpu")
        k, v = fp8_round_trip(k, scales.k), fp8_round_trip(v, scales.v)  # on the grid (see the module docstring)
        k[1, 0, :2] = torch.tensor([1e6, -1e6])
        v[1, 1, 3] = float("nan")  # stored as 0: an fp8 cache never holds NaN
        k_cache, v_cache = quantize_fp8(k_cache, scales.k), quantize_fp8(v_cache, scales.v)
        expect_k, expect_v = k_cache.clone(), v_cache.clone()
        TorchBackend().store_kvcache(k, v, expect_k, expect_v, slots, scales)
        store_kvcache(k, v, k_cache, v_cache, slots, scales.k, scales.v)
        assert torch.equal(k_cache.view(torch.uint8), expect_k.view(torch.uint8))
        assert torch.equal(v_cache.view(torch.uint8), expect_v.view(torch.uint8))
        assert v_cache.view(-1, 2, head_dim)[slots[1], 1, 3].item() == 0


def _check_prefill_fp8():
    """Paged (keys read as fp8) and unpaged (fresh keys rounded through fp8 on load), GQA, odd head_dim."""
    from nanovllm.kernels.attention import TileConfig, prefill_attention
    for paged, q_lens, k_lens, head_dim in ((True, [1, 17, 33, 5], [5, 40, 33, 70], 32),
                                           (False, [1, 17, 40], [1, 17, 40], 32),
                                           (True, [3, 20], [10, 20], 40)):
        case = prefill_case(q_lens, k_lens, 16, 6, 2, head_dim, torch.float32, "cpu", paged=paged)
        scales = fp8_scales(2, "cpu")
        q, k, v, k_cache, v_cache, ctx = with_fp8_cache(case, scales)
        k, v = fp8_round_trip(k, scales.k), fp8_round_trip(v, scales.v)  # on the grid (see the module docstring)
        case = q, k, v, k_cache, v_cache, ctx
        out = prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                ctx.block_tables, 0.3, TileConfig(16, 16, 4, 1), scales.k, scales.v)
        assert_matches_torch("prefill", case, out, kv_scales=scales)


def _check_decode_fp8():
    from nanovllm.kernels.attention import TileConfig, decode_attention
    for num_splits in (None, 3):
        scales = fp8_scales(2, "cpu")
        case = with_fp8_cache(decode_case([1, 16, 17, 90, 33], 16, 6, 2, 32, torch.float32, "cpu", extra_width=2),
                              scales)
        q, k_cache, v_cache, ctx = case
        out = decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.3,
                               TileConfig(16, 16, 4, 1), num_splits, scales.k, scales.v)
        assert_matches_torch("decode", case, out, kv_scales=scales)



def _check_decode_stale_nan():
    """Cache slots that hold no key of the batch (the rest of each last page, unused blocks) hold what earlier
    owners left, NaN included in a float cache (fill_stale_slots): the decode kernel reads the K rows of a last
    tile unmasked, and an fp8 cache's key-major V tiles whole, so they must not reach the output. The kernel gives
    the same bits with every such slot filled as with the case's own values there, in both V layouts."""
    from nanovllm.kernels.attention import TileConfig, decode_attention
    lens = [1, 16, 17, 90, 33]
    for fp8 in (False, True):
        for block_size, block_n, num_splits in ((16, 16, None), (32, 16, None), (32, 16, 3), (16, 32, None)):
            case = decode_case(lens, block_size, 6, 2, 32, torch.float32, "cpu", extra_width=2)
            scales = fp8_scales(2, "cpu") if fp8 else None
            if fp8:
                case = with_fp8_cache(case, scales)
            q, k_cache, v_cache, ctx = case
            args = (ctx.context_lens, ctx.block_tables, 0.3, TileConfig(16, block_n, 4, 1), num_splits,
                    *((scales.k, scales.v) if fp8 else (None, None)))
            clean = decode_attention(q, k_cache, v_cache, *args)
            assert_matches_torch("decode", case, clean, kv_scales=scales)
            for kc, vc in ((k_cache.clone(), v_cache.clone()), (head_major(k_cache), key_major(v_cache))):
                fill_stale_slots(kc, vc, ctx)
                assert torch.equal(decode_attention(q, kc, vc, *args), clean)


# ---- the layers' fused element-wise ops (nanovllm.kernels.fused) against their PyTorch functions


def norm_case(num_tokens: int, hidden: int, dtype: torch.dtype, device, seed=0):
    """(x, residual, weight): x and residual are row-strided views (columns of wider tensors), the weight is
    around 1 like a trained norm's."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden + 8, generator=gen).to(device=device, dtype=dtype)[:, :hidden]
    residual = torch.randn(num_tokens, hidden + 8, generator=gen).to(device=device, dtype=dtype)[:, 8:]
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    return x, residual, weight


def rope_case(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
              positions_dtype=torch.int64, max_position=64, seed=0):
    """(positions, q, k, q_norm, k_norm, rotary), q and k views of one fused qkv tensor as in Qwen3Attention."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(device=device, dtype=dtype)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(max_position, (num_tokens,), generator=gen).to(device=device, dtype=positions_dtype)
    norms = [RMSNorm(head_dim).to(device=device, dtype=dtype) for _ in range(2)]
    for norm in norms:
        norm.weight.copy_(1 + 0.5 * torch.randn(head_dim, generator=gen))
    rotary = RotaryEmbedding(default_inv_freq(head_dim, 10000.0), max_position, dtype).to(device)
    return positions, q, k, norms[0], norms[1], rotary


def gate_up_case(num_tokens: int, size: int, dtype: torch.dtype, device, seed=0) -> torch.Tensor:
    """[num_tokens, 2 * size] = [gate | up], a row-strided view."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, 2 * size + 8, generator=gen).to(device=device, dtype=dtype)[:, :2 * size]


def assert_fused_close(outs, expects, atol: float, rtol: float):
    """A kernel's output tensors are new, contiguous and close to the reference's."""
    outs, expects = (outs, expects) if isinstance(outs, tuple) else ((outs,), (expects,))
    assert len(outs) == len(expects)
    for out, expect in zip(outs, expects):
        assert out.is_contiguous()
        torch.testing.assert_close(out, expect, atol=atol, rtol=rtol)


def _check_fused_norms():
    from nanovllm.kernels import fused
    for num_tokens, hidden in ((5, 96), (1, 64)):  # 96: masked to a 128-wide block; a single token
        x, residual, weight = norm_case(num_tokens, hidden, torch.float32, "cpu")
        assert_fused_close(fused.rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6), 1e-5, 1e-5)
        assert_fused_close(fused.add_rms_norm(x, residual, weight, 1e-6), add_rms_norm(x, residual, weight, 1e-6),
                           1e-5, 1e-5)


def _check_fused_rope():
    from nanovllm.kernels import fused
    # GQA with head counts masked to powers of two, head_dim 40 (halves of 20 masked to 32), one token
    for num_tokens, num_heads, num_kv_heads, head_dim, positions_dtype in ((6, 4, 2, 32, torch.int64),
                                                                           (3, 3, 1, 40, torch.int32),
                                                                           (1, 2, 2, 64, torch.int32)):
        positions, q, k, q_norm, k_norm, rotary = rope_case(num_tokens, num_heads, num_kv_heads, head_dim,
                                                            torch.float32, "cpu", positions_dtype)
        cos, sin = rotary.cos_cache, rotary.sin_cache
        assert_fused_close(fused.rope(positions, q, k, cos, sin), rotary(positions, q, k), 1e-5, 1e-5)
        assert_fused_close(fused.norm_rope(positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps, cos, sin),
                           norm_rope(positions, q, k, q_norm, k_norm, rotary), 1e-5, 1e-5)


def rope_store_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, fp8=False):
    """rope_case plus v (a view of the same qkv-like tensor's tail), caches with room to spare and slots with
    some -1 (padding)."""
    positions, q, k, q_norm, k_norm, rotary = rope_case(num_tokens, num_heads, num_kv_heads, head_dim, dtype,
                                                        device, max_position=4096 if device == "cuda" else 64)
    _, v, k_cache, v_cache, slots = store_case(num_tokens, 2 * num_tokens + block_size, block_size, num_kv_heads,
                                               head_dim, dtype, device, seed=1)
    scales = None
    if fp8:
        scales = fp8_scales(num_kv_heads, device)
        k_cache, v_cache = quantize_fp8(k_cache, scales.k), quantize_fp8(v_cache, scales.v)
    return positions, q, k, v, q_norm, k_norm, rotary, k_cache, v_cache, slots, scales


def assert_rope_store_matches(case):
    """The fused kernel's q, k equal the rope kernels' (checked against PyTorch on their own); its cache holds
    what the PyTorch store writes for the k it returned (and the v given), byte for byte, and nothing else."""
    from nanovllm.kernels import fused
    from nanovllm.layers.backends.torch_sdpa import store_kvcache as torch_store
    positions, q, k, v, q_norm, k_norm, rotary, k_cache, v_cache, slots, scales = case
    cos, sin = rotary.cos_cache, rotary.sin_cache
    scale_args = (scales.k, scales.v) if scales is not None else (None, None)
    for weights in ((q_norm.weight, k_norm.weight), (None, None)):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = fused.rope_store(positions, q, k, v, *weights, q_norm.eps, cos, sin, kc, vc, slots, *scale_args)
        if weights[0] is None:
            expect = fused.rope(positions, q, k, cos, sin)
        else:
            expect = fused.norm_rope(positions, q, k, *weights, q_norm.eps, cos, sin)
        assert_fused_close(out, expect, 0, 0)
        expect_k, expect_v = k_cache.clone(), v_cache.clone()
        torch_store(out[1], v, expect_k, expect_v, slots, scales)
        for got, want in ((kc, expect_k), (vc, expect_v)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def _check_fused_rope_store():
    # float32 only: the interpreter's float32 -> float8 rounding is off (module docstring); fp8 runs on CUDA
    for num_tokens, num_heads, num_kv_heads, head_dim, block_size in ((7, 4, 2, 32, 4), (3, 3, 3, 40, 16)):
        assert_rope_store_matches(rope_store_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size,
                                                  torch.float32, "cpu"))


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values, stored head by head within each block (the triton backend's layout; see kv_cache.py)."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


def _check_head_major_blocks():
    """Every Triton kernel that reads or writes the cache gives the same result on a head-major copy of it."""
    from nanovllm.kernels.attention import TileConfig, decode_attention, prefill_attention
    q, k_cache, v_cache, ctx = decode_case([1, 16, 17, 90, 33], 16, 6, 2, 32, torch.float32, "cpu", extra_width=2)
    kh, vh = head_major(k_cache), head_major(v_cache)
    assert torch.equal(kh, k_cache) and kh.stride() != k_cache.stride()
    for block_n, num_splits in ((16, None), (32, 3)):
        args = (ctx.context_lens, ctx.block_tables, 0.3, TileConfig(16, block_n, 4, 1), num_splits)
        assert torch.equal(decode_attention(q, kh, vh, *args), decode_attention(q, k_cache, v_cache, *args))
    q, k, v, k_cache, v_cache, ctx = prefill_case([3, 20], [10, 37], 16, 4, 2, 32, torch.float32, "cpu", paged=True)
    args = (ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, ctx.block_tables, 0.3)
    assert torch.equal(prefill_attention(q, k, v, head_major(k_cache), head_major(v_cache), *args),
                       prefill_attention(q, k, v, k_cache, v_cache, *args))
    assert_stores_equal_in_layout(head_major)


def assert_stores_equal_in_layout(v_layout):
    """store_kvcache and the fused rotary store write into head-major K and `v_layout(V)` caches what they write
    into contiguous ones."""
    from nanovllm.kernels import fused
    from nanovllm.kernels.store_kvcache import store_kvcache
    k, v, k_cache, v_cache, slots = store_case(9, 64, 16, 2, 32, torch.float32, "cpu")
    kl, vl = head_major(k_cache), v_layout(v_cache)
    store_kvcache(k, v, kl, vl, slots)
    store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(kl, k_cache) and torch.equal(vl, v_layout(v_cache))
    positions, q, k, v, q_norm, k_norm, rotary, k_cache, v_cache, slots, _ = rope_store_case(7, 4, 2, 32, 4,
                                                                                           torch.float32, "cpu")
    kl, vl = head_major(k_cache), v_layout(v_cache)
    for kc, vc in ((kl, vl), (k_cache, v_cache)):
        fused.rope_store(positions, q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, rotary.cos_cache,
                         rotary.sin_cache, kc, vc, slots, None, None)
    assert torch.equal(kl, k_cache) and torch.equal(vl, v_layout(v_cache))


def key_major(cache: torch.Tensor, run: int | None = None) -> torch.Tensor:
    """The same values stored key-major in runs of `run` slots (default: a whole block): one head's values of a
    run as [head_dim, run], seen as value blocks of `run` slots (the triton backend's V layout for an fp8 cache;
    see kv_cache.py). A whole block keeps the cache's shape."""
    num_blocks, block_size, heads, head_dim = cache.shape
    run = run or block_size
    runs = cache.reshape(num_blocks * block_size // run, run, heads, head_dim)
    return runs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def triton_layout(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """The caches laid out as the triton backend's engine allocates them for a `dtype` model on their device
    (kv_cache.py): head-major blocks, and key-major values where TritonBackend.key_major_values asks for them
    (fp8: runs of 4 keys where the Gluon kernel serves, of a block elsewhere)."""
    from nanovllm.layers.backends.triton_attn import TritonBackend
    kv_cache_dtype = "fp8_e4m3" if k_cache.dtype == FP8_DTYPE else "auto"
    run = TritonBackend(k_cache.device).key_major_values(k_cache.size(1), k_cache.size(3), dtype, kv_cache_dtype)
    if run:
        return head_major(k_cache), key_major(v_cache, run)
    return head_major(k_cache), head_major(v_cache)


def _check_key_major_values():
    """Every Triton kernel that reads or writes V gives the same result on a key-major copy of it, in runs of a
    whole block or of fewer keys: decode by tiles inside a block (float32: V masked; fp8: read whole) and by keys
    across blocks, split or not, paged prefill, the store and the fused rotary store."""
    from nanovllm.kernels.attention import TileConfig, decode_attention, prefill_attention, values_key_major
    lens = [1, 16, 17, 90, 33]
    for fp8 in (False, True):
        scales = fp8_scales(2, "cpu") if fp8 else None
        scale_args = (scales.k, scales.v) if fp8 else (None, None)
        for block_size, block_n, num_splits, run in ((32, 16, None, None), (32, 16, 3, None), (16, 16, None, None),
                                                     (16, 32, None, None), (32, 16, 3, 4), (32, 16, None, 8),
                                                     (16, 32, None, 4), (32, 32, None, 16)):
            case = decode_case(lens, block_size, 6, 2, 32, torch.float32, "cpu", extra_width=2)
            q, k_cache, v_cache, ctx = with_fp8_cache(case, scales) if fp8 else case
            kh, vk = head_major(k_cache), key_major(v_cache, run)
            assert values_key_major(vk) and vk.stride(1) == 1 and vk.size(1) == (run or block_size)
            assert torch.equal(vk.flatten(0, 1).float(), v_cache.flatten(0, 1).float())  # the same slots
            args = (ctx.context_lens, ctx.block_tables, 0.3, TileConfig(16, block_n, 4, 1), num_splits, *scale_args)
            # runs against whole-block runs: the same tile path (contiguous values take another, whose float32
            # products the interpreter may round differently where the tile spans the block)
            expect = decode_attention(q, *((kh, key_major(v_cache)) if run else (k_cache, v_cache)), *args)
            assert torch.equal(decode_attention(q, kh, vk, *args), expect)
        case = prefill_case([3, 20, 1], [10, 37, 40], 16, 4, 2, 32, torch.float32, "cpu", paged=True)
        q, k, v, k_cache, v_cache, ctx = with_fp8_cache(case, scales) if fp8 else case
        if fp8:
            k, v = fp8_round_trip(k, scales.k), fp8_round_trip(v, scales.v)  # on the grid (module docstring)
        args = (ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, ctx.block_tables, 0.3,
                TileConfig(16, 16, 4, 1), *scale_args)
        for run in (None, 4):
            assert torch.equal(prefill_attention(q, k, v, head_major(k_cache), key_major(v_cache, run), *args),
                               prefill_attention(q, k, v, k_cache, v_cache, *args))
    assert_stores_equal_in_layout(key_major)
    assert_stores_equal_in_layout(lambda cache: key_major(cache, 4))


def _check_fused_silu_and_mul():
    from nanovllm.kernels import fused
    for num_tokens, size in ((4, 96), (1, 1500)):  # 1500: two 1024-wide column blocks, the second masked
        x = gate_up_case(num_tokens, size, torch.float32, "cpu")
        assert_fused_close(fused.silu_and_mul(x), silu_and_mul(x), 1e-5, 1e-5)


def _sampler_case(params, vocab, seed, scale=3.0):
    """Logits [len(params), vocab] float32 and the CPU's SamplingTensors for those rows."""
    from nanovllm.layers.sampler import sampling_tensors
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), vocab, generator=gen) * scale
    t = sampling_tensors(params, [seed + i for i in range(len(params))], [3 * i for i in range(len(params))], "cpu")
    return logits, t


def _check_sampler_race_and_greedy():
    """Vocabularies of one part (300) to the full 32 parts of 1024-token blocks (40000, the last part short); a tie
    across parts goes to the first index, as argmax's; rows with -inf parts, all -inf; a NaN."""
    from nanovllm.kernels.sampling import greedy, race
    from nanovllm.layers.sampler import _greedy, _race
    for vocab in (300, 5000, 40000):
        params = [SamplingParams(temperature=t) for t in (0.7, 0, 1.3, 0.05, 1.0, 0, 0, 0.9, 0)]
        logits, t = _sampler_case(params, vocab, seed=vocab)
        logits[1, [100, vocab - 7]] = 50.0  # greedy row 1: the same maximum in two parts
        logits[5, :vocab // 2] = float("-inf")  # greedy row 5: the maximum in a later part
        logits[6] = float("-inf")  # all -inf: token 0, as argmax
        logits[7, : vocab - 1] = float("-inf")  # sampled, only the last token possible
        ref_race = _race.reference(logits, t.temperatures, t.noise_keys)
        assert torch.equal(race(logits, t.temperatures, t.noise_keys), ref_race)
        assert ref_race[7].item() == vocab - 1
        assert torch.equal(greedy(logits), _greedy.reference(logits))
        assert greedy(logits)[1].item() == 100 and greedy(logits)[6].item() == 0
        logits[8, 3] = float("nan")  # PyTorch's argmax answers a NaN's index; the kernels pass over NaN
        assert race(logits, t.temperatures, t.noise_keys)[8].item() != 3 and greedy(logits)[8].item() != 3


def _check_fill_in_flight():
    """Three 1024-token blocks, the last partial: tokens in flight read from the previous samples, others kept."""
    from nanovllm.engine.model_runner import fill_in_flight as reference
    from nanovllm.kernels.inputs import fill_in_flight
    gen = torch.Generator().manual_seed(11)
    last = torch.randint(0, 150_000, (40,), generator=gen)  # int64, as the sampler returns them
    ids = torch.randint(0, 150_000, (2500,), generator=gen, dtype=torch.int32)
    pending = torch.randint(-1, 40, (2500,), generator=gen, dtype=torch.int32)
    pending[torch.rand(2500, generator=gen) < 0.5] = -1
    out = fill_in_flight(ids, pending, last)
    assert out.dtype == torch.int32 and torch.equal(out, reference.reference(ids, pending, last))
    assert torch.equal(out[pending >= 0], last[pending[pending >= 0].long()].int())


def _check_stage_decode_inputs():
    """A decode step's rows into a graph's static inputs: n of bs rows, tables narrower than the static ones and
    wider than one 128-column loop step, with and without an order; rows past bs stay untouched."""
    from nanovllm.engine.cuda_graphs import stage_decode_inputs as reference
    from nanovllm.kernels.inputs import stage_decode_inputs
    gen = torch.Generator().manual_seed(12)
    max_bs, max_blocks = 24, 150
    for n, bs, width, ordered in ((1, 1, 1, True), (7, 16, 3, True), (16, 16, 150, False), (5, 8, 130, True)):
        ids, pos, slots, lens = (torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32) for _ in range(4))
        tables = torch.randint(0, 500, (n, width), generator=gen, dtype=torch.int32)
        order = torch.randperm(n, generator=gen).int() if ordered else None
        results = []
        for fn in (stage_decode_inputs, reference.reference):
            packed = torch.full((2 * max_bs,), 77, dtype=torch.int32)  # ids and positions share one buffer
            static = [packed[:max_bs], packed[max_bs:]] + [torch.full((max_bs,), 77, dtype=torch.int32)
                                                            for _ in range(2)]
            static += [torch.full((max_bs, max_blocks), 77, dtype=torch.int32),
                       torch.full((max_bs,), 77, dtype=torch.int32)]
            fn(ids, pos, slots, lens, tables, order, *static, bs)
            results.append(static)
        for got, want in zip(*results):
            assert torch.equal(got, want), (n, bs, width, ordered)
        static_slots, static_lens, static_tables, static_order = results[0][2:]
        assert (static_slots[n:bs] == -1).all() and (static_lens[n:bs] == 0).all()
        assert (static_tables[:bs, width:] == -1).all() and (static_tables[bs:] == 77).all()
        assert static_order[:bs].sort().values.tolist() == list(range(bs))


def _check_sampler_penalties():
    from nanovllm.kernels.sampling import apply_penalties
    from nanovllm.layers.sampler import _apply_penalties
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 2500, generator=gen) * 3
    counts = torch.randint(0, 3, (3, 2500), generator=gen, dtype=torch.int32)
    mask = torch.rand(3, 2500, generator=gen) < 0.3
    rep, pres, freq = torch.tensor([1.3, 1.0, 0.8]), torch.tensor([0.5, 0.0, -0.2]), torch.tensor([0.1, 0.3, 0.0])
    torch.testing.assert_close(apply_penalties(logits, counts, mask, rep, pres, freq),
                               _apply_penalties.reference(logits, counts, mask, rep, pres, freq), atol=1e-6, rtol=1e-6)


def _check_sampler_thresholds():
    """top-k, top-p and min-p alone and together, flat and peaked rows; unfiltered and greedy rows keep `other`."""
    from nanovllm.kernels.sampling import draw_by_thresholds
    from nanovllm.layers.sampler import _draw_by_thresholds, _top_k_thresholds
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
              SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
              SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.1), SamplingParams(temperature=0.8),
              SamplingParams(temperature=0, top_p=0.5), SamplingParams(temperature=1.5, top_p=0.3, min_p=0.2)]
    for vocab, scale in ((300, 3.0), (5000, 1.0), (5000, 8.0)):
        logits, t = _sampler_case(params, vocab, seed=vocab + int(scale), scale=scale)
        other = torch.arange(100, 100 + len(params))
        args = (logits, t.temperatures, _top_k_thresholds(logits, t), t.top_k, t.top_p_complement, t.min_p,
                t.noise_keys, other)
        out = draw_by_thresholds(*args)
        assert torch.equal(out, _draw_by_thresholds.reference(*args)), (out, _draw_by_thresholds.reference(*args))
        assert out[5].item() == 105 and out[6].item() == 106


def _inverse_mix32(h: int) -> int:
    """The input that sampler._mix32 hashes to h."""
    from nanovllm.layers.sampler import _MUL1, _MUL2
    x = h ^ (h >> 16)
    x = (x * pow(_MUL2, -1, 2**32)) & 0xFFFFFFFF
    x = x ^ (x >> 15) ^ (x >> 30)
    x = (x * pow(_MUL1, -1, 2**32)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _check_sampler_noise(device: str = "cpu"):
    """The draws' exponential noise E against the reference's -log1p(-U) in float64: the Gumbel noise -ln(E)
    within 1e-6 plus an ulp. Rows whose token 0 hashes to chosen values reach the smallest U (2**-33, E ~ 1e-10),
    both sides of the kernel's switch at U = 1/4 and the clamp at 1 - 2**-24; 64 random rows x 3000 tokens the
    rest."""
    from nanovllm.kernels.sampling import exponential_noise_log2
    from nanovllm.layers.sampler import _mix32, uniform_noise
    hashes = [*range(1000), *range(2**30 - 500, 2**30 + 500), *range(2**32 - 1000, 2**32), *range(0, 2**32, 2**22)]
    targeted = torch.tensor([_inverse_mix32(h) for h in hashes], dtype=torch.int64)
    assert _mix32(targeted).tolist() == hashes
    random_rows = torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(13), dtype=torch.int64)
    for keys, vocab in ((targeted, 1), (random_rows, 3000)):
        u = uniform_noise(keys.unsqueeze(1), torch.arange(vocab)).double()
        want = -torch.log(-torch.log1p(-u))
        got = -math.log(2) * exponential_noise_log2(keys.to(device), vocab).double().cpu()
        err = (got - want).abs()
        assert (err <= 1e-6 + 1.2e-7 * want.abs()).all(), (err.max().item(), u.flatten()[err.argmax()].item())
    assert u.min() < 0.25 < u.max()


INTERPRETER_CHECKS = {
    "store_kvcache": _check_store_kvcache,
    "prefill_varlen": _check_prefill_varlen,
    "prefill_paged": _check_prefill_paged,
    "prefill_with_decode_rows": _check_prefill_with_decode_rows,
    "decode": _check_decode,
    "odd_head_dim": _check_odd_head_dim,
    "decode_empty_rows": _check_decode_empty_rows,
    "store_kvcache_fp8": _check_store_kvcache_fp8,
    "prefill_fp8": _check_prefill_fp8,
    "decode_fp8": _check_decode_fp8,
    "decode_stale_nan": _check_decode_stale_nan,
    "fused_norms": _check_fused_norms,
    "fused_rope": _check_fused_rope,
    "fused_rope_store": _check_fused_rope_store,
    "fused_silu_and_mul": _check_fused_silu_and_mul,
    "head_major_blocks": _check_head_major_blocks,
    "key_major_values": _check_key_major_values,
    "sampler_race_and_greedy": _check_sampler_race_and_greedy,
    "fill_in_flight": _check_fill_in_flight,
    "stage_decode_inputs": _check_stage_decode_inputs,
    "sampler_penalties": _check_sampler_penalties,
    "sampler_thresholds": _check_sampler_thresholds,
    "sampler_noise": _check_sampler_noise,
}


def _fix_interpreter_for_numpy_2_4():
    """Triton 3.6's interpreter turns 1-element scalar arrays into loop bounds with int(array), which numpy >= 2.4
    refuses (triton-lang/triton#9171, fixed upstream after 3.6). Patch that one conversion."""
    import numpy as np
    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    import triton.runtime.interpreter as interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _run_interpreter_checks() -> dict[str, str]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _fix_interpreter_for_numpy_2_4()
    torch.manual_seed(0)
    verdicts = {}
    for name, check in INTERPRETER_CHECKS.items():
        try:
            check()
            verdicts[name] = "ok"
        except Exception:  # report every check, not just the first failure
            verdicts[name] = traceback.format_exc()
    return verdicts


@pytest.fixture(scope="module")
def interpreter_verdicts() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("name", list(INTERPRETER_CHECKS))
def test_kernel_in_triton_interpreter(name, interpreter_verdicts):
    assert interpreter_verdicts[name] == "ok", interpreter_verdicts[name]


# ----------------------------------------------------------------------------------------------------------------
# CPU tests of the host-side logic


@needs_triton
def test_decode_splits_follow_shapes_only():
    from nanovllm.kernels.attention import decode_splits
    # one sequence, 8 KV heads, 4096 keys on 132 SMs: 33 splits wanted, capped at 4096 // 256 = 16
    assert decode_splits(4096, 1, 8, 64, 264) == (16, 256)
    # a large batch fills the GPU by itself: no split
    assert decode_splits(4096, 256, 8, 64, 264) == (1, 4096)
    # at most one split per 256 keys; split sizes are whole tiles, the last split is short (1000 - 2 * 384 keys)
    assert decode_splits(1000, 2, 2, 64, 264) == (3, 384)
    # short contexts are never split
    assert decode_splits(200, 1, 1, 64, 264) == (1, 256)


@pytest.mark.parametrize("block_size", [8, 48, 100, 0])
def test_odd_block_sizes_are_refused_before_any_backend(qwen3_path, block_size):
    """The block-size rule (a power of two >= 16, all the Triton kernels need) is stated once, in Config."""
    from nanovllm.config import Config
    with pytest.raises(ValueError, match=f"kvcache_block_size must be .*, got {block_size}$"):
        Config.from_options(qwen3_path, kvcache_block_size=block_size)


@needs_triton
@pytest.mark.parametrize("block_size", [16, 32, 256, 1024])
def test_triton_backend_accepts_power_of_two_blocks(block_size):
    from nanovllm.layers.backends.triton_attn import TritonBackend
    assert TritonBackend().check_config(block_size, 96, torch.float16) is None


def _import_fresh(monkeypatch, module: str, blocked: str):
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import <blocked>` raise ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    return importlib.import_module(module)


def test_triton_backend_without_triton_says_what_to_install(monkeypatch):
    with pytest.raises(ImportError, match="pip install triton"):
        _import_fresh(monkeypatch, "nanovllm.layers.backends.triton_attn", "triton")


def test_flash_attn_backend_without_flash_attn_says_what_to_install(monkeypatch):
    with pytest.raises(ImportError, match=r"pip install flash-attn.*'triton'"):
        _import_fresh(monkeypatch, "nanovllm.layers.backends.flash_attn", "flash_attn")


@pytest.mark.skipif(not (HAS_FLASH_ATTN and HAS_TRITON), reason="flash_attn and triton are not both installed")
@pytest.mark.parametrize("block_size, head_dim, dtype, words", [
    (16, 128, torch.bfloat16, "kvcache_block_size=16"),
    (384, 128, torch.bfloat16, "kvcache_block_size=384"),
    (256, 96, torch.bfloat16, "head_dim=96"),
    (256, 128, torch.float32, "dtype=torch.float32"),
])
def test_flash_attn_backend_refuses_unsupported_configs(block_size, head_dim, dtype, words):
    from nanovllm.layers.backends.flash_attn import FlashAttnBackend
    with pytest.raises(ValueError, match=words):
        FlashAttnBackend().check_config(block_size, head_dim, dtype)
    assert FlashAttnBackend().check_config(512, 64, torch.float16) is None


@pytest.mark.skipif(not (HAS_FLASH_ATTN and HAS_TRITON), reason="flash_attn and triton are not both installed")
def test_flash_attn_backend_refuses_an_fp8_cache():
    from nanovllm.layers.backends.flash_attn import FlashAttnBackend
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e4m3'.*attention_backend='triton'"):
        FlashAttnBackend().check_config(256, 128, torch.bfloat16, "fp8_e4m3")


@needs_triton
@pytest.mark.parametrize("triton_installed", [True, False])
@pytest.mark.parametrize("block_size, head_dim, dtype, kv_cache_dtype, flash_attn_serves", [
    (256, 128, torch.bfloat16, "auto", True),
    (16, 128, torch.bfloat16, "auto", False),  # flash-attn's pages are multiples of 256 tokens
    (256, 24, torch.bfloat16, "auto", False),
    (512, 64, torch.float32, "auto", False),
    (256, 128, torch.bfloat16, "fp8_e4m3", False),
])
def test_auto_picks_triton_and_flash_attn_only_without_it(monkeypatch, triton_installed, block_size, head_dim,
                                                         dtype, kv_cache_dtype, flash_attn_serves):
    """On CUDA "auto" takes triton, flash_attn installed or not; without Triton, flash_attn where it serves the
    configuration, else a ValueError that says why. An explicit flash_attn refuses what it cannot serve."""
    import types

    from nanovllm.layers import backends
    fake = types.ModuleType("flash_attn")  # stands in for the package: only check_config runs here
    fake.flash_attn_varlen_func = fake.flash_attn_with_kvcache = None
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    installed = {"flash_attn"} | ({"triton"} if triton_installed else set())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else None)
    module = "nanovllm.layers.backends.flash_attn"
    real = sys.modules.pop(module, None)  # the backend module is imported afresh over the fake package ...
    try:
        cuda = torch.device("cuda")
        args = (cuda, kv_cache_dtype, block_size, head_dim, dtype)
        if triton_installed:
            assert backends.create_backend("auto", *args).name == "triton"
        elif kv_cache_dtype == "fp8_e4m3":  # flash_attn has no fp8 cache: auto names triton (whose import then
            assert backends.resolve_backend_name("auto", cuda, kv_cache_dtype) == "triton"  # says to install it)
        elif flash_attn_serves:
            assert backends.create_backend("auto", *args).name == "flash_attn"
        else:
            with pytest.raises(ValueError, match="attention_backend='triton'"):
                backends.create_backend("auto", *args)
        if not flash_attn_serves:
            with pytest.raises(ValueError, match="attention_backend='triton'"):
                backends.create_backend("flash_attn", *args)
    finally:  # ... and never left behind for later tests
        sys.modules.pop(module, None)
        if real is not None:
            sys.modules[module] = real


@needs_triton
def test_triton_backend_accepts_an_fp8_cache():
    from nanovllm.layers.backends.triton_attn import TritonBackend
    assert TritonBackend().check_config(16, 128, torch.bfloat16, "fp8_e4m3") is None


# ----------------------------------------------------------------------------------------------------------------
# GPU tests


def gpu_backend(name: str):
    if name == "flash_attn" and not HAS_FLASH_ATTN:
        pytest.skip("flash_attn is not installed")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from nanovllm.layers.backends import create_backend
    return create_backend(name, torch.device("cuda"))


def backend_params(block_sizes):
    """(backend, block_size) pairs; flash-attn's paged mode takes multiples of 256 only."""
    return [(b, bs) for b in ("triton", "flash_attn") for bs in block_sizes if b == "triton" or bs % 256 == 0]


GQA = [(16, 8), (14, 2)]
HEAD_DIMS = [64, 128]
ATOL = RTOL = 2e-2


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("head_dim", HEAD_DIMS + [96])
def test_store_kvcache_cuda_equals_indexed_assignment(head_dim):
    from nanovllm.kernels.store_kvcache import store_kvcache
    k, v, k_cache, v_cache, slots = store_case(300, 1024, 16, 8, head_dim, torch.bfloat16, "cuda")
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    TorchBackend().store_kvcache(k, v, expect_k, expect_v, slots)
    store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@cuda
@needs_cuda
@pytest.mark.parametrize("backend_name", ["triton", "flash_attn"])
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_varlen_cuda(backend_name, num_heads, num_kv_heads, head_dim):
    backend = gpu_backend(backend_name)
    q_lens = [1, 15, 16, 17, 300, 1000, 129]
    case = prefill_case(q_lens, q_lens, 256, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda", paged=False)
    assert_backend_matches_torch(backend, "prefill", case, head_dim ** -0.5, ATOL, RTOL)


@cuda
@needs_cuda
@pytest.mark.parametrize("backend_name, block_size", backend_params([16, 64, 256]))
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_paged_prefix_and_chunks_cuda(backend_name, block_size, num_heads, num_kv_heads, head_dim):
    backend = gpu_backend(backend_name)
    # (new tokens, keys): single token, chunk of a long prompt, whole prompt read from the cache, cached prefixes
    q_lens = [1, 7, 300, 64, 513, 1, 100]
    k_lens = [1, 300, 300, 1000, 700, 1500, 2049]
    case = prefill_case(q_lens, k_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda",
                        paged=True)
    assert_backend_matches_torch(backend, "prefill", case, head_dim ** -0.5, ATOL, RTOL)


@cuda
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_prefill_with_decode_rows_cuda(block_size, num_heads, num_kv_heads, head_dim, fp8):
    """A mixed step's decodes through the decode kernel (the engine's cache layout): as the torch backend's
    prefill over every row, and bit-equal to the decode kernel run on those rows alone."""
    backend = gpu_backend("triton")
    scales = fp8_scales(num_kv_heads, "cuda") if fp8 else None
    q_lens, k_lens = [1, 300, 64, 513, 1, 1, 1, 1], [1, 300, 1000, 700, 1500, 2049, 17, 700]
    case = prefill_case(q_lens, k_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda",
                        paged=True)
    q, k, v, k_cache, v_cache, ctx = with_fp8_cache(case, scales) if fp8 else case
    case = (q, k, v, *triton_layout(k_cache, v_cache), ctx)
    mixed = with_decode_rows(ctx, 4)
    out = backend.prefill(*case[:5], mixed, head_dim ** -0.5, scales)
    assert_matches_torch("prefill", case, out, head_dim ** -0.5, ATOL, RTOL, scales)
    decode_ctx = Context(False, context_lens=mixed.context_lens, block_tables=mixed.decode_block_tables,
                         decode_order=mixed.decode_order)
    assert torch.equal(out[-4:], backend.decode(q[-4:], *case[3:5], decode_ctx, head_dim ** -0.5, scales))


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype, head_dim, atol", [(torch.float16, 128, 2e-2), (torch.float32, 64, 1e-4),
                                                   (torch.bfloat16, 256, 2e-2), (torch.bfloat16, 96, 2e-2),
                                                   (torch.bfloat16, 32, 2e-2)])
def test_triton_other_dtypes_and_head_dims_cuda(dtype, head_dim, atol):
    backend = gpu_backend("triton")
    for paged in (False, True):
        q_lens = [3, 200, 77]
        k_lens = [40, 200, 300] if paged else q_lens
        case = prefill_case(q_lens, k_lens, 16, 8, 2, head_dim, dtype, "cuda", paged=paged)
        assert_backend_matches_torch(backend, "prefill", case, 0.1, atol, atol)
    case = decode_case([1, 300, 3000], 16, 8, 2, head_dim, dtype, "cuda")
    assert_backend_matches_torch(backend, "decode", case, 0.1, atol, atol)


DECODE_LENS = {
    "short": [1, 2, 17, 255, 256, 257, 33],
    "long": [5000, 4097],
    "mixed": [5000, 1, 300, 2048, 7, 4500, 256, 1025],
}


@cuda
@needs_cuda
@pytest.mark.parametrize("backend_name, block_size", backend_params([16, 64, 256]))
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lens", list(DECODE_LENS))
def test_decode_cuda(backend_name, block_size, num_heads, num_kv_heads, head_dim, lens):
    backend = gpu_backend(backend_name)
    case = decode_case(DECODE_LENS[lens], block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    assert_backend_matches_torch(backend, "decode", case, head_dim ** -0.5, ATOL, RTOL)


@needs_triton
def test_decode_config_caps_registers_for_fp8_128_key_tiles_only():
    from nanovllm.kernels.attention import decode_config
    assert decode_config(128, 2, torch.bfloat16, kv_fp8=True).max_registers == 128
    assert decode_config(64, 16, torch.float16, kv_fp8=True).max_registers == 128
    assert decode_config(128, 2, torch.bfloat16).max_registers is None  # bf16 cache: held by shared memory
    assert decode_config(256, 2, torch.bfloat16, kv_fp8=True).max_registers is None  # 32-key tiles
    assert decode_config(128, 32, torch.bfloat16, kv_fp8=True).max_registers is None  # 32 query rows
    assert decode_config(128, 2, torch.float32, kv_fp8=True).max_registers is None  # 64-key tiles
    # key-major values (the triton backend's fp8 layout): 157 registers, faster uncapped
    assert decode_config(128, 2, torch.bfloat16, kv_fp8=True, values_key_major=True).max_registers is None


@cuda
@needs_cuda
@needs_triton
def test_triton_decode_splits_long_contexts_cuda():
    """5000 keys on few sequences must take the split-KV path (else this test would not test it)."""
    from nanovllm.kernels.attention import _target_programs, decode_config, decode_splits
    q, k_cache, v_cache, ctx = decode_case(DECODE_LENS["long"], 16, 16, 8, 128, torch.bfloat16, "cuda")
    cfg = decode_config(128, 2, torch.bfloat16)
    num_splits, _ = decode_splits(ctx.block_tables.size(1) * 16, 2, 8, cfg.block_n, _target_programs(q.device))
    assert num_splits > 1


@cuda
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_size", [16, 256])
def test_triton_decode_ignores_stale_slots_cuda(fp8, block_size):
    """What the cache holds past each sequence's keys (the rest of its last page, other blocks; fill_stale_slots:
    NaN in a bf16 cache) never reaches the output: the same bits as with the case's own values there, in the
    triton backend's layout. With 256-slot pages the last tile's K rows are read unmasked, and with an fp8 cache
    its key-major V tile too (the interpreter check cannot hold NaN in bf16: it runs float32 only)."""
    from nanovllm.kernels.attention import decode_attention
    case = decode_case(DECODE_LENS["mixed"], block_size, 16, 8, 128, torch.bfloat16, "cuda")
    scales = (None, None)
    if fp8:
        kv_scales = fp8_scales(8, "cuda")
        case = with_fp8_cache(case, kv_scales)
        scales = (kv_scales.k, kv_scales.v)
    q, k_cache, v_cache, ctx = case
    k_cache, v_cache = triton_layout(k_cache, v_cache)
    args = (ctx.context_lens, ctx.block_tables, 0.1, None, None, *scales)
    clean = decode_attention(q, k_cache, v_cache, *args)
    assert not clean.isnan().any()
    fill_stale_slots(k_cache, v_cache, ctx)
    assert torch.equal(decode_attention(q, k_cache, v_cache, *args), clean)


@cuda
@needs_cuda
@pytest.mark.parametrize("backend_name, block_size", backend_params([16, 256]))
def test_decode_no_host_sync_cuda(backend_name, block_size):
    backend = gpu_backend(backend_name)
    case = decode_case(DECODE_LENS["mixed"], block_size, 16, 8, 128, torch.bfloat16, "cuda")
    run_backend(backend, "decode", case, 0.1)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_backend(backend, "decode", case, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@needs_cuda
@pytest.mark.parametrize("backend_name, block_size", backend_params([16, 256]))
def test_decode_cuda_graph_replay_matches_eager(backend_name, block_size):
    backend = gpu_backend(backend_name)
    scale = 128 ** -0.5
    # static buffers sized like the graph runner's: 8 rows, block tables as wide as 6000 tokens
    width = (6000 + block_size - 1) // block_size
    first = decode_case([30, 5000, 1, 700, 2, 0, 0, 0], block_size, 16, 8, 128, torch.bfloat16, "cuda", seed=1,
                        extra_width=width - (5000 + block_size - 1) // block_size, spare_blocks=2 * width)
    q, k_cache, v_cache, ctx = first
    backend.decode(q, k_cache, v_cache, ctx, scale)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = backend.decode(q, k_cache, v_cache, ctx, scale)

    # new step: other lengths, other blocks of the same cache, other queries, written into the static buffers
    new_lens = [5990, 3, 256, 4000, 1, 17, 0, 0]
    gen = torch.Generator().manual_seed(2)
    tables = make_block_tables(new_lens, block_size, k_cache.size(0), gen)
    ctx.block_tables.fill_(-1)
    ctx.block_tables[:, :tables.size(1)] = tables.to("cuda")
    ctx.context_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    q.copy_(torch.randn(q.shape, generator=gen).to(q))
    graph.replay()
    torch.cuda.synchronize()

    eager = backend.decode(q, k_cache, v_cache, ctx, scale)
    live = slice(0, 6)  # rows with context length 0 are padding: their output is never used
    torch.testing.assert_close(graph_out[live], eager[live], atol=1e-3, rtol=1e-3)
    sub = Context(is_prefill=False, context_lens=ctx.context_lens[live], block_tables=ctx.block_tables[live])
    expect = TorchBackend().decode(q[live], k_cache, v_cache, sub, scale)
    torch.testing.assert_close(graph_out[live], expect, atol=ATOL, rtol=RTOL)
    if backend_name == "triton":  # same kernels, same launch: bit for bit
        assert torch.equal(graph_out, eager)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpret"]:
        print(json.dumps(_run_interpreter_checks()))
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpret")


# ----------------------------------------------------------------------------------------------------------------
# GPU tests of the fp8 KV cache: the triton kernels against TorchBackend, both reading the same fp8 cache


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("head_dim", HEAD_DIMS + [96])
def test_store_kvcache_fp8_cuda_equals_torch_bytes(head_dim):
    from nanovllm.kernels.store_kvcache import store_kvcache
    k, v, k_cache, v_cache, slots = store_case(300, 1024, 16, 8, head_dim, torch.bfloat16, "cuda")
    k[1, :, :4] = torch.tensor([1e5, -1e5, 3e38, -3e38], dtype=torch.bfloat16)  # saturate, never nan / inf
    v[1, :, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)  # 0, +-448
    assert slots[1] >= 0
    scales = fp8_scales(8, "cuda")
    k_cache, v_cache = quantize_fp8(k_cache, scales.k), quantize_fp8(v_cache, scales.v)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    TorchBackend().store_kvcache(k, v, expect_k, expect_v, slots, scales)
    layouts = ((k_cache, v_cache), triton_layout(k_cache.clone(), v_cache.clone()))
    for kc, vc in layouts:
        store_kvcache(k, v, kc, vc, slots, scales.k, scales.v)
        assert torch.equal(kc.view(torch.uint8), expect_k.view(torch.uint8))
        assert torch.equal(vc.view(torch.uint8), expect_v.view(torch.uint8))
        assert not kc.float().isnan().any() and not vc.float().isnan().any()
    slot = slots[1].item()
    stored = v_cache[slot // 16, slot % 16, :, :3].float() * scales.v[:, None]
    assert stored[:, 0].eq(0).all() and torch.equal(stored[:, 1:], 448 * scales.v[:, None] * torch.tensor(
        [1.0, -1.0], device="cuda"))


@cuda
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_fp8_prefill_cuda(block_size, num_heads, num_kv_heads, head_dim):
    backend = gpu_backend("triton")
    scales = fp8_scales(num_kv_heads, "cuda")
    q_lens = [1, 15, 300, 1000, 129]
    case = prefill_case(q_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda",
                        paged=False)
    assert_backend_matches_torch(backend, "prefill", with_fp8_cache(case, scales), head_dim ** -0.5, ATOL, RTOL,
                                 scales)
    q_lens, k_lens = [1, 7, 300, 64, 513, 100], [1, 300, 300, 1000, 700, 2049]
    case = prefill_case(q_lens, k_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda",
                        paged=True)
    q, k, v, k_cache, v_cache, ctx = with_fp8_cache(case, scales)
    case = (q, k, v, *triton_layout(k_cache, v_cache), ctx)  # the engine's layout (key-major V at 256 slots)
    assert_backend_matches_torch(backend, "prefill", case, head_dim ** -0.5, ATOL, RTOL, scales)


@cuda
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lens", list(DECODE_LENS))
def test_triton_fp8_decode_cuda(block_size, num_heads, num_kv_heads, head_dim, lens):
    backend = gpu_backend("triton")
    scales = fp8_scales(num_kv_heads, "cuda")
    case = decode_case(DECODE_LENS[lens], block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    q, k_cache, v_cache, ctx = with_fp8_cache(case, scales)
    case = (q, *triton_layout(k_cache, v_cache), ctx)  # the engine's layout (key-major V at 256 slots)
    assert_backend_matches_torch(backend, "decode", case, head_dim ** -0.5, ATOL, RTOL, scales)


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_heads, head_dim", [(16, 128), (64, 128), (16, 64), (8, 96)])
def test_triton_fp8_decode_register_cap_changes_nothing_cuda(num_heads, head_dim):
    """The fp8 decode kernel's default tiles cap registers (decode_config); capped or not, the same bits."""
    from dataclasses import replace

    from nanovllm.kernels.attention import decode_attention, decode_config
    cfg = decode_config(head_dim, num_heads // 8, torch.bfloat16, kv_fp8=True)
    assert cfg.max_registers == 128
    scales = fp8_scales(8, "cuda")
    for lens in ("mixed", "long"):
        case = decode_case(DECODE_LENS[lens], 256, num_heads, 8, head_dim, torch.bfloat16, "cuda")
        q, k_cache, v_cache, ctx = with_fp8_cache(case, scales)
        args = (q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.1)
        for num_splits in (1, None):
            capped = decode_attention(*args, cfg, num_splits, scales.k, scales.v)
            uncapped = decode_attention(*args, replace(cfg, max_registers=None), num_splits, scales.k, scales.v)
            assert torch.equal(capped, uncapped)


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(16, 8, 128), (32, 8, 128), (14, 2, 64), (64, 4, 128),
                                                               (8, 8, 64), (40, 8, 128)])
@pytest.mark.parametrize("block_size", [128, 512])
def test_gluon_fp8_decode_matches_triton_cuda(num_heads, num_kv_heads, head_dim, block_size):
    """On a Hopper GPU an fp8 cache's decode runs the Gluon split kernel (gluon_decode.applies: fp8 MMAs, the
    query and P as two e4m3 parts each), within 1e-2 of the Triton kernel (2e-2 with q 8x larger) and within
    the fp8 path's tolerance of the PyTorch reference: split or not, in any order of the sequences, with empty
    rows (CUDA-graph padding: exact zeros), stale slots (fill_stale_slots) past the sequences' keys, and queries
    8x larger (sharp softmax). On an H200 a kernel holding q to its e4m3 high part alone (its products 1/16 off
    at worst) failed all 12 cases at q_scale 1."""
    gluon_decode = pytest.importorskip("nanovllm.kernels.gluon_decode")
    from nanovllm.kernels.attention import decode_attention
    scales = fp8_scales(num_kv_heads, "cuda")
    lens = DECODE_LENS["mixed"] + [0, 129]
    case = decode_case(lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    q, k_cache, v_cache, ctx = with_fp8_cache(case, scales)
    k_cache, v_cache = triton_layout(k_cache, v_cache)
    if not gluon_decode.applies(q, k_cache, v_cache, 128):
        pytest.skip("the Gluon kernel serves Hopper GPUs (sm_90) only")
    fill_stale_slots(k_cache, v_cache, ctx)
    orders = (None, torch.argsort(ctx.context_lens, descending=True))
    for q_scale in (1, 8):
        args = (q * q_scale, k_cache, v_cache, ctx.context_lens, ctx.block_tables, head_dim ** -0.5, None)
        for num_splits in (None, 1, 5):
            for order in orders:
                out = decode_attention(*args, num_splits, scales.k, scales.v, order)
                expect = decode_attention(*args, num_splits, scales.k, scales.v, order, kernel="triton")
                # a sharp softmax magnifies the scores' rounding (Hopper's fp8 MMAs do not add in IEEE float32):
                # measured on an H200 at most 0.57 of 2e-2 there, 0.39 of 1e-2 at q_scale 1
                tol = 1e-2 if q_scale == 1 else ATOL
                torch.testing.assert_close(out, expect, atol=tol, rtol=tol)
                assert torch.equal(out[len(lens) - 2], torch.zeros_like(out[0]))
                assert_matches_torch("decode", (q * q_scale, k_cache, v_cache, ctx), out, head_dim ** -0.5, ATOL,
                                     RTOL, scales)


def test_gluon_fp8_decode_applies_to_cuda_fp8_only():
    """The Gluon kernel is chosen for fp8 caches with key-major values on a CUDA GPU only: never on the CPU (the
    Triton kernel and the interpreter serve there), never for a bf16 cache or float32 queries."""
    gluon_decode = pytest.importorskip("nanovllm.kernels.gluon_decode")
    scales = fp8_scales(2, "cpu")
    case = decode_case([5, 300], 256, 4, 2, 128, torch.bfloat16, "cpu")
    q, k_cache, v_cache, ctx = with_fp8_cache(case, scales)
    k_cache, v_cache = triton_layout(k_cache, v_cache)
    assert not gluon_decode.applies(q, k_cache, v_cache, 128)
    _, k16, v16, _ = case
    assert not gluon_decode.applies(q, *triton_layout(k16, v16), 128)
    with pytest.raises(ValueError, match="kernel"):
        from nanovllm.kernels.attention import decode_attention
        decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.1, None, None, scales.k,
                         scales.v, kernel="gluon")


def test_attention_keeps_the_triton_kernel_without_gluon():
    """On a Triton older than the Gluon API the kernel was built for, importing the kernels still works and the
    Triton kernel serves fp8 decode (a fresh interpreter that reports Triton 3.4)."""
    code = ("import triton; triton.__version__ = '3.4.0'\n"
            "from nanovllm.kernels import attention\n"
            "assert attention.gluon_decode is None, attention.gluon_decode\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_decode_attention_picks_its_split_kernel(monkeypatch):
    """Where the Gluon kernel applies, decode_attention launches it, unless kernel="triton" or a config (the Triton
    kernel's tiles) is given; elsewhere the Triton kernel. Launches are recorded, not run (no GPU here)."""
    gluon_decode = pytest.importorskip("nanovllm.kernels.gluon_decode")
    from nanovllm.kernels import attention
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append("triton")

    monkeypatch.setattr(attention, "_decode_split_kernel", Recorder())
    monkeypatch.setattr(gluon_decode, "decode_split", lambda *args: launched.append("gluon"))
    scales = fp8_scales(2, "cpu")
    q, k_cache, v_cache, ctx = with_fp8_cache(decode_case([5, 300], 256, 4, 2, 128, torch.bfloat16, "cpu"), scales)
    k_cache, v_cache = triton_layout(k_cache, v_cache)
    cfg = attention.decode_config(128, 2, torch.bfloat16, True, True)
    args = (q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.1)
    for applies in (True, False):
        monkeypatch.setattr(gluon_decode, "applies", lambda *a, applies=applies: applies)
        for config, kernel in ((None, "auto"), (None, "triton"), (cfg, "auto")):
            launched.clear()
            attention.decode_attention(*args, config, 1, scales.k, scales.v, kernel=kernel)
            assert launched == ["gluon" if applies and config is None and kernel == "auto" else "triton"]


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_size", [16, 256])
def test_triton_cache_layouts_equal_contiguous_cuda(fp8, block_size):
    """The triton backend's cache layouts (head-major blocks; key-major values for fp8, which take the decode
    kernel's other V path, in runs of a block or of 4 keys) give bit-identical prefill and decode on the GPU; but
    where runs of 4 keys take the Gluon kernel (fp8 MMAs), the same decode within the fp8 path's tolerance."""
    from nanovllm.kernels.attention import gluon_decode
    backend = gpu_backend("triton")
    scales = fp8_scales(8, "cuda") if fp8 else None
    case = decode_case(DECODE_LENS["mixed"], block_size, 16, 8, 128, torch.bfloat16, "cuda")
    q, k_cache, v_cache, ctx = with_fp8_cache(case, scales) if fp8 else case
    expect = backend.decode(q, k_cache, v_cache, ctx, 0.1, scales)
    layouts = [(head_major(k_cache), head_major(v_cache)), (head_major(k_cache), key_major(v_cache)),
               (head_major(k_cache), key_major(v_cache, 4))]  # runs of 4 keys: the Gluon kernel's at 256 slots
    for kc, vc in layouts:
        out = backend.decode(q, kc, vc, ctx, 0.1, scales)
        if gluon_decode is not None and gluon_decode.applies(q, kc, vc, 128):
            torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
        else:
            assert torch.equal(out, expect)
    case = prefill_case([5, 300], [40, 700], block_size, 16, 8, 128, torch.bfloat16, "cuda", paged=True)
    q, k, v, k_cache, v_cache, ctx = with_fp8_cache(case, scales) if fp8 else case
    expect = backend.prefill(q, k, v, k_cache, v_cache, ctx, 0.1, scales)
    for kc, vc in ((head_major(k_cache), head_major(v_cache)), (head_major(k_cache), key_major(v_cache)),
                   (head_major(k_cache), key_major(v_cache, 4))):
        assert torch.equal(backend.prefill(q, k, v, kc, vc, ctx, 0.1, scales), expect)


# ----------------------------------------------------------------------------------------------------------------
# GPU tests of the layers' fused element-wise kernels against their PyTorch functions


def assert_within_one_bf16_step(out: torch.Tensor, expect: torch.Tensor):
    """Equal but for neighbouring bf16 values (the kernel sums the squares in another order than torch)."""
    def ordered(t):  # bit patterns as integers in the order of their values (+0 and -0 both 0)
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    assert out.dtype == expect.dtype == torch.bfloat16 and out.is_contiguous()
    assert (ordered(out) - ordered(expect)).abs().max().item() <= 1


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens, hidden", [(1, 896), (300, 1024), (77, 4096), (5, 96)])
def test_fused_norms_cuda(dtype, num_tokens, hidden):
    x, residual, weight = norm_case(num_tokens, hidden, dtype, "cuda")
    outs = (rms_norm(x, weight, 1e-6),) + add_rms_norm(x, residual, weight, 1e-6)
    expects = (rms_norm.reference(x, weight, 1e-6),) + add_rms_norm.reference(x, residual, weight, 1e-6)
    assert torch.equal(outs[2], expects[2])  # the residual sum: one rounding in both
    for out, expect in zip(outs[:2], expects[:2]):
        if dtype == torch.bfloat16:
            assert_within_one_bf16_step(out, expect)
        else:
            assert_fused_close(out, expect, 1e-5, 1e-5)


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(16, 8, 128), (14, 2, 64), (6, 2, 40)])
def test_fused_rope_cuda(dtype, num_heads, num_kv_heads, head_dim):
    """The kernels round to bf16 once where the eager ops round every product: the expected values
    are the reference's in float32 from the same inputs, the norm rounded to the model dtype as rms_norm does."""
    atol, norm_atol, rtol = (1e-2, 2e-2, 1e-2) if dtype == torch.bfloat16 else (1e-5, 1e-5, 1e-5)
    for num_tokens, positions_dtype in ((1, torch.int32), (300, torch.int64), (45, torch.int32)):
        positions, q, k, q_norm, k_norm, rotary = rope_case(num_tokens, num_heads, num_kv_heads, head_dim, dtype,
                                                            "cuda", positions_dtype, max_position=4096)
        cos, sin = rotary.cos_cache.float(), rotary.sin_cache.float()
        expect = rope.reference(positions, q.float(), k.float(), cos, sin)
        assert_fused_close(rotary(positions, q, k), tuple(e.to(dtype) for e in expect), atol, rtol)
        q_normed = rms_norm.reference(q, q_norm.weight, q_norm.eps)
        k_normed = rms_norm.reference(k, k_norm.weight, k_norm.eps)
        expect = rope.reference(positions, q_normed.float(), k_normed.float(), cos, sin)
        # a 1-step flip of a normed value (sum order) moves an output by up to 1.6e-2 where |value| < 4
        assert_fused_close(norm_rope(positions, q, k, q_norm, k_norm, rotary), tuple(e.to(dtype) for e in expect),
                           norm_atol, rtol)


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype, fp8", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(16, 8, 128), (14, 2, 64), (6, 2, 40)])
def test_fused_rope_store_cuda(dtype, fp8, num_heads, num_kv_heads, head_dim):
    """q, k as the rope/norm_rope kernels give them (tested above against PyTorch), and the cache bytes the
    PyTorch store writes for them, fp8 rounding included."""
    for num_tokens, block_size in ((1, 16), (300, 256), (45, 16)):
        case = rope_store_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, "cuda", fp8)
        assert_rope_store_matches(case)


@cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens, size", [(1, 3072), (300, 9728), (7, 1500), (5, 96)])
def test_fused_silu_and_mul_cuda(dtype, num_tokens, size):
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    x = gate_up_case(num_tokens, size, dtype, "cuda")
    assert_fused_close(silu_and_mul(x), silu_and_mul.reference(x.float()).to(dtype), tol, tol)


def fused_layer_calls(num_tokens: int, positions_offset: int) -> dict:
    """Each fused op through its layer function as a call without arguments, the bf16 inputs made beforehand;
    positions and slots sit at an offset in a larger int32 buffer like a step's packed inputs."""
    x, residual, weight = norm_case(num_tokens, 1024, torch.bfloat16, "cuda")
    positions, q, k, q_norm, k_norm, rotary = rope_case(num_tokens, 16, 8, 128, torch.bfloat16, "cuda",
                                                        torch.int32, max_position=4096)
    packed = torch.zeros(positions_offset + num_tokens, dtype=torch.int32, device="cuda")
    packed[positions_offset:] = positions
    positions = packed[positions_offset:]
    gate_up = gate_up_case(num_tokens, 3072, torch.bfloat16, "cuda")
    k_cache, v_cache = (torch.zeros(num_tokens // 16 + 1, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
                        for _ in range(2))
    packed_slots = torch.full((positions_offset + num_tokens,), -1, dtype=torch.int32, device="cuda")
    packed_slots[positions_offset:] = torch.arange(num_tokens, device="cuda")
    rotation = QKRotation(positions, rotary, q_norm, k_norm)
    return {
        "rms_norm": lambda: rms_norm(x, weight, 1e-6),
        "add_rms_norm": lambda: add_rms_norm(x, residual, weight, 1e-6),
        "rope": lambda: rotary(positions, q, k),
        "norm_rope": lambda: norm_rope(positions, q, k, q_norm, k_norm, rotary),
        "silu_and_mul": lambda: silu_and_mul(gate_up),
        "rope_store": lambda: rotation.rotate_and_store(q, k, k, k_cache, v_cache, packed_slots[positions_offset:]),
    }


@cuda
@needs_cuda
@needs_triton
def test_fused_kernels_compile_once_for_every_token_count_cuda():
    """The token count is only the kernels' grid: once compiled at one size, other sizes (1, 16, a CUDA graph's
    32) and positions at other offsets compile nothing, and the captured graph computes what eager calls do."""
    from triton import knobs
    jitted = []

    def record(**kw):
        jitted.append(kw["fn"].name if "fn" in kw else "?")
        return None

    for call in fused_layer_calls(7, positions_offset=0).values():
        call()
    torch.cuda.synchronize()
    knobs.runtime.jit_cache_hook = record
    try:
        for num_tokens, offset in ((1, 4), (16, 3)):
            for call in fused_layer_calls(num_tokens, offset).values():
                call()
        calls = fused_layer_calls(32, positions_offset=32)
        eager = {name: call() for name, call in calls.items()}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = {name: call() for name, call in calls.items()}
        graph.replay()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_cache_hook = None
    assert jitted == []
    for name, out in eager.items():
        outs, graph_outs = (out, captured[name]) if isinstance(out, tuple) else ((out,), (captured[name],))
        assert all(torch.equal(a, b) for a, b in zip(outs, graph_outs)), name


# ---- run_warm_up: start-up tasks at once, their Triton compiles in one pool ----------------------------------------

def test_run_warm_up_serially_runs_the_tasks_in_order_on_the_calling_thread():
    seen = []
    tasks = [lambda i=i: seen.append((i, threading.get_ident())) for i in range(3)]
    run_warm_up(tasks, torch.device("cpu"), concurrently=False)
    assert seen == [(i, threading.get_ident()) for i in range(3)]


@needs_triton
def test_run_warm_up_runs_the_tasks_at_once_under_one_compile_mode_and_raises_the_first_error():
    """Four tasks pass a four-party barrier only if they run at the same time; each sees the same active
    triton.AsyncCompileMode (so a kernel two tasks need compiles once), which is off again afterwards. A failing
    task's error comes after the other tasks have finished."""
    from triton.runtime._async_compile import active_mode
    barrier, seen = threading.Barrier(4, timeout=30), []

    def task():
        barrier.wait()
        seen.append((threading.get_ident(), active_mode.get()))

    run_warm_up([task] * 4, torch.device("cpu"))
    assert len({ident for ident, _ in seen}) == 4 and threading.get_ident() not in {ident for ident, _ in seen}
    modes = {id(mode) for _, mode in seen}
    assert len(modes) == 1 and seen[0][1] is not None and active_mode.get() is None
    finished = []

    def fails():
        raise ValueError("task failed")

    def slow():
        time.sleep(0.3)
        finished.append(True)

    with pytest.raises(ValueError, match="task failed"):
        run_warm_up([fails, slow], torch.device("cpu"))
    assert finished == [True] and active_mode.get() is None


@cuda
@needs_cuda
@needs_triton
def test_run_warm_up_tasks_launch_a_new_kernel_at_once_cuda():
    """Six tasks launch a kernel no one compiled yet, three with each of two constants, at the same time: every
    output is right, and the kernel holds two compiled variants."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(x_ptr, out_ptr, ADD: tl.constexpr):
        offs = tl.arange(0, 128)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs) + ADD)

    x = torch.arange(128, dtype=torch.float32, device="cuda")
    outs = {i: torch.zeros_like(x) for i in range(6)}
    barrier = threading.Barrier(6, timeout=60)

    def task(i):
        barrier.wait()
        add_kernel[(1,)](x, outs[i], ADD=1 + i % 2)

    run_warm_up([lambda i=i: task(i) for i in range(6)], torch.device("cuda"))
    torch.cuda.synchronize()
    for i, out in outs.items():
        assert torch.equal(out, x + 1 + i % 2), i
    assert sum(len(caches[0]) for caches in add_kernel.device_caches.values()) == 2


@cuda
@needs_cuda
@needs_triton
def test_sampler_noise_cuda():
    """The noise through the GPU's approximate log2 and reciprocal stays within the interpreter check's bound."""
    _check_sampler_noise("cuda")
