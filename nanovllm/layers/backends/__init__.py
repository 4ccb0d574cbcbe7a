"""Attention backends: "torch" (any device), "triton" and "flash_attn" (CUDA). GPU packages load lazily."""
import importlib.util

import torch

from nanovllm.layers.backends.base import AttentionBackend

BACKENDS = ("auto", "torch", "triton", "flash_attn")


def resolve_backend_name(name: str, device: torch.device, kv_cache_dtype: str = "auto") -> str:
    """"auto" picks flash_attn when installed (and the KV cache is not fp8), else triton, on CUDA; torch elsewhere
    (create_backend also turns to triton where flash_attn cannot serve the configuration)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "torch"
    if kv_cache_dtype == "auto" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn"
    return "triton"


def create_backend(name: str, device: torch.device, kv_cache_dtype: str = "auto", block_size: int | None = None,
                   head_dim: int | None = None, dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend `name` names, checked against the engine's configuration when it is given (block_size,
    head_dim, dtype): ValueError when it cannot serve it. "auto" then falls back from flash_attn to triton for what
    flash-attn does not serve (small blocks, other head sizes, float32), as it does for an fp8 cache."""
    chosen = resolve_backend_name(name, device, kv_cache_dtype)
    backend = _backend(chosen, device)
    if block_size is None:
        return backend
    try:
        backend.check_config(block_size, head_dim, dtype, kv_cache_dtype)
    except ValueError:
        if name != "auto" or chosen != "flash_attn":
            raise
        backend = _backend("triton", device)
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
        return TritonBackend()
    if name == "flash_attn":
        from nanovllm.layers.backends.flash_attn import FlashAttnBackend
        return FlashAttnBackend()
    raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
