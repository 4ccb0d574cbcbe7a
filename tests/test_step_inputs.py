"""Step-input building as pure functions, with tiny numbers (blocks of 4): the exact ids, positions, cache slots,
cu_seqlens and block tables a step record turns into, and a property test that plays the runner against the
Scheduler (records applied, a fake KV cache written and read, overlapped or step by step).
"""
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.engine.step import CachedSequence, NewSequence, ScheduledStep, StepKind, StepResult
from nanovllm.engine.step_inputs import (SeqState, apply_step, block_table_rows, decode_layout, finish_step,
                                         prefill_layout, slots)
from nanovllm.sampling_params import SamplingParams

BS = 4
P = SamplingParams()


def new(seq_id: int, token_ids: list[int], block_table: list[int], num_cached: int, num_scheduled: int
        ) -> NewSequence:
    return NewSequence(seq_id, token_ids, block_table, num_cached, num_scheduled, P, len(token_ids), 0)


def prefill(*records: NewSequence | CachedSequence, finished: list[int] | None = None) -> ScheduledStep:
    return step_of(StepKind.PREFILL, records, finished)


def decode(*records: NewSequence | CachedSequence, finished: list[int] | None = None) -> ScheduledStep:
    return step_of(StepKind.DECODE, records, finished)


def step_of(kind: StepKind, records: tuple[NewSequence | CachedSequence, ...], finished: list[int] | None
            ) -> ScheduledStep:
    return ScheduledStep(kind, [r for r in records if isinstance(r, NewSequence)],
                         [r for r in records if isinstance(r, CachedSequence)], finished or [])


# ---- slots / block_table_rows --------------------------------------------------------------------------

def test_slots_across_a_block_boundary():
    assert slots([7, 3], 2, 6, BS) == [30, 31, 12, 13]


def test_slots_from_a_block_start_into_a_partial_block():
    assert slots([7, 3, 5], 4, 9, BS) == [12, 13, 14, 15, 20]


def test_slots_of_a_whole_block_and_of_nothing():
    assert slots([7, 3], 0, 4, BS) == [28, 29, 30, 31]
    assert slots([7, 3], 2, 2, BS) == []


def test_block_table_rows_pad_with_minus_one_to_the_longest():
    assert block_table_rows([[7, 3], [5], [1, 2, 4]]) == ([7, 3, -1, 5, -1, -1, 1, 2, 4], 3)
    assert block_table_rows([[7], [5]]) == ([7, 5], 1)


# ---- apply_step / finish_step --------------------------------------------------------------------------

def test_apply_step_keeps_new_sequences_and_extends_cached_ones():
    states: dict[int, SeqState] = {}
    rows = apply_step(states, prefill(new(1, [10, 11, 12, 13, 14, 15], [7, 3], 4, 2), new(2, [20, 21, 22], [5], 0, 3)))
    assert [(r.seq_id, r.num_tokens, r.last_token) for r in rows] == [(1, 2, 15), (2, 3, 22)]
    assert states == {1: SeqState([10, 11, 12, 13, 14, 15], [7, 3], 4, P, 6), 2: SeqState([20, 21, 22], [5], 0, P, 3)}
    assert rows[0].state is states[1]
    finish_step(rows)
    assert [states[1].num_computed, states[2].num_computed] == [6, 3]
    rows = apply_step(states, decode(CachedSequence(2, [9], 1, 42), CachedSequence(1, [], 1, None)))
    assert [(r.seq_id, r.num_tokens, r.last_token) for r in rows] == [(2, 1, 42), (1, 1, None)]
    assert [states[1].block_table, states[2].block_table] == [[7, 3], [5, 9]]


def test_apply_step_drops_finished_sequences_before_taking_new_ones():
    states = {1: SeqState([1, 2, 3], [4], 4, P), 2: SeqState([5, 6], [6], 3, P), 3: SeqState([7], [8], 2, P)}
    # 1 was preempted and comes back in full, 2 finished, 3 goes on
    rows = apply_step(states, prefill(new(1, [1, 2, 3, 9], [0], 0, 4), finished=[1, 2]))
    assert states == {1: SeqState([1, 2, 3, 9], [0], 0, P, 4), 3: SeqState([7], [8], 2, P)}
    assert [(r.seq_id, r.num_tokens) for r in rows] == [(1, 4)]


# ---- prefill_layout ------------------------------------------------------------------------------------

