"""Whole runs against Hugging Face transformers: greedy token ids must be equal, float32 on the CPU."""
import multiprocessing
import re

import pytest
import torch

from conftest import OTHER_SHAPES, make_model, next_token_logits, random_prompts, tiny_config
from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def assert_pool_empty(llm: LLM):
    bm = llm.scheduler.block_manager
    assert llm.is_finished()
    assert bm.num_free_blocks == bm.num_blocks


def run_and_compare(llm: LLM, path: str, prompts, hf_reference, sp=GREEDY):
    outputs = llm.generate(prompts, sp, use_tqdm=False)
    expected = [hf_reference(path, p, sp.max_tokens) for p in prompts]
    assert [o["token_ids"] for o in outputs] == expected
    assert all(o["finish_reason"] == "length" for o in outputs)
    assert_pool_empty(llm)
    return outputs


def model_with_eos(path: str, eos: int, tmp_path) -> str:
    """A copy of a tiny model whose config names `eos` as its end-of-sequence token (same weights)."""
    import json
    import shutil
    folder = tmp_path / f"eos{eos}"
    shutil.copytree(path, folder)
    for name in ("config.json", "generation_config.json"):
        file = folder / name
        if file.exists():
            data = json.loads(file.read_text())
            data["eos_token_id"] = eos
            file.write_text(json.dumps(data))
    return str(folder)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
@pytest.mark.parametrize("options", [{}, {"kvcache_block_size": 16}], ids=["block256", "block16"])
def test_greedy_matches_transformers(kind, options, request, hf_reference):
    path = request.getfixturevalue(f"{kind}_path")
    with LLM(path, **options) as llm:
        # 700: a prefill of over 1,000 tokens, which the CPU runs through the MLP in token chunks
        run_and_compare(llm, path, random_prompts([1, 7, 16, 33, 64, 200, 700]), hf_reference)


@pytest.mark.parametrize("shape", list(OTHER_SHAPES))
def test_other_model_shapes_match_transformers(shape, tmp_path, hf_reference):
    kind, overrides = OTHER_SHAPES[shape]
    path = make_model(tmp_path / shape, kind, seed=3, **overrides)
    # chunked prefill and 16-token blocks, so the paged prefill path runs too
    with LLM(path, kvcache_block_size=16, max_num_batched_tokens=64, max_model_len=512) as llm:
        run_and_compare(llm, path, random_prompts([1, 9, 40, 90], seed=4), hf_reference)


ROPE_KINDS = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.7,
                    "mscale_all_dim": 0.5, "beta_fast": 16.0, "rope_theta": 5e5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128, "rope_theta": 5e5},
    # dynamic NTK grows its frequencies only past max_position_embeddings, which max_model_len never passes
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
}


