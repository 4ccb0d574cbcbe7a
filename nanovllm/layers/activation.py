import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.kernels import fused_kernel


@fused_kernel("fused", "silu_and_mul", cpu=True)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
