"""Tensor-parallel rank information for layers under construction.

The ModelRunner builds the model inside `tensor_parallel(rank, size)`; each layer reads its rank and the
world size once, in __init__, and keeps them. Outside that block the world is one rank, whatever process
group the user's program may have set up for itself.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPInfo:
    rank: int = 0
    size: int = 1


_TP: ContextVar[TPInfo] = ContextVar("nanovllm_tensor_parallel", default=TPInfo())


@contextmanager
def tensor_parallel(rank: int, size: int):
    token = _TP.set(TPInfo(rank, size))
    try:
        yield
    finally:
        _TP.reset(token)


def tp_rank() -> int:
    return _TP.get().rank


def tp_size() -> int:
    return _TP.get().size


def all_reduce(x: torch.Tensor, size: int) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(x)
    return x
