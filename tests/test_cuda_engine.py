"""The engine on an NVIDIA GPU (skipped elsewhere): backends, CUDA graphs, memory, lifecycle."""
import importlib.util

import pytest
import torch

from conftest import OTHER_SHAPES, assert_agree_by_logprob_rule, generate_twice, make_model, random_prompts
from nanovllm import LLM, SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


PROMPTS = random_prompts([1, 9, 40, 100, 300, 17, 64, 65])


def run(path, prompt_list=PROMPTS, sp=GREEDY, **options):
    with LLM(path, **options) as llm:
        return generate_twice(llm, prompt_list, sp)


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    """head_dim 64: a size every GPU backend (and the prebuilt flash-attn) serves."""
    return make_model(tmp_path_factory.mktemp("qwen3_hd64"), "qwen3", hidden_size=128, head_dim=64,
                      num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def cpu_reference(qwen3_path):
    return run(qwen3_path, device="cpu", kvcache_block_size=16)


@pytest.mark.parametrize("options", [
    dict(kvcache_block_size=16),
    dict(kvcache_block_size=256, enforce_eager=True),
    dict(kvcache_block_size=32, max_num_batched_tokens=48),
    dict(kvcache_block_size=16, num_kvcache_blocks=24),  # forces preemption
    dict(kvcache_block_size=16, async_scheduling=False),
], ids=["graphs", "eager", "chunked", "preempt", "step-by-step"])
def test_triton_float32_equals_cpu_torch(qwen3_path, cpu_reference, options):
    assert run(qwen3_path, device="cuda", dtype="float32", attention_backend="triton", **options) == cpu_reference


@pytest.mark.parametrize("shape", list(OTHER_SHAPES))
def test_other_model_shapes_on_triton(shape, tmp_path):
    """MQA, MHA, head_dim 24 and 8, attention biases, tied embeddings: float32 equal to the CPU, bfloat16 (graphs)
    in agreement with the torch backend on the GPU."""
    kind, overrides = OTHER_SHAPES[shape]
    path = make_model(tmp_path / shape, kind, seed=3, **overrides)
    prompts = PROMPTS[:5]
    assert run(path, prompts, device="cuda", dtype="float32", attention_backend="triton", kvcache_block_size=16) \
        == run(path, prompts, device="cpu", kvcache_block_size=16)
    common = dict(dtype="bfloat16", kvcache_block_size=16, num_kvcache_blocks=64)  # two engines at once
    with (LLM(path, attention_backend="torch", enforce_eager=True, **common) as ref,
          LLM(path, attention_backend="triton", **common) as tr):
        out_ref, out_tr = generate_twice(ref, prompts, GREEDY), generate_twice(tr, prompts, GREEDY)
        assert_agree_by_logprob_rule(ref, tr, prompts, out_ref, out_tr)


def test_cuda_graphs_agree_with_eager_bf16(qwen3_path):
    """Not bitwise: a graph's block tables span max_model_len, so its split-KV decode splits the keys otherwise."""
    common = dict(dtype="bfloat16", attention_backend="triton", kvcache_block_size=16,
                  num_kvcache_blocks=128)  # two engines at once: fixed cache sizes
    with LLM(qwen3_path, enforce_eager=True, **common) as eager, LLM(qwen3_path, **common) as graphs:
        out_eager, out_graphs = generate_twice(eager, PROMPTS, GREEDY), generate_twice(graphs, PROMPTS, GREEDY)
        assert_agree_by_logprob_rule(eager, graphs, PROMPTS, out_eager, out_graphs)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn is not installed")
@pytest.mark.parametrize("options", [dict(num_kvcache_blocks=64),
                                     dict(num_kvcache_blocks=64, max_num_batched_tokens=64),
                                     dict(num_kvcache_blocks=3)],
                         ids=["plain", "chunked", "preempt"])  # two engines at once: fixed cache sizes
def test_flash_attn_bf16_agrees_with_torch_backend(qwen3_path, options):
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    common = dict(dtype="bfloat16", kvcache_block_size=256, **options)
    with (LLM(qwen3_path, attention_backend="torch", enforce_eager=True, **common) as ref,
          LLM(qwen3_path, attention_backend="flash_attn", **common) as fa):
        out_ref = [o["token_ids"] for o in ref.generate(PROMPTS, sp, use_tqdm=False)]
        out_fa = [o["token_ids"] for o in fa.generate(PROMPTS, sp, use_tqdm=False)]
        assert_agree_by_logprob_rule(ref, fa, PROMPTS, out_ref, out_fa)


def test_no_memory_growth_and_construct_exit_twice(qwen3_path):
    for _ in range(2):
        llm = LLM(qwen3_path, dtype="bfloat16", attention_backend="triton", kvcache_block_size=16)
        sp = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
        llm.generate(PROMPTS, sp, use_tqdm=False)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(3):  # the same calls: only a leak could change what is allocated between them
            llm.generate(PROMPTS, sp, use_tqdm=False)
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == before
        llm.exit()
        del llm
    torch.cuda.synchronize()


def test_no_recompiles_during_a_run(qwen3_path):
    """Triton kernels compile at start-up (warm-up), never while serving."""
    from triton import knobs
    jitted = []

    def record(**kw):
        jitted.append(kw["fn"].name if "fn" in kw else "?")
        return None

    for backend in ("triton", "flash_attn") if HAS_FLASH_ATTN else ("triton",):
        for options in (dict(), dict(enforce_eager=True)):
            _forget_compiled_kernels()  # as a fresh process: what serving needs must compile in the start-up
            with LLM(qwen3_path, dtype="bfloat16", attention_backend=backend,
                     kvcache_block_size=16 if backend == "triton" else 256,
                     max_num_batched_tokens=50, max_num_seqs=20, **options) as llm:
                try:
                    knobs.runtime.jit_cache_hook = record
                    mixed = random_prompts([1, 2, 3, 16, 17, 49, 50, 51, 130, 7, 300, 33] * 3, seed=11)
                    llm.generate(mixed, SamplingParams(temperature=0.7, max_tokens=30), use_tqdm=False)
                    llm.generate(mixed[:1], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
                    llm.generate(mixed[:25], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
                    llm.generate(mixed[:7], [SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1),
                                             SamplingParams(temperature=0.6, top_k=20, min_p=0.05)] * 3
                                 + [SamplingParams(temperature=0, presence_penalty=0.5)], use_tqdm=False)
                    llm.generate(mixed[:2], [SamplingParams(temperature=0.9, logit_bias={5: 2.0},
                                                            repetition_penalty=1.2,
                                                            allowed_token_ids=list(range(3, 90))),
                                             SamplingParams(temperature=0, logit_bias={7: 1.5}, presence_penalty=0.3)],
                                 use_tqdm=False)
                finally:
                    knobs.runtime.jit_cache_hook = None
            assert jitted == [], (backend, options)


def test_per_token_settings_on_cuda_equal_the_cpu(qwen3_path):
    """logit_bias and allowed_token_ids, with and without penalties, float32: the GPU's greedy tokens are the
    CPU's; seeded draws stay in their allowed set."""
    prompts = random_prompts([5, 12, 30, 64], seed=21)
    greedy = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw) for kw in (
        dict(logit_bias={11: 3.0, 12: -1.0, 13: float("-inf")}),
        dict(logit_bias={11: 3.0, 40: 2.0}, repetition_penalty=1.3),
        dict(allowed_token_ids=[2, 11, 17, 99, 240]),
        dict(allowed_token_ids=[2, 11, 17, 99, 240], logit_bias={2: 1.0}, frequency_penalty=0.5))]
    allowed = list(range(50, 80))
    drawn = SamplingParams(temperature=1.2, top_p=0.9, seed=4, max_tokens=16, ignore_eos=True,
                           allowed_token_ids=allowed, logit_bias={60: 2.0})
    params = [sp for sp in greedy for _ in prompts] + [drawn] * len(prompts)
    with LLM(qwen3_path, device="cpu", kvcache_block_size=16) as llm:
        cpu = llm.generate(prompts * 5, params, use_tqdm=False)
    with LLM(qwen3_path, device="cuda", dtype="float32", kvcache_block_size=16) as llm:
        gpu = llm.generate(prompts * 5, params, use_tqdm=False)
    n = len(greedy) * len(prompts)
    assert [o["token_ids"] for o in gpu[:n]] == [o["token_ids"] for o in cpu[:n]]
    assert all(set(o["token_ids"]) <= set(allowed) for o in gpu[n:])


