"""Tensor-parallel rank information and the all-reduce for layers under construction.

The ModelRunner builds the model inside `tensor_parallel(rank, size, all_reduce)`; each layer reads its rank, the
world size and the all-reduce once, in __init__, and keeps them. Outside that block the world is one rank, whatever
process group the user's program may have set up for itself.

With disable_custom_all_reduce=False a CUDA group sums decode-sized messages (batch x hidden) with torch's kernels
over CUDA symmetric memory, as vLLM's custom all-reduce does: every rank copies its part into a buffer that all
peers can address and reads theirs over NVLink, instead of NCCL's ring of steps. Larger messages, float16, and
groups whose GPUs cannot reach each other directly go through NCCL.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist

# On two H200s (benchmarks/all_reduce.py, bf16, CUDA graphs): NCCL takes 12 us at 8 KiB, 32 us at 2 MiB, 80 us at
# 16 MiB; the one-shot kernel 7 / 22 / 134 us, the two-shot 8 / 15 / 64 us. One-shot up to 128 KiB, two-shot up to
# 16 MiB (a decode step's messages), NCCL past that (prefill chunks).
ONE_SHOT_MAX_BYTES = 128 << 10
SYMM_MEM_MAX_BYTES = 16 << 20
SYMM_MEM_DTYPES = (torch.bfloat16, torch.float32)  # what torch's symmetric-memory kernels are built for


class AllReduce:
    """Sums a tensor over the process group in place through torch.distributed (NCCL on CUDA, gloo on CPU).
    why_not_custom: why a CUDA group does not use SymmMemAllReduce (for the start-up line)."""

    def __init__(self, why_not_custom: str = ""):
        self.why_not_custom = why_not_custom

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def describe(self) -> str:
        why = f" (not over symmetric memory: {self.why_not_custom})" if self.why_not_custom else ""
        return f"all-reduce {dist.get_backend()}{why}"


class SymmMemAllReduce(AllReduce):
    """All-reduce over CUDA symmetric memory (buffers every rank can address over NVLink) for messages of up to
    `capacity` elements of `dtype`; NCCL for the rest.

    Small messages: torch's one-shot kernel copies this rank's part into its buffer, meets the peers at a barrier
    and sums every rank's buffer in rank order. Larger ones: the two-shot kernel, where each rank sums one slice of
    the buffers and hands it to the others (half the bytes read per rank). Either way one rounding per element, in
    the same order on every rank, so all ranks hold the same bits; and the kernels meet the peers again before they
    return, so the next call may overwrite the buffer. Both are captured in the CUDA graphs like any other kernel.
    Every rank takes the same path for a given shape and dtype, which is what keeps the ranks in step.
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem
        super().__init__()
        self.dtype = dtype
        self.capacity = capacity
        self.one_shot_max = ONE_SHOT_MAX_BYTES // dtype.itemsize
        self.world_size = dist.get_world_size()
        self.buffer = symm_mem.empty(capacity, dtype=dtype, device=device)
        self.group_name = dist.group.WORLD.group_name
        if not _SYMM_MEM_GROUP:
            _SYMM_MEM_GROUP.append(dist.group.WORLD)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective: every rank maps the others' buffers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        if x.dtype != self.dtype or n > self.capacity:
            return super().__call__(x)
        if not x.is_contiguous() or x.data_ptr() % 16:  # the kernels copy in 16-byte vectors, like the buffer's
            x = x.clone(memory_format=torch.contiguous_format)
        buffer = self.buffer[:n]
        if n <= self.one_shot_max or n * x.element_size() % (16 * self.world_size):
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(buffer, x.view(-1), "sum", self.group_name)
            return out.view(x.shape)
        buffer.copy_(x.view(-1))
        out = torch.empty_like(x)
        torch.ops.symm_mem.two_shot_all_reduce_out(buffer, "sum", self.group_name, out.view(-1))
        return out

    def describe(self) -> str:
        size = self.buffer.element_size()
        kernels = f"one-shot up to {min(self.one_shot_max, self.capacity) * size >> 10} KiB"
        if self.capacity > self.one_shot_max:
            kernels += f", two-shot up to {self.capacity * size >> 10} KiB"
        return f"all-reduce over symmetric memory ({kernels}), {dist.get_backend()} above"


# torch numbers the store keys of a symmetric-memory rendezvous with a per-process counter, so a process can only
# ever meet the ranks of one process group: a later engine's freshly spawned workers start counting at zero and the
# rendezvous would wait forever. The group this process's symmetric memory has met under:
_SYMM_MEM_GROUP: list = []


# what an aborted engine's rank left behind on the device (see abandon)
_ABANDONED: list = []


def abandon(*objects):
    """Keep `objects` alive until the process exits. A kernel of torch's symmetric-memory all-reduce whose peer
    died waits for it forever (its barriers have no timeout), and freeing symmetric memory first waits for the
    device: an aborted engine's graphs, weights, cache and buffers stay allocated instead of hanging the caller."""
    _ABANDONED.append(objects)


def create_all_reduce(world_size: int, device: torch.device, dtype: torch.dtype, max_tokens: int, hidden_size: int,
                      custom: bool) -> AllReduce | None:
    """The group's all-reduce: over symmetric memory where asked for and every rank can use it, else through
    torch.distributed. Collective: every rank of the group calls it at the same point of its start-up."""
    if world_size == 1:
        return None
    if device.type != "cuda":
        return AllReduce()
    if not custom:  # the same config on every rank: nothing to agree on
        return AllReduce("disable_custom_all_reduce=True")
    why = _why_not_custom(device, dtype, world_size)
    if not _every_rank(not why, device):
        return AllReduce(why or "another rank cannot use it")
    capacity = min(max_tokens * hidden_size, SYMM_MEM_MAX_BYTES // dtype.itemsize)
    return SymmMemAllReduce(capacity, dtype, device)


def _why_not_custom(device: torch.device, dtype: torch.dtype, world_size: int) -> str:
    if dtype not in SYMM_MEM_DTYPES:
        return f"torch's kernel has no {dtype}"
    if _SYMM_MEM_GROUP and _SYMM_MEM_GROUP[0] is not dist.group.WORLD:
        return "an earlier engine in this process set up symmetric memory, which torch can do once per process"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return "this torch has no symmetric memory"
    if not all(torch.cuda.can_device_access_peer(device.index, peer) for peer in range(world_size)
               if peer != device.index):
        return "the GPUs cannot address each other's memory"
    return ""


def _every_rank(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass(frozen=True, slots=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    all_reduce: AllReduce | None = None


_TP: ContextVar[TPInfo] = ContextVar("nanovllm_tensor_parallel", default=TPInfo())


@contextmanager
def tensor_parallel(rank: int, size: int, all_reduce: AllReduce | None = None):
    token = _TP.set(TPInfo(rank, size, all_reduce if all_reduce is not None or size == 1 else AllReduce()))
    try:
        yield
    finally:
        _TP.reset(token)


def tp_rank() -> int:
    return _TP.get().rank


def tp_size() -> int:
    return _TP.get().size


def tp_all_reduce() -> AllReduce | None:
    """The all-reduce of the group the layer under construction belongs to; None for one rank."""
    return _TP.get().all_reduce
