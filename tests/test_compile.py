"""torch.compile'd fused ops: compiled once at start-up, never again while serving.

On CUDA the ops compile with inductor. Here they compile on the CPU with the "aot_eager" backend, which traces
and guards through dynamo and AOTAutograd exactly as inductor's path does but runs the traced graph eagerly (no
C++ toolchain needed). A guard that a later batch breaks shows up as a recompile, and error_on_recompile turns
that into a failure.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.utils.compile import compile_settings


@pytest.mark.parametrize("block_size,budget", [(16, 50), (32, 23)])
def test_no_recompile_while_serving(qwen3_path, block_size, budget):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # odd and even token counts, one-token prompts, chunked prefill (budget), prefix-cache hits (the repeat)
    batch = random_prompts([1, 2, 3, 16, 17, 49, 50, 51, 70, 7, 33], seed=block_size)
    options = dict(device="cpu", kvcache_block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=6)
    with compile_settings(devices=("cpu",), backend="aot_eager"):
        counters.clear()
        with LLM(qwen3_path, **options) as llm:
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = [o["token_ids"] for o in llm.generate(batch + batch[:4], sp, use_tqdm=False)]
                compiled += [o["token_ids"] for o in llm.generate(batch[5:7], sp, use_tqdm=False)]
                compiled += [o["token_ids"] for o in llm.generate(batch[:1], sp, use_tqdm=False)]  # a batch of one
        # one graph per fused op, whatever the sizes: norm + rope, residual add + norm, SiLU-and-mul, and the
        # sampler's four (penalties, the plain race, the top-k scaling, the filtered draw)
        assert counters["stats"]["unique_graphs"] == 7
    with LLM(qwen3_path, **options) as llm:
        eager = [o["token_ids"] for o in llm.generate(batch + batch[:4], sp, use_tqdm=False)]
        eager += [o["token_ids"] for o in llm.generate(batch[5:7], sp, use_tqdm=False)]
        eager += [o["token_ids"] for o in llm.generate(batch[:1], sp, use_tqdm=False)]
    assert compiled == eager
