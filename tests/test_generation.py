"""vLLM's sampling and output surface, end to end on the CPU in float32: penalties, logprobs and min_tokens against
transformers, seeds, stop strings and stop tokens, n > 1, chat, streaming, the model's generation defaults and bad
values (issue 11's "Prove it" list)."""
import dataclasses
import json
import math
import pickle
import re
import shutil

import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, Logprob, SamplingParams

VOCAB = 512
BLOCK = 16
# the word-level tokenizer's chat template: "<bos> w1 <user text> w2 <assistant text> ... w3"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %} {{ 'w1' if m['role'] == 'user' else 'w2' }} "
                 "{{ m['content'] }}{% endfor %}{% if greeting is defined %} {{ greeting }}{% endif %}"
                 "{% if add_generation_prompt %} w3{% endif %}")


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def ids_of(outputs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


def assert_pool_empty(llm: LLM):
    bm = llm.scheduler.block_manager
    assert llm.is_finished()
    assert bm.num_free_blocks == bm.num_blocks


def model_copy(path: str, folder, config: dict | None = None, generation: dict | None = None) -> str:
    """A copy of a model folder with config.json / generation_config.json entries changed (same weights)."""
    shutil.copytree(path, folder)
    for name, changes in (("config.json", config), ("generation_config.json", generation)):
        if changes:
            file = folder / name
            data = json.loads(file.read_text()) if file.exists() else {}
            file.write_text(json.dumps(data | changes))
    return str(folder)


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices on a shared, loaded machine: a second intra-op thread only waits for a core (each op then
    costs a scheduler tick, a run about 100 times longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def word_model(qwen3_path, tmp_path_factory) -> str:
    """The tiny qwen3 with a word-level tokenizer ("w0" .. "w509", "<bos>", "<eos>") and a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("generation") / "word_model"
    shutil.copytree(qwen3_path, folder)
    vocab = {f"w{i}": i for i in range(510)} | {"<bos>": 510, "<eos>": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llm(qwen3_path):
    with LLM(qwen3_path, kvcache_block_size=BLOCK) as engine:
        yield engine


@pytest.fixture(scope="module")
def word_llm(word_model):
    with LLM(word_model, kvcache_block_size=BLOCK) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf_model():
    """transformers' model of a folder, float32, with no EOS of its own (runs go to max_new_tokens)."""
    from transformers import AutoModelForCausalLM
    models = {}

    def load(path: str):
        if path not in models:
            models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            models[path].generation_config.eos_token_id = None
        return models[path]

    yield load
    models.clear()


def hf_generate(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def hf_log_softmax(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), V]: row p is log_softmax of the logits after token_ids[:p + 1] (teacher forced)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), -1)


def expected_entry(row: torch.Tensor, token: int, n: int) -> dict[int, float]:
    top = row.topk(n)
    return {token: row[token].item()} | dict(zip(top.indices.tolist(), top.values.tolist()))


def assert_entry(entry: dict[int, float], row: torch.Tensor, token: int, n: int):
    """vLLM's shape: the chosen token, then the top-n ids most likely first (the chosen one not again)."""
    expected = expected_entry(row, token, n)
    assert list(entry) == list(expected)
    for token_id, logprob in expected.items():
        assert abs(entry[token_id] - logprob) <= 1e-4, (token_id, entry[token_id], logprob)
        assert entry[token_id].logprob == float(entry[token_id])
    # vLLM's ranks: a top-N entry its place; the chosen token, when not among them, how many tokens are at least as
    # likely (bounds: float32 rounding may reorder tokens within 1e-4 of it)
    for place, t in enumerate(row.topk(n).indices.tolist(), 1):
        assert entry[t].rank == place
    if token not in row.topk(n).indices.tolist():
        chosen = row[token].item()
        assert (row > chosen + 1e-4).sum().item() + 1 <= entry[token].rank <= (row >= chosen - 1e-4).sum().item()


# ---- 1, 2: penalties --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers(kind, penalty, request, hf_model):
    path = request.getfixturevalue(f"{kind}_path")
    prompts = random_prompts([3, 19, 37], seed=31) + [[7, 8] * 10]
    with LLM(path, kvcache_block_size=BLOCK) as engine:
        outs = engine.generate(prompts, greedy(20, repetition_penalty=penalty), use_tqdm=False)
        plain = engine.generate(prompts, greedy(20), use_tqdm=False)
        assert_pool_empty(engine)
    model = hf_model(path)
    assert ids_of(outs) == [hf_generate(model, p, 20, repetition_penalty=penalty) for p in prompts]
    assert ids_of(plain) == [hf_generate(model, p, 20) for p in prompts]
    assert ids_of(outs) != ids_of(plain)  # the penalty changed something


def penalized_reference(model, prompt: list[int], max_tokens: int, presence: float, frequency: float,
                        repetition: float) -> list[int]:
    """Greedy with vLLM's penalties applied by hand to transformers' logits, one full forward per token."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=logits.numel()).float()
        seen = torch.zeros(logits.numel(), dtype=torch.bool)
        seen[ids] = True  # prompt and output: the repetition penalty's set
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        logits = logits - frequency * counts - presence * (counts > 0).float()
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("presence, frequency, repetition", [(1.5, 0.0, 1.0), (0.0, 0.7, 1.0), (-0.5, 1.2, 1.2)])
def test_presence_and_frequency_penalties_equal_a_plain_reference(llm, qwen3_path, hf_model, presence, frequency,
                                                                  repetition):
    prompts = random_prompts([5, 26], seed=32) + [[9, 9, 4] * 6]
    penalized = greedy(16, presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
    # an unpenalized row in the same batch keeps its plain greedy tokens
    outs = llm.generate(prompts + prompts[:1], [penalized] * len(prompts) + [greedy(16)], use_tqdm=False)
    model = hf_model(qwen3_path)
    expected = [penalized_reference(model, p, 16, presence, frequency, repetition) for p in prompts]
    assert ids_of(outs[:-1]) == expected
    assert outs[-1]["token_ids"] == hf_generate(model, prompts[0], 16)
    assert outs[-1]["token_ids"] != expected[0]


# ---- per-token settings: logit_bias, allowed_token_ids (vLLM's) ---------------------------------------------

def test_logit_bias_equals_transformers_sequence_bias(llm, qwen3_path, hf_model):
    """HF adds a sequence_bias of single tokens before its repetition penalty, as vLLM adds logit_bias."""
    model = hf_model(qwen3_path)
    prompts = random_prompts([4, 17, 30], seed=35)
    plain = [hf_generate(model, p, 14) for p in prompts]
    # lift a token each plain run never picks, push down its first token, and one bias of -inf
    lifted = next(t for t in range(VOCAB) if all(t not in run for run in plain))
    bias = {lifted: 3.0, plain[0][0]: -2.5, plain[1][1]: float("-inf")}
    for extra in ({}, {"repetition_penalty": 1.4}):
        outs = llm.generate(prompts + prompts[:1], [greedy(14, logit_bias=bias, **extra)] * len(prompts)
                            + [greedy(14, **extra)], use_tqdm=False)
        expected = [hf_generate(model, p, 14, sequence_bias={(t,): b for t, b in bias.items()}, **extra)
                    for p in prompts]
        assert ids_of(outs[:-1]) == expected
        assert outs[-1]["token_ids"] == hf_generate(model, prompts[0], 14, **extra)  # its neighbour, unbiased
        assert ids_of(outs[:-1]) != [hf_generate(model, p, 14, **extra) for p in prompts]
        assert all(plain[1][1] not in o["token_ids"] for o in outs[:-1])
    assert_pool_empty(llm)


def test_logit_bias_leaves_the_logprobs_raw(llm, qwen3_path, hf_model):
    prompt = random_prompts([9], seed=36)[0]
    out = llm.generate([prompt], greedy(6, logit_bias={5: 8.0}, logprobs=1), use_tqdm=False)[0]
    rows = hf_log_softmax(hf_model(qwen3_path), prompt + out["token_ids"])[len(prompt) - 1:]
    for entry, row, token in zip(out["logprobs"], rows, out["token_ids"]):
        assert_entry(entry, row, token, 1)


def test_allowed_token_ids_equal_transformers_suppress_tokens(llm, qwen3_path, hf_model):
    model = hf_model(qwen3_path)
    prompts = random_prompts([6, 21], seed=37)
    allowed = [3, 40, 41, 200, 333, 511]
    suppressed = [t for t in range(VOCAB) if t not in allowed]
    outs = llm.generate(prompts + prompts[:1], [greedy(12, allowed_token_ids=allowed)] * len(prompts)
                        + [greedy(12)], use_tqdm=False)
    assert ids_of(outs[:-1]) == [hf_generate(model, p, 12, suppress_tokens=suppressed) for p in prompts]
    assert outs[-1]["token_ids"] == hf_generate(model, prompts[0], 12)
    assert not set(outs[-1]["token_ids"]) <= set(allowed)  # the unrestricted neighbour is not held to the list


@pytest.mark.parametrize("filters", [{}, {"top_k": 3}, {"top_p": 0.9}, {"min_p": 0.2}])
def test_sampled_tokens_stay_in_the_allowed_set_and_off_banned_tokens(llm, filters):
    prompts = random_prompts([3, 8, 15, 24], seed=38)
    allowed = list(range(100, 140))
    restricted = SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True, seed=5, allowed_token_ids=allowed,
                                **filters)
    banned = SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True, seed=6, **filters,
                            logit_bias={t: float("-inf") for t in range(0, VOCAB, 2)})  # every even id
    outs = llm.generate(prompts * 2, [restricted] * len(prompts) + [banned] * len(prompts), use_tqdm=False)
    assert all(set(o["token_ids"]) <= set(allowed) for o in outs[:len(prompts)])
    assert all(t % 2 for o in outs[len(prompts):] for t in o["token_ids"])
    assert len({t for o in outs[:len(prompts)] for t in o["token_ids"]}) > 3  # drawn, not a fixed token


def bad_words_reference(model, prompt: list[int], max_tokens: int, words: list[list[int]]) -> list[int]:
    """Greedy with vLLM's bad-words rule applied by hand to transformers' logits: a word's last token is banned
    where the completion so far (not the prompt) ends with the rest of the word."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for word in words:
            prefix = word[:-1]
            if len(prefix) <= len(out) and out[len(out) - len(prefix):] == prefix:
                logits[word[-1]] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def words_of(ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in ids)


