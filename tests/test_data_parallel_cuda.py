"""Data-parallel replicas on NVIDIA GPUs (skipped without two): each replica holds one GPU as its cuda:0."""
import os

import pytest
import torch

from conftest import make_model, random_prompts
from nanovllm import LLM, SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs")]
ray = pytest.importorskip("ray")

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = random_prompts([1, 9, 40, 100, 300, 17, 64, 65])
OPTIONS = dict(dtype="float32", attention_backend="triton", kvcache_block_size=16)  # float32: exact across GPUs


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    """head_dim 64: a size every GPU backend serves."""
    return make_model(tmp_path_factory.mktemp("qwen3_hd64"), "qwen3", hidden_size=128, head_dim=64,
                      num_attention_heads=4, num_key_value_heads=2)


def test_two_gpu_replicas_equal_one_gpu_engine(qwen3_path):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    with LLM(qwen3_path, **OPTIONS) as single:
        expected = single.generate(PROMPTS, GREEDY, use_tqdm=False)
    with LLM(qwen3_path, data_parallel_size=2, **OPTIONS) as llm:  # starts a local Ray with both GPUs
        replicas = llm.replicas
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not ray.is_initialized()  # the local cluster it started is stopped again
    assert [r.device for r in replicas] == ["cuda", "cuda"]  # device "auto" found the GPU inside the actor
    # each replica sees exactly its own GPU, as cuda:0
    assert sorted(r.cuda_visible_devices for r in replicas) == sorted(str(r.gpu_ids[0]) for r in replicas)
    assert len({r.cuda_visible_devices for r in replicas}) == 2 and all(len(r.gpu_ids) == 1 for r in replicas)
    assert outputs == expected
