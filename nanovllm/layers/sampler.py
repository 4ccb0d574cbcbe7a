import torch
from torch import nn

from nanovllm.utils.compile import compile_on_cuda


@compile_on_cuda
def sample_from_logits(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature == 0, else a draw from softmax(logits / temperature); noise ~ Exp(1) i.i.d.

    The exponential race: argmax_i(p_i / E_i) picks index i with probability p_i. In log space that is
    argmax_i(logits_i / T - log E_i), since log p_i differs from logits_i / T by a per-row constant. No softmax,
    no cumulative sum and no host sync; compiled, both argmaxes are one pass over the logits.
    """
    logits = logits.float()
    t = temperatures.unsqueeze(1)
    scores = logits / torch.where(t > 0, t, 1.0) - noise.log()
    return torch.where(temperatures > 0, scores.argmax(-1), logits.argmax(-1))


class Sampler(nn.Module):

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if logits.device.type == "cpu" and not (temperatures > 0).any():
            # an all-greedy batch on the CPU (where reading the temperatures costs no sync) skips the noise,
            # whose draw alone takes about 0.2 CPU-seconds a step at batch 64 over a 152k vocabulary
            return logits.float().argmax(-1)
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        noise.exponential_(1, generator=generator)
        return sample_from_logits(logits, temperatures, noise)
