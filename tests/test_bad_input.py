"""Every bad input fails at the call that caused it, naming what is wrong, and the engine keeps working."""
import json
import math
import os
import re
import shutil

import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_path):
    engine = LLM(qwen3_path, kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=200)
    yield engine
    engine.exit()


@pytest.fixture(scope="module")
def expected(llm):
    return llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]


@pytest.mark.parametrize("prompts, sp, error, words", [
    ([[]], GREEDY, ValueError, "empty"),
    ([[1, -1]], GREEDY, ValueError, "token id -1"),
    ([[1, 512]], GREEDY, ValueError, "vocab_size=512"),
    ([[1, 2.5]], GREEDY, TypeError, "2.5"),
    ([3], GREEDY, TypeError, "a prompt must be a str or a list of token ids, got int"),
    (5, GREEDY, TypeError, "prompts must be"),
    ([[1] * 190], SamplingParams(max_tokens=20), ValueError, "190 + max_tokens 20 = 210 exceeds max_model_len=200"),
    ([[1] * 100], SamplingParams(max_tokens=40), ValueError, "can never fit"),
    ([[1], [2]], [GREEDY], ValueError, "2 entries but there are 3 prompts"),
    ([[1]], "greedy", TypeError, "sampling_params must be SamplingParams"),
    (["hello"], GREEDY, ValueError, "no tokenizer"),
])
def test_bad_requests_raise_and_engine_survives(llm, expected, prompts, sp, error, words):
    with pytest.raises(error, match=re.escape(words)):
        llm.generate(prompts if not isinstance(prompts, list) else [[1, 2, 3]] + prompts,
                     [GREEDY] + sp if isinstance(sp, list) else sp, use_tqdm=False)
    assert llm.is_finished()  # the valid request in the same call was not queued either
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == expected


def test_a_bare_token_list_is_not_a_batch(llm):
    with pytest.raises(TypeError, match="wrap a single token-id list"):
        llm.generate([1, 2, 3], GREEDY, use_tqdm=False)


def test_numpy_token_ids_are_accepted(llm, expected):
    import numpy as np
    assert llm.generate([np.array([1, 2, 3])], GREEDY, use_tqdm=False) == \
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


def test_fits_exactly_at_the_limits(llm):
    # 8 blocks of 16 = 128 slots; the last sampled token needs none: 100 + 29 - 1 = 128
    out = llm.generate([[1] * 100], SamplingParams(temperature=0, max_tokens=29, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 29


def test_empty_prompt_list_returns_nothing(llm):
    assert llm.generate([], GREEDY, use_tqdm=False) == []


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0, got -0.5"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1, got 0"),
    (dict(max_tokens=2.0), TypeError, "max_tokens must be an int"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos must be a bool"),
])
def test_sampling_params_validate_themselves(kwargs, error, words):
    with pytest.raises(error, match=words):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("options, error, words", [
    (dict(max_num_seq=4), TypeError, r"unknown option\(s\) \['max_num_seq'\]"),
    (dict(kvcache_block_size=100), ValueError, "kvcache_block_size must be a power of two >= 16, got 100"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be >= 1, got 0"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(num_kvcache_blocks=0), ValueError, "num_kvcache_blocks must be -1"),
    (dict(attention_backend="cudnn"), ValueError, "attention_backend must be one of"),
    (dict(attention_backend="triton", device="cpu"), ValueError, "needs a CUDA device"),
    (dict(dtype="float64"), ValueError, "dtype must be 'auto' or one of"),
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(tensor_parallel_size=3), ValueError, "not divisible by tensor_parallel_size=3"),
    (dict(load_format="gguf"), ValueError, "load_format must be one of"),
    (dict(max_model_len=64, num_kvcache_blocks=-1, kvcache_block_size=16, enforce_eager="no"), TypeError,
     "enforce_eager must be a bool"),
])
def test_bad_options_raise(qwen3_path, options, error, words):
    with pytest.raises(error, match=words):
        LLM(qwen3_path, **options)


def test_missing_model_folder_or_config(tmp_path, qwen3_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(str(tmp_path))
    with pytest.raises(TypeError, match="model must be a path"):
        LLM(42)


def test_unsupported_architecture(tmp_path, qwen3_path):
    folder = tmp_path / "llama"
    shutil.copytree(qwen3_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type 'llama' .* not supported; supported: \['qwen3', 'qwen2'\]"):
        LLM(str(folder))


def test_missing_weights(tmp_path, qwen3_path):
    folder = tmp_path / "noweights"
    shutil.copytree(qwen3_path, folder)
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.remove(folder / name)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(folder))


def test_generate_after_exit_is_refused(qwen3_path):
    engine = LLM(qwen3_path, kvcache_block_size=16)
    engine.exit()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate([[1]], GREEDY, use_tqdm=False)
