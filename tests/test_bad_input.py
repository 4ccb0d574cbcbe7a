"""Every bad input fails at the call that caused it, naming what is wrong, and the engine keeps working."""
import json
import math
import os
import re
import shutil
import warnings

import pytest
import torch

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
    ([[1, True]], GREEDY, TypeError, "token ids must be ints, got True (bool)"),
    ([(1, "2")], GREEDY, TypeError, "token ids must be ints, got '2' (str)"),
    ([3], GREEDY, TypeError, "a prompt must be a str, a list of token ids or a prompt dict, got int"),
    ([{"prompt_token_ids": [1], "multi_modal_data": {}}], GREEDY, ValueError,
     "prompt dict keys ['multi_modal_data'] are not supported: only 'prompt' and 'prompt_token_ids' are read"),
    ([{"prompt": [1, 2]}], GREEDY, TypeError, "a prompt dict's 'prompt' is text (str), got list"),
    ([{"prompt_token_ids": 7}], GREEDY, TypeError, "'prompt_token_ids' is a list of token ids, got int"),
    ([{"prompt_token_ids": "1 2"}], GREEDY, TypeError, "'prompt_token_ids' is a list of token ids, got str"),
    ([{"prompt_token_ids": {1, 2}}], GREEDY, TypeError, "'prompt_token_ids' is a list of token ids, got set"),
    ([{"prompt_token_ids": []}], GREEDY, ValueError, "empty"),
    ([{"prompt_token_ids": [1, 600]}], GREEDY, ValueError, "token id 600"),
    ([{}], GREEDY, ValueError, "a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys []"),
    ([{"prompt": 5, "prompt_token_ids": [1]}], GREEDY, TypeError, "'prompt' is text (str), got int"),
    ([{"prompt": None, "prompt_token_ids": [1]}], GREEDY, TypeError, "'prompt' is text (str), got NoneType"),
    ([{"prompt": None}], GREEDY, TypeError, "'prompt' is text (str), got NoneType: token ids go under"),
    (5, GREEDY, TypeError, "prompts must be"),
    ([[1] * 190], SamplingParams(max_tokens=20), ValueError, "190 + max_tokens 20 = 210 exceeds max_model_len=200"),
    ([[1] * 100], SamplingParams(max_tokens=40), ValueError, "can never fit"),
    ([[1], [2]], [GREEDY], ValueError, "2 entries but there are 3 prompts"),
    ([[1]], "greedy", TypeError, "sampling_params must be SamplingParams"),
    (["hello"], GREEDY, ValueError, "no tokenizer"),
    ([[1]], SamplingParams(max_tokens=2, stop="w"), ValueError, "stop strings ['w'] need the text, but model folder"),
    ([[1]], SamplingParams(max_tokens=2, logprobs=21), ValueError, "logprobs=21 is more than this engine returns: "
                                                                   "at most 20"),
    ([[1]], SamplingParams(max_tokens=2, prompt_logprobs=513), ValueError, "prompt_logprobs=513 is more than"),
])
def test_bad_requests_raise_and_engine_survives(llm, expected, prompts, sp, error, words):
    with pytest.raises(error, match=re.escape(words)):
        llm.generate(prompts if not isinstance(prompts, list) else [[1, 2, 3]] + prompts,
                     [GREEDY] + sp if isinstance(sp, list) else sp, use_tqdm=False)
    assert llm.is_finished()  # the valid request in the same call was not queued either
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == expected


def test_no_tokenizer(llm):
    assert llm.get_tokenizer() is None


def test_a_bare_token_list_is_not_a_batch(llm):
    with pytest.raises(TypeError, match="wrap a single token-id list"):
        llm.generate([1, 2, 3], GREEDY, use_tqdm=False)


