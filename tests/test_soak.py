"""Soak: hundreds of calls from 4 threads on one engine, with random prompts and settings, abandoned streams and
bad requests mixed in. Every good request must equal a fresh single-threaded engine's output, the block pool must
be full again, and memory must stay flat after the first rounds."""
import random
import threading

import pytest
import torch

from nanovllm import LLM, SamplingParams

THREADS, CALLS = 4, 60  # per thread
OPTIONS = dict(kvcache_block_size=16, num_kvcache_blocks=24, max_num_batched_tokens=64)  # small: preemption


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def random_request(rng: random.Random) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randrange(500) for _ in range(rng.randint(1, 60))]
    common = dict(max_tokens=rng.randint(1, 16), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        return prompt, SamplingParams(temperature=0, repetition_penalty=rng.choice([1.0, 1.2]), **common)
    return prompt, SamplingParams(temperature=rng.choice([0.5, 1.0]), top_k=rng.choice([0, 5]),
                                  top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 30), **common)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the callers are threads: keep torch from fighting them for the 2 cores
    yield
    torch.set_num_threads(before)


def test_soak_many_callers(qwen3_path):
    done: list[tuple[list[int], SamplingParams, list[int]]] = []
    errors, injected = [], {"bad": 0, "abandoned": 0}
    rss = {}
    lock = threading.Lock()

    with LLM(qwen3_path, **OPTIONS) as llm:
        def caller(index: int):
            rng = random.Random(index)
            for call in range(CALLS):
                batch = [random_request(rng) for _ in range(rng.randint(1, 4))]
                prompts, params = [p for p, _ in batch], [sp for _, sp in batch]
                try:
                    roll = rng.random()
                    if roll < 0.1:  # a bad request among good ones: refused whole, nothing queued
                        with lock:
                            injected["bad"] += 1
                        with pytest.raises(ValueError, match="out of range"):
                            llm.generate(prompts + [[1, 512]], params + [params[0]], use_tqdm=False)
                    elif roll < 0.2:  # a caller that leaves its stream part-way (an interrupt)
                        with lock:
                            injected["abandoned"] += 1
                        for n, _ in enumerate(llm.stream(prompts, params)):
                            if n == 2:
                                break
                    else:
                        outputs = llm.generate(prompts, params, use_tqdm=False)
                        with lock:
                            done.extend((p, sp, o["token_ids"]) for p, sp, o in zip(prompts, params, outputs))
                except BaseException as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(e)
                if index == 0 and call == CALLS // 4:
                    rss["after first rounds"] = rss_mib()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(170)
        assert not any(t.is_alive() for t in threads), "a caller hung"
        rss["end"] = rss_mib()
        bm = llm.scheduler.block_manager
        assert errors == []
        assert llm.is_finished() and bm.num_free_blocks == bm.num_blocks
    print(f"soak: {THREADS} threads x {CALLS} calls, {len(done)} good requests, injected {injected}, RSS {rss}")
    assert injected["bad"] > 0 and injected["abandoned"] > 0
    assert rss["end"] - rss["after first rounds"] < 8, rss
    # a fresh engine, one thread, one call: greedy and seeded outputs do not depend on the batch they ran in
    with LLM(qwen3_path, **OPTIONS) as fresh:
        expected = fresh.generate([p for p, _, _ in done], [sp for _, sp, _ in done], use_tqdm=False)
    assert [o["token_ids"] for o in expected] == [ids for _, _, ids in done]
