"""Random combinations of model shape, engine options and requests, each run against transformers in float32.

The other tests pin one option at a time on the shared tiny models; here a seed draws them all at once (heads,
head_dim, layers, vocabulary, tied embeddings, biases, rope_theta and scaling; block size, token budget, sequence
limit, a pool that holds only the longest sequence, mixed or prefill-first steps, overlapped or step-by-step, prefix
caching; prompts that share prefixes, logprobs and prompt logprobs), so that a combination nobody wrote down is
still checked. Every seed must give transformers' greedy tokens exactly, its log-softmax within 1e-4, the same
tokens again on a second call (now from the prefix cache) and an empty pool afterwards.
"""
import math
import random

import pytest
import torch

from conftest import make_model
from nanovllm import LLM, SamplingParams

SEEDS = range(24)


def draw_model(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(["qwen3", "qwen3", "qwen2"])
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3])
    vocab = rng.choice([300, 512, 777])
    shape = dict(vocab_size=vocab, eos_token_id=vocab - 1, bos_token_id=vocab - 2, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, num_hidden_layers=rng.choice([1, 2, 3]),
                 intermediate_size=rng.choice([40, 64, 130]), tie_word_embeddings=rng.random() < 0.5,
                 rope_theta=rng.choice([500.0, 10000.0, 1e6]), max_position_embeddings=rng.choice([256, 1024]))
    if kind == "qwen3":  # head_dim is free: not hidden_size / heads
        shape.update(head_dim=rng.choice([8, 16, 32, 64, 128]), hidden_size=rng.choice([32, 48, 64, 96]),
                     attention_bias=rng.random() < 0.3)
    else:
        shape.update(hidden_size=heads * rng.choice([8, 16]))
    rope = rng.choice(["default", "default", "linear", "yarn", "llama3", "dynamic"])
    params = {"rope_type": rope, "rope_theta": shape.pop("rope_theta")}
    if rope != "default":
        params["factor"] = rng.choice([2.0, 4.0])
    if rope in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = shape["max_position_embeddings"] // 4
    if rope == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    shape["rope_parameters"] = params
    return kind, shape


def draw_options(rng: random.Random) -> dict:
    return dict(device="cpu", dtype="float32", enforce_eager=True, kvcache_block_size=rng.choice([16, 32, 256]),
                max_num_batched_tokens=rng.choice([16, 40, 128, 1024]), max_num_seqs=rng.choice([1, 2, 3, 8]),
                mixed_steps=rng.random() < 0.7, async_scheduling=rng.random() < 0.7,
                enable_prefix_caching=rng.random() < 0.8, max_model_len=rng.choice([128, 256]))


def tight_pool(options: dict, prompts: list[list[int]], params: list[SamplingParams]) -> int:
    """Blocks for the longest sequence alone: the others wait for room, or preempt each other as they grow."""
    block_size = options["kvcache_block_size"]
    return max(math.ceil((len(p) + sp.max_tokens) / block_size) for p, sp in zip(prompts, params))


def draw_requests(rng: random.Random, vocab: int, max_model_len: int) -> tuple[list[list[int]], list[SamplingParams]]:
    shared = [rng.randrange(vocab - 2) for _ in range(rng.randrange(1, 60))]
    prompts = []
    for _ in range(rng.randrange(1, 7)):
        head = shared[:rng.randrange(len(shared) + 1)] if rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(vocab - 2) for _ in range(rng.randrange(1, 50))])
    logprobs, prompt_logprobs = rng.choice([None, 0, 3]), rng.choice([None, None, 2])
    params = [SamplingParams(temperature=0, max_tokens=min(rng.randrange(1, 40), max_model_len - len(p)),
                             ignore_eos=True, logprobs=logprobs, prompt_logprobs=prompt_logprobs) for p in prompts]
    return prompts, params


def check_logprobs(reference: torch.Tensor, entries: dict[int, float], token: int, num: int | None):
    """The entries hold the chosen token and the reference's top `num`, each at the reference's log-softmax."""
    assert token in entries
    if num:
        assert set(reference.topk(num).indices.tolist()) <= set(entries)
    for token_id, logprob in entries.items():
        assert logprob == pytest.approx(reference[token_id].item(), abs=1e-4), token_id


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_configuration_equals_transformers(seed, tmp_path, hf_reference):
    from transformers import AutoModelForCausalLM
    rng = random.Random(seed)
    kind, shape = draw_model(rng)
    path = make_model(tmp_path, kind, seed=seed, **shape)
    options = draw_options(rng)
    prompts, params = draw_requests(rng, shape["vocab_size"], options["max_model_len"])
    if rng.random() < 0.4:
        options["num_kvcache_blocks"] = tight_pool(options, prompts, params)
    with LLM(path, **options) as llm:
        first = llm.generate(prompts, params, use_tqdm=False)
        again = llm.generate(prompts, params, use_tqdm=False)
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, sp, out, out_again in zip(prompts, params, first, again, strict=True):
        assert out["token_ids"] == hf_reference(path, prompt, sp.max_tokens)
        assert out_again["token_ids"] == out["token_ids"]
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([prompt + out["token_ids"]])).logits[0].float(), -1)
        if sp.logprobs is not None:
            for i, (token, entries) in enumerate(zip(out["token_ids"], out["logprobs"], strict=True)):
                check_logprobs(reference[len(prompt) - 1 + i], entries, token, sp.logprobs)
        if sp.prompt_logprobs is not None:
            scored = out["prompt_logprobs"]
            assert len(scored) == len(prompt) and scored[0] is None
            for i in range(1, len(prompt)):
                check_logprobs(reference[i - 1], scored[i], prompt[i], sp.prompt_logprobs)
