import torch
from torch import nn


class Sampler(nn.Module):
    """Greedy where temperature == 0, else a draw from softmax(logits / temperature).

    The draw uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) i.i.d. picks index i with
    probability p_i, without a cumulative sum or a host sync.
    """

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(-1)
        t = temperatures.unsqueeze(1)
        probs = torch.softmax(logits / torch.where(t > 0, t, 1.0), -1)
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
        sampled = (probs / noise).argmax(-1)
        return torch.where(temperatures > 0, sampled, greedy)
