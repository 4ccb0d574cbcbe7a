"""The fp8 KV cache (kv_cache_dtype="fp8_e4m3") on the CPU: option, sizing, torch-backend numerics, whole runs;
and the cache's allocation, which both cache dtypes share (the head-major blocks a backend may ask for).

Hugging Face transformers has no fp8 KV cache, so the reference for whole runs is transformers with an attention
function that rounds K and V through fp8 with the engine's scales (registered through its AttentionInterface):
the engine must then be token-exact, through prefill, decode, prefix hits and chunks alike.
"""
import pytest
import torch

from conftest import agree_by_logprob_rule, generate_twice, make_model, next_token_logits, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine import kv_cache
from nanovllm.engine.kv_calibration import calibration_token_ids
from nanovllm.layers.backends import resolve_backend_name
from nanovllm.layers.backends.torch_sdpa import TorchBackend
from nanovllm.layers.kv_quant import FP8_DTYPE, FP8_MAX, KVScales, fp8_round_trip, quantize_fp8, scales_from_amax
from nanovllm.utils.context import Context

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


# ----------------------------------------------------------------------------------------------------------------
# option and sizing


@pytest.mark.parametrize("value, stored", [("auto", "auto"), ("fp8_e4m3", "fp8_e4m3"), ("fp8", "fp8_e4m3")])
def test_kv_cache_dtype_accepts_vllm_names(qwen3_path, value, stored):
    config = Config(qwen3_path, kv_cache_dtype=value)
    assert config.kv_cache_dtype == stored
    assert config.kv_torch_dtype == (FP8_DTYPE if stored != "auto" else torch.float32)


@pytest.mark.parametrize("value", ["fp8_e5m2", "int8", "bfloat16", None, torch.float8_e4m3fn])
def test_kv_cache_dtype_refuses_other_values(qwen3_path, value):
    error = ValueError if isinstance(value, str) else TypeError  # a name that is not one, or not a name
    with pytest.raises(error, match=r"kv_cache_dtype must be one of \('auto', 'fp8_e4m3', 'fp8'\)"):
        LLM(qwen3_path, kv_cache_dtype=value)


def test_auto_backend_picks_triton_for_an_fp8_cache_on_cuda():
    # flash-attn 2 cannot read an fp8 cache, so "auto" must not pick it even where it is installed
    assert resolve_backend_name("auto", torch.device("cuda"), "fp8_e4m3") == "triton"
    assert resolve_backend_name("auto", torch.device("cpu"), "fp8_e4m3") == "torch"


