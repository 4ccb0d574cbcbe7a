"""The native CPU kernels (kernels/cpu.py) against the PyTorch functions they replace.

The element-wise kernels round where the PyTorch ops round, so they must give the same bits (NaN where it gives
NaN); where a reduction comes first (an RMSNorm's mean of squares, summed in another order), a value may sit one
or two bf16 steps off where the sum's last bit tips a rounding, rarely. Decode attention sums in another order,
so it is held to the bf16 PyTorch path's own error against a float64 reference. Shapes with tails (widths not a
multiple of 32), strided views like the qkv projection's, -1 slots, empty rows and several blocks per sequence.
Skipped only where the kernels cannot exist here (not x86-64 with AVX-512, or no C compiler); where they can,
failing to build them fails.
"""
import pytest
import torch

from conftest import OTHER_SHAPES, generate_twice, make_model, next_token_logits, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.kernels import cpu
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.backends.torch_sdpa import TorchBackend, grouped_decode, reference_prefill
from nanovllm.layers.layernorm import add_rms_norm, rms_norm
from nanovllm.layers.rotary_embedding import RotaryEmbedding, _norm_rope, _rope_store, default_inv_freq, rope
from nanovllm.layers.sampler import _greedy
from nanovllm.utils.kernels import fused_kernels
from test_kernels import decode_case, prefill_case
from test_torch_backend import textbook_decode, textbook_prefill

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None,
                                reason=f"no CPU kernels here: {cpu.unavailable_reason()}")
BF16 = torch.bfloat16


def same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0).view(torch.int16), b.nan_to_num(0.0).view(torch.int16)), \
        f"{(a != b).sum().item()} of {a.numel()} values differ"


