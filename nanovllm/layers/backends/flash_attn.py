"""nano-vllm's attention path: flash-attn 2 varlen prefill and paged decode; KV store through our Triton kernel."""
import torch

from nanovllm.layers.backends.base import AttentionBackend
from nanovllm.utils.context import Context

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError as e:
    raise ImportError("attention_backend='flash_attn' needs flash-attn 2: pip install flash-attn "
                      "(or use attention_backend='triton' or 'torch')") from e

from nanovllm.kernels.store_kvcache import store_kvcache

# flash-attn's paged KV cache wants pages of a multiple of 256 tokens
FLASH_ATTN_PAGE_MULTIPLE = 256
# head sizes the prebuilt flash-attn of this project is compiled for
FLASH_ATTN_HEAD_DIMS = (64, 128)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def check_config(self, block_size: int, head_dim: int, dtype: torch.dtype,
                     kv_cache_dtype: str = "auto") -> None:
        if kv_cache_dtype != "auto":  # flash-attn 2 reads K/V in q's dtype only (fp8 descaling is flash-attn 3)
            raise ValueError(f"attention_backend='flash_attn' does not support kv_cache_dtype={kv_cache_dtype!r}; "
                             f"use attention_backend='triton' for an fp8 KV cache")
        if block_size % FLASH_ATTN_PAGE_MULTIPLE:
            raise ValueError(f"attention_backend='flash_attn' needs kvcache_block_size to be a multiple of "
                             f"{FLASH_ATTN_PAGE_MULTIPLE}, got kvcache_block_size={block_size}; "
                             f"use attention_backend='triton' for smaller blocks")
        if head_dim not in FLASH_ATTN_HEAD_DIMS:
            raise ValueError(f"attention_backend='flash_attn' supports head_dim {FLASH_ATTN_HEAD_DIMS}, got "
                             f"head_dim={head_dim}; use attention_backend='triton'")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention_backend='flash_attn' supports dtype float16 or bfloat16, got dtype={dtype}; "
                             f"use attention_backend='triton'")

    # kv_scales: always None here, check_config refuses an fp8 cache
    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping, kv_scales=None):
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)

    def rotate_and_store(self, rotation, q, k, v, k_cache, v_cache, slot_mapping, kv_scales=None):
        # the rotary kernel writes k and v to the cache too (PyTorch ops then the store off CUDA)
        return rotation.rotate_and_store(q, k, v, k_cache, v_cache, slot_mapping, kv_scales)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        if ctx.block_tables is not None:  # cached prefix or chunked prefill: every key is already in the cache
            k, v = k_cache, v_cache
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=ctx.cu_seqlens_k,
                                      max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k,
                                      softmax_scale=scale, causal=True, block_table=ctx.block_tables)

    def decode(self, q, k_cache, v_cache, ctx: Context, scale, kv_scales=None):
        o = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.context_lens,
                                    block_table=ctx.block_tables, softmax_scale=scale, causal=True)
        return o.squeeze(1)
