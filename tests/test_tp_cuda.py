"""Tensor parallelism on two GPUs (skipped with fewer): TP=2 against TP=1, the all-reduce over symmetric memory against
NCCL, a clean exit.

On NVLink machines the environment must not turn on NVLink SHARP/multicast (NCCL_NVLS_ENABLE=0); the tests set it
for the processes they start.
"""
import glob
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

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


def _all_reduce_rank(rank: int, init_file: str, out_dir: str):
    """One rank of test_symm_mem_all_reduce_equals_nccl: every case's result next to NCCL's, saved for the parent."""
    from nanovllm.utils.parallel import create_all_reduce
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", world_size=2, rank=rank, device_id=device)
    gen = torch.Generator(device=device).manual_seed(100 + rank)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    results = {}
    try:
        # 512 x 256 elements: bf16 messages of up to 128 KiB take the one-shot kernel, larger ones the two-shot
        reducers = {dtype: create_all_reduce(2, device, dtype, max_tokens=512, hidden_size=256, custom=True)
                    for dtype in (torch.bfloat16, torch.float32, torch.float16)}
        results["types"] = {str(k): type(v).__name__ for k, v in reducers.items()}
        results["nccl type"] = type(create_all_reduce(2, device, torch.bfloat16, 64, 256, custom=False)).__name__
        for dtype, ar in reducers.items():
            cases = {"one row": randn(1, 256, dtype=dtype), "7 rows": randn(7, 256, dtype=dtype),
                     "256 rows": randn(256, 256, dtype=dtype), "300 rows": randn(300, 256, dtype=dtype),
                     "capacity": randn(512, 256, dtype=dtype), "past capacity": randn(513, 256, dtype=dtype),
                     "unaligned view": randn(8 * 256 + 1, dtype=dtype)[1:].view(8, 256),
                     "unaligned 400 rows": randn(400 * 256 + 1, dtype=dtype)[1:].view(400, 256)}
            for name, x in cases.items():
                want = x.clone()
                dist.all_reduce(want)
                got = ar(x)
                results[f"{dtype} {name}"] = (torch.equal(got, want), got.shape == want.shape, got.dtype == dtype)
        # captured in a CUDA graph: a one-shot and a two-shot all-reduce that depend on each other, on new inputs
        ar = reducers[torch.bfloat16]
        small, large = randn(16, 256), randn(384, 256)

        def step():
            return ar(ar(large) * 0.5 + ar(small).sum())

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = step()
        replays = []
        for _ in range(4):
            small.copy_(randn(16, 256))
            large.copy_(randn(384, 256))
            graph.replay()
            a, b = large.clone(), small.clone()
            dist.all_reduce(a)
            dist.all_reduce(b)
            want = a * 0.5 + b.sum()
            dist.all_reduce(want)
            replays.append(torch.equal(y, want))
        results["graph replays"] = replays
    finally:
        torch.cuda.synchronize()
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_symm_mem_all_reduce_equals_nccl(tmp_path):
    """The all-reduce over symmetric memory (one-shot and two-shot kernels) gives NCCL's bits (two ranks: one
    rounding of a + b), also on views that are not 16-byte aligned and inside a replayed CUDA graph; past its
    buffer and for float16 it is NCCL's."""
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("the two GPUs cannot address each other's memory: the engine uses NCCL alone")
    torch.multiprocessing.spawn(_all_reduce_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results["types"] == {"torch.bfloat16": "SymmMemAllReduce", "torch.float32": "SymmMemAllReduce",
                                    "torch.float16": "AllReduce"}
        assert results["nccl type"] == "AllReduce"
        cases = {k: v for k, v in results.items() if k.startswith("torch.")}
        assert len(cases) == 24
        assert all(all(checks) for checks in cases.values()), cases
        assert results["graph replays"] == [True] * 4


def run_in_fresh_process(script_text: str, model_path: str, tmp_path, timeout: float):
    """Run a script as `python script model prompts.json out.json` in a new process (torch's symmetric memory can
    be set up once per process) and return what it wrote to out.json."""
    script, prompts, out = tmp_path / "script.py", tmp_path / "prompts.json", tmp_path / "out.json"
    script.write_text(script_text)
    prompts.write_text(json.dumps(PROMPTS))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, str(script), model_path, str(prompts), str(out)], env=env, check=True,
                   timeout=timeout)
    return json.loads(out.read_text())


