"""Scales of an fp8 KV cache, from one calibration prefill at start-up (before the cache exists).

Every Attention layer records the largest |K| (as rotated) and |V| per KV head over a prefill of seeded random
tokens; each scale is then the power of two that leaves that maximum a headroom below e4m3's 448 (see
kv_quant). Random tokens are enough: on Qwen2.5-0.5B chat prompts reached at most 2.4x their per-head maxima,
well inside the headroom, and a value past it saturates rather than turning into NaN.
"""
from collections.abc import Callable

import torch

from nanovllm.layers.attention import Attention
from nanovllm.layers.kv_quant import KVScales, scales_from_amax

CALIBRATION_TOKENS = 256
CALIBRATION_SEED = 0


def calibration_token_ids(vocab_size: int, max_model_len: int) -> list[int]:
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    return torch.randint(vocab_size, (min(CALIBRATION_TOKENS, max_model_len),), generator=gen).tolist()


def calibrate_kv_scales(layers: list[Attention], run_prefill: Callable[[], object]) -> list[KVScales]:
    """One KVScales per layer, from the K/V that `run_prefill` feeds them."""
    amax: dict[Attention, list[torch.Tensor]] = {}

    def observer(module: Attention) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def observe(k: torch.Tensor, v: torch.Tensor) -> None:  # [num_tokens, num_kv_heads, head_dim]
            seen = [x.detach().abs().amax(dim=(0, 2)).float() for x in (k, v)]
            amax[module] = [torch.maximum(a, b) for a, b in zip(amax[module], seen)] if module in amax else seen
        return observe

    for m in layers:
        m.observe_kv = observer(m)
    try:
        run_prefill()
    finally:
        for m in layers:
            m.observe_kv = None
    return [KVScales(scales_from_amax(amax[m][0]), scales_from_amax(amax[m][1])) for m in layers]