def test_bad_words_on_cuda_equal_the_cpu(qwen3_path, tmp_path):
    """bad_words keep the completion's tokens on the device (OutputHistory) while steps overlap and decode
    replays CUDA graphs: float32 greedy tokens are the CPU's, and the words do change the run."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(qwen3_path, folder)
    vocab = {f"w{i}": i for i in range(510)} | {"<bos>": 510, "<eos>": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>").save_pretrained(folder)
    prompts = random_prompts([4, 19, 33, 70], seed=39)
    plain_sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(folder), device="cpu", kvcache_block_size=16) as llm:
        plain = [o["token_ids"] for o in llm.generate(prompts, plain_sp, use_tqdm=False)]
        # words that bite: two tokens of the first run, one of the second, three of the third
        words = [" ".join(f"w{t}" for t in ids) for ids in (plain[0][2:4], plain[1][5:6], plain[2][3:6])]
        params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=words, **kw)
                  for kw in ({}, {"repetition_penalty": 1.3})]
        cpu = llm.generate(prompts * 2, [sp for sp in params for _ in prompts], use_tqdm=False)
    with LLM(str(folder), device="cuda", dtype="float32", kvcache_block_size=16) as llm:
        assert llm.executor.runner.graphs is not None  # decode replays graphs
        gpu = llm.generate(prompts * 2, [sp for sp in params for _ in prompts], use_tqdm=False)
    assert [o["token_ids"] for o in gpu] == [o["token_ids"] for o in cpu]
    assert [o["token_ids"] for o in cpu[:len(prompts)]] != plain


def _forget_compiled_kernels():
    """Drop every nanovllm Triton kernel's in-memory variants, as in a fresh process (the disk cache stays)."""
    import importlib
    import pkgutil
    import nanovllm.kernels
    from triton.runtime.jit import JITFunction
    for info in pkgutil.iter_modules(nanovllm.kernels.__path__):
        for value in vars(importlib.import_module(f"nanovllm.kernels.{info.name}")).values():
            if isinstance(value, JITFunction):
                value.device_caches.clear()