@pytest.mark.parametrize("options", [{}, {"async_scheduling": False}, {"max_num_batched_tokens": 16},
                                     {"num_kvcache_blocks": 5, "max_num_batched_tokens": 64}],
                         ids=["overlapped", "step-by-step", "chunked", "preempted"])
def test_bad_words_equal_transformers_and_the_vllm_rule(word_model, hf_model, options):
    model = hf_model(word_model)
    prompts = random_prompts([4, 19, 33], seed=39)
    plain = [hf_generate(model, p, 14) for p in prompts]
    # words that bite: two tokens of the first run, one of the second, three of the third (from its 4th token)
    words = [plain[0][2:4], plain[1][5:6], plain[2][3:6]]
    sp = greedy(14, bad_words=[words_of(w) for w in words])
    assert sp.bad_words_token_ids is None  # tokenised by generate, on its own copy
    with LLM(word_model, kvcache_block_size=BLOCK, **options) as engine:
        outs = engine.generate(prompts + prompts[:1], [sp] * len(prompts) + [greedy(14)], use_tqdm=False)
        # a prompt that ends with a word's prefix: vLLM looks at the completion only, transformers at both
        tail = engine.generate([prompts[0] + words[0][:1]], sp, use_tqdm=False)
        assert_pool_empty(engine)
    assert ids_of(outs[:-1]) == [hf_generate(model, p, 14, bad_words_ids=words) for p in prompts]
    assert ids_of(outs[:-1]) == [bad_words_reference(model, p, 14, words) for p in prompts]
    assert ids_of(outs[:-1]) != plain and outs[-1]["token_ids"] == plain[0]
    assert tail[0]["token_ids"] == bad_words_reference(model, prompts[0] + words[0][:1], 14, words)


def test_the_output_history_of_a_sequence_back_from_preemption():
    """The runner meets a preempted sequence again as new, its completion so far among its tokens: the history
    starts from that completion, so a word whose prefix lies in it still bites; hits need the completion only."""
    from nanovllm.engine.penalties import OutputHistory
    from nanovllm.engine.step_inputs import Row, SeqState
    sp = dataclasses.replace(greedy(8))
    sp._bad_words_token_ids = [[41, 42, 43], [42, 50], [7]]
    history = OutputHistory(64, torch.device("cpu"))
    prompt, done = [9, 9, 41, 42], [41, 42]  # the prompt ends with [41, 42] too: no hit from it alone
    back = Row(1, SeqState(prompt + done, [], 0, sp, len(prompt)), len(prompt) + len(done))
    fresh = Row(2, SeqState(prompt, [], 0, sp, len(prompt)), len(prompt))
    (rows, ids, hits), slots = history.bans([back, fresh])
    found = {(int(r), int(t)) for r, t, h in zip(rows, ids, hits) if h}
    assert found == {(0, 43), (0, 50), (0, 7), (1, 7)} and slots == [0, 1]
    history.record(torch.tensor([43, 42]), [back, fresh], slots)  # each sampled its next token
    back.state.num_computed, fresh.state.num_computed = len(prompt) + 2, len(prompt)
    back.num_tokens = fresh.num_tokens = 1
    back.state.token_ids.append(43)
    fresh.state.token_ids.append(42)
    (rows, ids, hits), _ = history.bans([back, fresh])
    assert {(int(r), int(t)) for r, t, h in zip(rows, ids, hits) if h} == {(0, 7), (1, 50), (1, 7)}


def test_bad_words_without_a_tokenizer_are_refused(llm):
    before = llm.generate([[5, 6, 7]], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match=re.escape("bad_words ['w5'] need the tokenizer, but model folder")):
        llm.generate([[5, 6, 7]], greedy(4, bad_words=["w5"]), use_tqdm=False)
    assert_pool_empty(llm)
    assert llm.generate([[5, 6, 7]], greedy(4), use_tqdm=False) == before


