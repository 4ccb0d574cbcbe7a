"""One engine, many callers: threads share it one call at a time; an unreachable engine gives its memory back."""
import gc
import multiprocessing
import threading
import weakref

import pytest

from conftest import random_prompts
from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "step-by-step"])
def test_threads_calling_generate_at_once_each_get_their_own_results(qwen3_path, hf_reference, overlap):
    batches = [random_prompts([3, 17, 30, 9], seed=40 + i) for i in range(4)]
    results, errors = {}, []
    with LLM(qwen3_path, kvcache_block_size=16, async_scheduling=overlap) as llm:
        barrier = threading.Barrier(len(batches))

        def call(i):
            try:
                barrier.wait()
                for _ in range(2):
                    results.setdefault(i, []).append(
                        [o["token_ids"] for o in llm.generate(batches[i], GREEDY, use_tqdm=False)])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    assert errors == []
    for i, batch in enumerate(batches):
        expected = [hf_reference(qwen3_path, p, GREEDY.max_tokens) for p in batch]
        assert results[i] == [expected, expected]


def test_step_from_another_thread_waits_for_generate(qwen3_path):
    """add_request/step (nano-vllm's manual loop) from one thread and generate from another never interleave
    halfway through a step: both finish with the right tokens."""
    with LLM(qwen3_path, kvcache_block_size=16) as llm:
        expected = [o["token_ids"] for o in llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)]
        other = llm.add_request([9, 9, 9, 9], GREEDY)
        worker = threading.Thread(target=lambda: [llm.step() for _ in range(40)])
        worker.start()
        got = [o["token_ids"] for o in llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)]
        worker.join(60)
        while not llm.is_finished():
            llm.step()
        assert got == expected
        assert other.is_finished and len(other.completion_token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("tp", [1, 2])
def test_an_unreachable_engine_releases_everything(qwen3_path, tp):
    llm = LLM(qwen3_path, kvcache_block_size=16, tensor_parallel_size=tp)
    llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    engine, executor = weakref.ref(llm), weakref.ref(llm.executor)
    workers = llm.executor.worker_processes
    del llm
    gc.collect()
    assert engine() is None and executor() is None
    assert all(not w.is_alive() for w in workers)
    assert multiprocessing.active_children() == []


def test_an_exited_engine_lets_its_model_be_collected(qwen3_path):
    """The engine freezes the collector's view of the heap after start-up (no full passes over the model while
    it serves); exit() thaws it, so the model's layers, which sit in reference cycles (a weight's loader is a
    method of its layer), can be collected."""
    with LLM(qwen3_path, kvcache_block_size=16) as llm:
        model = weakref.ref(llm.executor.runner.model.model.layers[0].mlp.down_proj)
        assert gc.get_freeze_count() > 0
    gc.collect()
    assert model() is None


def test_an_engine_exit_keeps_the_heap_frozen_for_the_others(qwen3_path):
    """gc.freeze is process-wide: one engine's exit lets its own model be collected and freezes the heap again for
    an engine still serving (it used to leave the survivor's model to the collector's full passes)."""
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(qwen3_path, kvcache_block_size=16) as serving:
        expected = serving.generate([[1, 2, 3]], sp, use_tqdm=False)
        with LLM(qwen3_path, kvcache_block_size=16) as leaving:
            model = weakref.ref(leaving.executor.runner.model.model.layers[0].mlp.down_proj)
        assert model() is None  # collected before the heap froze again
        assert gc.get_freeze_count() > 0
        assert serving.generate([[1, 2, 3]], sp, use_tqdm=False) == expected


@pytest.mark.parametrize("kind", ["generate", "stream"])
def test_exit_from_another_thread_stops_a_running_call_with_its_reason(qwen3_path, kind):
    """exit() while another thread is in generate or a stream: that call stops at its next step with exit()'s
    RuntimeError (it met a released model before: AttributeError, IndexError, TypeError), and exit() waits for
    at most the step that runs."""
    prompts = random_prompts([20, 40, 9, 33], seed=50)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    llm = LLM(qwen3_path, kvcache_block_size=16)
    outcome, stepping = [], threading.Event()

    def call():
        try:
            if kind == "stream":
                for _ in llm.stream(prompts, long):
                    stepping.set()
            else:
                llm.generate(prompts, long, use_tqdm=False)
            outcome.append("finished")
        except BaseException as e:  # noqa: BLE001 - checked below
            outcome.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    if kind == "stream":
        assert stepping.wait(60)
    else:  # wait until its steps run
        while not llm.scheduler.running and thread.is_alive():
            threading.Event().wait(0.001)
    llm.exit()
    thread.join(60)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    assert "this LLM has been shut down with exit()" in str(outcome[0])