def test_prefill_of_a_chunk_after_a_cached_prefix_next_to_a_fresh_prompt():
    # seq 1: tokens 0..3 hit the cache (block 7), 4..5 are computed; seq 2: all 3 tokens computed
    rows = apply_step({}, prefill(new(1, [10, 11, 12, 13, 14, 15], [7, 3], 4, 2), new(2, [20, 21, 22], [5], 0, 3)))
    lay = prefill_layout(rows, BS)
    assert lay.input_ids == [14, 15, 20, 21, 22]
    assert lay.positions == [4, 5, 0, 1, 2]
    assert lay.slot_mapping == [12, 13, 20, 21, 22]
    assert lay.cu_seqlens_q == [0, 2, 5]
    assert lay.cu_seqlens_k == [0, 6, 9]
    assert (lay.max_seqlen_q, lay.max_seqlen_k) == (3, 6)
    assert (lay.block_tables, lay.width) == ([7, 3, 5, -1], 2)


def test_prefill_in_two_chunks_continues_where_the_first_stopped():
    states: dict[int, SeqState] = {}
    rows = apply_step(states, prefill(new(1, list(range(10, 20)), [7, 3, 5], 0, 3)))
    lay = prefill_layout(rows, BS)
    assert (lay.input_ids, lay.positions, lay.slot_mapping) == ([10, 11, 12], [0, 1, 2], [28, 29, 30])
    assert (lay.cu_seqlens_q, lay.cu_seqlens_k) == ([0, 3], [0, 3])
    assert (lay.block_tables, lay.width) == ([], 0)  # no key comes from the cache
    finish_step(rows)
    lay = prefill_layout(apply_step(states, prefill(CachedSequence(1, [], 4, 12))), BS)
    assert (lay.input_ids, lay.positions) == ([13, 14, 15, 16], [3, 4, 5, 6])
    assert lay.slot_mapping == [31, 12, 13, 14]
    assert (lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_seqlen_q, lay.max_seqlen_k) == ([0, 4], [0, 7], 4, 7)
    assert (lay.block_tables, lay.width) == ([7, 3, 5], 3)


def test_prefill_of_rows_without_blocks_stores_nothing():
    # as the warm-up runs it: sequences with no KV blocks, nothing cached
    rows = apply_step({}, prefill(new(0, [1, 2, 3, 4, 5], [], 0, 5), new(1, [6, 7, 8], [], 0, 3)))
    lay = prefill_layout(rows, BS)
    assert lay.input_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert lay.positions == [0, 1, 2, 3, 4, 0, 1, 2]
    assert lay.slot_mapping == []
    assert (lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_seqlen_q, lay.max_seqlen_k) == ([0, 5, 8], [0, 5, 8], 5, 5)
    assert (lay.block_tables, lay.width) == ([], 0)



def test_prefill_logits_of_scored_prompts_and_of_one_token_chunks():
    """A row scoring its prompt gets every chunk token's logit; a one-token chunk adds none beyond its row's last,
    so the layout says that some row scores (the runner would otherwise take the logits count as the sign)."""
    scored = SamplingParams(prompt_logprobs=1)
    rows = apply_step({}, prefill(new(1, [10, 11, 12], [7], 0, 3),
                                  NewSequence(2, [20, 21, 22, 23], [5], 0, 2, scored, 4, 0)))
    lay = prefill_layout(rows, BS)
    assert (lay.logits_indices, lay.scores_prompts) == ([2, 3, 4], True)
    rows = apply_step({}, prefill(new(1, [10, 11, 12], [7], 0, 3), NewSequence(2, [20, 21], [5], 0, 1, scored, 2, 0)))
    lay = prefill_layout(rows, BS)
    assert (lay.logits_indices, lay.scores_prompts) == ([2, 3], True)
    assert prefill_layout(apply_step({}, prefill(new(1, [10, 11, 12], [7], 0, 3))), BS).scores_prompts is False