@pytest.mark.parametrize("dtype, ratio", [("bfloat16", 2), ("float32", 4)])
def test_fp8_cache_holds_more_blocks_in_the_same_memory(qwen3_path, monkeypatch, dtype, ratio):
    # a CPU budget small enough to bind (the tiny model would otherwise get room for 16 full sequences)
    monkeypatch.setattr(kv_cache, "CPU_KVCACHE_MAX_BYTES", 1 << 20)
    options = dict(dtype=dtype, kvcache_block_size=16, max_model_len=1024, device="cpu")
    plain = Config(qwen3_path, **options)
    fp8 = Config(qwen3_path, kv_cache_dtype="fp8_e4m3", **options)
    assert kv_cache.block_bytes(plain) == ratio * kv_cache.block_bytes(fp8)
    # 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 1 byte = 2048 bytes per block
    assert kv_cache.num_kvcache_blocks(fp8, torch.device("cpu"), 1) == (1 << 20) // 2048
    assert kv_cache.num_kvcache_blocks(fp8, torch.device("cpu"), 1) == \
        ratio * kv_cache.num_kvcache_blocks(plain, torch.device("cpu"), 1)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_cache_layouts_keep_the_shape_and_store_each_heads_slots_together(qwen3_path, kv_cache_dtype):
    config = Config(qwen3_path, kvcache_block_size=16, max_model_len=1024, device="cpu", dtype="float32",
                    kv_cache_dtype=kv_cache_dtype)
    cpu = torch.device("cpu")
    plain = kv_cache.allocate_kv_cache(config, 5, cpu)
    heads = kv_cache.allocate_kv_cache(config, 5, cpu, head_major=True)
    values = kv_cache.allocate_kv_cache(config, 5, cpu, head_major=True, key_major_values=16)
    for k, v in (plain, heads, values):
        assert k.shape == v.shape == (2, 5, 16, 2, 16) and k.dtype == v.dtype == config.kv_torch_dtype
        assert not k.float().any() and not v.float().any()  # zeroed
        # K and V of all layers in one allocation: K's then V's, layer by layer, block by block
        assert v.data_ptr() - k.data_ptr() == k.numel() * k.element_size()
        assert k.stride()[:2] == v.stride()[:2] == (5 * 16 * 2 * 16, 16 * 2 * 16)
    assert plain[0].is_contiguous() and plain[1].is_contiguous()
    # head-major: within a block one head's 16 slots are one run of 16 x 16 elements
    assert heads[0].stride()[2:] == heads[1].stride()[2:] == (16, 16 * 16, 1) == values[0].stride()[2:]
    # key-major values: one head's values of a block as [head_dim, block_size]
    assert values[1].stride()[2:] == (1, 16 * 16, 16)
    # in runs of 4 slots: value blocks of 4 slots, one head's values of a run as [head_dim, 4], the runs of a block
    # one after another; the same slots as K's, in the same allocation
    k, v = kv_cache.allocate_kv_cache(config, 5, cpu, head_major=True, key_major_values=4)
    assert k.shape == (2, 5, 16, 2, 16) and v.shape == (2, 20, 4, 2, 16) and not v.float().any()
    assert v.stride()[1:] == (4 * 2 * 16, 1, 4 * 16, 4) and v.data_ptr() - k.data_ptr() == k.numel() * k.element_size()
    v[1, 7, 2, 1, 5] = 1.0  # slot 30 = block 1, offset 14: the 8th run of 4 slots (7 * 4 + 2 = 30)
    assert v.flatten(1, 2)[1, 30, 1, 5] == 1.0 and v.flatten(1, 2).float().sum() == 1.0
    with pytest.raises(ValueError, match="key_major_values=3 must divide"):
        kv_cache.allocate_kv_cache(config, 5, cpu, key_major_values=3)


def test_the_runner_allocates_the_layout_its_backend_asks_for(qwen3_path, monkeypatch):
    import nanovllm.engine.model_runner as model_runner
    asked = []

    def allocate(config, num_blocks, device, head_major=False, key_major_values=0):
        asked.append((head_major, key_major_values))  # the torch backend itself reads contiguous caches only
        return kv_cache.allocate_kv_cache(config, num_blocks, device)

    class HeadMajor(TorchBackend):
        head_major_blocks = True

        def key_major_values(self, block_size, head_dim, dtype, kv_cache_dtype, queries_per_kv=1):
            asks = (block_size, head_dim, dtype, kv_cache_dtype, queries_per_kv)
            return 4 if asks == (16, 16, torch.float32, "fp8_e4m3", 2) else 0  # the tiny Qwen3: 4 heads, 2 KV

    monkeypatch.setattr(model_runner, "allocate_kv_cache", allocate)
    for backend, kv_cache_dtype, expect in ((TorchBackend(), "fp8", (False, 0)),
                                            (HeadMajor(), "auto", (True, 0)), (HeadMajor(), "fp8", (True, 4))):
        monkeypatch.setattr(model_runner, "create_backend", lambda *args, **kwargs: backend)
        with LLM(qwen3_path, kvcache_block_size=16, max_model_len=256, kv_cache_dtype=kv_cache_dtype) as llm:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
        assert asked.pop() == expect