def test_start_up_compiles_no_graph_and_capture_no_kernel(qwen3_path, monkeypatch):
    """Nothing goes through torch.compile, and graph capture reuses the kernels the warm-up compiled (it used to
    compile norm_rope again: its static inputs were int64 and at offset 0, the eager steps' int32 and packed)."""
    from torch._dynamo.utils import counters
    from triton import knobs
    from nanovllm.engine.cuda_graphs import CUDAGraphRunner
    captured, compiled = CUDAGraphRunner._capture_all, []

    def capture_recording_compiles(self):
        knobs.runtime.jit_cache_hook = lambda **kw: compiled.append(kw["fn"].name if "fn" in kw else "?")
        try:
            captured(self)
        finally:
            knobs.runtime.jit_cache_hook = None

    monkeypatch.setattr(CUDAGraphRunner, "_capture_all", capture_recording_compiles)
    _forget_compiled_kernels()
    counters.clear()
    with LLM(qwen3_path, dtype="bfloat16", attention_backend="triton", kvcache_block_size=16) as llm:
        llm.generate(random_prompts([5, 40, 77], seed=3), SamplingParams(temperature=0.7, max_tokens=20),
                     use_tqdm=False)
    assert compiled == []
    assert counters["stats"]["unique_graphs"] == 0


def test_exit_gives_the_memory_back(qwen3_path):
    """exit() returns the cache and the weights to the driver while the user still holds the LLM object, so a
    second LLM in the process can size its cache from them."""
    torch.cuda.synchronize()
    before, free_before = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
    llm = LLM(qwen3_path, dtype="bfloat16", attention_backend="triton", kvcache_block_size=16)
    llm.generate(PROMPTS, SamplingParams(temperature=0.7, max_tokens=8), use_tqdm=False)
    free, total = torch.cuda.mem_get_info()
    assert free < free_before - 0.5 * total  # the cache took most of what was free
    llm.exit()
    assert torch.cuda.memory_allocated() - before < 1 << 30
    assert torch.cuda.mem_get_info()[0] > free_before - (2 << 30)  # back to the driver, up to kernels/workspaces


def test_reading_a_step_back_does_not_wait_for_later_steps():
    """Overlapped scheduling reads step N's tokens while step N+1 runs: that read must wait for step N alone."""
    from nanovllm.engine.readback import SampledTokens, StepOutput
    from nanovllm.layers.sampler import SamplerOutput
    ids = torch.arange(5, device="cuda") * 7
    step_n = SampledTokens(StepOutput(SamplerOutput(ids), [None] * 5))
    torch.cuda._sleep(2_000_000_000)  # stands for step N+1, queued behind it on the same stream (~1 s)
    assert step_n.tolist() == [0, 7, 14, 21, 28]
    assert not torch.cuda.current_stream().query()  # returned while the later work still runs
    torch.cuda.synchronize()
