from collections.abc import Callable

import torch
from torch import nn

from nanovllm.layers.backends.base import AttentionBackend
from nanovllm.layers.kv_quant import KVScales
from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Paged attention over this layer's slice of the KV cache.

    The ModelRunner sets the backend after building the model and the cache (with its scales, for an fp8 cache)
    after sizing it; until then (the warm-up pass) nothing is stored and prefill attends to the batch's own keys.
    Given the model's q/k rotation, the layer applies it itself, so that the backend may fuse it with the store;
    `observe_kv`, when set, is called with each cache-less pass's rotated k and v (fp8 calibration).
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend: AttentionBackend | None = None
        self.k_cache = self.v_cache = torch.tensor([])
        self.kv_scales: KVScales | None = None
        self.observe_kv: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def set_backend(self, backend: AttentionBackend):
        self.backend = backend

    def set_cache(self, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                  kv_scales: KVScales | None = None):
        """This layer's views of the paged cache, [num_blocks, block_size, num_kv_heads, head_dim]; None drops
        them, so freeing the cache tensor frees its memory. kv_scales: an fp8 cache's K/V scales."""
        self.k_cache = k_cache if k_cache is not None else torch.tensor([])
        self.v_cache = v_cache if v_cache is not None else torch.tensor([])
        self.kv_scales = kv_scales

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotation=None) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]; rotation: a
        `QKRotation` still to apply to q and k, or None when they are final."""
        ctx = get_context()
        k_cache, v_cache, kv_scales = self.k_cache, self.v_cache, self.kv_scales
        if k_cache.numel():
            if rotation is not None:
                q, k = self.backend.rotate_and_store(rotation, q, k, v, k_cache, v_cache, ctx.slot_mapping,
                                                     kv_scales)
            else:
                self.backend.store_kvcache(k, v, k_cache, v_cache, ctx.slot_mapping, kv_scales)
        else:
            if rotation is not None:
                q, k = rotation(q, k)
            if self.observe_kv is not None:
                self.observe_kv(k, v)
        if ctx.is_prefill:
            return self.backend.prefill(q, k, v, k_cache, v_cache, ctx, self.scale, kv_scales)
        return self.backend.decode(q, k_cache, v_cache, ctx, self.scale, kv_scales)


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers, in order (one per decoder layer)."""
    return [m for m in model.modules() if isinstance(m, Attention)]