def test_a_bad_word_the_tokenizer_drops_is_refused(qwen3_path, tmp_path):
    """A word the tokenizer turns into no tokens (here its normaliser deletes "x") bans nothing: refused by name
    (it raised an IndexError where only the spaced form had tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path / "drops_x"
    shutil.copytree(qwen3_path, folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(510)} | {"<eos>": 511, "_": 510}, unk_token="w0"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("x", ""), normalizers.Replace(" ", " _ ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    with LLM(str(folder), kvcache_block_size=BLOCK) as engine:
        assert engine.get_tokenizer().encode(" xx", add_special_tokens=False) == [510]  # only the spaced form has one
        with pytest.raises(ValueError, match=re.escape("bad_words word 'xx' tokenises to no tokens")):
            engine.generate(["w1 w2"], greedy(4, bad_words=["xx"]), use_tqdm=False)
        assert len(engine.generate(["w1 w2"], greedy(4, bad_words=["w3"]), use_tqdm=False)[0]["token_ids"]) == 4


def test_sampled_completions_never_hold_a_bad_word(word_llm):
    prompts = [words_of(p) for p in random_prompts([3, 10, 25], seed=41)]
    words = [[t, t + 1] for t in range(0, 500, 2)] + [[t] for t in range(1, 200, 2)]  # many pairs, many singles
    sp = SamplingParams(temperature=1.5, top_k=12, seed=3, n=3, max_tokens=24, ignore_eos=True,
                        bad_words=[words_of(w) for w in words])
    outs = word_llm.generate(prompts, sp, use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            ids = c.token_ids
            assert not any(t < 200 and t % 2 for t in ids)
            assert not any(a % 2 == 0 and b == a + 1 for a, b in zip(ids, ids[1:])), ids
    assert len({tuple(c.token_ids) for o in outs for c in o.outputs}) == 9


def test_bad_words_take_vllm_s_spaced_variant(word_llm):
    """A word also counts with a leading space where that tokenises to another first token of the same length."""
    class Spaced:  # the word-level tokenizer with a space-marked variant of w7
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def encode(self, text, add_special_tokens=True):
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return [8 if text.startswith(" ") and i == 0 and t == 7 else t for i, t in enumerate(ids)]

    builder = word_llm.requests
    kept = builder.tokenizer
    try:
        builder.tokenizer = Spaced(kept)
        assert builder.bad_words_token_ids(["w7 w9", " w7", "w3"]) == [[7, 9], [8, 9], [7], [8], [3]]
    finally:
        builder.tokenizer = kept


# ---- 3: logprobs and prompt logprobs ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, num", [(0.0, 4), (0.7, 2), (1.3, 0)])  # raw logprobs, whatever the temperature
def test_logprobs_equal_transformers_log_softmax(llm, qwen3_path, hf_model, temperature, num):
    prompts = random_prompts([6, 23, 40], seed=33)
    sp = SamplingParams(temperature=temperature, seed=7, max_tokens=10, ignore_eos=True, logprobs=num)
    outs = llm.generate(prompts + prompts[:1], [sp] * len(prompts) + [greedy(10)], use_tqdm=False)
    model = hf_model(qwen3_path)
    outside_top = 0
    for prompt, out in zip(prompts, outs):
        ref = hf_log_softmax(model, prompt + out["token_ids"])
        assert len(out["logprobs"]) == len(out["token_ids"]) == 10
        total = 0.0
        for i, (token, entry) in enumerate(zip(out["token_ids"], out["logprobs"])):
            row = ref[len(prompt) - 1 + i]
            assert_entry(entry, row, token, num)
            outside_top += len(entry) > num
            total += row[token].item()
        assert abs(out["cumulative_logprob"] - total) <= 1e-4
        assert out["cumulative_logprob"] == pytest.approx(sum(e[t] for t, e in zip(out["token_ids"], out["logprobs"])),
                                                          abs=1e-9)
    if temperature == 0:
        assert outside_top == 0  # greedy picks the top-1
        assert ids_of(outs[:1]) == ids_of(outs[-1:])
    else:
        assert outside_top > 0  # sampled tokens outside the top-N are added to its entry
    assert outs[-1]["logprobs"] is None and outs[-1]["cumulative_logprob"] is None


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 16}, {"max_num_batched_tokens": 16,
                                                                            "num_kvcache_blocks": 6}],
                         ids=["whole", "chunked", "chunked-preempted"])
def test_prompt_logprobs_equal_transformers(qwen3_path, hf_model, options):
    prompts = random_prompts([1, 9, 40, 23], seed=34)
    plain = greedy(20)
    scored = greedy(20, prompt_logprobs=3)
    with LLM(qwen3_path, kvcache_block_size=BLOCK, **options) as engine:
        first = engine.generate(prompts, plain, use_tqdm=False)
        again = engine.generate(prompts[2:3], plain, use_tqdm=False)
        assert again[0]["num_cached_tokens"] == 32  # the 40-token prompt's two full blocks are cached
        preemptions = engine.scheduler.num_preemptions
        outs = engine.generate(prompts, scored, use_tqdm=False)
        assert (engine.scheduler.num_preemptions > preemptions) == ("num_kvcache_blocks" in options)
        assert_pool_empty(engine)
    model = hf_model(qwen3_path)
    for prompt, out, ref_out in zip(prompts, outs, first):
        assert out["token_ids"] == ref_out["token_ids"]
        assert out["num_cached_tokens"] == 0  # scoring every prompt token: nothing was taken from the cache
        assert ref_out["prompt_logprobs"] is None
        ref = hf_log_softmax(model, prompt)
        assert len(out["prompt_logprobs"]) == len(prompt) and out["prompt_logprobs"][0] is None
        for p in range(1, len(prompt)):
            assert_entry(out["prompt_logprobs"][p], ref[p - 1], prompt[p], 3)


@pytest.mark.parametrize("case", ["first-chunk", "every-chunk"])
def test_prompt_logprobs_of_one_token_chunks(qwen3_path, hf_model, case):
    """A scored prompt whose chunk is one token adds no logit beyond its row's last: it is scored all the same
    (first-chunk: a long plain prompt leaves the budget's last token to it; every-chunk: 15 decoding requests
    leave it one token a step)."""
    scored = random_prompts([10 if case == "first-chunk" else 20], seed=3)[0]
    if case == "first-chunk":
        prompts, options = random_prompts([50], seed=1) + [scored], dict(max_num_batched_tokens=17, mixed_steps=False)
    else:
        prompts, options = [[i + 1] for i in range(15)] + [scored], dict(max_num_batched_tokens=16, max_num_seqs=16)
    params = [greedy(40 if case == "every-chunk" else 4)] * (len(prompts) - 1) + [greedy(2, prompt_logprobs=2)]
    with LLM(qwen3_path, kvcache_block_size=BLOCK, **options) as engine:
        out = engine.generate(prompts, params, use_tqdm=False)[-1]
        assert_pool_empty(engine)
    ref = hf_log_softmax(hf_model(qwen3_path), scored)
    assert len(out["prompt_logprobs"]) == len(scored) and out["prompt_logprobs"][0] is None
    for p in range(1, len(scored)):
        assert_entry(out["prompt_logprobs"][p], ref[p - 1], scored[p], 2)

@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "step-by-step"])
def test_prompt_logprobs_of_a_prompt_preempted_part_way(qwen3_path, hf_model, overlap):
    """Preempted between two chunks of its prompt, a sequence scores the prompt again from its start: each entry
    still belongs to its own position."""
    prompts = random_prompts([30, 60], seed=46)
    with LLM(qwen3_path, kvcache_block_size=BLOCK, num_kvcache_blocks=6, max_num_batched_tokens=8,
             async_scheduling=overlap) as engine:
        part_way = []
        preempt = engine.scheduler.preempt

        def watched(seq):
            part_way.append(seq.num_cached_tokens < seq.num_prompt_tokens)
            preempt(seq)

        engine.scheduler.preempt = watched
        outs = engine.generate(prompts, greedy(20, prompt_logprobs=1), use_tqdm=False)
        assert any(part_way)
        assert_pool_empty(engine)
    model = hf_model(qwen3_path)
    for prompt, out in zip(prompts, outs):
        ref = hf_log_softmax(model, prompt)
        assert len(out["prompt_logprobs"]) == len(prompt) and out["prompt_logprobs"][0] is None
        for p in range(1, len(prompt)):
            assert_entry(out["prompt_logprobs"][p], ref[p - 1], prompt[p], 1)


# ---- 4: seeds ---------------------------------------------------------------------------------------------------

SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)


def test_a_seed_gives_the_same_tokens_in_any_company(qwen3_path):
    """Alone or in a mixed batch, with or without prefix-cache hits, with preemptions, overlapped or step by step.
    Requests without a seed draw theirs from the engine's seeded stream in order, so two fresh engines agree too."""
    prompt = random_prompts([40], seed=35)[0]  # two full blocks: a second run hits the prefix cache
    others = random_prompts([5, 30, 17, 33], seed=36)
    company = [SamplingParams(temperature=0.7, top_k=20, max_tokens=12, ignore_eos=True), SEEDED,
               SamplingParams(temperature=1.0, seed=99, top_p=0.9, max_tokens=12, ignore_eos=True),
               greedy(12, repetition_penalty=1.2), SEEDED, SamplingParams(temperature=1.0, max_tokens=12),
               SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=12, ignore_eos=True)]
    batch_prompts = [others[0], prompt, others[1], others[2], prompt, others[3], others[1]]
    runs = []
    for overlap in (True, False):
        with LLM(qwen3_path, kvcache_block_size=BLOCK, async_scheduling=overlap) as engine:
            alone = engine.generate([prompt], SEEDED, use_tqdm=False)[0]
            assert alone["num_cached_tokens"] == 0
            mixed = engine.generate(batch_prompts, company, use_tqdm=False)
            assert [o["num_cached_tokens"] for o in (mixed[1], mixed[4])] == [32, 32]
            other_seed = engine.generate([prompt], SamplingParams(temperature=1.0, seed=1235, max_tokens=12,
                                                                  ignore_eos=True), use_tqdm=False)[0]
        with LLM(qwen3_path, kvcache_block_size=BLOCK, async_scheduling=overlap, num_kvcache_blocks=8) as small:
            squeezed = small.generate(batch_prompts, company, use_tqdm=False)
            assert small.scheduler.num_preemptions > 0
            assert_pool_empty(small)
        assert mixed[1]["token_ids"] == mixed[4]["token_ids"] == alone["token_ids"]
        assert len(mixed[6]["outputs"]) == 2
        assert other_seed["token_ids"] != alone["token_ids"]
        runs.append((alone["token_ids"], [ids_of(o["outputs"]) for o in mixed],
                     [ids_of(o["outputs"]) for o in squeezed]))
    assert runs[0][1] == runs[0][2]  # every row, whichever was preempted
    assert runs[0] == runs[1]


def test_the_engine_seed_seeds_requests_without_one(qwen3_path):
    prompts = random_prompts([4, 20], seed=37)
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    runs = []
    for seed in (1, 1, 2):
        with LLM(qwen3_path, kvcache_block_size=BLOCK, seed=seed) as engine:
            runs.append(ids_of(engine.generate(prompts + prompts[:1], [unseeded] * 2 + [SEEDED], use_tqdm=False)))
    assert runs[0] == runs[1]
    assert runs[0][:2] != runs[2][:2]
    assert runs[0][2] == runs[2][2]  # a request's own seed wins over the engine's


# ---- 5: stop strings, stop tokens, min_tokens ---------------------------------------------------------------------

# prompts whose greedy completions hold neither special token nor a repeat that ends them early
STREAM_PROMPTS = [" ".join(f"w{t}" for t in p) for p in random_prompts([3, 5, 20], seed=44)]


def spanning_stop(words: list[str]) -> tuple[str, int]:
    """A stop string made of the end of word j and the start of word j + 1, found only there: (stop, j)."""
    text = " ".join(words)
    for j in range(2, len(words) - 1):
        stop = words[j][-1] + " " + words[j + 1][:2]
        if text.find(stop) == len(" ".join(words[:j + 1])) - 1 and text.count(stop) == 1:
            return stop, j
    raise AssertionError(f"no stop string spans two words of {text!r}")


