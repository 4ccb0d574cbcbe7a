"""Tensor parallelism over NCCL on two GPUs (skipped with fewer): TP=2 against TP=1, and a clean exit.

On NVLink machines the environment must not turn on NVLink SHARP/multicast (NCCL_NVLS_ENABLE=0); the tests set it
for the processes they start.
"""
import glob
import importlib.util
import multiprocessing
import os
import tempfile

import pytest
import torch

from conftest import assert_agree_by_logprob_rule, generate_twice, make_model, random_prompts
from nanovllm import LLM, SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")]
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


PROMPTS = random_prompts([1, 9, 40, 100, 300, 17, 64, 65, 250])
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    # 4 query and 2 KV heads of 64: each rank keeps 2 query heads and 1 KV head
    return make_model(tmp_path_factory.mktemp("qwen3_tp"), "qwen3", hidden_size=256, head_dim=64,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)


@pytest.mark.parametrize("options", [
    dict(kvcache_block_size=16),
    dict(kvcache_block_size=32, max_num_batched_tokens=48),
    dict(kvcache_block_size=16, num_kvcache_blocks=40),  # forces preemption
    dict(kvcache_block_size=16, async_scheduling=False),
    dict(kvcache_block_size=16, enforce_eager=True),
], ids=["graphs", "chunked", "preempt", "step-by-step", "eager"])
def test_tp2_triton_float32_equals_tp1(qwen3_path, options):
    outs = []
    for tp in (1, 2):
        with LLM(qwen3_path, tensor_parallel_size=tp, dtype="float32", attention_backend="triton", **options) as llm:
            outs.append(generate_twice(llm, PROMPTS, GREEDY))
    assert outs[1] == outs[0]


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn is not installed")
@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=64), dict(num_kvcache_blocks=3)],
                         ids=["plain", "chunked", "preempt"])
def test_tp2_flash_attn_bf16_agrees_with_tp1(qwen3_path, options):
    common = dict(dtype="bfloat16", attention_backend="flash_attn", kvcache_block_size=256,
                  num_kvcache_blocks=64)  # two engines share GPU 0: fixed cache sizes
    common.update(options)
    with (LLM(qwen3_path, tensor_parallel_size=1, **common) as tp1,
          LLM(qwen3_path, tensor_parallel_size=2, **common) as tp2):
        out1, out2 = generate_twice(tp1, PROMPTS, GREEDY), generate_twice(tp2, PROMPTS, GREEDY)
        assert_agree_by_logprob_rule(tp1, tp2, PROMPTS, out1, out2)


def test_tp2_exits_cleanly_and_twice(qwen3_path):
    """No worker process, shared-memory segment or rendezvous file outlives LLM.exit(); a second engine works."""
    shm_before = set(glob.glob("/dev/shm/*"))
    files_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "nanovllm-dist-*")))
    for _ in range(2):
        llm = LLM(qwen3_path, tensor_parallel_size=2, dtype="bfloat16", attention_backend="triton",
                  kvcache_block_size=16)
        workers = llm.executor.worker_processes
        llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
        llm.exit()
        assert all(not w.is_alive() and w.exitcode == 0 for w in workers)
    assert multiprocessing.active_children() == []
    assert set(glob.glob("/dev/shm/*")) <= shm_before
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "nanovllm-dist-*"))) <= files_before