def nearly_same_bits(a: torch.Tensor, b: torch.Tensor):
    """Equal but for rare values a bf16 step or two apart (a reduction summed in another order, then the weight)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    differ = a != b
    assert differ.float().mean() < 0.01, f"{differ.sum().item()} of {a.numel()} values differ"
    step = b.float().abs() * 2.0 ** -7  # bf16 keeps 8 significant bits: one step is at most this
    assert ((a.float() - b.float()).abs() <= 2 * step)[differ].all()


def randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def test_library_builds_where_it_can():
    assert cpu.library() is not None


@pytest.mark.parametrize("cols", [896, 100, 31, 4096])
@pytest.mark.parametrize("rows", [1, 37])
def test_rms_norm_same_bits(rows, cols):
    x = randn(rows, cols + 5, seed=1)[:, 3:cols + 3]  # a strided view
    residual, weight = randn(rows, cols, seed=2), randn(cols, seed=3)
    nearly_same_bits(cpu.rms_norm(x, weight, 1e-6), rms_norm.reference(x, weight, 1e-6))
    out, res = cpu.add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_res = add_rms_norm.reference(x, residual, weight, 1e-5)
    nearly_same_bits(out, ref_out)
    same_bits(res, ref_res)  # the residual add has no reduction


@pytest.mark.parametrize("d", [4864, 50, 32])
def test_silu_and_mul_same_bits(d):
    x = randn(9, 2 * d, seed=4, scale=4.0)
    same_bits(cpu.silu_and_mul(x), silu_and_mul.reference(x))
    view = randn(5, 2 * d + 8, seed=5)[:, 8:]
    same_bits(cpu.silu_and_mul(view), silu_and_mul.reference(view))


def test_silu_and_mul_special_values():
    gate = torch.tensor([float("inf"), float("-inf"), float("nan"), 100.0, -100.0, 0.0, -0.0, 1.0,
                         -88.0, 88.0, 1e-30, -3.0] + [0.5] * 20)
    x = torch.cat([gate, torch.linspace(-2, 2, gate.numel())])[None].to(BF16)
    same_bits(cpu.silu_and_mul(x), silu_and_mul.reference(x))


def rope_inputs(tokens, heads, kv_heads, head_dim, seed=0):
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=seed)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    positions = torch.randint(0, 300, (tokens,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    rotary = RotaryEmbedding(default_inv_freq(head_dim, 10000.0), 512, BF16)  # the model's own bf16 tables
    return positions, q, k, v, rotary.cos_cache, rotary.sin_cache


@pytest.mark.parametrize("head_dim", [64, 128, 48])
@pytest.mark.parametrize("heads, kv_heads", [(14, 2), (4, 4)])
def test_rope_and_norm_rope_same_bits(head_dim, heads, kv_heads):
    positions, q, k, _, cos, sin = rope_inputs(13, heads, kv_heads, head_dim)
    for got, ref in zip(cpu.rope(positions, q, k, cos, sin), rope.reference(positions, q, k, cos, sin)):
        same_bits(got, ref)
    qw, kw = randn(head_dim, seed=7), randn(head_dim, seed=8)
    got = cpu.norm_rope(positions, q, k, qw, kw, 1e-6, cos, sin)
    for a, b in zip(got, _norm_rope.reference(positions, q, k, qw, kw, 1e-6, cos, sin)):
        nearly_same_bits(a, b)


@pytest.mark.parametrize("norm", [False, True])
def test_rope_store_same_bits_and_cache(norm):
    heads, kv_heads, head_dim, tokens = 14, 2, 64, 21
    positions, q, k, v, cos, sin = rope_inputs(tokens, heads, kv_heads, head_dim, seed=3)
    qw, kw = (randn(head_dim, seed=7), randn(head_dim, seed=8)) if norm else (None, None)
    caches = [randn(8, 16, kv_heads, head_dim, seed=s) for s in (10, 11)]
    ref_caches = [c.clone() for c in caches]
    slots = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:tokens].to(torch.int32)
    slots[::4] = -1  # not stored
    got = cpu.rope_store(positions, q, k, v, qw, kw, 1e-6, cos, sin, *caches, slots, None, None)
    ref = _rope_store.reference(positions, q, k, v, qw, kw, 1e-6, cos, sin, *ref_caches, slots, None, None)
    for a, b in zip(got + tuple(caches), ref + tuple(ref_caches)):
        (nearly_same_bits if norm else same_bits)(a, b)


def error_against_float64(got: torch.Tensor, pytorch: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    return (got.double() - exact).abs().max().item(), (pytorch.double() - exact).abs().max().item()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (14, 2), (16, 1)])  # (16, 1): not a specialised group
@pytest.mark.parametrize("head_dim, block_size", [(64, 16), (128, 32), (64, 256), (256, 16)])
def test_decode_attention_error_as_pytorch(heads, kv_heads, head_dim, block_size):
    lens = [1, 15, 16, 17, 40, 64, 3, 33, 0, 300]
    q, k_cache, v_cache, ctx = decode_case(lens, block_size, heads, kv_heads, head_dim, BF16, "cpu", extra_width=2)
    got = cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125)
    with_keys = torch.tensor(lens) > 0
    assert torch.equal(got[~with_keys], torch.zeros_like(got[~with_keys]))  # a row without keys: zeros
    exact = textbook_decode(q.double()[with_keys], k_cache.double(), v_cache.double(),
                            type(ctx)(False, context_lens=ctx.context_lens[with_keys],
                                      block_tables=ctx.block_tables[with_keys]), 0.125)
    pytorch = grouped_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125)
    err, pytorch_err = error_against_float64(got[with_keys], pytorch[with_keys], exact)
    assert err <= max(1.5 * pytorch_err, 4e-3), (err, pytorch_err)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (14, 2), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_lens, k_lens, paged", [
    ([5, 17, 1, 40, 16, 150], [5, 17, 1, 40, 16, 150], False),  # plain prompts, keys from the new tokens
    ([5, 17, 1, 40, 16], [5, 17, 1, 40, 16], True),  # the same, keys read back from the cache
    ([1, 17, 33, 5, 20], [5, 40, 33, 70, 20], True),  # cached prefixes, chunks, one-token chunks
])
def test_prefill_attention_error_as_pytorch(heads, kv_heads, head_dim, q_lens, k_lens, paged):
    q, k, v, k_cache, v_cache, ctx = prefill_case(q_lens, k_lens, 16, heads, kv_heads, head_dim, BF16, "cpu",
                                                  paged, seed=3)
    fused = torch.cat([k, v], 1)  # k, v as views of one tensor, as the qkv projection gives them
    k, v = fused[:, :kv_heads], fused[:, kv_heads:]
    got = cpu.prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.block_tables,
                                0.125)
    exact = textbook_prefill(q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), ctx, 0.125)
    err, pytorch_err = error_against_float64(got, reference_prefill(q, k, v, k_cache, v_cache, ctx, 0.125), exact)
    assert err <= max(1.5 * pytorch_err, 4e-3), (err, pytorch_err)
    assert torch.equal(TorchBackend().prefill(q, k, v, k_cache, v_cache, ctx, 0.125), got)


def test_attention_with_a_nan_key_is_nan_as_pytorch():
    """A NaN key makes the heads that see it NaN, as in PyTorch (the kernels used to leave that key out and give a
    finite answer)."""
    value = float("nan")
    q, k_cache, v_cache, ctx = decode_case([20, 40], 16, 4, 2, 64, BF16, "cpu")
    k_cache[ctx.block_tables[0, 0], 3, 0] = value  # a visible key of sequence 0, KV head 0
    got = cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125)
    pytorch = grouped_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125)
    assert torch.equal(got.isnan(), pytorch.isnan()) and got.isnan().any()
    q, k, v, k_cache, v_cache, ctx = prefill_case([5, 17], [5, 40], 16, 4, 2, 64, BF16, "cpu", True, seed=3)
    k_cache[ctx.block_tables[1, 0], 2, 1] = value  # a cached key of sequence 1, KV head 1
    got = cpu.prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.block_tables,
                                0.125)
    pytorch = reference_prefill(q, k, v, k_cache, v_cache, ctx, 0.125)
    assert torch.equal(got.isnan(), pytorch.isnan()) and got.isnan().any()


@pytest.mark.parametrize("threads", [1, 8])
def test_attention_with_any_thread_count(threads):
    """More threads than tasks (some get none, some only a row without keys) or one thread: the same results."""
    q, k_cache, v_cache, ctx = decode_case([0, 5, 0, 17], 16, 4, 1, 64, BF16, "cpu")
    expect = cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125)
        case = prefill_case([3, 1], [3, 1], 16, 4, 1, 64, BF16, "cpu", False)
        prefill = cpu.prefill_attention(*case[:5], case[5].cu_seqlens_q, case[5].cu_seqlens_k, None, 0.125)
    finally:
        torch.set_num_threads(saved)
    assert got is not None and torch.equal(got, expect)
    assert torch.equal(prefill, cpu.prefill_attention(*case[:5], case[5].cu_seqlens_q, case[5].cu_seqlens_k, None,
                                                      0.125))


def test_backend_uses_the_kernels_and_falls_back():
    lens = [5, 40, 17]
    q, k_cache, v_cache, ctx = decode_case(lens, 16, 14, 2, 64, BF16, "cpu")
    backend = TorchBackend()
    got = backend.decode(q, k_cache, v_cache, ctx, 0.125)
    assert torch.equal(got, cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125))
    assert torch.equal(backend.decode(q, k_cache, v_cache, ctx, 0.125), got)  # the step's next layer
    with fused_kernels(False):  # the PyTorch path
        ctx.plan = None
        off = backend.decode(q, k_cache, v_cache, ctx, 0.125)
    assert torch.equal(off, grouped_decode(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.125))
    assert (got.float() - off.float()).abs().max() < 2e-2


def test_what_the_kernels_do_not_take_returns_none():
    x = torch.randn(4, 64)
    assert cpu.rms_norm(x, torch.ones(64), 1e-6) is None  # float32: PyTorch's ops (exact against transformers)
    assert cpu.silu_and_mul(torch.randn(4, 64)) is None
    assert cpu.silu_and_mul(randn(4, 63)) is None  # odd width
    q, k_cache, v_cache, ctx = decode_case([5, 9], 16, 4, 2, 48, BF16, "cpu")  # head_dim 48: not a multiple of 32
    assert cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, ctx.block_tables, 0.1) is None
    q, k_cache, v_cache, ctx = decode_case([5, 9], 16, 4, 2, 64, BF16, "cpu")
    assert cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens.long(), ctx.block_tables, 0.1) is None
    bad = ctx.block_tables.clone()
    bad[0, 0] = k_cache.size(0)  # past the cache
    assert cpu.decode_attention(q, k_cache, v_cache, ctx.context_lens, bad, 0.1) is None
    assert cpu.rms_norm(randn(4, 64), randn(32), 1e-6) is None  # a weight of another width
    positions, q, k, v, cos, sin = rope_inputs(4, 4, 2, 64)
    assert cpu.rope(torch.tensor([0, 1, 2, 512], dtype=torch.int32), q, k, cos, sin) is None  # past the tables
    caches = [randn(2, 16, 2, 64), randn(2, 16, 2, 64)]
    assert cpu.rope_store(positions, q, k, v, None, None, 0.0, cos, sin, *caches,
                          torch.tensor([0, 1, 2, 32], dtype=torch.int32), None, None) is None  # slot 32 of 32


def test_layers_dispatch_to_the_kernels_on_bf16_only(monkeypatch):
    x, weight = randn(3, 64), randn(64)
    calls = []
    real = cpu.rms_norm
    monkeypatch.setattr(cpu, "rms_norm", lambda *a: calls.append(a) or real(*a))
    nearly_same_bits(rms_norm(x, weight, 1e-6), rms_norm.reference(x, weight, 1e-6))
    with fused_kernels(False):
        rms_norm(x, weight, 1e-6)
    monkeypatch.setitem(cpu._settings, "enabled", False)  # NANOVLLM_CPU_KERNELS=0
    rms_norm(x, weight, 1e-6)
    assert len(calls) == 2  # bf16 on, not with every fused kernel off; asked but refusing with the CPU ones off
    assert cpu.rms_norm(x, weight, 1e-6) is None
    monkeypatch.setitem(cpu._settings, "enabled", True)
    assert cpu.rms_norm(x, weight, 1e-6) is not None


def test_without_the_library_the_layers_run_pytorch(monkeypatch):
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "a test says so")
    cpu.library.cache_clear()
    try:
        assert cpu.library() is None
        x, weight = randn(3, 64), randn(64)
        assert cpu.rms_norm(x, weight, 1e-6) is None
        same_bits(rms_norm(x, weight, 1e-6), rms_norm.reference(x, weight, 1e-6))
    finally:
        cpu.library.cache_clear()


def test_a_failed_build_is_reported_and_the_layers_run_pytorch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: None)
    cpu.library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="nanovllm.kernels.cpu"):
            assert cpu.library() is None
        assert "building them failed" in caplog.text
        assert cpu.silu_and_mul(randn(2, 64)) is None
    finally:
        cpu.library.cache_clear()


@pytest.mark.parametrize("cols", [1, 5, 31, 32, 33, 1000, 151936])
def test_greedy_first_maximum_as_pytorch(cols):
    gen = torch.Generator().manual_seed(cols)
    logits = torch.randint(-3, 3, (9, cols), generator=gen).to(BF16)  # many ties
    logits[0] = float("-inf")
    logits[1, -1] = float("inf")
    logits[2, :] = -3.0
    logits[3, cols // 2:] = float("inf")
    assert torch.equal(cpu.greedy(logits), _greedy.reference(logits))
    assert torch.equal(cpu.greedy(randn(4, cols, seed=cols)), _greedy.reference(randn(4, cols, seed=cols)))


def test_greedy_leaves_nan_rows_to_pytorch():
    logits = randn(3, 100)
    logits[1, 5] = float("nan")
    assert cpu.greedy(logits) is None
    assert torch.equal(_greedy(logits), _greedy.reference(logits))


ENGINE_SHAPES = {
    "qwen3_head_dim_64": ("qwen3", dict(head_dim=64)),  # q/k norm, groups of 2: every kernel serves
    "qwen2_mqa_head_dim_32": ("qwen2", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                                            intermediate_size=96)),  # biases, one KV head: every kernel serves
    **OTHER_SHAPES,  # head_dim 16, 24 or 8: attention stays PyTorch's, the element-wise kernels serve
}


@pytest.mark.parametrize("shape, chunked", [(shape, False) for shape in ENGINE_SHAPES]
                         + [("qwen3_head_dim_64", True), ("qwen2_mqa_head_dim_32", True)])
def test_engine_in_bf16_agrees_with_the_pytorch_path(tmp_path, monkeypatch, shape, chunked):
    """A bf16 engine on the kernels (prefill, paged prefill of cached prefixes, decode; chunked: 32-token steps, so
    prompts are prefilled in chunks with decodes riding along) against the same engine on PyTorch's ops: equal
    tokens, or at the first difference each side's token in the other's top 5."""
    served = []
    for name in ("decode_attention", "prefill_attention"):
        real = getattr(cpu, name)

        def counted(*args, real=real, name=name, **kwargs):
            out = real(*args, **kwargs)
            if out is not None:
                served.append(name)
            return out
        monkeypatch.setattr(cpu, name, counted)
    kind, overrides = ENGINE_SHAPES[shape]
    path = make_model(tmp_path, kind, **overrides)
    prompts = random_prompts([3, 17, 40, 64, 100], seed=5)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    options = dict(max_num_batched_tokens=32, max_model_len=256) if chunked else {}
    with LLM(path, device="cpu", dtype="bfloat16", enforce_eager=True, kvcache_block_size=16,
             num_kvcache_blocks=64, **options) as llm:
        on = generate_twice(llm, prompts, sp)  # the second run prefills from cached prefixes
        if shape in ("qwen3_head_dim_64", "qwen2_mqa_head_dim_32"):
            assert {"decode_attention", "prefill_attention"} <= set(served)
        with fused_kernels(False):
            off = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
        for prompt, x, y in zip(prompts, on, off):
            differ = [i for i, (a, b) in enumerate(zip(x, y)) if a != b]
            if not differ:
                continue
            prefix = prompt + x[:differ[0]]
            top_on = next_token_logits(llm, prefix).topk(5).indices.tolist()
            with fused_kernels(False):
                top_off = next_token_logits(llm, prefix).topk(5).indices.tolist()
            assert x[differ[0]] in top_off and y[differ[0]] in top_on, prompt


def test_float32_never_builds_the_library(monkeypatch):
    def no_build():
        raise AssertionError("a float32 call asked for the native library")
    monkeypatch.setattr(cpu, "library", no_build)
    x, weight = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm.reference(x, weight, 1e-6), rtol=0, atol=0)
    silu_and_mul(torch.randn(3, 64))
    _greedy(torch.randn(2, 100))
    q, k_cache, v_cache, ctx = decode_case([5, 9], 16, 4, 2, 64, torch.float32, "cpu")
    TorchBackend().decode(q, k_cache, v_cache, ctx, 0.1)
