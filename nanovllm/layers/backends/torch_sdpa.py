"""Pure-PyTorch paged attention: the CPU path, and the reference every GPU kernel is tested against.

Prefill runs one sequence at a time: a step's sequences are long enough that attention is compute-bound, and
padding them into one batched SDPA measured slower than the loop on the CPU.

Decode has two versions whose results agree to float rounding:

* `reference_decode`: every sequence's blocks padded to the longest block table and K/V repeated per query head,
  then one masked SDPA. Plain, and free of host syncs (CUDA graphs can capture it); used off the CPU.
* `grouped_decode` (the CPU path): sequences grouped by their number of blocks, each group gathers its rows' keys
  slot by slot, padded to its longest row (so by less than a block), with one plan per step for every layer; the
  query heads that share a KV head attend together as the query rows of one SDPA, so the cached K/V is read
  once, never copied per query head:

      q [num_seqs, num_heads, head_dim] --view--> [num_seqs, num_kv_heads, group, head_dim]
                                                   group query heads = the "query length" of each KV head
      k [num_seqs, num_kv_heads, keys, head_dim]   (a view of the gathered keys, no copy per head)

On the CPU in bfloat16 both prefill and decode first try the native kernels (kernels/cpu.py), which attend the
same way straight from the cache blocks without the gather; these PyTorch versions run where those cannot.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanovllm.kernels import cpu as cpu_kernels
from nanovllm.layers.backends.base import AttentionBackend
from nanovllm.layers.kv_quant import KVScales, dequantize_fp8, fp8_round_trip, quantize_fp8
from nanovllm.utils.context import Context
from nanovllm.utils.math import cdiv


def gather_cached_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first num_tokens cached entries of one sequence, in order: [num_tokens, num_kv_heads, head_dim]."""
    block_size = cache.size(1)
    num_blocks = cdiv(num_tokens, block_size)
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, kv_heads, head_dim]
    return blocks.flatten(0, 1)[:num_tokens]