@pytest.mark.parametrize("block_size, head_dim, dtype, kv_cache_dtype, expect", [
    (256, 128, torch.bfloat16, "fp8_e4m3", 256), (128, 64, torch.float16, "fp8_e4m3", 128),
    (64, 128, torch.bfloat16, "fp8_e4m3", 0),  # a decode tile (128 keys) spans blocks: per-key path
    (256, 128, torch.bfloat16, "auto", 0),  # bf16 values load through ldmatrix's transposing form
    (64, 128, torch.float32, "fp8_e4m3", 64),  # float32 models: 64-key tiles
])
def test_triton_backend_asks_for_key_major_values_where_its_decode_tiles_fit(block_size, head_dim, dtype,
                                                                          kv_cache_dtype, expect, monkeypatch):
    """Off CUDA (the Triton kernel in the interpreter) runs of a whole block; where the Gluon kernel serves, runs of
    4 keys (its `serves` stands in for a GPU here)."""
    pytest.importorskip("triton")
    from nanovllm.layers.backends import triton_attn
    assert triton_attn.TritonBackend().key_major_values(block_size, head_dim, dtype, kv_cache_dtype) == expect
    gluon_decode = triton_attn.gluon_decode
    if gluon_decode is None:
        return
    cuda = triton_attn.TritonBackend(torch.device("cuda", 0))
    for serves in (True, False):
        monkeypatch.setattr(gluon_decode, "serves", lambda *args, serves=serves: serves)
        for queries_per_kv in (1, gluon_decode.MAX_GROUP, 2 * gluon_decode.MAX_GROUP):
            run = cuda.key_major_values(block_size, head_dim, dtype, kv_cache_dtype, queries_per_kv)
            assert run == (gluon_decode.VALUE_RUN if expect and serves and queries_per_kv <= gluon_decode.MAX_GROUP
                           else expect)


def test_a_nan_is_stored_as_zero_and_inf_saturates():
    scale = torch.tensor([0.5, 2.0])
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]] * 2)
    stored = quantize_fp8(x, scale)
    assert not stored.float().isnan().any()
    assert stored.float().tolist() == [[0.0, 448.0, -448.0, 2.0], [0.0, 448.0, -448.0, 0.5]]


