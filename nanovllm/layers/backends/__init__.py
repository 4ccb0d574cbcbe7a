"""Attention backends: "torch" (any device), "triton" and "flash_attn" (CUDA). GPU packages load lazily."""
import importlib.util

import torch

from nanovllm.layers.backends.base import AttentionBackend

BACKENDS = ("auto", "torch", "triton", "flash_attn")


def resolve_backend_name(name: str, device: torch.device, kv_cache_dtype: str = "auto") -> str:
    """"auto": triton on CUDA (our paged kernels: on an H200 the 0.6B bench runs 15% faster on them than on
    flash_attn, whose decode read the cache at 83% of the bandwidth against triton's 92%), flash_attn only where
    Triton is missing (and the cache is not fp8); torch elsewhere."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "torch"
    if importlib.util.find_spec("triton") is None and kv_cache_dtype == "auto" \
            and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn"
    return "triton"


def create_backend(name: str, device: torch.device, kv_cache_dtype: str = "auto", block_size: int | None = None,
                   head_dim: int | None = None, dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend `name` names ("auto" resolved), checked against the engine's configuration when it is given
    (block_size, head_dim, dtype): ValueError, naming what it cannot serve, when it cannot."""
    backend = _backend(resolve_backend_name(name, device, kv_cache_dtype), device)
    if block_size is not None:
        backend.check_config(block_size, head_dim, dtype, kv_cache_dtype)
    return backend


def _backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "torch":
        from nanovllm.layers.backends.torch_sdpa import TorchBackend
        return TorchBackend()
    if device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device, got device={device.type!r}; use 'torch'")
    if name == "triton":
        from nanovllm.layers.backends.triton_attn import TritonBackend
        return TritonBackend(device)
    if name == "flash_attn":
        from nanovllm.layers.backends.flash_attn import FlashAttnBackend
        return FlashAttnBackend()
    raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