def read_cache(cached: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries ([..., num_kv_heads, head_dim]) as `dtype` values: fp8 ones (scale given) dequantised."""
    return cached if scale is None else dequantize_fp8(cached, scale, dtype)


def _scales(kv_scales: KVScales | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, heads, dim]; k, v: [k_len, kv_heads, dim], k_len >= q_len, bottom-right causal."""
    q_len, k_len = q.size(0), k.size(0)
    # 4-D with enable_gqa: the CPU's fused SDPA kernel takes neither 3-D inputs nor repeated K/V without a copy
    q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if q_len == k_len:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # query i sits at position k_len - q_len + i and sees every key up to it
        rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        mask = torch.arange(k_len, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def reference_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, ctx: Context, scale: float,
                      kv_scales: KVScales | None = None) -> torch.Tensor:
    """One sequence at a time; keys from the cache when ctx.block_tables is set, else the new tokens' own (with an
    fp8 cache rounded as it stores them, so a cached and an uncached prefill agree)."""
    ks, vs = _scales(kv_scales)
    if kv_scales is not None and ctx.block_tables is None:
        k, v = fp8_round_trip(k, ks), fp8_round_trip(v, vs)
    cu_q = ctx.cu_seqlens_q.tolist()
    cu_k = ctx.cu_seqlens_k.tolist()
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        q0, q1 = cu_q[i], cu_q[i + 1]
        k_len = cu_k[i + 1] - cu_k[i]
        if ctx.block_tables is None:
            ki, vi = k[q0:q1], v[q0:q1]
        else:
            ki = read_cache(gather_cached_kv(k_cache, ctx.block_tables[i], k_len), ks, q.dtype)
            vi = read_cache(gather_cached_kv(v_cache, ctx.block_tables[i], k_len), vs, q.dtype)
        out[q0:q1] = causal_attention(q[q0:q1], ki, vi, scale)
    return out


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, kv_scales: KVScales | None = None) -> torch.Tensor:
    """q: [num_seqs, heads, dim]; each sequence attends to its first context_lens[i] cached tokens."""
    num_heads, num_kv_heads = q.size(1), k_cache.size(2)
    ks, vs = _scales(kv_scales)
    tables = block_tables.long()  # [num_seqs, max_blocks]; -1 entries index the last block and are masked
    k = read_cache(k_cache[tables].flatten(1, 2), ks, q.dtype)  # [num_seqs, max_blocks * block_size, kv_heads, dim]
    v = read_cache(v_cache[tables].flatten(1, 2), vs, q.dtype)
    visible = torch.arange(k.size(1), device=q.device)[None, :] < context_lens[:, None]
    # the slots past a sequence's keys may hold anything; a NaN there would pass the mask (NaN * 0 weight)
    hidden = ~visible[:, :, None, None]
    k, v = k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)
    group = num_heads // num_kv_heads
    k = k.permute(0, 2, 1, 3).repeat_interleave(group, 1)  # [num_seqs, heads, keys, dim]
    v = v.permute(0, 2, 1, 3).repeat_interleave(group, 1)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=scale)
    return o.squeeze(2)


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows with the same number of cache blocks, attended together: the cache slots of each row's keys,
    padded to the group's longest row (so by less than a block) with its last key's slot, and the mask of that
    padding."""
    rows: torch.Tensor | None  # None: every row of the step
    slots: torch.Tensor  # [num_rows * num_keys] int64, row after row
    num_keys: int
    mask: torch.Tensor | None  # [num_rows, 1, 1, num_keys] bool; None when no row is padded


def decode_groups(context_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> list[DecodeGroup]:
    """grouped_decode's gather plan, the same for every layer of a step. Reads context_lens on the host."""
    lens = context_lens.tolist()
    by_blocks: dict[int, list[int]] = {}
    for row, n in enumerate(lens):
        if n:  # a row without context (CUDA-graph padding) reads nothing
            by_blocks.setdefault(cdiv(n, block_size), []).append(row)
    groups = []
    for rows in by_blocks.values():
        group_lens = [lens[r] for r in rows]
        num_keys = max(group_lens)
        keys = torch.arange(num_keys, device=block_tables.device)[None, :]
        index = None if len(rows) == len(lens) else torch.tensor(rows, device=block_tables.device)
        tables = block_tables if index is None else block_tables[index]
        mask = None
        if min(group_lens) < num_keys:
            row_lens = torch.tensor(group_lens, device=keys.device)[:, None]
            mask = (keys < row_lens)[:, None, None, :]
            # a padding key reads its row's last key: the stale slots past it may hold anything, and a NaN there
            # would pass the mask (NaN * 0 weight)
            keys = torch.minimum(keys, row_lens - 1)
        keys = keys.expand(len(rows), num_keys)
        slots = (tables.gather(1, keys // block_size).long() * block_size + keys % block_size).flatten()
        groups.append(DecodeGroup(index, slots, num_keys, mask))
    return groups


def grouped_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                   block_tables: torch.Tensor, scale: float, kv_scales: KVScales | None = None,
                   groups: list[DecodeGroup] | None = None) -> torch.Tensor:
    """reference_decode's result, reading each sequence's own keys once (see the module docstring). groups:
    decode_groups' plan when the caller has it (one per step, not per layer)."""
    if groups is None:
        groups = decode_groups(context_lens, block_tables, k_cache.size(1))
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.size(2)
    k_slots, v_slots = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [slots, kv_heads, head_dim], views
    ks, vs = _scales(kv_scales)
    whole = len(groups) == 1 and groups[0].rows is None
    out = None if whole else torch.zeros_like(q)  # rows without context stay zero
    for g in groups:
        qg = q if g.rows is None else q[g.rows]
        n = qg.size(0)
        # index_select: on the CPU about 3x faster than the same gather written as k_slots[g.slots]
        k = read_cache(k_slots.index_select(0, g.slots), ks, q.dtype).view(n, g.num_keys, num_kv_heads, head_dim)
        v = read_cache(v_slots.index_select(0, g.slots), vs, q.dtype).view(n, g.num_keys, num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(qg.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim),
                                           k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask, scale=scale)
        if whole:
            return o.reshape(num_seqs, num_heads, head_dim)
        out[g.rows] = o.reshape(n, num_heads, head_dim)
    return out


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, kv_scales: KVScales | None = None) -> None:
    """Writes token t's k, v to slot slot_mapping[t] (not when it is -1), quantised for an fp8 cache."""
    if kv_scales is not None:
        k, v = quantize_fp8(k, kv_scales.k), quantize_fp8(v, kv_scales.v)
    k_slots, v_slots = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    slots = slot_mapping.long()
    # the CPU has no padded tokens (those are CUDA graphs'): index_copy_ is ~3x faster than a masked
    # assignment there; elsewhere the mask keeps the step free of host syncs
    if slots.device.type == "cpu" and (slots.numel() == 0 or int(slots.min()) >= 0):
        if k_slots.element_size() == 1:  # index_copy_ has no float8 kernel on the CPU: copy the bytes
            k_slots, v_slots, k, v = (t.view(torch.uint8) for t in (k_slots, v_slots, k, v))
        k_slots.index_copy_(0, slots, k)
        v_slots.index_copy_(0, slots, v)
        return
    keep = slots >= 0
    k_slots[slots[keep]] = k[keep]
    v_slots[slots[keep]] = v[keep]


NATIVE_DECODE = "native"  # ctx.plan of a CPU step whose decode runs the native kernel


class TorchBackend(AttentionBackend):
    name = "torch"

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping, kv_scales: KVScales | None = None):
        store_kvcache(k, v, k_cache, v_cache, slot_mapping, kv_scales)

    def rotate_and_store(self, rotation, q, k, v, k_cache, v_cache, slot_mapping, kv_scales=None):
        if q.device.type == "cpu":  # the CPU kernels rotate and store in one pass (the PyTorch ops where they cannot)
            return rotation.rotate_and_store(q, k, v, k_cache, v_cache, slot_mapping, kv_scales)
        return super().rotate_and_store(rotation, q, k, v, k_cache, v_cache, slot_mapping, kv_scales)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales: KVScales | None = None):
        if q.device.type == "cpu" and kv_scales is None:
            out = cpu_kernels.prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                                ctx.block_tables, scale)
            if out is not None:
                return out
        return reference_prefill(q, k, v, k_cache, v_cache, ctx, scale, kv_scales)

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales: KVScales | None = None):
        if q.device.type == "cpu":
            if kv_scales is None and ctx.plan in (None, NATIVE_DECODE):
                out = cpu_kernels.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, scale,
                                                   tables_checked=ctx.plan is NATIVE_DECODE)
                if out is not None:
                    ctx.plan = NATIVE_DECODE  # the step's other layers skip the tables' bounds check
                    return out
            if ctx.plan in (None, NATIVE_DECODE):  # the step's first layer: the rest reuse its gather plan
                ctx.plan = decode_groups(ctx.context_lens, ctx.block_tables, k_cache.size(1))
            return grouped_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, scale, kv_scales,
                                  ctx.plan)
        return reference_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, scale, kv_scales)