@pytest.mark.parametrize("kind", list(ROPE_KINDS))
def test_rotary_tables_equal_transformers(kind):
    """cos/sin of every position the model may reach (past max_position_embeddings for linear scaling and YaRN),
    float32, bit for bit against transformers' rotary embedding (the tables every backend reads: the CPU
    kernels, Triton's, PyTorch's)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from nanovllm.layers.rotary_embedding import RotaryEmbedding, rope_context_length, rope_tables
    config, _ = tiny_config("qwen3", head_dim=32, rope_parameters=ROPE_KINDS[kind], max_position_embeddings=512)
    length = rope_context_length(config)[0]
    assert length == {"linear": 1024, "yarn": 512, "yarn_mscale": 1024}.get(kind, 512)
    inv_freq, scaling = rope_tables(config, 32)
    ours = RotaryEmbedding(inv_freq, length, torch.float32, scaling)
    positions = torch.arange(length)[None]
    cos, sin = Qwen3RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    assert torch.equal(ours.cos_cache, cos[0, :, :16]) and torch.equal(ours.sin_cache, sin[0, :, :16])
    assert torch.equal(cos[0, :, :16], cos[0, :, 16:])  # transformers' halves layout, which the kernels assume


def test_yarn_runs_past_max_position_embeddings_as_transformers_does(tmp_path, hf_reference):
    """YaRN stretches the context to original_max_position_embeddings x factor (vLLM's rule): here 64 x 4 = 256
    against max_position_embeddings=128, and prompts whose completions run past position 128 match transformers."""
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}
    path = make_model(tmp_path / "yarn", "qwen3", seed=5, max_position_embeddings=128, rope_parameters=params)
    with pytest.warns(UserWarning, match=re.escape("max_model_len=1000 is longer than the model's context of 256 "
                                                   "(YaRN: original_max_position_embeddings=64 x factor 4.0; "
                                                   "max_position_embeddings=128); using 256")):
        llm = LLM(path, kvcache_block_size=16, max_model_len=1000)
    with llm:
        assert llm.config.max_model_len == 256
        run_and_compare(llm, path, random_prompts([120, 150, 200], seed=6), hf_reference)
        with pytest.raises(ValueError, match="exceeds max_model_len=256"):
            llm.generate([[1] * 257], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("params, words", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 2.0,
      "original_max_position_embeddings": 64, "rope_theta": 1e4}, re.escape(": rope_type 'longrope' is not supported")),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5, "rope_theta": 1e4},
     re.escape(": rope_type 'linear' rotates 8 of the head's 16 dimensions: a partial rotary embedding is not "
               "supported")),
    ({"rope_type": "yarn", "rope_theta": 1e4}, " cannot be read: .*'factor'"),  # transformers' own check
], ids=["longrope", "partial", "yarn_without_factor"])
def test_a_rotary_embedding_the_engine_cannot_run_is_refused_at_llm(tmp_path, params, words):
    import json
    path = make_model(tmp_path / "model", "qwen3")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["rope_parameters"] = params
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json of (model folder )?{re.escape(repr(path))}{words}"):
        LLM(path)


def test_attention_biases_under_tensor_parallelism_on_cpu(tmp_path, hf_reference):
    """q/k/v biases split with their heads, o_proj's bias added on rank 0 only, before the all-reduce."""
    kind, overrides = OTHER_SHAPES["qwen3_attention_bias"]
    path = make_model(tmp_path / "biased", kind, seed=3, **overrides)
    with LLM(path, tensor_parallel_size=2, kvcache_block_size=16) as llm:
        run_and_compare(llm, path, random_prompts([3, 40, 90], seed=4), hf_reference)
    assert multiprocessing.active_children() == []


def test_prefix_caching_is_token_exact(qwen3_path, hf_reference):
    shared = random_prompts([48], seed=1)[0]  # three full blocks of 16
    prompts = [shared + tail for tail in random_prompts([5, 9, 20], seed=2)] + [shared[:32], shared[:32] + [7]]
    with LLM(qwen3_path, kvcache_block_size=16) as llm:
        first = run_and_compare(llm, qwen3_path, prompts, hf_reference)
        # in one batch, prompts are admitted together: none finds another's blocks computed yet
        assert [o["num_cached_tokens"] for o in first] == [0, 0, 0, 0, 0]
        second = run_and_compare(llm, qwen3_path, prompts, hf_reference)
        # full blocks before each prompt's last token; the 68-token prompt also finds its 4th block, computed
        # while it decoded; the 32-token prompt recomputes its last block, which holds its last token
        assert [o["num_cached_tokens"] for o in second] == [48, 48, 64, 16, 32]


def test_prefix_cache_hits_inside_one_batch_are_exact(qwen3_path, hf_reference):
    # the same long prompt several times in one generate call, with a tiny token budget (chunked prefill):
    # later copies may only reuse blocks the first copy has finished computing
    prompt = random_prompts([70], seed=3)[0]
    with LLM(qwen3_path, kvcache_block_size=16, max_num_batched_tokens=24) as llm:
        run_and_compare(llm, qwen3_path, [prompt] * 4 + [prompt[:40]], hf_reference)


@pytest.mark.parametrize("budget", [1, 13, 64])
def test_chunked_prefill_is_token_exact(qwen3_path, hf_reference, budget):
    with LLM(qwen3_path, kvcache_block_size=16, max_num_batched_tokens=budget) as llm:
        run_and_compare(llm, qwen3_path, random_prompts([3, 50, 130], seed=4), hf_reference)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_is_token_exact(qwen3_path, hf_reference, caching):
    # 10 blocks of 16 tokens for 4 sequences that need 3-5 blocks each: decode must preempt and recompute
    with LLM(qwen3_path, kvcache_block_size=16, num_kvcache_blocks=10, enable_prefix_caching=caching) as llm:
        sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        run_and_compare(llm, qwen3_path, random_prompts([20, 25, 30, 35], seed=5), hf_reference, sp)
        assert llm.scheduler.num_preemptions > 0


def test_a_sequence_preempted_with_its_token_in_flight_is_not_admitted_again_in_the_same_step(qwen3_path):
    """Overlapped steps, mixed steps and prefix caching (the defaults) with 9 blocks of 16 tokens: a decode preempts
    a sequence whose token is in flight, and prefix hits on another sequence's copy of its blocks let it back in at
    once; it was sent to the runner without that token (AssertionError in the scheduler, found by a sweep)."""
    base = random_prompts([60], seed=31)[0]
    prompts = [base[:24] + [11, 498, 173, 384, 90], base, base[:55] + [384, 424, 378, 296, 343, 186, 193, 216, 40],
               base]
    # allowed_token_ids pins each completion to one token, so the schedule does not depend on the weights
    pinned = [(48, 8), (22, 8), (4, 7), (17, 8)]
    sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, allowed_token_ids=[t]) for n, t in pinned]
    with LLM(qwen3_path, kvcache_block_size=16, num_kvcache_blocks=9, max_num_batched_tokens=64) as llm:
        outs = llm.generate(prompts, sps, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [[t] * n for n, t in pinned]
        assert llm.scheduler.num_preemptions > 0


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "step-by-step"])
def test_tensor_parallel_2_on_cpu(qwen3_path, hf_reference, overlap):
    with LLM(qwen3_path, tensor_parallel_size=2, kvcache_block_size=16, max_num_batched_tokens=40,
             async_scheduling=overlap) as llm:
        assert llm.executor.runner.all_reduce.describe() == "all-reduce gloo"  # symmetric memory is CUDA's
        prompts = random_prompts([1, 12, 45, 90], seed=6)
        run_and_compare(llm, qwen3_path, prompts, hf_reference)
        run_and_compare(llm, qwen3_path, prompts, hf_reference)  # again, through the prefix cache
    assert multiprocessing.active_children() == []


