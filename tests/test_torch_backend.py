"""The pure-PyTorch backend on the CPU: its fast paths against the plain reference, both against textbook math.

float32, tiny shapes: random caches, shuffled block tables, GQA groups 1/2/7, lengths on and around block edges,
chunked prefill after a cached prefix.
"""
import pytest
import torch

from nanovllm.layers.backends.torch_sdpa import TorchBackend, grouped_decode, reference_decode, reference_prefill
from test_kernels import decode_case, fill_stale_slots, fp8_scales, prefill_case, with_fp8_cache

SCALE = 0.3
HEADS = [(4, 4), (4, 2), (14, 2)]  # query heads, KV heads: groups of 1, 2 and 7
MIXED_LENS = [1, 15, 16, 17, 40, 64, 3, 33, 48, 31]  # block size 16: 1..4 blocks, full and partial last blocks


def textbook_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 softmax(q k^T) v, bottom-right causal; q: [q_len, heads, dim], k, v: [k_len, kv_heads, dim]."""
    q_len, k_len = q.size(0), k.size(0)
    group = q.size(1) // k.size(1)
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def cached_keys(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    return cache[table[table >= 0].long()].flatten(0, 1)[:n]


def textbook_decode(q, k_cache, v_cache, ctx, scale) -> torch.Tensor:
    rows = []
    for i, n in enumerate(ctx.context_lens.tolist()):
        k, v = cached_keys(k_cache, ctx.block_tables[i], n), cached_keys(v_cache, ctx.block_tables[i], n)
        rows.append(textbook_attention(q[i:i + 1], k, v, scale))
    return torch.cat(rows)


def textbook_prefill(q, k, v, k_cache, v_cache, ctx, scale) -> torch.Tensor:
    cu_q, cu_k = ctx.cu_seqlens_q.tolist(), ctx.cu_seqlens_k.tolist()
    rows = []
    for i in range(len(cu_q) - 1):
        q0, q1, n = cu_q[i], cu_q[i + 1], cu_k[i + 1] - cu_k[i]
        if ctx.block_tables is None:
            ki, vi = k[q0:q1], v[q0:q1]
        else:
            ki, vi = cached_keys(k_cache, ctx.block_tables[i], n), cached_keys(v_cache, ctx.block_tables[i], n)
        rows.append(textbook_attention(q[q0:q1], ki, vi, scale))
    return torch.cat(rows)


def test_textbook_attention_sees_only_earlier_keys():
    q, k, v = torch.randn(2, 1, 4), torch.randn(3, 1, 4), torch.eye(3, 4)[:, None, :]
    out = textbook_attention(q, k, v, 1.0)
    # the first query sits at position 1 (bottom-right): no weight on key 2, so value row 2 contributes nothing
    assert out[0, 0, 2].item() == 0.0 and out[1, 0, 2].item() > 0.0


@pytest.mark.parametrize("num_heads, num_kv_heads", HEADS)
@pytest.mark.parametrize("lens", [MIXED_LENS, [40] * 5, [1], [16, 32, 48]])
def test_grouped_decode_equals_reference(num_heads, num_kv_heads, lens):
    q, k_cache, v_cache, ctx = decode_case(lens, 16, num_heads, num_kv_heads, 8, torch.float32, "cpu", seed=1,
                                           extra_width=2)
    fast = grouped_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, SCALE)
    torch.testing.assert_close(fast, reference_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables,
                                                      SCALE))
    torch.testing.assert_close(fast, textbook_decode(q, k_cache, v_cache, ctx, SCALE))


def test_grouped_decode_leaves_rows_without_context_zero():
    q, k_cache, v_cache, ctx = decode_case([20, 5, 20], 16, 4, 2, 8, torch.float32, "cpu")
    ctx.context_lens[1] = 0
    out = grouped_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, SCALE)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[[0, 2]], textbook_decode(q[[0, 2]], k_cache, v_cache,
                                                            type(ctx)(context_lens=ctx.context_lens[[0, 2]],
                                                                      block_tables=ctx.block_tables[[0, 2]]), SCALE))



@pytest.mark.parametrize("fp8", [False, True])
def test_decode_ignores_what_stale_slots_hold(fp8):
    """The slots past each sequence's keys (the rest of its last block, other blocks) hold what a block's earlier
    owner wrote, NaN included in a float cache (fill_stale_slots): neither decode may let it through its mask."""
    case = decode_case(MIXED_LENS, 16, 14, 2, 8, torch.float32, "cpu", seed=5, extra_width=2)
    scales = fp8_scales(2, "cpu") if fp8 else None
    if fp8:
        case = with_fp8_cache(case, scales)
    q, k_cache, v_cache, ctx = case
    args = (ctx.context_lens, ctx.block_tables, SCALE, scales)
    clean = grouped_decode(q, k_cache, v_cache, *args), reference_decode(q, k_cache, v_cache, *args)
    fill_stale_slots(k_cache, v_cache, ctx)
    for fn, expected in zip((grouped_decode, reference_decode), clean):
        out = fn(q, k_cache, v_cache, *args)
        assert not out.isnan().any(), fn.__name__
        torch.testing.assert_close(out, expected, atol=0, rtol=0)

@pytest.mark.parametrize("num_heads, num_kv_heads", HEADS)
def test_backend_decode_on_cpu_equals_textbook(num_heads, num_kv_heads):
    case = decode_case(MIXED_LENS, 16, num_heads, num_kv_heads, 8, torch.float32, "cpu", seed=2)
    torch.testing.assert_close(TorchBackend().decode(*case, SCALE), textbook_decode(*case, SCALE))


def test_one_decode_plan_serves_every_layer_of_a_step():
    """The backend plans a step's gather at its first layer and reuses it: a second layer (other cache, other
    queries) under the same context still attends to its own keys."""
    q, k_cache, v_cache, ctx = decode_case(MIXED_LENS, 16, 14, 2, 8, torch.float32, "cpu", seed=3)
    q2, k_cache2, v_cache2, _ = decode_case(MIXED_LENS, 16, 14, 2, 8, torch.float32, "cpu", seed=4)
    backend = TorchBackend()
    first = backend.decode(q, k_cache, v_cache, ctx, SCALE)
    assert ctx.plan is not None
    second = backend.decode(q2, k_cache2, v_cache2, ctx, SCALE)
    torch.testing.assert_close(first, textbook_decode(q, k_cache, v_cache, ctx, SCALE))
    torch.testing.assert_close(second, textbook_decode(q2, k_cache2, v_cache2, ctx, SCALE))


@pytest.mark.parametrize("num_heads, num_kv_heads", HEADS)
@pytest.mark.parametrize("q_lens, k_lens, paged", [
    ([5, 17, 1, 40, 16], [5, 17, 1, 40, 16], False),  # plain prompts
    ([5, 17, 1, 40, 16], [5, 17, 1, 40, 16], True),  # the same, keys read back from the cache
    ([1, 17, 33, 5, 20], [5, 40, 33, 70, 20], True),  # cached prefixes, chunks, one-token chunks
])
def test_backend_prefill_equals_textbook(num_heads, num_kv_heads, q_lens, k_lens, paged):
    case = prefill_case(q_lens, k_lens, 16, num_heads, num_kv_heads, 8, torch.float32, "cpu", paged, seed=3)
    expect = textbook_prefill(*case, SCALE)
    torch.testing.assert_close(TorchBackend().prefill(*case, SCALE), expect)
    torch.testing.assert_close(reference_prefill(*case, SCALE), expect)


@pytest.mark.parametrize("padded", [False, True], ids=["every-token", "with-padding"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_store_kvcache_on_cpu_writes_each_token_to_its_slot(padded, fp8):
    """Every token lands in its slot and nothing else changes; slot -1 (a padded token) is skipped. Covers both
    CPU paths: index_copy_ when every token is stored, the masked one when some are padding."""
    from nanovllm.layers.kv_quant import KVScales, quantize_fp8
    torch.manual_seed(0)
    num_blocks, block, kv_heads, dim, tokens = 6, 16, 2, 8, 11
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    k_cache = torch.randn(num_blocks, block, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim).to(dtype)
    k, v = torch.randn(tokens, kv_heads, dim).bfloat16(), torch.randn(tokens, kv_heads, dim).bfloat16()
    slots = torch.randperm(num_blocks * block)[:tokens].int()
    if padded:
        slots[[2, 7]] = -1
    scales = KVScales(torch.full((kv_heads,), 0.5), torch.full((kv_heads,), 2.0)) if fp8 else None
    expect_k, expect_v = k_cache.clone().flatten(0, 1), v_cache.clone().flatten(0, 1)
    stored_k = quantize_fp8(k, scales.k) if fp8 else k
    stored_v = quantize_fp8(v, scales.v) if fp8 else v
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expect_k[slot], expect_v[slot] = stored_k[t], stored_v[t]
    TorchBackend().store_kvcache(k, v, k_cache, v_cache, slots, scales)
    assert torch.equal(k_cache.flatten(0, 1).view(torch.uint8), expect_k.view(torch.uint8))
    assert torch.equal(v_cache.flatten(0, 1).view(torch.uint8), expect_v.view(torch.uint8))