@pytest.mark.parametrize("include, min_past, at_limit", [(False, None, False), (True, None, False), (False, 3, False),
                                                         (False, 2, False), (False, 1, False), (False, None, True)],
                         ids=["cut", "included", "min_tokens", "at-min_tokens", "past-min_tokens", "at-max-tokens"])
def test_stop_strings_spanning_tokens(word_llm, include, min_past, at_limit):
    """The stop string completes with token j + 1, the (j + 2)-th (at_limit: the last max_tokens allows, where
    "stop" still wins over "length"). As in vLLM a stop string counts only once there are more than min_tokens
    tokens: with min_tokens = j + min_past it is not looked for there when min_past >= 2 (nor found later in a
    window as wide as the list's longer stop string), and cuts as usual when min_past = 1."""
    prompts = STREAM_PROMPTS
    full = word_llm.generate(prompts, greedy(16), use_tqdm=False)
    sps, expected = [], []
    for out in full:
        words = out["text"].split(" ")
        assert words == [f"w{t}" for t in out["token_ids"]]
        stop, j = spanning_stop(words)
        end = out["text"].find(stop) + (len(stop) if include else 0)
        held = min_past is not None and min_past >= 2
        sps.append(greedy(j + 2 if at_limit else 16, stop=["w999 w999", stop], include_stop_str_in_output=include,
                          min_tokens=0 if min_past is None else j + min_past))
        expected.append((out["text"], out["token_ids"], "length", None) if held else
                        (out["text"][:end], out["token_ids"][:j + 2], "stop", stop))
    outs = word_llm.generate(prompts, sps, use_tqdm=False)
    assert [(o["text"], o["token_ids"], o["finish_reason"], o["stop_reason"]) for o in outs] == expected
    assert_pool_empty(word_llm)


def test_stop_token_ids_and_min_tokens(llm, qwen3_path, hf_model):
    prompt = random_prompts([11], seed=38)[0]
    full = llm.generate([prompt], greedy(16), use_tqdm=False)[0]["token_ids"]
    stop_id = full[3]
    k = full.index(stop_id)
    out = llm.generate([prompt], greedy(16, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert (out["token_ids"], out["finish_reason"], out["stop_reason"]) == (full[:k + 1], "stop", stop_id)
    # min_tokens bans the stop token until then; transformers' min_new_tokens does the same for its EOS ids
    held = llm.generate([prompt], greedy(16, stop_token_ids=[stop_id], min_tokens=k + 3), use_tqdm=False)[0]
    ref = hf_generate(hf_model(qwen3_path), prompt, 16, eos_token_id=[stop_id], min_new_tokens=k + 3)
    assert held["token_ids"] == ref
    assert len(ref) > k + 3
    assert (held["finish_reason"], held["stop_reason"]) == (("stop", stop_id) if ref[-1] == stop_id else
                                                            ("length", None))


def test_min_tokens_holds_eos_back(qwen3_path, hf_model, tmp_path):
    prompt = random_prompts([9], seed=39)[0]
    model = hf_model(qwen3_path)
    full = hf_generate(model, prompt, 16)
    eos = full[2]  # a token greedy produces early
    k = full.index(eos)
    with LLM(model_copy(qwen3_path, tmp_path / "eos", config={"eos_token_id": eos},
                        generation={"eos_token_id": eos}), kvcache_block_size=BLOCK) as engine:
        plain, held = engine.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=16),
                                                         SamplingParams(temperature=0, max_tokens=16, min_tokens=6)],
                                      use_tqdm=False)
    assert (plain["token_ids"], plain["finish_reason"], plain["stop_reason"]) == (full[:k + 1], "stop", None)
    ref = hf_generate(model, prompt, 16, eos_token_id=eos, min_new_tokens=6)
    assert held["token_ids"] == ref and len(ref) > 6
    assert held["finish_reason"] == ("stop" if ref[-1] == eos else "length") and held["stop_reason"] is None


def test_min_tokens_holds_eos_back_under_ignore_eos(llm):
    """As in vLLM: ignore_eos keeps EOS from ending the completion, min_tokens still keeps it from being drawn."""
    eos = llm.config.eos[0]
    sp = SamplingParams(temperature=0, max_tokens=6, min_tokens=3, ignore_eos=True, logit_bias={eos: 50.0})
    out = llm.generate([random_prompts([7], seed=5)[0]], sp, use_tqdm=False)[0]
    assert eos not in out["token_ids"][:3] and out["token_ids"][3:] == [eos] * 3
    assert out["finish_reason"] == "length"


@pytest.mark.parametrize("include", [False, True], ids=["left-out", "included"])
def test_the_stop_token_that_ends_a_completion_is_not_in_its_text(word_llm, include):
    """As in vLLM: token_ids end with the stop token, the text stops before its text (after it with
    include_stop_str_in_output), in generate and in a stream."""
    full = word_llm.generate(STREAM_PROMPTS, greedy(16), use_tqdm=False)
    sps, expected = [], []
    for out in full:
        stop_id = out["token_ids"][4]
        k = out["token_ids"].index(stop_id)
        sps.append(greedy(16, stop_token_ids=[stop_id], include_stop_str_in_output=include))
        words = out["text"].split(" ")
        expected.append((out["token_ids"][:k + 1], " ".join(words[:k + 1 if include else k]), stop_id))
    outs = word_llm.generate(STREAM_PROMPTS, sps, use_tqdm=False)
    assert [(o["token_ids"], o["text"], o["stop_reason"]) for o in outs] == expected
    events = list(word_llm.stream(STREAM_PROMPTS, sps))
    assert ["".join(e["text"] for e in events if e["index"] == i) for i in range(len(outs))] == \
        [o["text"] for o in outs]


# ---- 6: n > 1 ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap, prompt_logprobs", [(True, None), (False, None), (True, 2)],
                         ids=["overlapped", "step-by-step", "prompt-logprobs"])
def test_n_completions_share_the_prompt_blocks(word_model, overlap, prompt_logprobs):
    """The first branch prefills the prompt (scoring it if asked); the others take its full blocks."""
    prompt = random_prompts([40], seed=40)[0]  # two full blocks and a tail of 8 tokens
    n, max_tokens = 3, 8  # positions 40..47 stay in the tail block
    sp = SamplingParams(temperature=1.5, n=n, seed=5, max_tokens=max_tokens, ignore_eos=True,
                        prompt_logprobs=prompt_logprobs)
    with LLM(word_model, kvcache_block_size=BLOCK, async_scheduling=overlap) as engine:
        bm = engine.scheduler.block_manager
        events, used = [], []
        for event in engine.stream([prompt], sp):
            events.append(event)
            if len({e["completion"] for e in events}) == n and not event["finished"]:
                used.append(bm.num_blocks - bm.num_free_blocks)
        assert_pool_empty(engine)
        outs = engine.generate([prompt], sp, use_tqdm=False)
        again = engine.generate([prompt], sp, use_tqdm=False)
    shared, separate = 2 + n, n * 3  # two shared full blocks and a tail per branch; n copies of three blocks
    assert used and max(used) == shared < separate
    completions = ids_of(outs[0]["outputs"])
    assert len(completions) == n and len(set(map(tuple, completions))) == n
    assert all(len(c) == max_tokens for c in completions)
    assert_events_add_up(events, outs)
    assert {k: v for k, v in outs[0].items() if k not in ("outputs", "prompt", "prompt_token_ids", "prompt_logprobs",
                                                          "num_cached_tokens", "finished")} \
        == {k: v for k, v in outs[0]["outputs"][0].items() if k != "index"}
    assert (outs[0].request_id, again[0].request_id) == ("0", "1")  # one per prompt, not per completion
    assert [c.index for c in outs[0].outputs] == list(range(n))
    assert outs[0]["prompt_token_ids"] == prompt
    if prompt_logprobs is not None:
        assert len(outs[0]["prompt_logprobs"]) == len(prompt) and outs[0]["prompt_logprobs"][0] is None
        assert all(len(entry) in (2, 3) for entry in outs[0]["prompt_logprobs"][1:])
    assert ids_of(again[0]["outputs"]) == completions


# ---- 7: chat ----------------------------------------------------------------------------------------------------

