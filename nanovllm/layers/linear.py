"""Linear layers that own their tensor-parallel sharding.

Each Parameter carries a `weight_loader(param, loaded_weight[, shard_id])` that copies this rank's slice of a
full checkpoint tensor into it, so the loader never needs to know how a layer is split. A checkpoint tensor whose
shape is not the whole (unsplit) shape its part of the layer has is refused, also where copying would broadcast it
or a rank's slice of it would fit.
"""
import torch
from torch import nn

from nanovllm.layers.cpu_packed import PackedWeight
from nanovllm.utils.loader import check_loaded_shape
from nanovllm.utils.parallel import tp_all_reduce, tp_rank, tp_size


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = tp_rank()
        self.tp_size = tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed = PackedWeight()

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor):
        split = self.tp_dim is not None and param.dim() > self.tp_dim and self.tp_size > 1
        shape = list(param.shape)
        if split:
            shape[self.tp_dim] *= self.tp_size
        check_loaded_shape(loaded_weight, shape)
        if split:
            shard = param.size(self.tp_dim)
            loaded_weight = loaded_weight.narrow(self.tp_dim, self.tp_rank * shard, shard)
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, tp_size()), bias, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int):
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        check_loaded_shape(loaded_weight, [self.output_sizes[shard_id], *param.shape[1:]])
        target = param.data.narrow(0, offset, size)
        target.copy_(loaded_weight.chunk(self.tp_size, 0)[self.tp_rank])


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; each rank holds its own heads of all three.

    Output layout per rank: [q heads of this rank | k heads | v heads] * head_dim.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        size = tp_size()
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, size)
        self.num_kv_heads = divide(total_num_kv_heads, size)
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str):
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        check_loaded_shape(loaded_weight, [size * self.tp_size, *param.shape[1:]])
        target = param.data.narrow(0, offset, size)
        target.copy_(loaded_weight.chunk(self.tp_size, 0)[self.tp_rank])


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, tp_size()), output_size, bias, 1)
        self.all_reduce = tp_all_reduce()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the bias is added once, on rank 0, so the all-reduce sums it exactly once
        y = self.packed.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return self.all_reduce(y) if self.all_reduce is not None else y
