import torch
from torch import nn

from nanovllm.utils.kernels import fused_kernel


@fused_kernel("fused", "rms_norm", cpu=True)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    orig_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(orig_dtype)


@fused_kernel("fused", "add_rms_norm", cpu=True)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add fused into the norm: returns (norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm.reference(residual, weight, eps), residual


class RMSNorm(nn.Module):

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # the kernels take 2-D rows ([tokens, features])
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if residual is None:
            return rms_norm(x, self.weight, self.eps).view(shape)
        out, residual = add_rms_norm(x, residual.reshape(-1, shape[-1]), self.weight, self.eps)
        return out.view(shape), residual.view(shape)