ENGINES_SCRIPT = """
import json, sys
from nanovllm import LLM, SamplingParams

if __name__ == "__main__":
    path, prompts, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = []
    for disable in (False, True, False):
        with LLM(path, tensor_parallel_size=2, dtype="bfloat16", attention_backend="triton", kvcache_block_size=16,
                 num_kvcache_blocks=256, disable_custom_all_reduce=disable) as llm:
            reducer = llm.executor.runner.all_reduce
            tokens = [o["token_ids"] for o in llm.generate(prompts, greedy, use_tqdm=False)]
            results.append([type(reducer).__name__, reducer.describe(), tokens])
    json.dump(results, open(out, "w"))
"""


def test_tp2_symm_mem_all_reduce_engines_in_one_process(qwen3_path, tmp_path):
    """In a fresh process, a TP=2 engine with disable_custom_all_reduce=False sums its layers over symmetric memory
    and gives the same tokens as one with every all-reduce through NCCL (the default); a later engine of that
    process asking for it falls back to NCCL and says why (torch sets symmetric memory up once per process), with
    the same tokens again."""
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("the two GPUs cannot address each other's memory: the engine uses NCCL alone")
    (kind1, _, tokens1), (kind2, why2, tokens2), (kind3, why3, tokens3) = run_in_fresh_process(
        ENGINES_SCRIPT, qwen3_path, tmp_path, timeout=600)
    assert (kind1, kind2, kind3) == ("SymmMemAllReduce", "AllReduce", "AllReduce")
    assert "disable_custom_all_reduce=True" in why2 and "earlier engine in this process" in why3
    assert tokens1 == tokens2 == tokens3


KILL_SCRIPT = """
import json, os, signal, sys, time
from nanovllm import LLM, SamplingParams

if __name__ == "__main__":
    path, prompts, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
    llm = LLM(path, tensor_parallel_size=2, dtype="bfloat16", attention_backend="triton", kvcache_block_size=16,
              num_kvcache_blocks=256, async_scheduling=False, disable_custom_all_reduce=False)
    kind = type(llm.executor.runner.all_reduce).__name__
    worker, runner, calls, killed = llm.executor.worker_processes[0], llm.executor.runner, [], []
    launch = runner.launch

    def launch_and_kill(step):  # the worker dies after it was sent the third step, before rank 0 runs it
        calls.append(step)
        if len(calls) == 3:
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()
            killed.append(time.perf_counter())
        return launch(step)

    runner.launch = launch_and_kill
    error = None
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)
    except RuntimeError as e:
        error = str(e)
    seconds = time.perf_counter() - killed[0]
    llm.exit()
    json.dump(dict(kind=kind, error=error, seconds=seconds), open(out, "w"))
"""


@pytest.mark.xfail(strict=True, reason="seen timing out on two H200s (no output; where rank 0 then waits is not yet "
                                       "known): why disable_custom_all_reduce defaults to True")
def test_worker_killed_mid_step_is_reported_within_seconds(qwen3_path, tmp_path):
    """A worker that dies while rank 0's step waits in the all-reduce over symmetric memory (whose barriers never
    time out) is reported to the caller within seconds, exit() returns and the process ends."""
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("the two GPUs cannot address each other's memory: the engine uses NCCL alone")
    result = run_in_fresh_process(KILL_SCRIPT, qwen3_path, tmp_path, timeout=150)
    assert result["kind"] == "SymmMemAllReduce"
    assert "worker rank 1 exited (exit code -9)" in result["error"]
    assert result["seconds"] < 10
