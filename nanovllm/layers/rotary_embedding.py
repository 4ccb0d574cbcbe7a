from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.backends.torch_sdpa import store_kvcache
from nanovllm.layers.kv_quant import KVScales
from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.utils.kernels import fused_kernel


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim // 2] (halves layout, as in HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@fused_kernel("fused", "rope", cpu=True)
def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
         sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_cache[positions], sin_cache[positions]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@fused_kernel("fused", "norm_rope", cpu=True)
def _norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
               k_weight: torch.Tensor, eps: float, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rms_norm.reference(q, q_weight, eps), rms_norm.reference(k, k_weight, eps)
    return rope.reference(positions, q, k, cos_cache, sin_cache)


@fused_kernel("fused", "rope_store", cpu=True)
def _rope_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cos_cache: torch.Tensor,
                sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm and) rope, then the rotated k and v written to their cache slots: one kernel on CUDA."""
    if q_weight is None:
        q, k = rope.reference(positions, q, k, cos_cache, sin_cache)
    else:
        q, k = _norm_rope.reference(positions, q, k, q_weight, k_weight, eps, cos_cache, sin_cache)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping, None if k_scale is None else KVScales(k_scale, v_scale))
    return q, k


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """The plain rotary embedding's inverse frequencies, float32 [head_dim // 2]."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_parameters(config: PretrainedConfig) -> tuple[dict, str]:
    """(the config's rope parameters, their rope_type): transformers 5's rope_parameters or 4's rope_scaling."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params, params.get("rope_type", params.get("type", "default"))


def rope_tables(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin scaling) of the model's rotary embedding, as transformers builds them.

    Scaled embeddings (linear, YaRN, llama3, ...) come from transformers' own ROPE_INIT_FUNCTIONS. "dynamic" NTK
    scaling keeps those frequencies up to max_position_embeddings, past which max_model_len never goes (see
    rope_context_length). "longrope" switches its frequencies on the longest sequence of a batch, which a
    per-sequence engine cannot follow."""
    params, rope_type = rope_parameters(config)
    if rope_type == "default":
        return default_inv_freq(head_dim, params.get("rope_theta", getattr(config, "rope_theta", 10000.0))), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    supported = sorted({"default"} | set(ROPE_INIT_FUNCTIONS) - {"longrope"})
    if rope_type not in supported:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {supported}")
    try:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    except Exception as e:  # parameters transformers cannot build tables from (missing, wrong types)
        raise ValueError(f"rope_type {rope_type!r} with parameters {params} cannot be built: {e!r}") from e
    if inv_freq.numel() != head_dim // 2:
        raise ValueError(f"rope_type {rope_type!r} rotates {2 * inv_freq.numel()} of the head's {head_dim} "
                         f"dimensions: a partial rotary embedding is not supported")
    return inv_freq, float(scaling)


def rope_context_length(config: PretrainedConfig) -> tuple[int, str]:
    """(the longest context the model's positions may reach, where that figure comes from), as vLLM derives it:
    max_position_embeddings, times the factor of a linear scaling, or YaRN's original_max_position_embeddings
    times its factor (Qwen3's 32,768 x 4 = 131,072). Other types keep max_position_embeddings: llama3's is the
    scaled length already, and dynamic NTK would change its frequencies past it (transformers does, per batch)."""
    limit = config.max_position_embeddings
    params, rope_type = rope_parameters(config)
    if rope_type == "linear":
        scaled = int(limit * params["factor"])
        return scaled, f"max_position_embeddings={limit} x its linear rope factor {params['factor']} = {scaled}"
    if rope_type == "yarn":
        original = params.get("original_max_position_embeddings") or limit
        scaled = max(limit, int(original * params["factor"]))
        return scaled, (f"context of {scaled} (YaRN: original_max_position_embeddings={original} x factor "
                        f"{params['factor']}; max_position_embeddings={limit})")
    return limit, f"max_position_embeddings={limit}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0 .. max_position - 1 from inverse frequencies (float32 [head_dim // 2]);
    `scaling` multiplies both (YaRN's attention factor; 1 for the plain embedding)."""

    def __init__(self, inv_freq: torch.Tensor, max_position: int, dtype: torch.dtype, scaling: float = 1.0):
        super().__init__()
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq.float())
        # like HF: computed and scaled in float32, used in the model dtype
        self.register_buffer("cos_cache", (freqs.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * scaling).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim], k likewise."""
        return rope(positions, q, k, self.cos_cache, self.sin_cache)


def norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
              rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary(q_norm(q), k_norm(k)) in one kernel, not six: Qwen3's per-head q/k norm."""
    return _norm_rope(positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps, rotary.cos_cache,
                      rotary.sin_cache)


@dataclass(slots=True)
class QKRotation:
    """What turns a layer's projected q and k into the attended ones: Qwen3's per-head RMSNorm (norms set) and
    the rotary embedding at `positions`. The attention layer applies it, so that a backend can rotate k and
    write it to the KV cache in one pass (`rotate_and_store`)."""
    positions: torch.Tensor
    rotary: RotaryEmbedding
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return self.rotary(self.positions, q, k)
        return norm_rope(self.positions, q, k, self.q_norm, self.k_norm, self.rotary)

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         kv_scales: KVScales | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated (q, k), with k and v written to the cache slots as TorchBackend.store_kvcache would."""
        norm = self.q_norm is not None
        return _rope_store(self.positions, q, k, v, self.q_norm.weight if norm else None,
                           self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0,
                           self.rotary.cos_cache, self.rotary.sin_cache, k_cache, v_cache, slot_mapping,
                           *((kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)))