def test_scales_are_powers_of_two_with_headroom():
    amax = torch.tensor([3.5, 1.0, 0.0, 448.0, 300.0, float("nan")])
    # 3.5 * 8 / 448 = 1/16 exactly; 1 * 8 / 448 -> 2^-5.8 -> 2^-5; unseen or nan -> 1; 448 * 8 / 448 = 8
    assert scales_from_amax(amax).tolist() == [2 ** -4, 2 ** -5, 1.0, 8.0, 8.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------
# torch backend numerics


def _scales(num_kv_heads: int, seed: int) -> KVScales:
    gen = torch.Generator().manual_seed(seed)
    exps = torch.randint(-6, 3, (2, num_kv_heads), generator=gen).float()
    return KVScales(k=2.0 ** exps[0], v=2.0 ** exps[1])


def test_store_then_read_rounds_through_fp8():
    gen = torch.Generator().manual_seed(0)
    num_tokens, heads, dim, block_size, num_blocks = 20, 3, 8, 4, 8
    scales = _scales(heads, 1)
    k = torch.randn(num_tokens, heads, dim, generator=gen) * 4
    v = torch.randn(num_tokens, heads, dim, generator=gen)
    k[0, 0, :3] = torch.tensor([1e6, -1e6, float("inf")])  # far past 448 * scale: must saturate
    k_cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[5] = -1  # padding: not stored
    TorchBackend().store_kvcache(k, v, k_cache, v_cache, slots, scales)

    stored = slots >= 0
    for x, cache, scale in ((k, k_cache, scales.k), (v, v_cache, scales.v)):
        read = cache.view(-1, heads, dim)[slots[stored].long()].float() * scale[:, None]
        expected = (x[stored] / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale[:, None]
        assert torch.equal(read, expected)
        assert torch.equal(read, fp8_round_trip(x[stored], scale))
    assert k_cache.view(-1, heads, dim)[slots[0]][0, :3].float().tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX]
    assert not k_cache.float().isnan().any() and not v_cache.float().isnan().any()
    written = (k_cache.view(num_blocks * block_size, -1).float() != 0).any(1).nonzero()[:, 0]
    assert written.tolist() == sorted(slots[stored].tolist())  # the padding token wrote nothing


def _paged_case(k_lens, q_lens, heads, kv_heads, dim, block_size, seed=0):
    """Keys of each sequence stored in shuffled blocks of both an fp32 and an fp8 cache, and the new tokens' q."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in k_lens) + 2
    free = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-n // block_size) for n in k_lens)
    tables = torch.full((len(k_lens), width), -1, dtype=torch.int32)
    slots = []
    for i, n in enumerate(k_lens):
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[j // block_size] * block_size + j % block_size for j in range(n)]
    k = torch.randn(sum(k_lens), kv_heads, dim, generator=gen)
    v = torch.randn(sum(k_lens), kv_heads, dim, generator=gen)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    return q, k, v, torch.tensor(slots, dtype=torch.int32), tables, num_blocks


def _caches(k, v, slots, num_blocks, block_size, scales):
    backend = TorchBackend()
    shape = (num_blocks, block_size, k.size(1), k.size(2))
    exact = [torch.zeros(shape), torch.zeros(shape)]
    rounded = [torch.zeros(shape), torch.zeros(shape)]
    fp8 = [torch.zeros(shape, dtype=FP8_DTYPE), torch.zeros(shape, dtype=FP8_DTYPE)]
    backend.store_kvcache(k, v, *exact, slots)
    backend.store_kvcache(fp8_round_trip(k, scales.k), fp8_round_trip(v, scales.v), *rounded, slots)
    backend.store_kvcache(k, v, *fp8, slots, scales)
    return exact, rounded, fp8


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("kind", ["decode", "prefill_paged", "prefill_fresh"])
def test_attention_over_an_fp8_cache(kind):
    """Equals attention over fp8-rounded K/V (to float32 rounding), and stays near attention over exact K/V."""
    heads, kv_heads, dim, block_size = 6, 2, 16, 4
    backend, attn_scale = TorchBackend(), dim ** -0.5
    k_lens = [1, 9, 30, 17]
    q_lens = [1] * 4 if kind == "decode" else ([1, 4, 30, 17] if kind == "prefill_paged" else k_lens)
    q, k, v, slots, tables, num_blocks = _paged_case(k_lens, q_lens, heads, kv_heads, dim, block_size)
    scales = KVScales(scales_from_amax(k.abs().amax(dim=(0, 2))), scales_from_amax(v.abs().amax(dim=(0, 2))))
    exact, rounded, fp8 = _caches(k, v, slots, num_blocks, block_size, scales)
    if kind == "decode":
        ctx = Context(is_prefill=False, context_lens=torch.tensor(k_lens, dtype=torch.int32), block_tables=tables)
        outs = [backend.decode(q, *cache, ctx, attn_scale, s) for cache, s in ((exact, None), (rounded, None),
                                                                                 (fp8, scales))]
    elif kind == "prefill_paged":  # every key is read from the cache
        ctx = Context(is_prefill=True, cu_seqlens_q=_cu(q_lens), cu_seqlens_k=_cu(k_lens), max_seqlen_q=max(q_lens),
                      max_seqlen_k=max(k_lens), block_tables=tables)
        outs = [backend.prefill(q, None, None, *cache, ctx, attn_scale, s) for cache, s in ((exact, None),
                                                                                          (rounded, None),
                                                                                          (fp8, scales))]
    else:  # the new tokens' own k, v, which an fp8 cache's prefill attends to rounded
        ctx = Context(is_prefill=True, cu_seqlens_q=_cu(q_lens), cu_seqlens_k=_cu(k_lens), max_seqlen_q=max(q_lens),
                      max_seqlen_k=max(k_lens))
        k_rounded, v_rounded = fp8_round_trip(k, scales.k), fp8_round_trip(v, scales.v)
        outs = [backend.prefill(q, k, v, *exact, ctx, attn_scale),
                backend.prefill(q, k_rounded, v_rounded, *rounded, ctx, attn_scale),
                backend.prefill(q, k, v, *fp8, ctx, attn_scale, scales)]
    exact_out, rounded_out, fp8_out = outs
    torch.testing.assert_close(fp8_out, rounded_out, atol=1e-6, rtol=1e-6)
    # e4m3 rounds each K/V element by at most 2^-4 of itself (3 mantissa bits, rms 2^-4 / sqrt(3) = 3.6%);
    # the output averages many such errors (V's directly, K's through the softmax weights), so its rms error
    # relative to the output stays below the per-element worst case
    rel = (fp8_out - exact_out).norm() / exact_out.norm()
    assert 0 < rel <= 2 ** -4


# ----------------------------------------------------------------------------------------------------------------
# whole runs


def _engine_scales(llm: LLM) -> list[KVScales]:
    return [layer.kv_scales for layer in llm.executor.runner.layers]


@pytest.fixture(scope="module")
def fake_fp8_reference():
    """Greedy completions of transformers whose attention sees K and V rounded through fp8 with given scales."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    state = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        # key, value: [batch, kv_heads, seq, dim]; the scales index the KV head
        if state.get("observe") is not None:
            state["observe"](module.layer_idx, key, value)
        else:
            s = state["scales"][module.layer_idx]
            key = fp8_round_trip(key.transpose(1, 2), s.k).transpose(1, 2)
            value = fp8_round_trip(value.transpose(1, 2), s.v).transpose(1, 2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nanovllm_fp8_test", attention)

    models = {}

    def load(path):
        if path not in models:
            models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                attn_implementation="nanovllm_fp8_test").eval()
            models[path].generation_config.eos_token_id = None
        return models[path]

    def generate(path, scales, prompt, max_new_tokens):
        state["scales"], state["observe"] = scales, None
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = load(path).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def calibration_amax(path, ids):
        amax = {}

        def observe(layer, key, value):
            amax[layer] = [x.abs().amax(dim=(0, 2, 3)) for x in (key, value)]
        state["observe"] = observe
        with torch.no_grad():
            load(path)(torch.tensor([ids]))
        state["observe"] = None
        return [amax[i] for i in sorted(amax)]

    generate.calibration_amax = calibration_amax
    yield generate
    models.clear()


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_fp8_scales_come_from_the_calibration_prefill(kind, request, fake_fp8_reference):
    path = request.getfixturevalue(f"{kind}_path")
    with LLM(path, kv_cache_dtype="fp8_e4m3", kvcache_block_size=16) as llm:
        ids = calibration_token_ids(llm.config.hf_config.vocab_size, llm.config.max_model_len)
        expected = fake_fp8_reference.calibration_amax(path, ids)
        for scales, (k_amax, v_amax) in zip(_engine_scales(llm), expected, strict=True):
            assert torch.equal(scales.k, scales_from_amax(k_amax))
            assert torch.equal(scales.v, scales_from_amax(v_amax))


@pytest.mark.parametrize("kind, options", [
    ("qwen3", {}),
    ("qwen2", {}),
    ("qwen3", {"max_num_batched_tokens": 13}),  # chunked prefill: every chunk reads its earlier keys as fp8
    # each rank calibrates its own KV head (the two heads of qwen2's layer 1 get different V scales)
    ("qwen2", {"tensor_parallel_size": 2}),
], ids=["qwen3", "qwen2", "qwen3-chunked", "qwen2-tp2"])
def test_fp8_run_matches_transformers_with_fp8_rounded_kv(kind, options, request, fake_fp8_reference):
    path = request.getfixturevalue(f"{kind}_path")
    prompts = random_prompts([1, 7, 33, 70], seed=7)
    with LLM(path, kv_cache_dtype="fp8_e4m3", kvcache_block_size=16, **options) as llm:
        # the scales the calibration prefill gives, over all KV heads (under tensor parallelism rank 0 holds half)
        ids = calibration_token_ids(llm.config.hf_config.vocab_size, llm.config.max_model_len)
        scales = [KVScales(scales_from_amax(k), scales_from_amax(v))
                  for k, v in fake_fp8_reference.calibration_amax(path, ids)]
        expected = [fake_fp8_reference(path, scales, p, GREEDY.max_tokens) for p in prompts]
        for _ in range(2):  # the second time through the prefix cache: cached keys are read as fp8
            outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
            assert [o["token_ids"] for o in outputs] == expected


def test_fp8_greedy_tokens_mostly_agree_with_a_float32_cache(qwen3_path):
    """The tiny random model amplifies rounding (fp8 moves its logits by ~0.3 on a spread of 1.6), so free-running
    runs drift apart after the first near-tie; teacher-forced, the two caches pick the same token 93% of the time
    here (the demo model's figures: benchmarks/fp8_accuracy.py)."""
    prompts = random_prompts([5, 30, 70, 12], seed=1)
    with LLM(qwen3_path, kvcache_block_size=16) as plain, \
            LLM(qwen3_path, kv_cache_dtype="fp8_e4m3", kvcache_block_size=16) as fp8:
        out_plain = [o["token_ids"] for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
        out_fp8 = [o["token_ids"] for o in fp8.generate(prompts, GREEDY, use_tqdm=False)]
        agree = [next_token_logits(fp8, p + o[:i]).argmax().item() == o[i]
                 for p, o in zip(prompts, out_plain) for i in range(len(o))]
        assert sum(agree) / len(agree) >= 0.9
        # where the runs part, each side's token is among the other's top 5
        for p, a, b in zip(prompts, out_plain, out_fp8):
            assert agree_by_logprob_rule(plain, fp8, p, a, b)


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped elsewhere): the triton backend's fp8 path in whole runs


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def qwen3_hd64_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("qwen3_fp8_hd64"), "qwen3", hidden_size=128, head_dim=64,
                      num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("options", [
    dict(kvcache_block_size=16),
    dict(kvcache_block_size=256, enforce_eager=True),
    dict(kvcache_block_size=32, max_num_batched_tokens=48),
], ids=["graphs", "eager", "chunked"])
def test_triton_fp8_float32_equals_cpu_torch_fp8(qwen3_hd64_path, options):
    prompts = random_prompts([1, 9, 40, 100, 300, 17])
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    runs = []
    for device_options in (dict(device="cpu", kvcache_block_size=16),
                           dict(device="cuda", dtype="float32", attention_backend="triton", **options)):
        with LLM(qwen3_hd64_path, kv_cache_dtype="fp8_e4m3", **device_options) as llm:
            runs.append(generate_twice(llm, prompts, sp))
    assert runs[1] == runs[0]


@pytest.mark.cuda
@needs_cuda
def test_triton_fp8_bf16_agrees_with_torch_backend(qwen3_hd64_path):
    prompts = random_prompts([1, 9, 40, 100, 300, 17])
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    common = dict(dtype="bfloat16", kv_cache_dtype="fp8_e4m3", kvcache_block_size=16, num_kvcache_blocks=128)
    with (LLM(qwen3_hd64_path, attention_backend="torch", enforce_eager=True, **common) as ref,
          LLM(qwen3_hd64_path, attention_backend="auto", **common) as fast):  # "auto" must pick triton for fp8
        assert fast.executor.runner.attn_backend.name == "triton"
        out_ref = [o["token_ids"] for o in ref.generate(prompts, sp, use_tqdm=False)]
        out_fast = [o["token_ids"] for o in fast.generate(prompts, sp, use_tqdm=False)]
        for p, a, b in zip(prompts, out_ref, out_fast):
            assert agree_by_logprob_rule(ref, fast, p, a, b)


@pytest.mark.cuda
@needs_cuda
def test_fp8_cache_holds_twice_the_blocks_on_the_gpu(qwen3_hd64_path):
    counts = {}
    for kv in ("auto", "fp8_e4m3"):
        with LLM(qwen3_hd64_path, dtype="bfloat16", attention_backend="triton", kv_cache_dtype=kv,
                 gpu_memory_utilization=0.3, enforce_eager=True) as llm:
            counts[kv] = llm.config.num_kvcache_blocks
    # the same free memory, half the bytes per block (within the few blocks of memory that moved meanwhile)
    assert abs(counts["fp8_e4m3"] - 2 * counts["auto"]) <= 0.01 * counts["fp8_e4m3"]