def test_vllm_prompt_dicts_are_prompts(llm, expected):
    """vLLM's TokensPrompt ({"prompt_token_ids": ids}), alone or in a list, mixed with plain prompts."""
    import numpy as np
    want = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False) == want
    assert llm.generate({"prompt_token_ids": (1, 2, 3)}, GREEDY, use_tqdm=False) == want
    assert llm.generate([{"prompt_token_ids": np.array([1, 2, 3])}], GREEDY, use_tqdm=False) == want
    mixed = llm.generate([[4, 5], {"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
    assert mixed[1] == want[0] and mixed[0] == llm.generate([[4, 5]], GREEDY, use_tqdm=False)[0]
    assert sum((e["token_ids"] for e in llm.stream({"prompt_token_ids": [1, 2, 3]}, GREEDY)), []) == expected


def test_numpy_token_ids_are_accepted(llm, expected):
    import numpy as np
    want = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert llm.generate([np.array([1, 2, 3])], GREEDY, use_tqdm=False) == want
    assert llm.generate([[np.int64(1), 2, np.uint8(3)]], GREEDY, use_tqdm=False) == want  # numpy ints in a list


def test_numpy_scalars_are_numbers(qwen3_path):
    """numpy's ints and floats count as ints and numbers (stored as Python's), bools still do not."""
    import numpy as np
    sp = SamplingParams(temperature=np.float32(0.5), top_k=np.int32(3), max_tokens=np.int64(5),
                        stop_token_ids=[np.int64(7)], seed=np.uint8(9), logprobs=np.int16(2))
    assert sp == SamplingParams(temperature=0.5, top_k=3, max_tokens=5, stop_token_ids=[7], seed=9, logprobs=2)
    assert [type(v) for v in (sp.temperature, sp.top_k, sp.max_tokens, sp.stop_token_ids[0], sp.seed)] == \
        [float, int, int, int, int]
    with pytest.raises(TypeError, match="max_tokens must be an int, got bool"):
        SamplingParams(max_tokens=np.bool_(True))
    flags = SamplingParams(ignore_eos=np.True_, detokenize=np.bool_(False))  # numpy's bools are bools
    assert (flags.ignore_eos, flags.detokenize) == (True, False) and type(flags.ignore_eos) is bool
    with LLM(qwen3_path, max_model_len=np.int64(64), kvcache_block_size=16, dtype="float",
             enforce_eager=np.True_, gpu_memory_utilization=np.float32(0.5)) as engine:
        assert engine.config.max_model_len == 64 and type(engine.config.max_model_len) is int
        assert engine.config.enforce_eager is True and engine.config.gpu_memory_utilization == 0.5
        assert engine.config.torch_dtype == torch.float32  # "float" is vLLM's spelling of float32, "half" of float16
        assert engine.generate([[1, 2]], SamplingParams(max_tokens=np.int64(3)), use_tqdm=False)[0]["token_ids"]



def test_a_max_model_len_past_the_model_is_cut_to_it_with_a_warning(qwen3_path):
    with pytest.warns(UserWarning, match=r"max_model_len=5000 is longer than the model's "
                                         r"max_position_embeddings=1024; using 1024") as record:
        engine = LLM(qwen3_path, kvcache_block_size=16, max_model_len=5000)
    with engine:
        assert engine.config.max_model_len == 1024
        with pytest.raises(ValueError, match="exceeds max_model_len=1024"):
            engine.generate([[1] * 1000], SamplingParams(max_tokens=30), use_tqdm=False)
    assert [w.filename for w in record] == [__file__]  # it points at the LLM(...) line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default 4096 is cut silently, as in nano-vllm
        with LLM(qwen3_path, kvcache_block_size=16) as engine:
            assert engine.config.max_model_len == 1024

def test_max_num_seqs_is_cut_to_the_token_budget_so_no_step_carries_more_tokens(qwen3_path):
    """A decode step takes a token of every running sequence, so no more sequences run than max_num_batched_tokens
    (vLLM refuses the pair): asked for, it is cut with a warning at the LLM(...) line; by default silently. Every
    step then stays within the budget, with the tokens of an engine without the limit (helper-25's sweep: steps
    of 8 tokens under a budget of 2)."""
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[i + 1] for i in range(8)]
    with LLM(qwen3_path, kvcache_block_size=16) as engine:
        expected = engine.generate(prompts, sp, use_tqdm=False)
    for mixed in (True, False):
        with pytest.warns(UserWarning, match=r"max_num_seqs=8 is more than max_num_batched_tokens=2, the tokens of "
                                             r"one step, .* using 2") as record:
            engine = LLM(qwen3_path, kvcache_block_size=16, max_num_batched_tokens=2, max_num_seqs=8,
                         async_scheduling=False, mixed_steps=mixed)
        assert [w.filename for w in record] == [__file__]
        with engine:
            assert engine.config.max_num_seqs == 2
            for prompt in prompts:
                engine.add_request(prompt, sp)
            sizes = []
            while not engine.is_finished():
                sizes.append(engine.step().num_tokens)
            assert max(sizes) == 2 and sum(sizes) == 8 * 6
            assert engine.generate(prompts, sp, use_tqdm=False) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with LLM(qwen3_path, kvcache_block_size=16, max_num_batched_tokens=48) as engine:
            assert engine.config.max_num_seqs == 48


def test_max_logprobs_sets_the_cap(qwen3_path):
    with LLM(qwen3_path, kvcache_block_size=16, max_model_len=64, max_logprobs=-1) as engine:
        greedy_one = dict(temperature=0, max_tokens=1)
        out = engine.generate([[1, 2]], SamplingParams(**greedy_one, logprobs=512), use_tqdm=False)[0]
        assert len(out["logprobs"][0]) == 512  # the whole vocabulary
        # -1 is vLLM's "the whole vocabulary", for generated and prompt tokens
        whole = engine.generate([[1, 2]], SamplingParams(**greedy_one, logprobs=-1, prompt_logprobs=-1),
                                use_tqdm=False)[0]
        assert whole["logprobs"][0].keys() == out["logprobs"][0].keys() and len(whole["prompt_logprobs"][1]) == 512
        assert max(abs(whole["logprobs"][0][t] - v) for t, v in out["logprobs"][0].items()) < 1e-5
        with pytest.raises(ValueError, match="logprobs=513 is more than this engine returns: at most 512"):
            engine.generate([[1, 2]], SamplingParams(max_tokens=1, logprobs=513), use_tqdm=False)
    with LLM(qwen3_path, kvcache_block_size=16, max_model_len=64) as engine:
        with pytest.raises(ValueError, match="logprobs=512 is more than this engine returns: at most 20"):
            engine.generate([[1, 2]], SamplingParams(max_tokens=1, logprobs=-1), use_tqdm=False)
    with LLM(qwen3_path, kvcache_block_size=16, max_model_len=64, max_logprobs=30) as engine:
        assert len(engine.generate([[1, 2]], SamplingParams(max_tokens=1, prompt_logprobs=30),
                                   use_tqdm=False)[0]["prompt_logprobs"][1]) >= 30
        with pytest.raises(ValueError, match="at most 30"):
            engine.generate([[1, 2]], SamplingParams(max_tokens=1, logprobs=31), use_tqdm=False)


def test_fits_exactly_at_the_limits(llm):
    # 8 blocks of 16 = 128 slots; the last sampled token needs none: 100 + 29 - 1 = 128
    out = llm.generate([[1] * 100], SamplingParams(temperature=0, max_tokens=29, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 29


def test_empty_prompt_list_returns_nothing(llm):
    assert llm.generate([], GREEDY, use_tqdm=False) == []


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(temperature=-0.5), ValueError, r"temperature must be a finite number >= 0, got -0.5"),
    (dict(temperature=math.nan), ValueError, r"temperature must be a finite number >= 0, got nan"),
    (dict(temperature=math.inf), ValueError, r"temperature must be a finite number >= 0, got inf"),
    (dict(temperature="hot"), TypeError, r"temperature must be a number, got str"),
    (dict(temperature=True), TypeError, r"temperature must be a number, got bool"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=math.nan), ValueError, r"top_p must be in \(0, 1\], got nan"),
    (dict(top_p=None), TypeError, r"top_p must be a number, got NoneType"),
    (dict(top_k=-2), ValueError, r"top_k must be 0 or -1 \(off\), or >= 1, got -2"),
    (dict(top_k=2.0), TypeError, r"top_k must be an int, got float"),
    (dict(top_k=True), TypeError, r"top_k must be an int, got bool"),
    (dict(min_p=-0.1), ValueError, r"min_p must be in \[0, 1\], got -0.1"),
    (dict(min_p=1.01), ValueError, r"min_p must be in \[0, 1\], got 1.01"),
    (dict(presence_penalty=2.5), ValueError, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    (dict(presence_penalty=-3), ValueError, r"presence_penalty must be in \[-2, 2\], got -3.0"),
    (dict(frequency_penalty=-2.01), ValueError, r"frequency_penalty must be in \[-2, 2\], got -2.01"),
    (dict(frequency_penalty="1"), TypeError, r"frequency_penalty must be a number, got str"),
    (dict(repetition_penalty=0), ValueError, r"repetition_penalty must be a finite number > 0, got 0.0"),
    (dict(repetition_penalty=-1.2), ValueError, r"repetition_penalty must be a finite number > 0, got -1.2"),
    (dict(repetition_penalty=math.inf), ValueError, r"repetition_penalty must be a finite number > 0, got inf"),
    (dict(max_tokens=0), ValueError, r"max_tokens must be None or >= 1, got 0"),
    (dict(max_tokens=2.0), TypeError, r"max_tokens must be an int, got float"),
    (dict(max_tokens="16"), TypeError, r"max_tokens must be an int, got str"),
    (dict(max_tokens=None, min_tokens=-1), ValueError, r"min_tokens must be >= 0, got -1"),
    (dict(min_tokens=-1), ValueError, r"min_tokens must be in \[0, max_tokens=16\], got -1"),
    (dict(min_tokens=9, max_tokens=8), ValueError, r"min_tokens must be in \[0, max_tokens=8\], got 9"),
    (dict(min_tokens=1.0), TypeError, r"min_tokens must be an int, got float"),
    (dict(stop=""), ValueError, r"stop must not contain an empty string, got \[''\]"),
    (dict(stop=["end", ""]), ValueError, r"stop must not contain an empty string"),
    (dict(stop=["end", 7]), TypeError, r"stop must be a str or a list of str, got \['end', 7\]"),
    (dict(stop=7), TypeError, r"stop must be a str or a list of str, got 7"),
    (dict(stop_token_ids=[1, "2"]), TypeError, r"stop_token_ids must be a list of int, got \[1, '2'\]"),
    (dict(stop_token_ids=5), TypeError, r"stop_token_ids must be a list of int, got 5"),
    (dict(stop_token_ids=[True]), TypeError, r"stop_token_ids must be a list of int"),
    (dict(stop_token_ids=[3, -1]), ValueError, r"stop_token_ids must be token ids >= 0, got \[3, -1\]"),
    (dict(n=0), ValueError, r"n must be >= 1, got 0"),
    (dict(n=2.0), TypeError, r"n must be an int, got float"),
    (dict(n=2, temperature=0), ValueError, r"n must be 1 with temperature=0 .*, got 2"),
    (dict(logprobs=-2), ValueError, r"logprobs must be None, -1 \(the whole vocabulary\) or >= 0, got -2"),
    (dict(logprobs=True), TypeError, r"logprobs must be an int, got bool"),
    (dict(prompt_logprobs=-2), ValueError, r"prompt_logprobs must be None, -1 \(the whole vocabulary\) or >= 0, "
                                          r"got -2"),
    (dict(prompt_logprobs=1.0), TypeError, r"prompt_logprobs must be an int, got float"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got float"),
    (dict(seed="42"), TypeError, r"seed must be an int, got str"),
    (dict(ignore_eos="yes"), TypeError, r"ignore_eos must be a bool, got 'yes'"),
    (dict(include_stop_str_in_output=1), TypeError, r"include_stop_str_in_output must be a bool, got 1"),
    (dict(skip_special_tokens=None), TypeError, r"skip_special_tokens must be a bool, got None"),
    (dict(detokenize="no"), TypeError, r"detokenize must be a bool, got 'no'"),
    (dict(detokenize=False, stop=["w1"]), ValueError, r"stop strings \['w1'\] are matched on the text: they need "
                                                        r"detokenize=True"),
    (dict(truncate_prompt_tokens=0), ValueError, r"truncate_prompt_tokens must be None, -1 \(max_model_len\) or "
                                                 r">= 1, got 0"),
    (dict(truncate_prompt_tokens=-2), ValueError, r"truncate_prompt_tokens must be .*, got -2"),
    (dict(truncate_prompt_tokens=5.0), TypeError, r"truncate_prompt_tokens must be an int, got float"),
])
def test_sampling_params_validate_themselves(kwargs, error, words):
    with pytest.raises(error, match=words):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    sp = SamplingParams()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.max_tokens, sp.min_tokens, sp.n) == (1.0, 1.0, 0, 0.0,
                                                                                                  16, 0, 1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (sp.seed, sp.stop, sp.stop_token_ids, sp.logprobs, sp.prompt_logprobs) == (None, [], [], None, None)
    assert (sp.ignore_eos, sp.include_stop_str_in_output, sp.skip_special_tokens) == (False, False, True)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=[5, 3, 5]).stop_token_ids == [5, 3]
    assert SamplingParams(seed=-1).seed is None  # vLLM's "no seed"
    assert SamplingParams(temperature=1e-4).temperature == 0.01  # vLLM's floor: smaller overflows the logits
    # greedy drops the filters, which cannot change the argmax
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    # the three fields nano-vllm had, positionally and by name, as before
    assert SamplingParams(0.6, 256, True) == SamplingParams(temperature=0.6, max_tokens=256, ignore_eos=True)
    assert isinstance(SamplingParams(temperature=1).temperature, float)


@pytest.mark.parametrize("options, error, words", [
    (dict(max_num_seq=4), TypeError, r"unknown option\(s\) \['max_num_seq'\]"),
    (dict(kvcache_block_size=100), ValueError, "kvcache_block_size must be a power of two >= 16, got 100"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be >= 1, got 0"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(num_kvcache_blocks=0), ValueError, "num_kvcache_blocks must be -1"),
    (dict(attention_backend="cudnn"), ValueError, "attention_backend must be one of"),
    (dict(attention_backend="triton", device="cpu"), ValueError, "needs a CUDA device"),
    (dict(dtype="float64"), ValueError, "dtype must be 'auto' or one of"),
    (dict(max_logprobs=-2), ValueError, "max_logprobs must be -1 \\(the whole vocabulary\\) or >= 0, got -2"),
    (dict(max_logprobs=2.0), TypeError, "max_logprobs must be an int, got 2.0"),
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(tensor_parallel_size=3), ValueError, "not divisible by tensor_parallel_size=3"),
    (dict(load_format="gguf"), ValueError, "load_format must be one of"),
    (dict(max_model_len=64, num_kvcache_blocks=-1, kvcache_block_size=16, enforce_eager="no"), TypeError,
     "enforce_eager must be a bool"),
    (dict(disable_custom_all_reduce=1), TypeError, "disable_custom_all_reduce must be a bool, got 1"),
    (dict(trust_remote_code="yes"), TypeError, "trust_remote_code must be a bool, got 'yes'"),
    (dict(tokenizer=7), TypeError, "tokenizer must be a path to a local tokenizer folder or None, got int"),
    (dict(tokenizer="/no/such/folder"), ValueError, "tokenizer folder '/no/such/folder' does not exist"),
    (dict(dtype=["float32"]), TypeError,
     re.escape("dtype must be 'auto', a dtype name or a torch.dtype, got ['float32']")),
    (dict(device=0), TypeError,
     re.escape("device must be 'auto', 'cpu' or 'cuda' (a str or torch.device), got 0")),
    (dict(kv_cache_dtype=5), TypeError,
     re.escape("kv_cache_dtype must be one of ('auto', 'fp8_e4m3', 'fp8') (a str), got 5")),
    (dict(gpu_memory_utilization="0.5"), TypeError,
     re.escape("gpu_memory_utilization must be a number in (0, 1], got '0.5'")),
    (dict(enforce_eager=1), TypeError, "enforce_eager must be a bool, got 1"),
    (dict(num_kvcache_blocks=10**9), ValueError, "num_kvcache_blocks=1000000000 needs "),
    (dict(num_kvcache_blocks=10**30), ValueError, "num_kvcache_blocks=1000000000000000000000000000000 needs "),
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
    config_file = os.path.join(qwen3_path, "config.json")
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {config_file!r} is a file, expected a tokenizer "
                                                   "folder (with one of ['tokenizer.json'")):
        LLM(qwen3_path, tokenizer=config_file)


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


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    import nanovllm
    assert nanovllm.__version__ == version("nanovllm")


def test_dtype_half_is_float16(qwen3_path):
    from nanovllm.config import Config
    assert Config(qwen3_path, dtype="half", device="cpu").torch_dtype == torch.float16
