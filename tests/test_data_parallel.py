"""Data parallelism on Ray and the Ray Data processor, on a simulated two-node cluster (two raylets, 1 CPU each):
replicas must give exactly the single engine's outputs, in input order, also when one is killed mid-call."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import _thread

import numpy as np
import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, Logprob, SamplingParams
from nanovllm.engine.data_parallel import DataParallelLLM, spread_by_cost

ray = pytest.importorskip("ray")

OPTIONS = dict(kvcache_block_size=16)
OBJECT_STORE = 80 << 20  # Ray's minimum is 75 MiB


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process reference engines: one core each, like the replicas
    # CPU nodes also on a GPU host (num_gpus=0: Ray would count the host's GPUs on each)
    node = dict(num_cpus=1, num_gpus=0, object_store_memory=OBJECT_STORE)
    two_nodes = Cluster(initialize_head=True, head_node_args=node)
    try:
        two_nodes.add_node(**node)
        two_nodes.wait_for_nodes()
        ray.init(address=two_nodes.address)
        yield two_nodes
    finally:
        ray.shutdown()
        two_nodes.shutdown()
        torch.set_num_threads(threads)


def single_engine(path: str, prompts, sampling_params) -> list[dict]:
    with LLM(path, **OPTIONS) as llm:
        return llm.generate(prompts, sampling_params, use_tqdm=False)


def mixed_batch() -> tuple[list, list[SamplingParams]]:
    """Text and token-id prompts (lists, a numpy array) of many lengths, each with its own max_tokens."""
    tokens = random_prompts([3, 40, 25, 9, 60, 17], seed=7)
    tokens[2] = np.array(tokens[2], dtype=np.int64)
    texts = ["w5 w17 w300", "w1 " * 50 + "w2", "w400 w3", " ".join(f"w{i}" for i in range(100, 130))]
    prompts = [p for pair in zip(tokens, texts) for p in pair] + tokens[len(texts):]
    return prompts, [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(len(prompts))]


def without_cache_hits(output) -> dict:
    return {key: value for key, value in output.items() if key != "num_cached_tokens"}


def test_spread_by_cost_puts_the_longest_first_into_the_least_loaded():
    assert spread_by_cost([10, 3, 7, 7, 1], [0, 0]) == [[0, 1, 4], [2, 3]]  # loads 14 and 14
    assert spread_by_cost([10, 3, 7, 7, 1], [12, 0]) == [[3, 4], [0, 1, 2]]  # on top of their work: 20 and 20
    assert spread_by_cost([5], [0, 0, 0]) == [[0], [], []]


def test_too_many_replicas_for_the_cluster(cluster, qwen3_path):
    with pytest.raises(RuntimeError, match=r"data_parallel_size=3 CPU replicas need at least one CPU each, but the "
                                           r"Ray cluster has 2 CPUs"):
        LLM(qwen3_path, data_parallel_size=3, **OPTIONS)


class TestTwoReplicas:
    """One DataParallelLLM for these tests, in order: it holds both nodes' CPUs until the class is done, and the
    last test takes its model folder away."""

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, qwen3_with_tokenizer, tmp_path_factory):
        return str(shutil.copytree(qwen3_with_tokenizer, tmp_path_factory.mktemp("dp") / "model"))

    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, cluster, model):
        llm = LLM(model, data_parallel_size=2, **OPTIONS)
        yield llm
        llm.exit()

    def test_equal_to_one_engine_in_input_order(self, llm, model):
        assert isinstance(llm, DataParallelLLM)
        assert len({r.node_id for r in llm.replicas}) == 2  # one replica on each raylet
        prompts, sps = mixed_batch()
        outputs = llm.generate(prompts, sps, use_tqdm=False)
        # then sampled requests: the driver draws the seeds of unseeded requests as one engine would (the n-th
        # request of the engine's life gets the n-th seed), so outputs do not depend on which replica ran what
        sampled = random_prompts([5, 30, 12, 44], seed=9)
        sampled_sps = [SamplingParams(temperature=0.9, top_k=40, max_tokens=10, ignore_eos=True),
                       SamplingParams(temperature=1.2, n=2, max_tokens=6, ignore_eos=True)] * 2
        sampled_outputs = llm.generate(sampled, sampled_sps, use_tqdm=False)
        with LLM(model, **OPTIONS) as one:
            assert outputs == one.generate(prompts, sps, use_tqdm=False)
            assert sampled_outputs == one.generate(sampled, sampled_sps, use_tqdm=False)
        assert [len(o["token_ids"]) for o in outputs] == [sp.max_tokens for sp in sps]

    def test_stream_and_chat(self, llm, model):
        prompts, sps = mixed_batch()
        final = llm.generate(prompts, sps, use_tqdm=False)
        text, ids, finished = {}, {}, []
        for event in llm.stream(prompts, sps):
            text[event["index"]] = text.get(event["index"], "") + event["text"]
            ids[event["index"]] = ids.get(event["index"], []) + event["token_ids"]
            if event["finished"]:
                finished.append(event["index"])
        assert sorted(finished) == list(range(len(prompts)))
        assert [text[i] for i in range(len(prompts))] == [o["text"] for o in final]
        assert [ids[i] for i in range(len(prompts))] == [o["token_ids"] for o in final]
        conversation = [{"role": "user", "content": "w5 w6"}]
        with pytest.raises(ValueError, match="chat template"):  # this tokenizer has none, as one engine says
            llm.chat([conversation])
        assert llm.get_tokenizer() is llm.tokenizer is not None
        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)  # vLLM's prompt dicts, as one engine
        assert llm.generate({"prompt": "w5 w6"}, greedy, use_tqdm=False)[0]["token_ids"] == \
            llm.generate(["w5 w6"], greedy, use_tqdm=False)[0]["token_ids"]
        own = "{% for m in messages %} {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w3{% endif %}"
        chat = llm.chat([conversation], greedy, use_tqdm=False, chat_template=own)[0]  # vLLM's option: a template
        assert (chat["prompt_token_ids"], chat["prompt"]) == ([5, 6, 3], " w5 w6 w3")  # the rendered text, as vLLM
        # vLLM's request ids, numbered on the driver, and Logprob entries with their decoded tokens through Ray
        with_logprobs = llm.generate(["w5 w6", "w7"], SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                                     use_tqdm=False)
        assert int(with_logprobs[1].request_id) == int(with_logprobs[0].request_id) + 1 == int(chat.request_id) + 2
        for entry in with_logprobs[0].logprobs + with_logprobs[1].logprobs:
            assert all(type(lp) is Logprob and lp.rank >= 1 and lp.decoded_token == llm.get_tokenizer().decode([t])
                       for t, lp in entry.items())
        assert chat["token_ids"] == llm.generate([[5, 6, 3]], greedy, use_tqdm=False)[0]["token_ids"]
        text_out = llm.generate(["w5 w6"], greedy, use_tqdm=False)[0]  # vLLM's attributes, through Ray
        assert (text_out.prompt, text_out.outputs[0].token_ids) == ("w5 w6", text_out["token_ids"])
        cut = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=3, detokenize=False)
        out = llm.generate(["w5 w6 w7 w8 w9"], cut, use_tqdm=False)[0]
        assert (out["prompt_token_ids"], out["text"]) == ([7, 8, 9], "")
        assert out["token_ids"] == llm.generate([[7, 8, 9]], greedy, use_tqdm=False)[0]["token_ids"]

    def test_a_call_from_inside_its_own_stream_is_refused(self, llm):
        """As one engine: a generate inside the stream loop raises at once, where waiting would never end."""
        sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        expected = llm.generate([[1, 2, 3]], sp, use_tqdm=False)
        stream = llm.stream([[4, 5, 6], [7, 8]], sp)
        next(stream)
        with pytest.raises(RuntimeError, match="already busy in this thread"):
            llm.generate([[1, 2, 3]], sp, use_tqdm=False)
        stream.close()
        assert llm.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"] == expected[0]["token_ids"]

    def test_bad_requests_are_refused_on_the_driver(self, llm):
        with pytest.raises(ValueError, match=r"token id 512 is out of range: it must be in \[0, vocab_size=512\)"):
            llm.generate([[1, 2], [3, 512, -1]], SamplingParams(max_tokens=4), use_tqdm=False)
        with pytest.raises(TypeError, match=r"token ids must be ints, got True \(bool\)"):
            llm.generate([[1, True]], SamplingParams(max_tokens=4), use_tqdm=False)
        with pytest.raises(ValueError, match="exceeds max_model_len=1024"):
            llm.generate([[1] * 1000], SamplingParams(max_tokens=30), use_tqdm=False)
        with pytest.raises(TypeError, match="sampling_params must be SamplingParams, got dict"):
            llm.generate([[1, 2]], [dict(max_tokens=3)], use_tqdm=False)
        assert llm.generate([], SamplingParams(), use_tqdm=False) == []

    def test_ctrl_c_frees_the_replicas_at_once(self, llm, model):
        """An interrupted generate cancels the replicas' shares: they stop at their next step, so the next call does
        not queue behind work nobody will read (uninterrupted, these shares run for half a minute or more)."""
        endless = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        # a process started in the background by a non-interactive shell ignores SIGINT, and then so would the
        # simulated Ctrl-C: give it Python's usual handler for this test
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        ctrl_c = threading.Timer(1.0, _thread.interrupt_main)
        ctrl_c.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                llm.generate(random_prompts([10] * 512, seed=5), endless, use_tqdm=False)
        finally:
            ctrl_c.join()
            signal.signal(signal.SIGINT, previous)
        prompts, sps = mixed_batch()
        start = time.perf_counter()
        outputs = llm.generate(prompts, sps, use_tqdm=False)
        waited = time.perf_counter() - start
        # what the interrupted call evicted depends on how far it got (on a loaded machine, not far): the earlier
        # tests' prompt blocks may still be cached, so the prefix hits may differ from a fresh engine's, not the rest
        expected = single_engine(model, prompts, sps)
        assert [without_cache_hits(o) for o in outputs] == [without_cache_hits(o) for o in expected]
        assert waited < 15, f"the next call waited {waited:.1f} s behind the interrupted one"

    def test_a_replica_killed_mid_generate_loses_no_request(self, llm, model):
        prompts = random_prompts([20] * 6, seed=3)
        sp = SamplingParams(temperature=0, max_tokens=800, ignore_eos=True)
        expected = single_engine(model, prompts, sp)
        victim = llm.actors[1]
        # its job is out by then on any machine; on this one the replica is some seconds into it
        kill = threading.Timer(0.5, ray.kill, args=(victim,))
        with pytest.warns(RuntimeWarning, match=r"replica 1 \(pid \d+\) died .*; restarting it and running its "
                                                r"3 unfinished requests again"):
            kill.start()
            outputs = llm.generate(prompts, sp, use_tqdm=False)
        kill.join()
        assert outputs == expected
        assert llm.actors[1] != victim and len(llm.replicas) == 2

    def test_a_replica_killed_mid_stream_loses_and_repeats_nothing(self, llm, model):
        """Its unfinished requests run again on the replacement; what the stream had sent is not sent twice."""
        prompts = random_prompts([30, 5, 44, 12, 60, 9], seed=21)
        sps = [SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True, seed=i) for i in range(3)] + \
              [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 3  # seeded: the same in both calls
        expected = llm.generate(prompts, sps, use_tqdm=False)
        ids, finished, killed = {}, [], False
        with pytest.warns(RuntimeWarning, match="died .*; restarting it"):
            for event in llm.stream(prompts, sps):
                ids[event["index"]] = ids.get(event["index"], []) + event["token_ids"]
                finished += [event["index"]] if event["finished"] else []
                if not killed and sum(map(len, ids.values())) >= 20:  # both replicas are part-way
                    ray.kill(llm.actors[0])
                    killed = True
        assert sorted(finished) == list(range(len(prompts)))
        assert [ids[i] for i in range(len(prompts))] == [o["token_ids"] for o in expected]

    def test_no_replica_can_restart(self, llm, model):
        shutil.rmtree(model)  # the replacements cannot load it
        for actor in llm.actors:
            ray.kill(actor)
        with pytest.warns(RuntimeWarning, match="died"), \
                pytest.raises(RuntimeError, match=r"no data-parallel replica is left to run the requests: replica 0: "
                                                  r"The actor died because of an error raised in its creation task"
                                                  r"(.|\n)*does not exist"):
            llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=4), use_tqdm=False)
        assert llm.actors == []


def draws_as_calls_run(llm) -> list[dict]:
    """Calls that run nothing: a stream left before its first event, bad input, a generate refused as busy. They
    must draw no seed, so the sampled generate after them gets the seeds it would get without them."""
    sampled = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)  # no seed: the engine draws one
    llm.stream([[9, 9, 9]], sampled).close()
    with pytest.raises(ValueError, match=r"token id 512 is out of range"):  # at the call, not at the first event
        llm.stream([[9, 512]], sampled)
    stream = llm.stream([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=3, seed=1))
    next(stream)
    with pytest.raises(RuntimeError, match="already busy in this thread"):
        llm.generate([[8, 8]], sampled, use_tqdm=False)
    stream.close()
    return llm.generate(random_prompts([3, 20, 7], seed=11), sampled, use_tqdm=False)


def test_seeds_are_drawn_when_a_call_runs_as_on_one_engine(cluster, qwen3_path):
    with LLM(qwen3_path, data_parallel_size=2, **OPTIONS) as dp:
        outputs = draws_as_calls_run(dp)
    with LLM(qwen3_path, **OPTIONS) as one:
        assert outputs == draws_as_calls_run(one)


SHUT_DOWN = r"this LLM has been shut down with exit\(\); create a new one"


def assert_shut_down(llm, actors: list):
    """No replica is left, and every call says why."""
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.info.remote(), timeout=30)
    sp = SamplingParams(max_tokens=2)
    with pytest.raises(RuntimeError, match=SHUT_DOWN):
        llm.generate([[1, 2]], sp, use_tqdm=False)
    with pytest.raises(RuntimeError, match=SHUT_DOWN):
        llm.stream([[1, 2]], sp)
    with pytest.raises(RuntimeError, match=SHUT_DOWN):
        llm.chat([{"role": "user", "content": "w1"}], sp, use_tqdm=False)


def test_exit_from_another_thread_stops_a_running_generate(cluster, qwen3_path):
    """As on one engine: the call raises exit()'s reason at once, and exit() does not wait for it (uninterrupted,
    this generate runs for most of a minute)."""
    llm = LLM(qwen3_path, data_parallel_size=2, **OPTIONS)
    actors = llm.actors
    took = {}

    def exit_later():
        time.sleep(1.0)
        start = time.perf_counter()
        llm.exit()
        took["exit"] = time.perf_counter() - start

    exiting = threading.Thread(target=exit_later)
    exiting.start()
    start = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match=SHUT_DOWN):
            llm.generate(random_prompts([10] * 512, seed=5), SamplingParams(max_tokens=1000, ignore_eos=True),
                         use_tqdm=False)
        ended = time.perf_counter() - start
    finally:
        exiting.join()
    assert took["exit"] < 5, f"exit() took {took['exit']:.1f} s"
    assert ended < 7, f"generate ended {ended:.1f} s after it started, exit() was called after 1 s"
    assert_shut_down(llm, actors)


def test_exit_with_an_open_stream(cluster, qwen3_path):
    llm = LLM(qwen3_path, data_parallel_size=2, **OPTIONS)
    actors = llm.actors
    stream = llm.stream([[1, 2]] * 4, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    next(stream)
    start = time.perf_counter()
    llm.exit()
    took = time.perf_counter() - start
    with pytest.raises(RuntimeError, match=SHUT_DOWN):
        next(stream)
    assert took < 5, f"exit() took {took:.1f} s"
    assert_shut_down(llm, actors)


def test_exit_returns_once_the_replicas_are_gone(cluster, qwen3_path, monkeypatch):
    """ray.kill only sends the word to an actor's process: exit() waits until the replicas are gone, here with the
    word held back for a second (it was once late enough in CI for a call after exit() to be answered)."""
    llm = LLM(qwen3_path, data_parallel_size=2, **OPTIONS)
    actors, kill, late = llm.actors, ray.kill, []

    def kill_later(actor, **kwargs):
        late.append(threading.Timer(1.0, kill, (actor,), kwargs))
        late[-1].start()

    monkeypatch.setattr(ray, "kill", kill_later)
    start = time.perf_counter()
    try:
        llm.exit()
        took = time.perf_counter() - start
        assert len(late) == 2 and all(not timer.is_alive() for timer in late)
    finally:
        for timer in late:  # the kills land while Ray is still up, also when exit() came back too soon
            timer.join()
    assert 1 <= took < 5, f"exit() took {took:.1f} s"
    assert_shut_down(llm, actors)  # a replica still up would answer its first call at once


def test_exit_while_a_replica_is_replaced(cluster, qwen3_path, monkeypatch):
    """exit() from another thread as a running call replaces a dead replica: the replacement is ended with the
    others (it was made after exit() had released them, and left running), and exit() does not wait for its engine
    to come up (here that takes two minutes)."""
    import nanovllm.engine.data_parallel as data_parallel

    class SlowToStart(data_parallel.EngineReplica):  # local: Ray sends the class itself to the actor
        def __init__(self, *args):
            time.sleep(120)
            super().__init__(*args)

    llm = LLM(qwen3_path, data_parallel_size=2, **OPTIONS)
    actors, made, took = llm.actors, [], {}
    spawn = llm._spawn

    def exit_now():
        start = time.perf_counter()
        llm.exit()
        took["exit"] = time.perf_counter() - start

    exiting = threading.Thread(target=exit_now)

    def spawn_as_exit_begins(replica):
        exiting.start()
        time.sleep(0.5)  # exit() is under way
        monkeypatch.setattr(data_parallel, "EngineReplica", SlowToStart)
        spawn(replica)
        made.append(replica.actor)

    llm._spawn = spawn_as_exit_begins
    ray.kill(actors[0])
    try:
        with pytest.warns(RuntimeWarning, match=r"replica 0 \(pid \d+\) died .*; restarting it"), \
                pytest.raises(RuntimeError, match=SHUT_DOWN):
            llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    finally:
        exiting.join()
    assert len(made) == 1 and took["exit"] < 5, took
    assert_shut_down(llm, actors + made)


def test_an_engine_nobody_refers_to_frees_its_replicas(cluster, qwen3_path):
    """Dropped without exit(), a DataParallelLLM's finaliser frees its actors and placement groups: the next one
    finds the cluster's CPUs free (it would otherwise wait for them, then fail)."""
    import gc
    from ray.util import placement_group_table
    llm = LLM(qwen3_path, data_parallel_size=2, **OPTIONS)
    groups = [r.placement_group.id.hex() for r in llm._replicas]
    del llm
    gc.collect()
    table = placement_group_table()
    assert [table[g]["state"] for g in groups] == ["REMOVED", "REMOVED"]
    with LLM(qwen3_path, data_parallel_size=2, **OPTIONS) as again:
        assert len(again.replicas) == 2


