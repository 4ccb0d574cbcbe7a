"""Sizing and allocating the paged KV cache.

One zeroed allocation holds every layer's keys and values, seen as two tensors [num_layers, num_blocks, block_size,
num_kv_heads, head_dim]; the ModelRunner hands each attention layer its k and v. In memory a block holds its slots
token by token (each token's heads together), or, for a backend that asks (`AttentionBackend.head_major_blocks`),
head by head, so one KV head's keys of a block are one contiguous run; a backend may also ask for key-major values
(`AttentionBackend.key_major_values`): runs of n consecutive slots stored as [num_kv_heads, head_dim, n], seen as
value blocks of n slots (n = block_size: one KV head's values of a block as [head_dim, block_size]):

    v_cache: [num_blocks * block_size // n, n, num_kv_heads, head_dim]     slot s at [s // n, s % n]

The slot numbering is the same as K's, so a store finds V's value block and offset from the slot as it finds K's
block; a reader through a block table finds key i of block b at value block b * (block_size // n) + i // n.
Every other layout is K's shape, as a strided view. An fp8 cache (kv_cache_dtype="fp8_e4m3") takes 1 byte per element,
so the same memory holds twice the tokens of a bf16 one.
"""
import os

import torch
import torch.distributed as dist

from nanovllm.config import Config, head_dim_of
from nanovllm.utils.math import cdiv

CPU_KVCACHE_MAX_BYTES = 1 << 30  # the CPU path is for trying things out; keep its cache modest
CPU_KVCACHE_MAX_SEQS = 16


def block_bytes(config: Config) -> int:
    hf = config.hf_config
    num_kv_heads = hf.num_key_value_heads // config.tensor_parallel_size
    itemsize = torch.empty(0, dtype=config.kv_torch_dtype).element_size()
    return 2 * hf.num_hidden_layers * config.kvcache_block_size * num_kv_heads * head_dim_of(hf) * itemsize


def num_kvcache_blocks(config: Config, device: torch.device, world_size: int) -> int:
    """How many blocks fit: an exact `num_kvcache_blocks` wins; else the GPU's spare memory after warm-up, or
    on the CPU room for a few full-length sequences. Fails when one max_model_len sequence does not fit."""
    per_block = block_bytes(config)
    if config.num_kvcache_blocks > 0:
        wanted = config.num_kvcache_blocks * per_block
        # the CPU's whole memory (unknown: let the allocation tell)
        room = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else \
            _cpu_memory_bytes("SC_PHYS_PAGES", 1 << 62)
        if wanted > room:
            raise ValueError(f"num_kvcache_blocks={config.num_kvcache_blocks} needs {wanted / 2**30:.2f} GiB for the "
                             f"KV cache ({per_block} bytes a block) but the {device.type} has "
                             f"{room / 2**30:.2f} GiB {'free' if device.type == 'cuda' else 'in all'}")
        return config.num_kvcache_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        # memory others hold + our weights, plus room for the warm-up's peak activations
        used = total - free
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        available = int(total * config.gpu_memory_utilization) - used - (peak - current)
    else:
        # room for a few full-length sequences, within a modest budget that still fits one long one,
        # and never more than half the free RAM
        one_seq = cdiv(config.max_model_len, config.kvcache_block_size) * per_block
        seqs = min(config.max_num_seqs, CPU_KVCACHE_MAX_SEQS)
        free = _cpu_memory_bytes("SC_AVPHYS_PAGES", CPU_KVCACHE_MAX_BYTES * 4)
        available = min(one_seq * seqs, max(CPU_KVCACHE_MAX_BYTES, one_seq), free // 2)
    num_blocks = max(available // per_block, 0)
    if world_size > 1:
        t = torch.tensor([num_blocks], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        num_blocks = int(t.item())
    needed = cdiv(config.max_model_len, config.kvcache_block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache cannot hold one max_model_len={config.max_model_len} sequence: it needs {needed} blocks "
            f"({needed * per_block / 2**30:.2f} GiB) but only {num_blocks} blocks "
            f"({max(available, 0) / 2**30:.2f} GiB) are free; lower max_model_len or raise gpu_memory_utilization")
    return num_blocks


def _cpu_memory_bytes(pages: str, unknown: int) -> int:
    """The CPU's memory from sysconf: SC_PHYS_PAGES (all of it) or SC_AVPHYS_PAGES (free now); `unknown` where
    the system cannot say."""
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return unknown


def allocate_kv_cache(config: Config, num_blocks: int, device: torch.device, head_major: bool = False,
                      key_major_values: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_caches, v_caches), each [num_layers, num_blocks, block_size, num_kv_heads, head_dim]. Within a block:
    slot-major ([block_size, num_kv_heads, head_dim]) by default; head_major: [num_kv_heads, block_size, head_dim].
    key_major_values = n (a divisor of block_size; 0: V laid out as K): V in runs of n slots, each stored as
    [num_kv_heads, head_dim, n] and seen as [num_layers, num_blocks * block_size // n, n, num_kv_heads, head_dim].
    Non-default layouts are strided views."""
    hf = config.hf_config
    sizes = {"slot": config.kvcache_block_size, "head": hf.num_key_value_heads // config.tensor_parallel_size,
             "dim": head_dim_of(hf)}
    # zeros, not empty: masked-out cache entries still enter P @ V, and 0 * NaN garbage would be NaN; an fp8
    # cache relies on it (it never holds a NaN, see kv_quant)
    cache = torch.zeros(2, hf.num_hidden_layers, num_blocks, sizes["slot"] * sizes["head"] * sizes["dim"],
                        dtype=config.kv_torch_dtype, device=device)

    def view(part: torch.Tensor, order: tuple[str, str, str]) -> torch.Tensor:
        # `order`: the block's dimensions as laid out in memory, outermost first
        stored = part.view(hf.num_hidden_layers, num_blocks, *(sizes[d] for d in order))
        return stored.permute(0, 1, *(2 + order.index(d) for d in ("slot", "head", "dim")))

    keys = ("head", "slot", "dim") if head_major else ("slot", "head", "dim")
    if not key_major_values:
        return view(cache[0], keys), view(cache[1], keys)
    run = key_major_values
    if sizes["slot"] % run:
        raise ValueError(f"key_major_values={run} must divide kvcache_block_size={sizes['slot']}")
    runs = cache[1].view(hf.num_hidden_layers, num_blocks * sizes["slot"] // run, sizes["head"], sizes["dim"], run)
    return view(cache[0], keys), runs.permute(0, 1, 4, 2, 3)