def test_chat_renders_the_template_and_generates(word_llm):
    user = [{"role": "user", "content": "w5 w6"}]
    talk = [{"role": "user", "content": "w7"}, {"role": "assistant", "content": "w8 w9"},
            {"role": "user", "content": "w10"}]
    expected_prompts = [[510, 1, 5, 6, 3], [510, 1, 7, 2, 8, 9, 1, 10, 3]]
    sp = greedy(8)

    def from_ids(outs: list[dict]) -> list[dict]:  # as generate gives them from the ids: no prompt text
        return [{**o, "prompt": None} for o in outs]

    one = word_llm.chat(user, sp, use_tqdm=False)
    assert one[0]["prompt_token_ids"] == expected_prompts[0] and one[0]["prompt"] == "<bos> w1 w5 w6 w3"
    assert from_ids(one) == word_llm.generate(expected_prompts[:1], sp, use_tqdm=False)
    both = word_llm.chat([user, talk], sp, use_tqdm=False)
    assert [o["prompt_token_ids"] for o in both] == expected_prompts
    assert from_ids(both) == word_llm.generate(expected_prompts, sp, use_tqdm=False)
    greeted = word_llm.chat(user, sp, use_tqdm=False, chat_template_kwargs={"greeting": "w42"})
    assert greeted[0]["prompt_token_ids"] == [510, 1, 5, 6, 42, 3]
    assert from_ids(greeted) == word_llm.generate([[510, 1, 5, 6, 42, 3]], sp, use_tqdm=False)
    # OpenAI-style content parts, as vLLM takes them: text parts joined with newlines
    parts = [{"role": "user", "content": [{"type": "text", "text": "w5"}, {"type": "text", "text": "w6"}]}]
    assert from_ids(word_llm.chat(parts, sp, use_tqdm=False)) == from_ids(one)  # its text has "w5\nw6"
    # an assistant turn that only calls tools has no content
    tool_turn = [*user, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]
    assert word_llm.chat(tool_turn, sp, use_tqdm=False)[0]["prompt_token_ids"] == [510, 1, 5, 6, 2, 3]



def test_clone_is_a_deep_copy():
    sp = SamplingParams(temperature=0.5, stop=["w1"], logit_bias={3: 1.0}, bad_words=["w2 w3"], max_tokens=9)
    sp._bad_words_token_ids = [[2, 3]]
    copy = sp.clone()
    assert copy == sp and copy is not sp and copy.bad_words_token_ids == [[2, 3]]
    copy.stop.append("w4")
    copy.logit_bias[5] = 2.0
    copy.bad_words_token_ids[0].append(4)
    assert (sp.stop, sp.logit_bias, sp.bad_words_token_ids) == (["w1"], {3: 1.0}, [[2, 3]])


def test_outputs_read_as_vllm_request_outputs(word_llm):
    """vLLM's quickstart loop runs unchanged: output.prompt, output.outputs[0].text; the outputs stay dicts."""
    prompts = ["w5 w6", {"prompt": "w7"}, [8, 9], {"prompt_token_ids": [10]}]
    outs = word_llm.generate(prompts, greedy(3), use_tqdm=False)
    assert [o.prompt for o in outs] == ["w5 w6", "w7", None, None]
    assert [o.prompt_token_ids for o in outs] == [[5, 6], [7], [8, 9], [10]]
    for o in outs:
        first = o.outputs[0]
        assert (first.text, first.token_ids, first.finish_reason) == (o["text"], o["token_ids"], "length")
        assert first.text == " ".join(f"w{t}" for t in first.token_ids)
        assert (first.index, o.finished) == (0, True) and "index" not in o  # the request has no branch number
    with pytest.raises(AttributeError, match=r"an output has no field 'metrics'; its fields: \['cumulative_logp"):
        outs[0].metrics
    # vLLM's request_id: the engine's requests numbered "0", "1", ... over its calls (an attribute, not a field)
    first_id = int(outs[0].request_id)
    assert [o.request_id for o in outs] == [str(first_id + i) for i in range(4)]
    again = word_llm.generate(prompts[:1], greedy(3), use_tqdm=False)
    assert again[0].request_id == str(first_id + 4) and again[0] == outs[0] and "request_id" not in outs[0]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # the id travels with the output, as through Ray
        back = pickle.loads(pickle.dumps(outs[1], protocol))
        assert (type(back), back, back.request_id, back.outputs[0].text) == (
            type(outs[1]), outs[1], outs[1].request_id, outs[1].outputs[0].text)
    assert json.loads(json.dumps(outs)) == outs
    # chat reports the rendered conversation as its prompt, as vLLM's chat does
    chat = word_llm.chat([{"role": "user", "content": "w5"}], greedy(2), use_tqdm=False)[0]
    rendered = word_llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False,
                                                            add_generation_prompt=True)
    assert chat.prompt == rendered and chat.prompt_token_ids == word_llm.get_tokenizer().encode(
        rendered, add_special_tokens=False)
    # vLLM's TokensPrompt may carry its text: the ids are generated from, the text is reported
    both = word_llm.generate([{"prompt_token_ids": [8, 9], "prompt": "eight nine"}], greedy(3), use_tqdm=False)[0]
    assert (both.prompt, both.prompt_token_ids, both.token_ids) == ("eight nine", [8, 9], outs[2].token_ids)

def test_logprobs_are_vllm_logprob_objects(word_llm, llm):
    """Each entry is vLLM's Logprob (.logprob, .rank, .decoded_token) and the float it holds; decoded_token is the
    token decoded alone, None with detokenize=False or without a tokenizer."""
    sp = SamplingParams(temperature=1.5, seed=4, max_tokens=6, logprobs=3, prompt_logprobs=2)
    out = word_llm.generate(["w5 w6 w7 w8"], sp, use_tqdm=False)[0]
    tokenizer = word_llm.get_tokenizer()
    entries = [(e, 3) for e in out.outputs[0].logprobs] + [(e, 2) for e in out.prompt_logprobs[1:]]
    assert len(entries) == 6 + 3
    for entry, n in entries:
        for token_id, lp in entry.items():
            assert type(lp) is Logprob and isinstance(lp, float)
            assert lp.logprob == float(lp) and type(lp.logprob) is float and lp.logprob <= 0
            assert lp.decoded_token == tokenizer.decode([token_id]) == f"w{token_id}"
        ranks = [lp.rank for lp in entry.values()]  # the scored token first, then the top n
        if len(entry) == n + 1:  # not among the top n: at least n + 1 tokens are at least as likely
            assert ranks[1:] == list(range(1, n + 1)) and ranks[0] > n
        else:
            assert sorted(ranks) == list(range(1, n + 1))
    chosen = [e[t] for e, t in zip(out.logprobs, out.token_ids)]
    assert all(lp.rank >= 1 for lp in chosen) and out.cumulative_logprob == pytest.approx(sum(chosen), abs=1e-5)
    lp = chosen[0]
    assert repr(lp) == f"Logprob(logprob={float(lp)!r}, rank={lp.rank}, decoded_token={lp.decoded_token!r})"
    back = pickle.loads(pickle.dumps(lp))
    assert type(back) is Logprob and (back, back.rank, back.decoded_token) == (lp, lp.rank, lp.decoded_token)
    assert json.loads(json.dumps(out.logprobs[0])) == {str(t): float(v) for t, v in out.logprobs[0].items()}

    raw = word_llm.generate(["w5 w6 w7 w8"], sp.clone(), use_tqdm=False)[0]
    assert raw == out  # the same request again: equal entries
    quiet = dataclasses.replace(sp, detokenize=False)
    no_text = word_llm.generate(["w5 w6 w7 w8"], quiet, use_tqdm=False)[0]
    tokenless = llm.generate([[5, 6, 7, 8]], sp, use_tqdm=False)[0]
    for o in (no_text, tokenless):
        for entry in o.outputs[0].logprobs + o.prompt_logprobs[1:]:
            assert all(type(lp) is Logprob and lp.decoded_token is None and lp.rank >= 1 for lp in entry.values())


# vLLM's LLM.chat options: another template, no generation prompt, continuing the last message, tools
OWN_TEMPLATE = ("{{ bos_token }}{% if tools %} w4{% endif %}{% for m in messages %} {{ m['content'] }} w9{% endfor %}"
                "{% if add_generation_prompt %} w3{% endif %}")


@pytest.mark.parametrize("options, prompt", [
    (dict(), [510, 5, 6, 9, 7, 9, 3]),
    (dict(add_generation_prompt=False), [510, 5, 6, 9, 7, 9]),
    (dict(add_generation_prompt=False, continue_final_message=True), [510, 5, 6, 9, 7]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), [510, 4, 5, 6, 9, 7, 9, 3]),
])
def test_chat_options_as_vllm(word_llm, options, prompt):
    talk = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}]
    out = word_llm.chat(talk, greedy(4), use_tqdm=False, chat_template=OWN_TEMPLATE, **options)[0]
    assert out["prompt_token_ids"] == prompt
    assert out["token_ids"] == word_llm.generate([prompt], greedy(4), use_tqdm=False)[0]["token_ids"]


