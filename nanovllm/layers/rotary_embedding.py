import torch
from torch import nn

from nanovllm.utils.compile import compile_on_cuda


@compile_on_cuda
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim // 2] (halves layout, as in HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


class RotaryEmbedding(nn.Module):

    def __init__(self, head_dim: int, max_position: int, base: float, dtype: torch.dtype):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq)
        # cast like HF: computed in float32, used in the model dtype
        self.register_buffer("cos_cache", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.cos_cache[positions], self.sin_cache[positions]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