def test_tensor_parallel_2_on_cpu_long_prefill(qwen3_path, hf_reference):
    # over 512 tokens in one step: every rank runs the MLP in the same token chunks, an all-reduce per chunk
    with LLM(qwen3_path, tensor_parallel_size=2, kvcache_block_size=16) as llm:
        run_and_compare(llm, qwen3_path, random_prompts([600, 300], seed=7), hf_reference)
    assert multiprocessing.active_children() == []


def test_eos_stops_and_is_reported(qwen3_path, hf_reference, tmp_path):
    prompt = random_prompts([10], seed=7)[0]
    first = hf_reference(qwen3_path, prompt, 24)
    eos = first[5]
    with LLM(model_with_eos(qwen3_path, eos, tmp_path)) as llm:  # same weights, that token ends the text
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
        assert out["token_ids"] == first[:first.index(eos) + 1]
        assert out["finish_reason"] == "stop"
        ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                               use_tqdm=False)[0]
        assert ignored["token_ids"] == first and ignored["finish_reason"] == "length"


def test_two_engines_one_after_the_other(qwen2_path, hf_reference):
    prompts = random_prompts([5, 11], seed=8)
    for _ in range(2):
        llm = LLM(qwen2_path, kvcache_block_size=16)
        run_and_compare(llm, qwen2_path, prompts, hf_reference)
        llm.exit()
        llm.exit()  # idempotent


def test_outputs_keep_prompt_order_and_mixed_params(qwen3_path, hf_reference):
    prompts = random_prompts([40, 2, 17], seed=9)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 30, 9)]
    with LLM(qwen3_path, kvcache_block_size=16) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for out, p, sp in zip(outputs, prompts, params):
            assert out["token_ids"] == hf_reference(qwen3_path, p, 30)[:sp.max_tokens]
        assert_pool_empty(llm)


def test_packed_starts_align_every_part_to_16_bytes():
    from nanovllm.utils.packing import packed_starts
    assert packed_starts([5, 4, 0, 1, 8]) == [0, 8, 12, 12, 16, 24]
    assert packed_starts([512, 512]) == [0, 512, 1024]  # the CUDA graphs' ids and positions
    assert packed_starts([]) == [0]


