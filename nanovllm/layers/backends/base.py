"""The seam between the model and the attention kernels.

Every backend sees the same paged KV cache shape, per layer:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (unit stride along head_dim)

in the memory layout it asks for (`head_major_blocks`, `key_major_values`; engine/kv_cache.py allocates it):
key-major values have unit stride along the slots instead, in runs of n slots seen as value blocks of n slots
(v_cache: [num_blocks * block_size // n, n, num_kv_heads, head_dim]; n = block_size keeps K's shape).

and the same per-step metadata (`nanovllm.utils.context.Context`). A token's cache slot is
`block_id * block_size + offset`; slot -1 marks a padded token (CUDA graphs) that must not be stored.

An fp8 cache (`kv_scales` set) holds float8 e4m3 values with one scale per KV head (see
`nanovllm.layers.kv_quant`); without a cache read, prefill attends to the new keys as the cache would return them.

The attention layer hands a backend q and k before their rotation (`rotate_and_store`), so a backend whose store
is a kernel can rotate k and write it to the cache in one pass; the default rotates, then stores.

Prefill is causal and bottom-right aligned: a sequence with `k` keys of which the last `q` are new lets its
i-th new token see keys `0 .. k - q + i`. Keys come from the cache when `block_tables` is set (cached prefix or
chunked prefill), else from the new tokens' own k/v.
"""
from abc import ABC, abstractmethod

import torch

from nanovllm.layers.kv_quant import KVScales
from nanovllm.utils.context import Context


class AttentionBackend(ABC):
    name: str = ""
    # whether decode reads ctx.decode_order (the rows longest first), which the runner then uploads with the step
    orders_decode: bool = False
    # whether prefill reads a mixed step's one-token rows as decode rows (Context.num_decode_rows and the fields
    # after it), which the runner then uploads with the step; other backends attend to them as prefill rows
    decodes_in_mixed_steps: bool = False
    # whether the cache is allocated head-major within each block: the same shape, contiguous per block and KV
    # head (strides: block, head_dim, block_size * head_dim, 1), so one head's keys of a block are one run of
    # memory; without it the caches are contiguous tensors
    head_major_blocks: bool = False

    def key_major_values(self, block_size: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str,
                         queries_per_kv: int = 1) -> int:
        """n > 0 to have V stored key-major in runs of n slots (n divides block_size): one KV head's values of
        a run as [head_dim, n] in memory, seen as [num_blocks * block_size // n, n, num_kv_heads, head_dim]
        (strides: n * num_kv_heads * head_dim, 1, n * head_dim, n); 0 to store V as K. queries_per_kv: the
        model's query heads per KV head."""
        return 0

    def check_config(self, block_size: int, head_dim: int, dtype: torch.dtype,
                     kv_cache_dtype: str = "auto") -> None:
        """Raise ValueError when this backend cannot serve the configuration."""

    @abstractmethod
    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, kv_scales: KVScales | None = None) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim]; writes token t to slot slot_mapping[t] unless it is -1."""

    def rotate_and_store(self, rotation, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         kv_scales: KVScales | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rotation(q, k) (a `QKRotation`), then the rotated k and v stored; returns the rotated (q, k).
        Backends whose store is a Triton kernel override this to do both in one kernel."""
        q, k = rotation(q, k)
        self.store_kvcache(k, v, k_cache, v_cache, slot_mapping, kv_scales)
        return q, k

    @abstractmethod
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: Context, scale: float, kv_scales: KVScales | None = None) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: the same tokens' keys/values. Returns like q."""

    @abstractmethod
    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context,
               scale: float, kv_scales: KVScales | None = None) -> torch.Tensor:
        """q: [num_seqs, num_heads, head_dim], one new token per sequence, already stored. Returns like q."""
