"""Pure-PyTorch paged attention: the CPU path, and the reference every GPU kernel is tested against."""
import torch
import torch.nn.functional as F

from nanovllm.layers.backends.base import AttentionBackend
from nanovllm.layers.kv_quant import KVScales, dequantize_fp8, fp8_round_trip, quantize_fp8
from nanovllm.utils.context import Context


def gather_cached_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first num_tokens cached entries of one sequence, in order: [num_tokens, num_kv_heads, head_dim]."""
    block_size = cache.size(1)
    num_blocks = (num_tokens + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, kv_heads, head_dim]
    return blocks.flatten(0, 1)[:num_tokens]


def read_cache(cached: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries ([..., num_kv_heads, head_dim]) as `dtype` values: fp8 ones (scale given) dequantised."""
    return cached if scale is None else dequantize_fp8(cached, scale, dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, heads, dim]; k, v: [k_len, kv_heads, dim], k_len >= q_len, bottom-right causal."""
    q_len, k_len = q.size(0), k.size(0)
    group = q.size(1) // k.size(1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if group > 1:
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    if q_len == k_len:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        # query i sits at position k_len - q_len + i and sees every key up to it
        rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        mask = torch.arange(k_len, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


class TorchBackend(AttentionBackend):
    name = "torch"

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping, kv_scales: KVScales | None = None):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        if kv_scales is not None:
            k, v = quantize_fp8(k, kv_scales.k), quantize_fp8(v, kv_scales.v)
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales: KVScales | None = None):
        ks, vs = (kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)
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

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales: KVScales | None = None):
        num_heads, num_kv_heads = q.size(1), k_cache.size(2)
        ks, vs = (kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)
        tables = ctx.block_tables.long()  # [num_seqs, max_blocks]
        k = read_cache(k_cache[tables].flatten(1, 2), ks, q.dtype)  # [num_seqs, max_blocks * block_size, kv_heads, dim]
        v = read_cache(v_cache[tables].flatten(1, 2), vs, q.dtype)
        group = num_heads // num_kv_heads
        k = k.permute(0, 2, 1, 3).repeat_interleave(group, 1)  # [num_seqs, heads, keys, dim]
        v = v.permute(0, 2, 1, 3).repeat_interleave(group, 1)
        visible = torch.arange(k.size(2), device=q.device)[None, :] < ctx.context_lens[:, None]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=scale)
        return o.squeeze(2)