@pytest.mark.parametrize("options, error, words", [
    (dict(continue_final_message=True), ValueError, "continue_final_message=True goes on writing the last message, "
                                                    "so it needs add_generation_prompt=False"),
    (dict(add_generation_prompt="no"), TypeError, "add_generation_prompt must be a bool, got 'no'"),
    (dict(continue_final_message=1), TypeError, "continue_final_message must be a bool, got 1"),
    (dict(chat_template=b"{{ x }}"), TypeError, r"chat_template must be a Jinja template \(str\) or None, got bytes"),
    (dict(tools={"name": "f"}), TypeError, "tools must be a list of tool dicts or None, got dict"),
    (dict(chat_template_kwargs=5), TypeError, "chat_template_kwargs must be a dict or None, got int"),
    (dict(chat_template="{{ oops"), ValueError, "the chat template failed on conversation 0: TemplateSyntaxError"),
    (dict(chat_template="{{ raise_exception('no tools here') }}"), ValueError,
     "the chat template failed on conversation 0: TemplateError: no tools here"),
])
def test_bad_chat_options_are_refused_by_name(word_llm, options, error, words):
    with pytest.raises(error, match=words):
        word_llm.chat([{"role": "user", "content": "w5"}], greedy(2), use_tqdm=False, **options)
    assert_pool_empty(word_llm)


# ---- 8: streaming -----------------------------------------------------------------------------------------------

def stop_params(llm: LLM, prompts: list[str], stop: str) -> list[SamplingParams]:
    """Greedy; "strings" / "tokens": all but the last prompt stop early, the last runs to max_tokens."""
    if stop == "none":
        return [greedy(12)] * len(prompts)
    outs = llm.generate(prompts, greedy(12), use_tqdm=False)
    if stop == "tokens":
        return [greedy(12, stop_token_ids=[o["token_ids"][3]]) for o in outs[:-1]] + [greedy(12)]
    # the last one's stop string never comes: the text held back for it is sent at the end
    return [greedy(12, stop=spanning_stop(o["text"].split(" "))[0]) for o in outs[:-1]] + [greedy(12, stop="w999 w")]


def assert_events_add_up(events: list[dict], expected: list[dict]):
    for index, out in enumerate(expected):
        for completion, want in enumerate(out["outputs"]):
            mine = [e for e in events if (e["index"], e["completion"]) == (index, completion)]
            assert len(mine) >= 2  # it streamed, not one event at the end
            assert "".join(e["text"] for e in mine) == want["text"]
            assert [t for e in mine for t in e["token_ids"]] == want["token_ids"]
            assert [e["finished"] for e in mine] == [False] * (len(mine) - 1) + [True]
            assert (mine[-1]["finish_reason"], mine[-1]["stop_reason"]) == (want["finish_reason"], want["stop_reason"])


@pytest.mark.parametrize("stop", ["none", "strings", "tokens"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "step-by-step"])
def test_stream_deltas_add_up_to_generate(word_model, overlap, stop):
    with LLM(word_model, kvcache_block_size=BLOCK, async_scheduling=overlap) as engine:
        sps = stop_params(engine, STREAM_PROMPTS, stop)
        expected = engine.generate(STREAM_PROMPTS, sps, use_tqdm=False)
        events = list(engine.stream(STREAM_PROMPTS, sps))
        assert_pool_empty(engine)
    assert [o["finish_reason"] for o in expected] == (["length"] * 3 if stop == "none" else ["stop", "stop", "length"])
    assert_events_add_up(events, expected)


def test_leaving_a_stream_early_and_generate_inside_a_stream(word_llm):
    sps = stop_params(word_llm, STREAM_PROMPTS, "strings")
    expected = word_llm.generate(STREAM_PROMPTS, sps, use_tqdm=False)
    for event in word_llm.stream(STREAM_PROMPTS, sps):
        break
    assert_pool_empty(word_llm)
    assert word_llm.generate(STREAM_PROMPTS, sps, use_tqdm=False) == expected
    stream = word_llm.stream(STREAM_PROMPTS, sps)
    events = [next(stream)]
    with pytest.raises(RuntimeError, match="already busy in this thread"):
        word_llm.generate(STREAM_PROMPTS, sps, use_tqdm=False)
    events += list(stream)
    assert_pool_empty(word_llm)
    assert_events_add_up(events, expected)



def byte_char(b: int) -> str:
    """The character a byte-level BPE vocabulary writes byte b as (GPT-2's table, which Qwen's tokenizers use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    return chr(b) if b in printable else chr(256 + sorted(set(range(256)) - set(printable)).index(b))


PARTIAL = "インター".encode() + "イ".encode()[:1]  # whole characters, then a character's first byte


@pytest.fixture(scope="module")
def byte_model(qwen3_path, tmp_path_factory) -> str:
    """The tiny qwen3 with a byte-level BPE tokenizer: ids 0-255 are the bytes, 256 is PARTIAL, 257 "ab"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("generation") / "byte_model"
    shutil.copytree(qwen3_path, folder)
    vocab = {byte_char(b): b for b in range(256)}
    vocab |= {"".join(map(byte_char, PARTIAL)): 256, "ab": 257, "<bos>": 510, "<eos>": 511}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>").save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("allowed, max_tokens", [([0xE3], 3), ([256], 1), ([256], 2), ([257, 0xE3], 5)],
                         ids=["three_lead_bytes", "chars_then_a_lead_byte", "twice", "mixed"])
def test_text_that_ends_in_a_partial_character_is_kept_with_stop_strings_and_streams(byte_model, allowed, max_tokens):
    """The incremental decoder holds back text ending in a partial UTF-8 character; when the completion ends there,
    that text (whole characters before the partial one included) was lost with stop strings or in a stream, while
    generate without them gave the tokenizer's decode. Now all three give the decode."""
    with LLM(byte_model, kvcache_block_size=BLOCK) as engine:
        tokenizer = engine.get_tokenizer()
        sp = greedy(max_tokens, allowed_token_ids=allowed)
        plain = engine.generate([[1, 2, 3]], sp, use_tqdm=False)[0]
        want = tokenizer.decode(plain["token_ids"])
        assert plain["text"] == want and want.endswith("\ufffd")
        stopped = engine.generate([[1, 2, 3]], dataclasses.replace(sp, stop=["never"]), use_tqdm=False)[0]
        assert (stopped["text"], stopped["token_ids"], stopped["finish_reason"]) == (want, plain["token_ids"],
                                                                                      "length")
        events = list(engine.stream([[1, 2, 3]], sp))
        assert "".join(e["text"] for e in events) == want
        assert [t for e in events for t in e["token_ids"]] == plain["token_ids"]


def test_the_final_partial_characters_meet_no_stop_string(byte_model):
    """Lead bytes only: the decoder holds all of it, and the end adds it as the decode gives it ("\ufffd" three
    times). The completion ended by length, so a stop string "\ufffd" does not cut it afterwards: generate and
    stream give the same text and reasons as without the stop string."""
    with LLM(byte_model, kvcache_block_size=BLOCK) as engine:
        sp = greedy(3, allowed_token_ids=[0xE3], stop=["\ufffd"])
        out = engine.generate([[1, 2, 3]], sp, use_tqdm=False)[0]
        events = list(engine.stream([[1, 2, 3]], sp))
    assert (out["text"], out["finish_reason"], out["stop_reason"]) == ("\ufffd" * 3, "length", None)
    assert "".join(e["text"] for e in events) == out["text"]
    assert (events[-1]["finish_reason"], events[-1]["stop_reason"]) == ("length", None)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_inside_held_back_text_stops_at_its_token(byte_model, include):
    """PARTIAL decodes to "インター" and a partial character, so the decoder releases nothing while such tokens
    follow each other: the stop string "ター" in that text still ends the completion at the first token."""
    with LLM(byte_model, kvcache_block_size=BLOCK) as engine:
        sp = greedy(5, allowed_token_ids=[256], stop=["ター"], include_stop_str_in_output=include)
        out = engine.generate([[1, 2, 3]], sp, use_tqdm=False)[0]
        events = list(engine.stream([[1, 2, 3]], sp))
    assert (out["text"], out["token_ids"], out["finish_reason"], out["stop_reason"]) == (
        "インター" if include else "イン", [256], "stop", "ター")
    assert "".join(e["text"] for e in events) == out["text"]
    assert (events[-1]["finish_reason"], events[-1]["stop_reason"]) == ("stop", "ター")


def test_detokenize_false_gives_the_same_tokens_and_no_text(word_llm):
    prompts = STREAM_PROMPTS
    with_text = word_llm.generate(prompts, greedy(8, stop_token_ids=[7]), use_tqdm=False)
    sp = greedy(8, stop_token_ids=[7], detokenize=False)
    without = word_llm.generate(prompts, sp, use_tqdm=False)
    assert ids_of(without) == ids_of(with_text) and all(o["text"] for o in with_text)
    assert [o["text"] for o in without] == [""] * len(prompts)
    assert [o["finish_reason"] for o in without] == [o["finish_reason"] for o in with_text]
    events = list(word_llm.stream(prompts, sp))
    assert {e["text"] for e in events} == {""}
    for index, out in enumerate(without):
        assert [t for e in events if e["index"] == index for t in e["token_ids"]] == out["token_ids"]
    sp.stop = ["w1"]  # set after construction: refused at the call, as at construction
    with pytest.raises(ValueError, match="they need detokenize=True"):
        word_llm.generate(prompts, sp, use_tqdm=False)
    assert_pool_empty(word_llm)


