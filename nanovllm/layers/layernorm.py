import torch
from torch import nn

from nanovllm.utils.compile import compile_on_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    orig_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(orig_dtype)


@compile_on_cuda
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add fused into the norm: returns (norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


class RMSNorm(nn.Module):

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # 2-D inputs only ([tokens, features]): one compiled graph serves every caller
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if residual is None:
            # eager: without a residual it only runs once per forward (the first layer's input norm), not worth
            # two more compiled variants at start-up
            return rms_norm(x, self.weight, self.eps).view(shape)
        out, residual = add_rms_norm(x, residual.reshape(-1, shape[-1]), self.weight, self.eps)
        return out.view(shape), residual.view(shape)