def test_a_backend_that_orders_decode_gets_the_rows_longest_first(qwen3_path, hf_reference, monkeypatch):
    """The runner uploads each decode step's rows by context length, longest first (ties in batch order), for a
    backend that asks (AttentionBackend.orders_decode, the triton one); the tokens stay transformers'."""
    import nanovllm.engine.model_runner as model_runner
    from nanovllm.layers.backends.torch_sdpa import TorchBackend
    steps = []

    class Ordering(TorchBackend):
        orders_decode = True

        def decode(self, q, k_cache, v_cache, ctx, scale, kv_scales=None):
            steps.append((ctx.decode_order.tolist(), ctx.context_lens.tolist()))
            return super().decode(q, k_cache, v_cache, ctx, scale, kv_scales)

    monkeypatch.setattr(model_runner, "create_backend", lambda *args, **kwargs: Ordering())
    with LLM(qwen3_path, kvcache_block_size=16, mixed_steps=False) as llm:
        run_and_compare(llm, qwen3_path, random_prompts([5, 40, 17, 40, 1, 90], seed=8), hf_reference,
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert steps
    for order, lens in steps:
        assert order == sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    assert any(order != list(range(len(order))) for order, _ in steps)


def test_the_compile_warm_up_runs_its_steps_and_sampler_kinds_at_once_and_leaves_the_engine_exact(
        qwen3_path, hf_reference, monkeypatch):
    """The start-up's compile warm-up (CUDA only; called here by hand) hands its five model steps, the in-flight
    fill, the GEMM kernels' warm-up and the sampler's nine kinds to run_warm_up to run at once on one device; they run (here in CPU threads)
    and the engine's tokens afterwards are still transformers' (the steps only scribbled on block 0)."""
    import nanovllm.engine.model_runner as model_runner
    calls, run_warm_up = [], model_runner.run_warm_up

    def recording(tasks, device, concurrently=True):
        calls.append((len(tasks), concurrently))
        run_warm_up(tasks, device, concurrently)

    monkeypatch.setattr(model_runner, "run_warm_up", recording)
    with LLM(qwen3_path, kvcache_block_size=16) as llm:
        llm.executor.runner.warmup_compiled_paths()
        assert calls == [(7 + 9, True)]
        run_and_compare(llm, qwen3_path, random_prompts([5, 40, 17], seed=21), hf_reference,
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))


def test_the_gemm_warm_up_runs_every_projection_and_the_head_at_every_row_count_up_to_max_num_seqs(
        qwen2_path, monkeypatch):
    """cuBLAS holds the host until the device is idle the first time it runs one of its kernels, and picks kernels
    by row count, so the start-up runs each distinct projection (weight shape and bias: Qwen2's qkv has one) and the
    LM head at every row count a decode step or a prefill step's logits can have, contiguous as the layers' inputs
    are; on this rank's shard only (PackedWeight.linear, no all-reduce or gather)."""
    from nanovllm.layers.cpu_packed import PackedWeight
    with LLM(qwen2_path, kvcache_block_size=16, max_num_seqs=20) as llm:
        model = llm.executor.runner.model
        distinct = {(tuple(m.weight.shape), getattr(m, "bias", None) is not None)
                    for m in model.modules() if hasattr(m, "packed")}
        assert ((512, 64), False) in distinct and ((128, 64), True) in distinct and len(distinct) == 5
        seen, linear = [], PackedWeight.linear

        def recording(self, x, weight, bias=None):
            seen.append((tuple(weight.shape), bias is not None, x.size(0), x.is_contiguous()))
            return linear(self, x, weight, bias)

        monkeypatch.setattr(PackedWeight, "linear", recording)
        llm.executor.runner.warm_gemm_kernels()
    assert sorted(seen) == sorted((shape, bias, m, True) for shape, bias in distinct for m in range(1, 21))


def test_a_tokenizer_from_another_folder(qwen3_path, qwen3_with_tokenizer):
    """vLLM's LLM(tokenizer=...): the weights of one folder, the tokenizer (and chat template, EOS) of another;
    trust_remote_code is accepted and handed to transformers."""
    texts = ["w5 w17 w300", "w1 w2"]
    with LLM(qwen3_with_tokenizer, kvcache_block_size=16) as llm:
        expected = llm.generate(texts, GREEDY, use_tqdm=False)
    with LLM(qwen3_path, tokenizer=qwen3_with_tokenizer, trust_remote_code=True, kvcache_block_size=16) as llm:
        assert llm.get_tokenizer() is not None and llm.config.tokenizer == qwen3_with_tokenizer
        assert llm.generate(texts, GREEDY, use_tqdm=False) == expected
    with pytest.raises(ValueError, match=re.escape(f"tokenizer folder {qwen3_path!r} holds no tokenizer")):
        LLM(qwen3_with_tokenizer, tokenizer=qwen3_path)