def test_truncate_prompt_tokens_keeps_the_end_of_the_prompt(qwen3_path, hf_reference):
    prompts = random_prompts([30, 5, 12], seed=45)
    with LLM(qwen3_path, kvcache_block_size=BLOCK, max_model_len=40) as engine:
        outs = engine.generate(prompts, greedy(6, truncate_prompt_tokens=10), use_tqdm=False)
        assert [o["prompt_token_ids"] for o in outs] == [p[-10:] for p in prompts]
        assert ids_of(outs) == [hf_reference(qwen3_path, p[-10:], 6) for p in prompts]
        with pytest.raises(ValueError, match="prompt length 60 \\+ max_tokens 6 = 66 exceeds max_model_len=40"):
            engine.generate([prompts[0] * 2], greedy(6), use_tqdm=False)
        # -1: the last max_model_len tokens, still checked against max_tokens
        with pytest.raises(ValueError, match="prompt length 40 \\+ max_tokens 6 = 46 exceeds max_model_len=40"):
            engine.generate([prompts[0] * 2], greedy(6, truncate_prompt_tokens=-1), use_tqdm=False)
        kept = engine.generate([prompts[0] * 2], greedy(6, truncate_prompt_tokens=34), use_tqdm=False)[0]
        assert kept["token_ids"] == hf_reference(qwen3_path, (prompts[0] * 2)[-34:], 6)
        assert_pool_empty(engine)


def test_max_tokens_none_runs_up_to_max_model_len(qwen3_path, hf_model):
    prompts = random_prompts([10, 33, 1], seed=46)
    with LLM(qwen3_path, kvcache_block_size=BLOCK, max_model_len=40) as engine:
        sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, min_tokens=5)
        outs = engine.generate(prompts, sp, use_tqdm=False)
        # transformers' greedy steps, EOS banned for the first five tokens (min_tokens) and never a stop
        expected = []
        for p in prompts:
            ids = list(p)
            while len(ids) < 40:
                with torch.no_grad():
                    logits = hf_model(qwen3_path)(torch.tensor([ids])).logits[0, -1]
                if len(ids) - len(p) < 5:
                    logits[list(engine.config.eos)] = float("-inf")
                ids.append(int(logits.argmax()))
            expected.append(ids[len(p):])
        assert ids_of(outs) == expected
        assert [o["finish_reason"] for o in outs] == ["length"] * 3
        assert sp.max_tokens is None  # the caller's object is left as it was
        with pytest.raises(ValueError, match="prompt length 40 leaves no room for a completion under "
                                             "max_model_len=40"):
            engine.generate([prompts[0] * 4], sp, use_tqdm=False)
        with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_tokens=7\], got 8"):
            engine.generate([prompts[1]], SamplingParams(max_tokens=None, min_tokens=8), use_tqdm=False)
        assert_pool_empty(engine)

# ---- 9: defaults from the model folder ----------------------------------------------------------------------------

def test_generation_config_supplies_the_defaults(qwen3_path, hf_model, tmp_path):
    prompts = random_prompts([7, 21], seed=42)
    model = hf_model(qwen3_path)
    full = [hf_generate(model, p, 7) for p in prompts]
    assert VOCAB - 1 not in full[0] + full[1]  # the model's own EOS does not cut the reference
    extra_eos = full[0][3]
    folder = model_copy(qwen3_path, tmp_path / "greedy",
                        generation={"temperature": 0.0, "max_new_tokens": 7, "eos_token_id": [VOCAB - 1, extra_eos]})
    with LLM(folder, kvcache_block_size=BLOCK) as engine:
        d = engine.default_sampling_params()
        assert (d.temperature, d.max_tokens, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (0.0, 7, 1.0, 0, 0.0,
                                                                                                  1.0)
        outs = engine.generate(prompts, use_tqdm=False)
    assert ids_of(outs) == [ids[:ids.index(extra_eos) + 1] if extra_eos in ids else ids for ids in full]
    # the model's EOS (config.json's) reports no stop_reason; generation_config's other EOS ids are stop tokens
    assert (outs[0]["finish_reason"], outs[0]["stop_reason"]) == ("stop", extra_eos)

    qwen3_like = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05,
                  "max_new_tokens": 9}
    folder = model_copy(qwen3_path, tmp_path / "qwen3_like", generation=qwen3_like)
    with LLM(folder, kvcache_block_size=BLOCK, seed=3) as engine:
        d = engine.default_sampling_params()
        assert engine.get_default_sampling_params() == d  # vLLM's name
        assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty, d.max_tokens) == (0.6, 0.95, 20, 0.05,
                                                                                                  1.05, 9)
        by_default = engine.generate(prompts, use_tqdm=False)
    with LLM(folder, kvcache_block_size=BLOCK, seed=3) as engine:
        spelled_out = engine.generate(prompts, SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05,
                                                              repetition_penalty=1.05, max_tokens=9), use_tqdm=False)
    assert ids_of(by_default) == ids_of(spelled_out)
    assert all(len(o["token_ids"]) == 9 or o["token_ids"][-1] == VOCAB - 1 for o in by_default)
    assert any(len(o["token_ids"]) == 9 for o in by_default)
    with LLM(qwen3_path, kvcache_block_size=BLOCK) as engine:
        assert engine.default_sampling_params() == SamplingParams()  # no generation settings: vLLM's defaults


def test_a_default_max_tokens_past_max_model_len_is_cut_to_fit(qwen3_path, tmp_path):
    """generation_config's max_new_tokens (Qwen3's folders say 2048+) meets a smaller max_model_len: the default
    is cut to what fits; a max_tokens the caller chose is still refused."""
    prompts = random_prompts([5, 30], seed=45)
    folder = model_copy(qwen3_path, tmp_path / "long", generation={"temperature": 0.0, "max_new_tokens": 2048})
    with LLM(folder, kvcache_block_size=BLOCK, max_model_len=40) as engine:
        outs = engine.generate(prompts, use_tqdm=False)
        spelled = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=40 - len(p)) for p in prompts],
                                  use_tqdm=False)
        assert [(o["token_ids"], o["finish_reason"]) for o in outs] == \
            [(o["token_ids"], o["finish_reason"]) for o in spelled]
        assert all(len(o["token_ids"]) == 40 - len(p) or o["finish_reason"] == "stop" for o, p in zip(outs, prompts))
        with pytest.raises(ValueError, match="exceeds max_model_len=40"):
            engine.generate(prompts, SamplingParams(temperature=0, max_tokens=2048), use_tqdm=False)


# ---- 10: bad values ---------------------------------------------------------------------------------------------

GOOD = greedy(6, stop=["w1 w2"], logprobs=2)
MESSAGES = [{"role": "user", "content": "w5"}]


