from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.layers.backends.torch_sdpa import store_kvcache
from nanovllm.layers.kv_quant import KVScales
from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.utils.kernels import fused_kernel


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim // 2] (halves layout, as in HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@fused_kernel("fused", "rope", cpu=True)
def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
         sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_cache[positions], sin_cache[positions]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@fused_kernel("fused", "norm_rope", cpu=True)
def _norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
               k_weight: torch.Tensor, eps: float, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rms_norm.reference(q, q_weight, eps), rms_norm.reference(k, k_weight, eps)
    return rope.reference(positions, q, k, cos_cache, sin_cache)


@fused_kernel("fused", "rope_store", cpu=True)
def _rope_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cos_cache: torch.Tensor,
                sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm and) rope, then the rotated k and v written to their cache slots: one kernel on CUDA."""
    if q_weight is None:
        q, k = rope.reference(positions, q, k, cos_cache, sin_cache)
    else:
        q, k = _norm_rope.reference(positions, q, k, q_weight, k_weight, eps, cos_cache, sin_cache)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping, None if k_scale is None else KVScales(k_scale, v_scale))
    return q, k


class RotaryEmbedding(nn.Module):

    def __init__(self, head_dim: int, max_position: int, base: float, dtype: torch.dtype):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq)
        # cast like HF: computed in float32, used in the model dtype
        self.register_buffer("cos_cache", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim], k likewise."""
        return rope(positions, q, k, self.cos_cache, self.sin_cache)


def norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
              rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary(q_norm(q), k_norm(k)) in one kernel, not six: Qwen3's per-head q/k norm."""
    return _norm_rope(positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps, rotary.cos_cache,
                      rotary.sin_cache)


@dataclass(slots=True)
class QKRotation:
    """What turns a layer's projected q and k into the attended ones: Qwen3's per-head RMSNorm (norms set) and
    the rotary embedding at `positions`. The attention layer applies it, so that a backend can rotate k and
    write it to the KV cache in one pass (`rotate_and_store`)."""
    positions: torch.Tensor
    rotary: RotaryEmbedding
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return self.rotary(self.positions, q, k)
        return norm_rope(self.positions, q, k, self.q_norm, self.k_norm, self.rotary)

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         kv_scales: KVScales | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated (q, k), with k and v written to the cache slots as TorchBackend.store_kvcache would."""
        norm = self.q_norm is not None
        return _rope_store(self.positions, q, k, v, self.q_norm.weight if norm else None,
                           self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0,
                           self.rotary.cos_cache, self.rotary.sin_cache, k_cache, v_cache, slot_mapping,
                           *((kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)))