def test_mixed_step_s_trailing_one_token_rows_as_decode_rows():
    """A mixed step: a chunk, then decodes (the scheduler's order). Asked for, the trailing one-token rows are
    laid out again as decode rows (key counts, their own block tables, longest first); the varlen fields still
    cover every row. A one-token row before a longer one stays a chunk only."""
    states: dict[int, SeqState] = {}
    finish_step(apply_step(states, prefill(new(2, [20] * 5, [2, 3], 0, 5), new(3, [30] * 9, [4, 5, 6], 0, 9))))
    rows = apply_step(states, prefill(new(4, [40] * 3, [8], 2, 1), new(1, [10] * 6, [7, 9], 0, 6),
                                      CachedSequence(2, [], 1, 21), CachedSequence(3, [], 1, None)))
    lay = prefill_layout(rows, BS, decode_rows=True, ordered=True)
    assert (lay.cu_seqlens_q, lay.cu_seqlens_k) == ([0, 1, 7, 8, 9], [0, 3, 9, 15, 25])
    assert (lay.block_tables, lay.width) == ([8, -1, -1, 7, 9, -1, 2, 3, -1, 4, 5, 6], 3)
    assert lay.decode_context_lens == [6, 10]
    assert lay.decode_block_tables == [2, 3, -1, 4, 5, 6]
    assert lay.decode_order == [1, 0]
    plain = prefill_layout(rows, BS)  # a backend that does not ask
    assert (plain.decode_context_lens, plain.decode_block_tables, plain.decode_order) == ([], [], [])
    assert prefill_layout(rows, BS, decode_rows=True).decode_order == []  # ordered only when asked
    # nothing from the cache (a first prefill of one-token prompts): no decode rows
    lay = prefill_layout(apply_step({}, prefill(new(5, [1], [0], 0, 1), new(6, [2], [1], 0, 1))), BS, True, True)
    assert (lay.width, lay.decode_context_lens) == (0, [])

# ---- decode_layout -------------------------------------------------------------------------------------

def test_decode_with_a_known_token_and_one_in_flight():
    states: dict[int, SeqState] = {}
    finish_step(apply_step(states, prefill(new(1, [10, 11, 12, 13, 14], [7, 3], 0, 5),
                                           new(2, [20, 21, 22, 23], [5], 0, 4))))
    rows = apply_step(states, decode(CachedSequence(1, [], 1, 42), CachedSequence(2, [9], 1, None)))
    lay = decode_layout(rows, BS)
    assert lay.input_ids == [42, -1]  # -1: the runner reads it from its previous step's samples
    assert lay.positions == [5, 4]
    assert lay.slot_mapping == [13, 36]
    assert lay.context_lens == [6, 5]
    assert (lay.block_tables, lay.width) == ([7, 3, 5, 9], 2)


def test_decode_order_is_longest_context_first_ties_in_batch_order():
    rows = apply_step({}, decode(new(1, [1] * 5, [0, 1], 4, 1), new(2, [2] * 9, [2, 3, 4], 8, 1),
                                 new(3, [3] * 5, [5, 6], 4, 1), new(4, [4] * 7, [7, 8], 6, 1)))
    lay = decode_layout(rows, BS, ordered=True)
    assert lay.context_lens == [5, 9, 5, 7]
    assert lay.order == [1, 3, 0, 2]
    assert decode_layout(rows, BS).order == []  # only for a backend that asks


def test_decode_of_a_new_sequence_whose_prefix_is_cached():
    rows = apply_step({}, decode(new(3, [1, 2, 3, 4, 7], [0, 2], 4, 1)))
    lay = decode_layout(rows, BS)
    assert (lay.input_ids, lay.positions, lay.slot_mapping, lay.context_lens) == ([7], [4], [8], [5])
    assert (lay.block_tables, lay.width) == ([0, 2], 2)


# ---- the runner's view follows the scheduler (property test) -------------------------------------------

EOS = 6


def sampled(seq_id: int, position: int) -> int:
    """The fake model's token at a position: a fixed function, so any schedule must produce the same outputs."""
    return (seq_id * 5 + position * 3) % 7


def expected_completion(prompt: list[int], seq_id: int, max_tokens: int, max_model_len: int) -> list[int]:
    out, pos = [], len(prompt)
    while True:
        out.append(sampled(seq_id, pos))
        pos += 1
        if out[-1] == EOS or len(out) == max_tokens or pos == max_model_len:
            return out


