import torch
from torch import nn

from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.utils.kernels import triton_on_cuda


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim // 2] (halves layout, as in HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@triton_on_cuda("fused", "rope")
def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
         sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_cache[positions], sin_cache[positions]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton_on_cuda("fused", "norm_rope")
def _norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
               k_weight: torch.Tensor, eps: float, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rms_norm.reference(q, q_weight, eps), rms_norm.reference(k, k_weight, eps)
    return rope.reference(positions, q, k, cos_cache, sin_cache)


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
