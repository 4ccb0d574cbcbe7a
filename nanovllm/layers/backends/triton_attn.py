"""Attention through our own Triton kernels (nanovllm.kernels): paged prefill, split-KV decode, KV store."""
import torch

from nanovllm.layers.backends.base import AttentionBackend
from nanovllm.layers.kv_quant import KVScales
from nanovllm.utils.context import Context

try:
    import triton  # noqa: F401  (imported only to fail early with a clear message)
except ImportError as e:
    raise ImportError("attention_backend='triton' needs Triton: pip install triton "
                      "(or use attention_backend='torch')") from e

from nanovllm.kernels.attention import decode_attention, decode_config, gluon_decode, prefill_attention
from nanovllm.kernels.store_kvcache import store_kvcache


class TritonBackend(AttentionBackend):
    name = "triton"
    orders_decode = True
    # a decode program reads one KV head's keys: head-major blocks make each tile one contiguous run (an fp8
    # tile of 128 keys: 16 KiB instead of 128 rows of 128 bytes); 2-3% less decode time with an fp8 cache on an
    # H200 at bench.py's batches, the same with bf16
    head_major_blocks = True
    # a mixed step's decodes through the decode kernel: in the prefill kernel each one-token row took a 64-row tile
    # per query head. At bench.py's nine prefill steps (benchmarks/prefill_attention.py, one H200) a layer's
    # attention took 2.57 instead of 3.56 ms with 0.6B's heads, 4.32 instead of 6.92 ms with 8B's
    decodes_in_mixed_steps = True

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")  # whose kernels will serve (the CPU: Triton's interpreter)

    def check_config(self, block_size: int, head_dim: int, dtype: torch.dtype,
                     kv_cache_dtype: str = "auto") -> None:
        # kvcache_block_size is a power of two >= 16 by Config's rule, which is all the kernels need
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"attention_backend='triton' supports dtype float16, bfloat16 or float32, "
                             f"got dtype={dtype}")

    def key_major_values(self, block_size, head_dim, dtype, kv_cache_dtype, queries_per_kv=1):
        # an fp8 cache: the decode kernel's P.V product then reads a tile's V like Q.K^T reads K, 8 bytes a
        # shared-memory load instead of one, and the tile needs no mask (kv_quant: the cache holds no NaN); 12% less
        # decode attention time on an H200 at bench.py's batches. Only where a decode tile lies inside one block;
        # smaller blocks keep the layout the kernel's per-key path reads along head_dim. bf16 caches keep theirs
        # (their V tiles load through ldmatrix's transposing form; key-major was 12% slower). Where the Gluon kernel
        # serves (a Hopper GPU, sm_90, at most 16 query heads a KV head), runs of 4 keys: each new token's values
        # are then stored 4 bytes apart rather than a block apart (16 sectors of 32 bytes a head instead of
        # head_dim): bench.py's 0.6B fp8 run 5% faster on an H200. Elsewhere (the Triton kernel) runs of a whole
        # block, whose tiles it copies 16 bytes at a time (over runs of 4 keys, 4 bytes: 2.8x its time).
        fp8 = kv_cache_dtype != "auto"
        if not fp8 or decode_config(head_dim, 1, dtype, fp8, True).block_n > block_size:
            return 0
        if (gluon_decode is not None and self.device.type == "cuda" and queries_per_kv <= gluon_decode.MAX_GROUP
                and gluon_decode.serves(head_dim, dtype, block_size, self.device)):
            return gluon_decode.VALUE_RUN
        return block_size

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping, kv_scales: KVScales | None = None):
        store_kvcache(k, v, k_cache, v_cache, slot_mapping, *_scales(kv_scales))

    def rotate_and_store(self, rotation, q, k, v, k_cache, v_cache, slot_mapping, kv_scales=None):
        # the rotary kernel writes k and v to the cache too (PyTorch ops then the store off CUDA)
        return rotation.rotate_and_store(q, k, v, k_cache, v_cache, slot_mapping, kv_scales)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales: KVScales | None = None):
        tail = ctx.num_decode_rows if ctx.block_tables is not None else 0
        if not tail:
            return prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                     ctx.max_seqlen_q, ctx.block_tables, scale, None, *_scales(kv_scales))
        # the first rows' chunks through the prefill kernel, the trailing one-token rows as a decode step
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        chunks, split = ctx.cu_seqlens_q.numel() - 1 - tail, q.size(0) - tail
        if chunks:
            prefill_attention(q[:split], k[:split], v[:split], k_cache, v_cache, ctx.cu_seqlens_q[:chunks + 1],
                              ctx.cu_seqlens_k[:chunks + 1], ctx.max_seqlen_q, ctx.block_tables, scale, None,
                              *_scales(kv_scales), out=out[:split])
        decode_attention(q[split:], k_cache, v_cache, ctx.context_lens, ctx.decode_block_tables, scale, None, None,
                         *_scales(kv_scales), seq_order=ctx.decode_order, out=out[split:])
        return out

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales: KVScales | None = None):
        # the runner's order starts the longest sequences' programs first, so that the last ones to finish are
        # short; a context without one (a direct caller) runs the rows in batch order
        return decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, scale, None, None,
                                *_scales(kv_scales), seq_order=ctx.decode_order)


def _scales(kv_scales: KVScales | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)