@pytest.mark.parametrize("call, error, words", [
    (lambda e: SamplingParams(top_p=0.0), ValueError, "top_p must be in (0, 1], got 0.0"),
    (lambda e: SamplingParams(top_k=-2), ValueError, "top_k must be 0 or -1 (off), or >= 1, got -2"),
    (lambda e: SamplingParams(min_tokens=5, max_tokens=4), ValueError, "min_tokens must be in [0, max_tokens=4]"),
    (lambda e: SamplingParams(repetition_penalty=0), ValueError, "repetition_penalty must be a finite number > 0"),
    (lambda e: SamplingParams(n=2, temperature=0), ValueError, "n must be 1 with temperature=0"),
    (lambda e: SamplingParams(stop=["w1", ""]), ValueError, "stop must not contain an empty string"),
    (lambda e: SamplingParams(logprobs=1.5), TypeError, "logprobs must be an int, got float"),
    (lambda e: SamplingParams(stop_token_ids=[3, -1]), ValueError, "stop_token_ids must be token ids >= 0"),
    (lambda e: e.generate(["w1 w2", "w3"], [GOOD, greedy(4, stop_token_ids=[3, VOCAB])], use_tqdm=False),
     ValueError, f"stop_token_ids holds {VOCAB}, outside the vocabulary: ids must be in [0, vocab_size={VOCAB})"),
    (lambda e: e.stream(["w1"], greedy(4, stop_token_ids=[10 ** 6])), ValueError, "stop_token_ids holds 1000000"),
    (lambda e: SamplingParams(logit_bias=[(3, 1.0)]), TypeError, "logit_bias must be a dict of token id -> bias"),
    (lambda e: SamplingParams(logit_bias={"w3": 1.0}), TypeError,
     "logit_bias keys must be token ids (int), got 'w3'"),
    (lambda e: SamplingParams(logit_bias={True: 1.0}), TypeError, "logit_bias keys must be token ids (int)"),
    (lambda e: SamplingParams(logit_bias={3: "1"}), TypeError,
     "logit_bias values must be numbers, got '1' for token 3"),
    (lambda e: SamplingParams(logit_bias={-3: 1.0}), ValueError, "logit_bias keys must be token ids >= 0, got -3"),
    (lambda e: SamplingParams(logit_bias={3: float("nan")}), ValueError, "logit_bias values must be finite or -inf"),
    (lambda e: SamplingParams(logit_bias={3: float("inf")}), ValueError, "logit_bias values must be finite or -inf"),
    (lambda e: SamplingParams(allowed_token_ids=[]), ValueError, "allowed_token_ids must not be empty"),
    (lambda e: SamplingParams(logit_bias={"\u00b2": 1.0}), TypeError,
     "logit_bias keys must be token ids (int), got '²'"),
    (lambda e: SamplingParams(logit_bias={3: -1e39}), ValueError,
     "logit_bias values must be finite or -inf (never drawn), and within float32's range (|bias| <= 3.403e+38), "
     "got -1e+39 for token 3"),
    (lambda e: SamplingParams(temperature=10**400), ValueError, "temperature must be a number in float's range"),
    (lambda e: SamplingParams(repetition_penalty=-10**400), ValueError, "repetition_penalty must be a number in"),
    (lambda e: e.generate(["w1"], greedy(4, allowed_token_ids=[5, 6], bad_words=["w5", "w6", "w7 w8"]),
                          use_tqdm=False),
     ValueError, "logit_bias (-inf) and one-token bad_words ban every token of allowed_token_ids [5, 6]"),
    (lambda e: SamplingParams(bad_words=["w1", 3]), TypeError, "bad_words must be a list of str"),
    (lambda e: SamplingParams(bad_words=["w1", "  "]), ValueError, "bad_words must not hold an empty or blank word"),
    (lambda e: SamplingParams(allowed_token_ids=[1, 2.0]), TypeError, "allowed_token_ids must be a list of int"),
    (lambda e: SamplingParams(allowed_token_ids=[1, -2]), ValueError, "allowed_token_ids must be token ids >= 0"),
    (lambda e: e.generate(["w1 w2", "w3"], [GOOD, greedy(4, logit_bias={VOCAB: 1.0})], use_tqdm=False),
     ValueError, f"logit_bias holds {VOCAB}, outside the vocabulary: ids must be in [0, vocab_size={VOCAB})"),
    (lambda e: e.generate(["w1"], greedy(4, allowed_token_ids=[4, VOCAB + 7]), use_tqdm=False), ValueError,
     f"allowed_token_ids holds {VOCAB + 7}, outside the vocabulary"),
    (lambda e: e.generate(["w1"], edited("logit_bias", {1: float("nan")}), use_tqdm=False), ValueError,
     "logit_bias values must be finite or -inf"),
    (lambda e: e.generate(["w1"], greedy(4, allowed_token_ids=[4, 9], logit_bias={9: -math.inf, 4: -math.inf}),
                          use_tqdm=False),
     ValueError, "logit_bias (-inf) and one-token bad_words ban every token of allowed_token_ids [4, 9]"),
    (lambda e: e.generate(["w1"], greedy(4, logit_bias=dict.fromkeys(range(VOCAB), -math.inf)), use_tqdm=False),
     ValueError, "logit_bias (-inf) and one-token bad_words ban every token of the vocabulary"),
    (lambda e: e.generate(["w1"], SamplingParams(temperature=0, max_tokens=4, allowed_token_ids=[511, 7],
                                                 logit_bias={7: -math.inf}, min_tokens=2), use_tqdm=False),
     ValueError, "min_tokens=2 holds back EOS and the stop tokens"),
    (lambda e: e.generate(["w1"], greedy(4, logit_bias=dict.fromkeys(range(1, VOCAB), -math.inf), min_tokens=1,
                                                stop_token_ids=[0]),
                          use_tqdm=False), ValueError, "min_tokens=1 holds back EOS and the stop tokens"),
    (lambda e: e.chat("w1 w2"), TypeError, "messages must be a list of {'role': ..., 'content': ...} dicts"),
    (lambda e: e.generate(["w1 w2", "w1 \ud800 w2"], GOOD, use_tqdm=False), ValueError,
     "prompt 'w1 \\ud800 w2' is not valid text: surrogates not allowed at position 3"),
    (lambda e: e.chat([]), ValueError, "messages is empty: a conversation needs at least one message"),
    (lambda e: e.chat([MESSAGES, []]), ValueError, "conversation 1 is empty"),
    (lambda e: e.chat([{"content": "w5"}]), ValueError,
     "message 0 of conversation 0 needs a 'role' (a non-empty str such as 'user'), got {'content': 'w5'}"),
    (lambda e: e.chat([[*MESSAGES, {"role": None, "content": "w6"}]]), ValueError, "message 1 of conversation 0 "),
    (lambda e: e.chat([{"role": "user"}]), ValueError, "message 0 of conversation 0 ('user') needs a 'content'"),
    (lambda e: e.chat([{"role": "user", "content": 5}]), TypeError,
     "message 0 of conversation 0 ('user'): 'content' must be a str or a list of text parts, got int"),
    (lambda e: e.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     ValueError, "holds a part of type 'image_url': this model reads text only"),
    (lambda e: e.chat([{"role": "user", "content": [{"type": "text", "text": 5}]}]), TypeError,
     "a content part must be {'type': 'text', 'text': str}"),
    (lambda e: e.chat([MESSAGES, "w2"]), TypeError, "a conversation must be a list of message dicts, got 'w2'"),
    (lambda e: e.chat(MESSAGES, greedy(4, stop_token_ids=[VOCAB])), ValueError, f"stop_token_ids holds {VOCAB}"),
])
def test_bad_values_name_the_field_and_the_engine_goes_on(word_llm, call, error, words):
    assert_refused_and_engine_goes_on(word_llm, call, error, words)


def assert_refused_and_engine_goes_on(llm, call, error, words):
    before = llm.generate(["w1 w2 w3", "w7"], GOOD, use_tqdm=False)
    with pytest.raises(error, match=re.escape(words)):
        call(llm)
    assert_pool_empty(llm)
    assert llm.generate(["w1 w2 w3", "w7"], GOOD, use_tqdm=False) == before


def edited(field: str, value) -> SamplingParams:
    """SamplingParams valid when built, then given a bad value (the dataclass is mutable, as vLLM's is)."""
    sp = greedy(4)
    setattr(sp, field, value)
    return sp


@pytest.mark.parametrize("call, error, words", [
    (lambda e: e.generate(["w1"], edited("temperature", -1.0), use_tqdm=False), ValueError,
     "temperature must be a finite number >= 0, got -1.0"),
    (lambda e: e.generate(["w1", "w2"], [GOOD, edited("max_tokens", 0)], use_tqdm=False), ValueError,
     "max_tokens must be None or >= 1, got 0"),
    (lambda e: e.stream(["w1"], edited("top_p", 0.0)), ValueError, "top_p must be in (0, 1], got 0.0"),
    (lambda e: e.generate(["w1"], edited("ignore_eos", 1), use_tqdm=False), TypeError, "ignore_eos must be a bool"),
    (lambda e: e.generate(["w1 w2 w3"], edited("truncate_prompt_tokens", "2"), use_tqdm=False), TypeError,
     "truncate_prompt_tokens must be an int, got str"),
    (lambda e: e.generate(["w1"], edited("logit_bias", {3: 10**400}), use_tqdm=False), ValueError,
     "logit_bias[3] must be a number in float's range, got an int of 401 digits"),
])
def test_fields_set_after_construction_are_checked_at_the_call(word_llm, call, error, words):
    assert_refused_and_engine_goes_on(word_llm, call, error, words)


def test_a_top_k_past_the_vocabulary_is_off(word_llm):
    """top_k >= vocab_size keeps every token (vLLM's reading): the draws equal top_k=0's, however large the value
    (2**31 and past used to overflow the sampler's int32 widths and return ids outside the vocabulary)."""
    off = SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_tokens=8, ignore_eos=True)
    want = word_llm.generate(["w1 w2", "w9"], off, use_tqdm=False)
    for top_k in (VOCAB, VOCAB + 1, 2**31, 2**62):
        got = word_llm.generate(["w1 w2", "w9"], dataclasses.replace(off, top_k=top_k), use_tqdm=False)
        assert ids_of(got) == ids_of(want)
    assert word_llm.generate(["w1"], dataclasses.replace(off, top_k=VOCAB - 1), use_tqdm=False)  # still a filter


def test_a_request_keeps_its_own_sampling_params(word_llm):
    """Editing the caller's SamplingParams while its request runs changes nothing for that request."""
    sp = greedy(8)
    expected = word_llm.generate(["w1 w2 w3"], sp, use_tqdm=False)[0]["token_ids"]
    stream = word_llm.stream(["w1 w2 w3"], sp)
    tokens = list(next(stream)["token_ids"])  # the request is running
    sp.max_tokens, sp.temperature = 2, 1.0
    for event in stream:
        tokens += event["token_ids"]
    assert tokens == expected and len(tokens) == 8
