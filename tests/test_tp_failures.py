"""Tensor parallelism when something goes wrong part-way (CPU, gloo): a worker dies, or rank 0 is interrupted.

The ranks are then out of step, so the engine must stop them all and say why, rather than hang in a collective
or return mixed-up results; exit() still works and no process is left behind.
"""
import multiprocessing
import os
import signal

import pytest
import torch
import torch.distributed as dist

from nanovllm import LLM, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
PROMPTS = [[1, 2, 3], list(range(40)), [7] * 18]


def tp2(path, **options):
    return LLM(path, tensor_parallel_size=2, kvcache_block_size=16, **options)


def kill_on_call(llm, n, action):
    """Run `action` on rank 0's n-th launch, after the workers were sent that call."""
    runner, calls = llm.executor.runner, []
    original = runner.launch

    def launch(step):
        calls.append(1)
        if len(calls) == n:
            action()
        return original(step)

    runner.launch = launch


def assert_stopped(llm, match):
    with pytest.raises(RuntimeError, match=match):
        llm.generate(PROMPTS, SP, use_tqdm=False)
    llm.exit()
    llm.exit()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "step-by-step"])
def test_leaving_a_stream_early_keeps_the_ranks_in_step(qwen3_path, overlap):
    """Breaking out of a stream, or an error in the caller's loop, ends it between steps: not a failure. Its
    requests are dropped and the engine goes on, as with one rank."""
    with tp2(qwen3_path, async_scheduling=overlap) as llm:
        expected = [o["token_ids"] for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
        for i, _ in enumerate(llm.stream(PROMPTS, SP)):
            if i == 3:
                break
        with pytest.raises(ValueError, match="the caller's own"):
            for _ in llm.stream(PROMPTS, SP):
                raise ValueError("the caller's own error")
        assert [o["token_ids"] for o in llm.generate(PROMPTS, SP, use_tqdm=False)] == expected
        assert llm.is_finished() and not llm.executor.broken
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks


def test_worker_killed_while_idle(qwen3_path):
    llm = tp2(qwen3_path)
    worker = llm.executor.worker_processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    with pytest.raises(RuntimeError, match=r"worker rank 1 exited \(exit code -9\).*create a new one"):
        llm.generate(PROMPTS, SP, use_tqdm=False)
    assert_stopped(llm, "worker rank 1 exited")


def test_exit_after_a_worker_died(qwen3_path):
    llm = tp2(qwen3_path)
    os.kill(llm.executor.worker_processes[0].pid, signal.SIGKILL)
    llm.executor.worker_processes[0].join()
    llm.exit()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "step-by-step"])
def test_worker_killed_mid_generate(qwen3_path, overlap):
    llm = tp2(qwen3_path, async_scheduling=overlap)
    worker = llm.executor.worker_processes[0]

    def kill():
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()

    kill_on_call(llm, 3, kill)
    with pytest.raises(RuntimeError, match=r"worker rank 1 exited \(exit code -9\)"):
        llm.generate(PROMPTS, SP, use_tqdm=False)
    assert_stopped(llm, "worker rank 1 exited")


def test_interrupt_on_rank_0_stops_every_rank(qwen3_path):
    llm = tp2(qwen3_path)

    def interrupt():
        raise KeyboardInterrupt

    kill_on_call(llm, 4, interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, SP, use_tqdm=False)
    assert_stopped(llm, "a step stopped part-way \\(KeyboardInterrupt.*out of step")


def test_failure_after_the_runner_is_built_stops_the_workers(qwen3_path, monkeypatch):
    """An error later in LLM() (here: the tokenizer) must not leave the built ranks and their cache behind."""
    import nanovllm.engine.llm_engine as llm_engine

    def broken_tokenizer(model):
        raise OSError("tokenizer files are unreadable")

    monkeypatch.setattr(llm_engine, "load_tokenizer", broken_tokenizer)
    with pytest.raises(OSError, match="unreadable"):
        tp2(qwen3_path)
    assert multiprocessing.active_children() == []


def test_an_option_rank_0_refuses_is_its_value_error_and_a_backend_is_checked_before_any_worker_starts(
        qwen3_path, monkeypatch):
    """A bad option under TP is the ValueError one rank gives, not a RuntimeError about a worker that failed too;
    an attention backend the device cannot run is refused before the workers are spawned."""
    from nanovllm.engine.executor import Executor
    spawned = []
    spawn = Executor._spawn_workers
    monkeypatch.setattr(Executor, "_spawn_workers", lambda self, config: spawned.append(1) or spawn(self, config))
    with pytest.raises(ValueError, match="attention_backend='flash_attn' needs a CUDA device"):
        tp2(qwen3_path, device="cpu", attention_backend="flash_attn")
    assert spawned == [] and multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="num_kvcache_blocks=1000000000000 needs"):
        tp2(qwen3_path, device="cpu", num_kvcache_blocks=10 ** 12)
    assert spawned == [1] and multiprocessing.active_children() == []
    with tp2(qwen3_path, device="cpu") as llm:  # the next engine starts
        assert len(llm.generate([[1, 2, 3]], SP, use_tqdm=False)[0]["token_ids"]) == SP.max_tokens


def test_a_second_tensor_parallel_engine_is_refused_and_the_first_keeps_serving(qwen3_path):
    """The ranks meet in the process's one default process group: a second engine while the first lives is refused
    by name (its failed start-up used to destroy the first engine's group, and with it the first engine)."""
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with tp2(qwen3_path) as first:
        before = first.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"]
        workers = {process.pid for process in multiprocessing.active_children()}
        with pytest.raises(RuntimeError, match="default torch.distributed process group"):
            tp2(qwen3_path)
        assert {process.pid for process in multiprocessing.active_children()} == workers  # none was spawned
        assert first.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"] == before
    with tp2(qwen3_path) as again:  # once the first has exited, the next one starts
        assert again.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"] == before


def test_the_program_s_own_process_group_is_left_alone(qwen3_path, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        with pytest.raises(RuntimeError, match="already set up"):
            tp2(qwen3_path)
        assert dist.is_initialized()
        ones = torch.ones(2)
        dist.all_reduce(ones)  # the program's group still works
        assert ones.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()
