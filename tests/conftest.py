"""Tiny random-weight Qwen3 / Qwen2 checkpoints made with transformers, float32, shared by the tests."""
import gc
import os
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import NewSequence, ScheduledStep, StepKind
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 512


def tiny_config(kind: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "qwen3":
        common.setdefault("head_dim", 16)
        return Qwen3Config(**common), Qwen3ForCausalLM
    return Qwen2Config(**common), Qwen2ForCausalLM


# shapes other than the shared tiny models': MQA, MHA, head_dim not hidden / heads (24, not a power of two; 8),
# attention biases (Qwen3's attention_bias puts one on o_proj too), tied embeddings, another rope_theta, scaled rope
OTHER_SHAPES = {
    "mqa": ("qwen3", dict(num_key_value_heads=1)),
    "mha": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4)),
    "head_dim_24": ("qwen3", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24, hidden_size=40,
                                  intermediate_size=72)),
    "qwen3_attention_bias": ("qwen3", dict(attention_bias=True)),
    "qwen3_tied_rope_1e6": ("qwen3", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_head_dim_8": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2)),  # 64 / 8 heads, untied
    # scaled rotary embeddings: YaRN (its attention factor scales cos and sin) and linear position interpolation
    "qwen3_yarn": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 64})),
    "qwen2_linear_rope": ("qwen2", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})),
}


def make_model(path, kind: str, seed: int = 0, **overrides) -> str:
    config, cls = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    # random init is near-uniform; sharpen it so greedy decoding is not a coin toss between near-equal logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path)


# What torch saw before any test hid the GPU (it keeps the device count it found first).
HAS_CUDA = torch.cuda.is_available()
GPU_VIEW = dict(is_available=torch.cuda.is_available, device_count=torch.cuda.device_count,
                env=os.environ.get("CUDA_VISIBLE_DEVICES"))


def hide_gpu(mp: pytest.MonkeyPatch):
    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setattr(torch.cuda, "device_count", lambda: 0)
    mp.setenv("CUDA_VISIBLE_DEVICES", "")


def show_gpu(mp: pytest.MonkeyPatch):
    mp.setattr(torch.cuda, "is_available", GPU_VIEW["is_available"])
    mp.setattr(torch.cuda, "device_count", GPU_VIEW["device_count"])
    if GPU_VIEW["env"] is None:
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        mp.setenv("CUDA_VISIBLE_DEVICES", GPU_VIEW["env"])


@pytest.fixture(autouse=True, scope="module")
def cpu_unless_marked_cuda(request):
    """The tests compare the engine with float32 transformers on the CPU, and device "auto" would take a GPU (and
    its dtype) where there is one. So on a GPU host a module not marked cuda runs as on a CPU machine, its
    module-scoped engines included: torch reports no GPU in this process, and CUDA_VISIBLE_DEVICES hides it from
    the processes its tests start (tensor-parallel workers, scripts, Ray's local cluster). A test marked cuda in
    such a module sees the GPU again (gpu_for_cuda_tests)."""
    if not HAS_CUDA or request.node.get_closest_marker("cuda") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        hide_gpu(mp)
        yield


@pytest.fixture(autouse=True)
def gpu_for_cuda_tests(request, cpu_unless_marked_cuda):
    if HAS_CUDA and request.node.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        with pytest.MonkeyPatch.context() as mp:
            show_gpu(mp)
            yield
        return
    yield


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def qwen3_with_tokenizer(qwen3_path, tmp_path_factory):
    """The tiny model plus a word-level tokenizer over its 512 ids ("w0" .. "w509", "<bos>", "<eos>")."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("qwen3_tok") / "model"
    shutil.copytree(qwen3_path, folder)
    vocab = {f"w{i}": i for i in range(510)} | {"<bos>": 510, "<eos>": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def hf_reference():
    """Greedy completions from transformers, memoised per (model, prompt, n)."""
    cache, models = {}, {}

    def generate(path: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (path, tuple(prompt), max_new_tokens)
        if key not in cache:
            if path not in models:
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                # pure greedy for exactly max_new_tokens: no EOS stop (min_new_tokens would mask EOS logits)
                model.generation_config.eos_token_id = None
                models[path] = model
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = models[path].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=max_new_tokens, pad_token_id=0)
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    yield generate
    models.clear()
    gc.collect()


def random_prompts(lengths, seed=0, vocab=500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def generate_twice(llm: LLM, prompts, sp: SamplingParams) -> list[list[int]]:
    """Token ids of a greedy run; a second run (prefixes now cached: a paged prefill, other batch shapes) must
    leave the pool empty and equal it in float32, or agree by the logprob rule in half precision, where a cached
    and an uncached prefill may round differently."""
    first = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    again = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    if llm.config.torch_dtype == torch.float32:
        assert again == first
    else:
        assert_agree_by_logprob_rule(llm, llm, prompts, first, again)
    return first


def next_token_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The engine's own next-token logits after `token_ids` (one prefill through its backend, on every rank)."""
    sp = SamplingParams(temperature=0, max_tokens=1)
    seq = Sequence(token_ids, sp, -1, llm.config.kvcache_block_size)
    bm = llm.scheduler.block_manager
    bm.allocate(seq)
    new = NewSequence(-1, token_ids, seq.block_table, seq.num_cached_tokens, len(seq) - seq.num_cached_tokens, sp,
                      len(token_ids), 0)
    try:
        return llm.executor.call("prefill_logits", ScheduledStep(StepKind.PREFILL, new=[new]))[0].float()
    finally:
        bm.deallocate(seq)


def assert_agree_by_logprob_rule(a: LLM, b: LLM, prompts, outs_a, outs_b):
    for prompt, x, y in zip(prompts, outs_a, outs_b, strict=True):
        assert agree_by_logprob_rule(a, b, prompt, x, y), prompt


def agree_by_logprob_rule(a: LLM, b: LLM, prompt, out_a, out_b, k=5) -> bool:
    """Equal, or at the first differing token each side's token is in the other's top-k."""
    for i, (x, y) in enumerate(zip(out_a, out_b)):
        if x != y:
            prefix = prompt + out_a[:i]
            top_a = next_token_logits(a, prefix).topk(k).indices.tolist()
            top_b = next_token_logits(b, prefix).topk(k).indices.tolist()
            return x in top_b and y in top_a
    return True