def test_ray_data_processor(cluster, qwen3_with_tokenizer):
    from nanovllm.ray_data import build_processor
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(3 + i)) for i in range(20)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_num_seq'\] for LLM\(\)"):
        build_processor(qwen3_with_tokenizer, max_num_seq=4)  # on the driver, before any actor
    with pytest.raises(ValueError, match="one completion per row: n must be 1, got 2"):
        build_processor(qwen3_with_tokenizer, sampling_params=dict(temperature=1.0, n=2))
    with pytest.warns(RuntimeWarning, match="take all 2 CPUs of the Ray cluster"):
        build_processor(qwen3_with_tokenizer, sampling_params=sp, concurrency=2, **OPTIONS)
    process = build_processor(qwen3_with_tokenizer, sampling_params=sp, concurrency=2, batch_size=6, num_cpus=0.5,
                              **OPTIONS)
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    rows = sorted(process(ds).take_all(), key=lambda row: row["id"])
    expected = single_engine(qwen3_with_tokenizer, prompts, sp)
    assert [row["prompt"] for row in rows] == prompts
    assert [(row["generated_text"], list(row["token_ids"]), row["finish_reason"]) for row in rows] == \
        [(e["text"], e["token_ids"], e["finish_reason"]) for e in expected]


def test_processor_renders_messages_with_the_chat_template(cluster, qwen3_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from nanovllm.ray_data import LLMProcessor
    model = str(tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(qwen3_with_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w9{% endif %}")
    shutil.copytree(qwen3_with_tokenizer, model)
    tokenizer.save_pretrained(model)
    conversations = [[{"role": "user", "content": "w1 w2"}],
                     [{"role": "system", "content": "w3"}, {"role": "user", "content": "w4 w5 w6"}]]
    # the batch exactly as Ray Data hands it to map_batches
    batch = ray.data.from_items([{"messages": c} for c in conversations]).take_batch(batch_format="numpy")
    sp = dict(temperature=0, max_tokens=6, ignore_eos=True)
    out = LLMProcessor(model, sampling_params=sp, **OPTIONS)(batch)
    expected = single_engine(model, ["w1 w2 w9", "w3 w4 w5 w6 w9"], SamplingParams(**sp))
    assert list(out["generated_text"]) == [e["text"] for e in expected]
    assert [list(t) for t in out["token_ids"]] == [e["token_ids"] for e in expected]
    with pytest.raises(ValueError, match=r"the dataset needs a 'prompt' or a 'messages' column, it has \['text'\]"):
        LLMProcessor(model, sampling_params=sp, **OPTIONS)({"text": batch["messages"]})


RAY_ONLY_WHEN_ASKED = """
import json, sys
from nanovllm import LLM, SamplingParams
path, prompts = sys.argv[1], json.loads(sys.argv[2])
sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
llm = LLM(path, kvcache_block_size=16, data_parallel_size=1)
single = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
llm.exit()
errors = []
for dp, options in [(2, dict(max_num_seq=4)), (0, {}), ("2", {}), (True, {}), (2, dict(device="tpu"))]:
    try:
        LLM(path, data_parallel_size=dp, **options)
    except (TypeError, ValueError) as e:
        errors.append(f"{type(e).__name__}: {e}")
sys.modules["ray"] = None  # as if Ray were not installed
try:
    LLM(path, data_parallel_size=2)
except ImportError as e:
    errors.append(f"ImportError: {e}")
del sys.modules["ray"]
no_ray = "ray" not in sys.modules
with LLM(path, kvcache_block_size=16, data_parallel_size=2) as llm:  # starts a local Ray, stops it at exit
    import ray
    started = ray.is_initialized()
    parallel = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
try:
    llm.generate(prompts, sp)
except RuntimeError as e:
    errors.append(f"RuntimeError: {e}")
print(json.dumps(dict(single=single, parallel=parallel, errors=errors, no_ray=no_ray, started=started,
                      stopped=not ray.is_initialized())))
"""


def test_ray_only_when_asked_and_a_local_cluster_of_its_own(qwen3_path):
    """data_parallel_size=1 and bad options never import Ray; without a cluster, a local one is started and
    stopped again by exit()."""
    prompts = random_prompts([5, 30, 12], seed=4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", RAY_ONLY_WHEN_ASKED, qwen3_path, json.dumps(prompts)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [
        "TypeError: unknown option(s) ['max_num_seq'] for LLM(); valid options are " + str(_engine_options()),
        "ValueError: data_parallel_size must be >= 1, got 0",
        "TypeError: data_parallel_size must be an int, got '2'",
        "TypeError: data_parallel_size must be an int, got True",
        "ValueError: device must be one of ['auto', 'cpu', 'cuda'], got 'tpu'",
        'ImportError: data_parallel_size > 1 and nanovllm.ray_data need Ray: pip install -e ".[ray]"',
        "RuntimeError: this LLM has been shut down with exit(); create a new one",
    ]
    assert result["no_ray"] and result["started"] and result["stopped"]
    assert result["parallel"] == result["single"]


RAY_SHUT_DOWN_UNDER_IT = """
import sys
import ray
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], kvcache_block_size=16, data_parallel_size=2)
ray.shutdown()
try:
    llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)
except RuntimeError as e:
    print(e)
llm.exit()
print("exited")
"""


def test_ray_shut_down_under_the_engine(qwen3_path):
    """The user's ray.shutdown() takes the replicas with it: calls then say so, and exit() stays quiet."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", RAY_SHUT_DOWN_UNDER_IT, qwen3_path], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] == [
        "Ray was shut down under this data-parallel LLM (ray.shutdown()), and its replicas with it: create a new LLM",
        "exited"]


def _engine_options() -> list[str]:
    from nanovllm.config import Config
    return Config.options()
