"""The fp8 (e4m3) KV cache: per-(layer, KV head) scales, and the PyTorch reference of writing and reading it.

    stored = fp8(clamp(x / scale, -448, 448))          read = stored * scale

A NaN is stored as 0: with the cache allocated zeroed, an fp8 cache never holds a NaN, so a kernel may read the
slots of a block past a sequence's end (an earlier owner's values) and give them zero weight without masking
them (0 * v is 0 for every finite v; the triton backend's decode kernel reads key-major V tiles so). A NaN in
K or V means the model's hidden state is NaN already, so its sequence's output is NaN either way.

Scales are powers of two: dividing by one is exact, so every path (torch, Triton, fresh keys or cached ones)
stores the same bytes, and a scale only moves e4m3's fixed window (15 binades with 3 mantissa bits, 3 more
subnormal) to where a head's values live. One scale per (layer, KV head): heads of one layer differ by up
to 16x, a kernel program reads one KV head and so one scalar, and the scales shard with the heads under tensor
parallelism, so no rank needs another's statistics.
"""
import math
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448; larger values saturate instead of becoming NaN
# calibration's amax sits 8-16x below FP8_MAX: real text reached 2.4x the amax of random calibration tokens on
# Qwen2.5-0.5B, and values down to 2^-11 of amax still get all 3 mantissa bits
HEADROOM = 8.0
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8")  # "fp8" is vLLM's alias of fp8_e4m3


@dataclass(slots=True)
class KVScales:
    """One layer's dequantisation scales, float32 [num_kv_heads] on the cache's device."""
    k: torch.Tensor
    v: torch.Tensor


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two with amax * HEADROOM / scale <= FP8_MAX, per head (1.0 for a head never seen)."""
    exps = [math.ceil(math.log2(a * HEADROOM / FP8_MAX)) if a > 0 and math.isfinite(a) else 0
            for a in amax.tolist()]
    return torch.tensor([2.0 ** e for e in exps], dtype=torch.float32, device=amax.device)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., num_kv_heads, head_dim]; scale: [num_kv_heads]. Saturates at +-FP8_MAX; NaN -> 0."""
    return (x.float() / scale[:, None]).nan_to_num(nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact in float32 and bfloat16 (an e4m3 value times a power of two)."""
    return (x.float() * scale[:, None]).to(dtype)


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the fp8 cache returns for x: fresh keys are attended as the cached ones would be."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)
