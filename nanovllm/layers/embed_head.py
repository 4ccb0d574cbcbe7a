import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.cpu_packed import PackedWeight
from nanovllm.layers.linear import divide
from nanovllm.utils.loader import check_loaded_shape
from nanovllm.utils.parallel import tp_all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; out-of-slice ids contribute zeros to the all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank = tp_rank()
        self.tp_size = tp_size()
        self.all_reduce = tp_all_reduce()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = divide(num_embeddings, self.tp_size)
        self.vocab_start_idx = self.num_embeddings_per_partition * self.tp_rank
        self.vocab_end_idx = self.vocab_start_idx + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor):
        check_loaded_shape(loaded_weight, [self.num_embeddings, param.size(1)])
        shard = param.size(0)
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        mask = (x >= self.vocab_start_idx) & (x < self.vocab_end_idx)
        y = F.embedding(mask * (x - self.vocab_start_idx), self.weight)
        y = mask.unsqueeze(1) * y
        return self.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of the hidden states it is given (the runner picks which tokens); under TP the vocabulary slices
    are gathered on rank 0."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = self.packed.linear(x, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
            dist.gather(logits, parts, 0)
            logits = torch.cat(parts, -1) if self.tp_rank == 0 else None
        return logits