def test_text_prompts_go_through_the_tokenizer(qwen3_with_tokenizer, hf_reference):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(qwen3_with_tokenizer)
    texts = ["w5 w17 w300", "w1 " * 40 + "w2"]
    with LLM(qwen3_with_tokenizer, kvcache_block_size=16) as llm:
        assert llm.get_tokenizer().encode(texts[0]) == tokenizer.encode(texts[0])
        outputs = llm.generate(texts, GREEDY, use_tqdm=False)
        # vLLM's TextPrompt dicts are the same prompts (served from the prefix cache now)
        again = llm.generate([{"prompt": t} for t in texts], GREEDY, use_tqdm=False)
        again += llm.generate({"prompt": texts[0]}, GREEDY, use_tqdm=False)
    assert [(o["prompt_token_ids"], o["token_ids"], o["text"]) for o in again] == \
        [(o["prompt_token_ids"], o["token_ids"], o["text"]) for o in outputs + outputs[:1]]
    for text, out in zip(texts, outputs):
        ids = tokenizer.encode(text)
        assert out["token_ids"] == hf_reference(qwen3_with_tokenizer, ids, GREEDY.max_tokens)
        assert out["text"] == tokenizer.decode(out["token_ids"], skip_special_tokens=True)
        assert out["text"].startswith("w")


@pytest.mark.parametrize("options", [dict(), dict(num_kvcache_blocks=10, max_num_batched_tokens=20),
                                     dict(num_kvcache_blocks=10, max_num_batched_tokens=20, tensor_parallel_size=2)],
                         ids=["plain", "preempt-chunked", "preempt-chunked-tp2"])
def test_overlapped_steps_equal_synchronous_steps(qwen3_path, hf_reference, options, tmp_path):
    """Scheduling step N+1 before step N's tokens are read back changes nothing: same tokens, same stops (an EOS
    found one step late drops the surplus token), same finish reasons, an empty pool afterwards."""
    prompts = random_prompts([3, 20, 25, 30, 35, 9], seed=12)
    first = [hf_reference(qwen3_path, p, 40) for p in prompts]
    eos = first[2][6]  # a token some sequences produce mid-way
    sp = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=(i % 3 == 0)) for i in range(len(prompts))]
    results = []
    path = model_with_eos(qwen3_path, eos, tmp_path)
    for overlap in (False, True):
        with LLM(path, kvcache_block_size=16, async_scheduling=overlap, **options) as llm:
            outs = llm.generate(prompts, sp, use_tqdm=False)
            assert_pool_empty(llm)
            assert (llm.scheduler.num_preemptions > 0) == ("num_kvcache_blocks" in options)
        results.append([(o["token_ids"], o["finish_reason"]) for o in outs])
    assert results[0] == results[1]
    for (ids, reason), ref, s in zip(results[1], first, sp):
        stop = None if s.ignore_eos or eos not in ref else ref.index(eos) + 1
        assert ids == ref[:stop] and reason == ("stop" if stop else "length")
    assert any(reason == "stop" for _, reason in results[1])


def test_add_request_refuses_what_only_generate_can_do_and_keeps_serving(qwen3_with_tokenizer):
    """add_request() queues one sequence and step() produces tokens, not text: n > 1 and stop strings were
    silently ignored (one branch; the stop string never matched), now refused by name."""
    with LLM(qwen3_with_tokenizer, kvcache_block_size=16) as llm:
        with pytest.raises(ValueError, match=r"add_request\(\) runs one sequence, got n=2: use generate\(\)"):
            llm.add_request([1, 2, 3], SamplingParams(n=2, temperature=0.5, max_tokens=4))
        with pytest.raises(ValueError, match=re.escape("stop strings ['w67'] would never match")):
            llm.add_request("w1 w2 w3", SamplingParams(stop=["w67"], max_tokens=4))
        assert llm.is_finished()
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, stop_token_ids=[7])
        seq = llm.add_request([1, 2, 3], sp)
        while not llm.is_finished():
            llm.step()
        assert seq.is_finished
        assert seq.completion_token_ids == llm.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"]