class FakeRunner:
    """Applies step records as the ModelRunner does, checks every input token against the truth, writes a fake KV
    cache (slot -> token) and checks each row's keys read back the right tokens."""

    def __init__(self, seqs: dict[int, Sequence], prompts: dict[int, list[int]]):
        self.seqs, self.prompts = seqs, prompts
        self.states: dict[int, SeqState] = {}
        self.kv: dict[int, int] = {}
        self.previous: dict[int, int] = {}  # seq_id -> the token it sampled in the previous step

    def truth(self, seq_id: int, pos: int) -> int:
        prompt = self.prompts[seq_id]
        return prompt[pos] if pos < len(prompt) else sampled(seq_id, pos)

    def launch(self, step: ScheduledStep) -> StepResult:
        rows = apply_step(self.states, step)
        for seq_id, state in self.states.items():  # the runner holds only running sequences, with their tables
            assert self.seqs[seq_id].status == SequenceStatus.RUNNING
            assert state.block_table == self.seqs[seq_id].block_table
        if step.kind == StepKind.PREFILL:  # also a mixed step's decode rows: one token each
            lay = prefill_layout(rows, BS)
            ends = lay.cu_seqlens_q[1:]
        else:
            lay = decode_layout(rows, BS)
            ends = list(range(1, len(rows) + 1))
        starts = [0] + ends[:-1]
        for row, a, b in zip(rows, starts, ends):  # a token in flight is the row's only one: the last sample
            if -1 in lay.input_ids[a:b]:
                assert row.last_token is None and b - a == 1
                lay.input_ids[a] = self.previous[row.seq_id]
        tokens = []
        for row, a, b in zip(rows, starts, ends):
            table = row.state.block_table
            for token, pos, slot in zip(lay.input_ids[a:b], lay.positions[a:b], lay.slot_mapping[a:b]):
                assert token == self.truth(row.seq_id, pos)
                assert slot == table[pos // BS] * BS + pos % BS
                self.kv[slot] = token
            end = lay.positions[b - 1] + 1
            assert [self.kv.get(table[q // BS] * BS + q % BS) for q in range(end)] == \
                   [self.truth(row.seq_id, q) for q in range(end)]
            tokens.append(sampled(row.seq_id, end))
        finish_step(rows)
        self.previous = {row.seq_id: t for row, t in zip(rows, tokens)}
        return StepResult(tokens)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_runner_view_follows_the_scheduler(data):
    overlapped = data.draw(st.booleans(), label="overlapped")
    max_model_len = 16
    config = SimpleNamespace(max_num_seqs=data.draw(st.integers(1, 3), label="max_num_seqs"),
                             max_num_batched_tokens=data.draw(st.integers(2, 12), label="budget"),
                             max_model_len=max_model_len, eos=(EOS,),
                             num_kvcache_blocks=data.draw(st.integers(4, 7), label="num_blocks"),
                             kvcache_block_size=BS, enable_prefix_caching=data.draw(st.booleans(), label="caching"),
                             mixed_steps=data.draw(st.booleans(), label="mixed"))
    sched = Scheduler(config)
    # prompts open with whole blocks from a pool of two, so that prefixes repeat and the cache gets hit
    prompt_st = st.tuples(st.lists(st.sampled_from([[0, 1, 2, 3], [3, 2, 1, 0]]), max_size=2),
                          st.lists(st.integers(0, 3), min_size=1, max_size=4)).map(lambda p: sum(p[0], []) + p[1])
    prompts = data.draw(st.lists(prompt_st, min_size=1, max_size=5), label="prompts")
    max_tokens = data.draw(st.lists(st.integers(1, 6), min_size=len(prompts), max_size=len(prompts)), label="max")
    seqs = {i: Sequence(p, SamplingParams(max_tokens=m), i, BS) for i, (p, m) in enumerate(zip(prompts, max_tokens))}
    runner = FakeRunner(seqs, {i: list(p) for i, p in enumerate(prompts)})
    for seq in seqs.values():
        sched.add(seq)
    in_flight = None
    for _ in range(500):  # the engine's loop: step N+1 is launched before step N is read back when overlapped
        step = sched.schedule()
        previous, in_flight = in_flight, None
        if step is not None:
            result = runner.launch(step)
            booked = sched.launched(step)
            for seq_id, state in runner.states.items():
                assert state.num_computed == seqs[seq_id].num_cached_tokens
            if overlapped:
                in_flight = (booked, result)
            else:
                sched.update(booked, result)
        if previous is not None:
            sched.update(*previous)
        elif step is None:
            break
    assert sched.is_finished()
    for i, seq in seqs.items():
        assert seq.completion_token_ids == expected_completion(prompts[i], i, max_tokens[i], max_model_len)
        assert seq.finish_reason == ("stop" if seq.completion_token_ids[-1] == EOS else "length")
    assert sched.block_manager.num_free_blocks == config.num_kvcache_blocks