def test_generate_completes_the_other_requests_it_stepped(qwen3_path, hf_reference):
    """generate() returns once its own requests are done, with a step of a request queued by add_request
    still in flight: that step's token must be filled in, and the request must go on exactly as if alone."""
    with LLM(qwen3_path, kvcache_block_size=16) as llm:
        other = llm.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        llm.generate([[9, 10]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert 3 < len(other.token_ids) < 3 + 30 and other.num_pending == 0
        while not llm.is_finished():
            llm.step()
        assert other.completion_token_ids == hf_reference(qwen3_path, [5, 6, 7], 30)
        assert_pool_empty(llm)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_step_that_raises_leaves_a_working_engine(qwen3_path, hf_reference, overlap):
    """An error (or Ctrl-C) in the middle of generate drops that call's requests; the next call is exact."""
    prompts = random_prompts([5, 30, 12], seed=13)
    llm = LLM(qwen3_path, kvcache_block_size=16, async_scheduling=overlap)
    runner = llm.executor.runner
    original, calls = runner.launch, []

    def failing_launch(step):
        calls.append(step.kind)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(step)

    # both the overlapped (launch) and the step-by-step (run) paths go through the failing launch
    runner.launch = failing_launch
    runner.run = lambda step: failing_launch(step).result()
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_pool_empty(llm)
        del runner.launch, runner.run  # the class's methods again
        run_and_compare(llm, qwen3_path, prompts, hf_reference)
    finally:
        llm.exit()



@pytest.mark.parametrize("where", ["allocate", "schedule_decode", "update"])  # mid-way through each
@pytest.mark.parametrize("overlap", [True, False])
def test_ctrl_c_inside_the_bookkeeping_loses_nothing(qwen3_path, hf_reference, overlap, where):
    """Ctrl-C (SIGINT) arriving while the scheduler moves sequences and blocks is raised once that is done: the
    KeyboardInterrupt reaches the caller, no block or sequence is lost, and the next call is exact. (Before,
    an interrupt inside _schedule_decode left sequences out of `running` and leaked their blocks.)"""
    import signal
    prompts = random_prompts([5, 30, 12], seed=13)
    llm = LLM(qwen3_path, kvcache_block_size=16, async_scheduling=overlap)
    scheduler = llm.scheduler
    stops = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 20)]
    # a call made part-way through: a block taken for a prompt, a decode's slot (its sequence is off `running`),
    # a sequence finishing while a step is booked
    owner, name = {"allocate": (scheduler.block_manager, "_take_free_block"),
                   "schedule_decode": (scheduler.block_manager, "may_append"),
                   "update": (scheduler, "_finish")}[where]
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # the handler runs here, in the middle of the bookkeeping
        return out

    setattr(owner, name, interrupted)
    # Python's own Ctrl-C handler, which a process started in the background (SIGINT ignored) does not have
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, stops, use_tqdm=False)
        assert len(calls) >= 2
        assert_pool_empty(llm)
        delattr(owner, name)
        run_and_compare(llm, qwen3_path, prompts, hf_reference)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        llm.exit()


def test_prefill_logits_under_tensor_parallelism(qwen3_path, hf_reference):
    """Scoring through every rank: TP=2's next-token logits equal TP=1's, and their argmax is transformers'."""
    prompt = random_prompts([37], seed=21)[0]
    logits = []
    for tp in (1, 2):
        with LLM(qwen3_path, tensor_parallel_size=tp, kvcache_block_size=16) as llm:
            logits.append(next_token_logits(llm, prompt))
            assert_pool_empty(llm)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert logits[0].argmax().item() == hf_reference(qwen3_path, prompt, 1)[0]


@pytest.mark.parametrize("options", [dict(max_num_seqs=2, max_num_batched_tokens=24),
                                     dict(num_kvcache_blocks=10, max_num_batched_tokens=20),
                                     dict(max_num_seqs=3, max_num_batched_tokens=7, async_scheduling=False)],
                         ids=["staggered-chunked", "preempt-chunked", "tiny-budget-step-by-step"])
def test_mixed_steps_equal_prefill_first_steps(qwen3_path, hf_reference, options):
    """Prompt chunks riding along decodes (the default) give transformers' tokens, as nano-vllm's prefill-first
    steps do, with prefix hits (a shared 32-token prefix, and the batch twice), chunking and preemption."""
    shared = random_prompts([32], seed=30)[0]
    prompts = random_prompts([3, 45, 20], seed=31) + [shared + [5], shared + [7, 8, 9], shared[:20]]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = []
    for mixed in (True, False):
        with LLM(qwen3_path, kvcache_block_size=16, mixed_steps=mixed, **options) as llm:
            runs = [run_and_compare(llm, qwen3_path, prompts, hf_reference, sp) for _ in range(2)]
            outputs.append([[o["token_ids"] for o in run] for run in runs])
    assert outputs[0] == outputs[1]  # prefix hits differ with the schedule; the tokens do not
