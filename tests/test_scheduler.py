"""Scheduler on the CPU with tiny numbers (blocks of 4 tokens, a handful of blocks): no model is run.

Each test plays the engine's loop by hand: `schedule()`, then `postprocess()` with the token ids the model would
have sampled (one per row of the step, new sequences first), or, for overlapped steps, `launched()` when a step is
queued and `update()` when its ids are read back, in the order the engine does it.
"""
from types import SimpleNamespace

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import BookedStep, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.engine.step import CachedSequence, NewSequence, ScheduledStep, StepKind, StepResult
from nanovllm.sampling_params import SamplingParams

BS = 4
EOS = 99
PREFILL, DECODE = StepKind.PREFILL, StepKind.DECODE


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, eos=(EOS,),
                  num_kvcache_blocks=8, kvcache_block_size=BS, enable_prefix_caching=True, mixed_steps=False)
    config.update(overrides)
    return Scheduler(SimpleNamespace(**config))


def make_seq(seq_id: int, token_ids: list[int], max_tokens: int = 8, ignore_eos: bool = False) -> Sequence:
    return Sequence(token_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), seq_id, BS)


def add_all(sched: Scheduler, *seqs: Sequence):
    for seq in seqs:
        sched.add(seq)


def rows(step: ScheduledStep) -> list[tuple[int, int]]:
    """The step's batch rows as (seq_id, tokens scheduled), in the order the runner lays them out."""
    return [(r.seq_id, r.num_scheduled_tokens) for r in [*step.new, *step.cached]]


def run(sched: Scheduler, step: ScheduledStep, token_ids: list[int]) -> list[Sequence]:
    """The step ran and sampled token_ids (one per row): book it, return the sequences that finished."""
    return sched.postprocess(step, StepResult(token_ids))


def read_back(sched: Scheduler, booked: BookedStep, token_ids: list[int]) -> list[Sequence]:
    return sched.update(booked, StepResult(token_ids))


def num_cached_after_allocate(bm: BlockManager, token_ids: list[int]) -> int:
    """Prefix-cache hits a new request with these tokens would get (the probe's blocks are given back)."""
    probe = Sequence(token_ids, SamplingParams(), -1, BS)
    bm.allocate(probe)
    hits = probe.num_cached_tokens
    bm.deallocate(probe)
    return hits


def refs(sched: Scheduler) -> list[int]:
    return sched.block_manager.ref_counts()


# ---- prefill admission ---------------------------------------------------------------------------------

def test_prefill_admission_bounded_by_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    s0, s1, s2 = make_seq(0, [1, 2, 3]), make_seq(1, [4, 5, 6]), make_seq(2, [7, 8, 9])
    add_all(sched, s0, s1, s2)
    step = sched.schedule()
    assert step.kind == PREFILL
    assert rows(step) == [(0, 3), (1, 3)]
    assert step.num_tokens == 6
    assert list(sched.running) == [s0, s1]
    assert list(sched.waiting) == [s2]
    assert [s0.block_table, s1.block_table] == [[0], [1]]
    assert s0.status == s1.status == SequenceStatus.RUNNING
    assert s2.status == SequenceStatus.WAITING and s2.block_table == []


def test_prefill_admission_bounded_by_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    s0, s1, s2 = make_seq(0, [1, 2, 3, 4]), make_seq(1, [5, 6, 7, 8]), make_seq(2, [9, 10])
    add_all(sched, s0, s1, s2)
    step = sched.schedule()
    assert rows(step) == [(0, 4), (1, 4)]
    assert list(sched.waiting) == [s2]  # budget spent: s2 is not even allocated
    assert s2.block_table == []
    assert sched.block_manager.num_free_blocks == 6
    assert run(sched, step, [20, 21]) == []
    step = sched.schedule()  # the others only decode now: s2's prefill goes first
    assert (step.kind, rows(step)) == (PREFILL, [(2, 2)])
    assert s2.block_table == [2]


def test_admission_stops_at_first_sequence_without_blocks():
    sched = make_scheduler(num_kvcache_blocks=3)
    s0, s1, s2 = make_seq(0, [1, 2, 3, 4, 5]), make_seq(1, [6, 7, 8, 9, 10]), make_seq(2, [11])
    add_all(sched, s0, s1, s2)
    step = sched.schedule()
    assert rows(step) == [(0, 5)]  # s1 needs 2 blocks, 1 is free; s2 would fit but waits behind it (FIFO)
    assert list(sched.waiting) == [s1, s2]
    assert s0.block_table == [0, 1]
    assert sched.block_manager.num_free_blocks == 1


def test_budget_remainder_starts_a_chunk_of_the_next_prompt():
    sched = make_scheduler(max_num_batched_tokens=8)
    s0, s1 = make_seq(0, [1, 2, 3, 4, 5]), make_seq(1, [6, 7, 8, 9, 10])
    add_all(sched, s0, s1)
    step = sched.schedule()
    assert rows(step) == [(0, 5), (1, 3)]
    assert run(sched, step, [20, 21]) == []
    assert s0.token_ids == [1, 2, 3, 4, 5, 20]
    assert s1.token_ids == [6, 7, 8, 9, 10]  # a chunk samples no token: its row's id is ignored
    assert s1.num_cached_tokens == 3
    # the chunk in flight goes first; s0 waits for the next decode step
    step = sched.schedule()
    assert (step.kind, rows(step)) == (PREFILL, [(1, 2)])
    assert run(sched, step, [22]) == []
    assert s1.token_ids == [6, 7, 8, 9, 10, 22]
    step = sched.schedule()
    assert (step.kind, rows(step)) == (DECODE, [(0, 1), (1, 1)])


# ---- chunked prefill and prefix hits -------------------------------------------------------------------

def test_long_prompt_is_prefilled_in_chunks_of_the_budget():
    sched = make_scheduler(max_num_batched_tokens=4)
    bm = sched.block_manager
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    seq = make_seq(0, prompt)
    sched.add(seq)
    step = sched.schedule()
    assert (step.kind, rows(step)) == (PREFILL, [(0, 4)])
    assert seq.block_table == [0, 1, 2]  # the whole prompt's blocks are taken at admission
    assert run(sched, step, [50]) == []
    assert seq.token_ids == prompt and seq.num_cached_tokens == 4
    assert num_cached_after_allocate(bm, prompt[:9]) == 4  # the computed block hits, the next one not yet
    step = sched.schedule()
    assert (step.kind, rows(step)) == (PREFILL, [(0, 4)])
    assert run(sched, step, [51]) == []
    assert seq.token_ids == prompt and seq.num_cached_tokens == 8
    assert num_cached_after_allocate(bm, prompt[:9]) == 8
    step = sched.schedule()
    assert (step.kind, rows(step)) == (PREFILL, [(0, 2)])
    assert run(sched, step, [52]) == []
    assert seq.token_ids == prompt + [52]  # only the last chunk samples
    assert seq.num_cached_tokens == 10
    step = sched.schedule()
    assert (step.kind, rows(step)) == (DECODE, [(0, 1)])


def test_prefix_hit_on_a_chunk_already_computed():
    sched = make_scheduler(max_num_batched_tokens=6)
    s0 = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    sched.add(s0)
    step = sched.schedule()
    assert rows(step) == [(0, 6)]
    run(sched, step, [50])  # 6 tokens computed: block 0 published
    s1 = make_seq(1, [1, 2, 3, 4, 30, 31])
    sched.add(s1)
    step = sched.schedule()
    assert rows(step) == [(1, 2), (0, 4)]  # new sequences come first in the batch
    assert s1.block_table == [0, 3]
    assert s1.num_cached_tokens == 4
    assert refs(sched)[:4] == [2, 1, 1, 1]


def test_full_prefix_hit_goes_straight_to_decode():
    sched = make_scheduler()
    s0 = make_seq(0, [1, 2, 3, 4, 5])
    sched.add(s0)
    run(sched, sched.schedule(), [6])
    s1 = make_seq(1, [1, 2, 3, 4, 7])  # only its last token is uncached
    sched.add(s1)
    step = sched.schedule()
    assert (step.kind, rows(step)) == (DECODE, [(1, 1), (0, 1)])
    assert s1.block_table == [0, 2]
    assert s1.num_cached_tokens == 4
    assert list(sched.running) == [s0, s1]


# ---- step records: new sequences in full, running ones as deltas ---------------------------------------

def test_a_sequence_is_sent_in_full_once_then_as_deltas():
    sched = make_scheduler()
    s0 = make_seq(0, [1, 2, 3, 4, 5])
    sched.add(s0)
    step = sched.schedule()
    assert step.new == [NewSequence(0, [1, 2, 3, 4, 5], [0, 1], 0, 5, s0.sampling_params, 5, 0)]
    assert step.cached == [] and step.finished_seq_ids == []
    run(sched, step, [6])
    s1 = make_seq(1, [1, 2, 3, 4, 9, 9, 9])
    sched.add(s1)
    step = sched.schedule()  # s1 hits s0's first block; s0 has no prompt left and sits this step out
    assert step.kind == PREFILL
    assert step.new == [NewSequence(1, [1, 2, 3, 4, 9, 9, 9], [0, 2], 4, 3, s1.sampling_params, 7, 0)]
    assert step.cached == []
    run(sched, step, [10])
    step = sched.schedule()
    assert step.kind == DECODE and step.new == []
    assert step.cached == [CachedSequence(0, [], 1, 6), CachedSequence(1, [], 1, 10)]
    run(sched, step, [11, 12])
    step = sched.schedule()  # s1's 9th token starts a block: only that block's id is sent
    assert step.cached == [CachedSequence(0, [], 1, 11), CachedSequence(1, [3], 1, 12)]
    assert s1.block_table == [0, 2, 3]


def test_a_chunked_prompt_continues_as_a_delta():
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq(0, [1, 2, 3, 4, 5, 6])
    sched.add(seq)
    step = sched.schedule()
    assert step.new == [NewSequence(0, [1, 2, 3, 4, 5, 6], [0, 1], 0, 4, seq.sampling_params, 6, 0)]
    run(sched, step, [50])
    step = sched.schedule()
    assert step.kind == PREFILL and step.new == []
    assert step.cached == [CachedSequence(0, [], 2, 6)]


def test_finished_ids_go_out_with_the_next_step_once():
    sched = make_scheduler()
    s0 = make_seq(0, [1, 2], max_tokens=1)
    sched.add(s0)
    assert run(sched, sched.schedule(), [5]) == [s0]
    assert sched.schedule() is None  # nothing to run: the id waits for the next step
    assert sched.is_finished()
    s1 = make_seq(1, [3, 4])
    sched.add(s1)
    step = sched.schedule()
    assert step.finished_seq_ids == [0]
    assert rows(step) == [(1, 2)]
    run(sched, step, [6])
    assert sched.schedule().finished_seq_ids == []


# ---- decode --------------------------------------------------------------------------------------------

def test_decode_after_prefill_adds_blocks_at_boundaries():
    sched = make_scheduler()
    s0, s1 = make_seq(0, [1, 2, 3, 4]), make_seq(1, [5, 6])
    add_all(sched, s0, s1)
    step = sched.schedule()
    assert (step.kind, rows(step)) == (PREFILL, [(0, 4), (1, 2)])
    assert run(sched, step, [10, 11]) == []
    assert s0.token_ids == [1, 2, 3, 4, 10] and s1.token_ids == [5, 6, 11]
    step = sched.schedule()
    assert step.cached == [CachedSequence(0, [2], 1, 10), CachedSequence(1, [], 1, 11)]  # the 5th token starts a block
    assert s0.block_table == [0, 2] and s1.block_table == [1]
    assert run(sched, step, [12, 13]) == []
    assert [s0.num_cached_tokens, s1.num_cached_tokens] == [5, 3]
    step = sched.schedule()
    assert step.cached == [CachedSequence(0, [], 1, 12), CachedSequence(1, [], 1, 13)]  # the 4th still fits
    run(sched, step, [14, 15])
    step = sched.schedule()
    assert step.cached == [CachedSequence(0, [], 1, 14), CachedSequence(1, [3], 1, 15)]
    assert s1.block_table == [1, 3]
    assert sched.block_manager.num_free_blocks == 4


def test_one_token_prompts_go_straight_to_decode_in_admission_order():
    sched = make_scheduler(max_num_seqs=2)
    s0, s1, s2 = make_seq(0, [1]), make_seq(1, [2]), make_seq(2, [3])
    add_all(sched, s0, s1, s2)
    step = sched.schedule()
    assert (step.kind, rows(step)) == (DECODE, [(0, 1), (1, 1)])
    assert step.new == [NewSequence(0, [1], [0], 0, 1, s0.sampling_params, 1, 0),
                        NewSequence(1, [2], [1], 0, 1, s1.sampling_params, 1, 0)]
    assert list(sched.running) == [s0, s1]
    assert list(sched.waiting) == [s2]


# ---- preemption ----------------------------------------------------------------------------------------

def test_preempts_most_recently_admitted_and_readmits_it_in_full():
    sched = make_scheduler(num_kvcache_blocks=2, max_num_seqs=2)
    bm = sched.block_manager
    s0 = make_seq(0, [1, 2, 3, 4], max_tokens=2)
    s1 = make_seq(1, [5, 6], max_tokens=5)
    s2 = make_seq(2, [8, 9])
    add_all(sched, s0, s1, s2)
    step = sched.schedule()
    assert rows(step) == [(0, 4), (1, 2)]
    assert list(sched.waiting) == [s2]
    assert run(sched, step, [10, 11]) == []
    assert [s0.block_table, s1.block_table] == [[0], [1]]
    # s0's 5th token needs a block, none is free: s1 (admitted last) gives its block back
    step = sched.schedule()
    assert step.cached == [CachedSequence(0, [1], 1, 10)]
    assert step.finished_seq_ids == [1]  # the runner drops s1
    assert list(sched.running) == [s0]
    assert list(sched.waiting) == [s1, s2]  # to the front of the queue
    assert s1.status == SequenceStatus.WAITING
    assert s1.block_table == [] and s1.num_cached_tokens == 0
    assert s1.token_ids == [5, 6, 11]  # its sampled token is kept and recomputed
    assert bm.num_free_blocks == 0
    finished = run(sched, step, [12])
    assert finished == [s0] and s0.finish_reason == "length"
    assert bm.num_free_blocks == 2
    # s1 comes back first, in full: all its tokens, generated one included
    step = sched.schedule()
    assert step.kind == PREFILL
    assert step.new == [NewSequence(1, [5, 6, 11], [1], 0, 3, s1.sampling_params, 2, 0),
                        NewSequence(2, [8, 9], [0], 0, 2, s2.sampling_params, 2, 0)]
    assert step.finished_seq_ids == [0]
    assert run(sched, step, [13, 14]) == []
    assert s1.token_ids == [5, 6, 11, 13]
    assert s1.num_completion_tokens == 2


def test_victim_is_the_last_admitted_not_the_next_in_line():
    sched = make_scheduler(num_kvcache_blocks=3, max_num_seqs=3)
    s0, s1, s2 = make_seq(0, [1, 2, 3, 4]), make_seq(1, [5, 6]), make_seq(2, [7, 8])
    add_all(sched, s0, s1, s2)
    run(sched, sched.schedule(), [10, 11, 12])
    step = sched.schedule()  # s0 needs a block: s2 is preempted, s1 keeps running
    assert rows(step) == [(0, 1), (1, 1)]
    assert step.finished_seq_ids == [2]
    assert [s0.block_table, s1.block_table, s2.block_table] == [[0, 2], [1], []]
    assert list(sched.running) == [s0, s1]
    assert list(sched.waiting) == [s2]


def test_last_running_sequence_preempts_itself():
    sched = make_scheduler(num_kvcache_blocks=2, max_num_seqs=2)
    s0, s1 = make_seq(0, [1, 2, 3]), make_seq(1, [4, 5, 6, 7])
    add_all(sched, s0, s1)
    run(sched, sched.schedule(), [10, 11])  # s0 has 4 tokens (fits), s1 has 5 (needs a block)
    step = sched.schedule()
    assert rows(step) == [(0, 1)]
    assert step.finished_seq_ids == [1]
    assert list(sched.running) == [s0]
    assert list(sched.waiting) == [s1]
    assert s1.block_table == [] and s1.status == SequenceStatus.WAITING
    assert sched.block_manager.num_free_blocks == 1


def test_preempting_a_sequence_that_shares_a_prefix_frees_only_its_own_blocks():
    sched = make_scheduler(num_kvcache_blocks=3, max_num_seqs=2)
    s0 = make_seq(0, [1, 2, 3, 4, 5, 6, 7], max_tokens=10)
    sched.add(s0)
    run(sched, sched.schedule(), [10])  # block 0 published
    s1 = make_seq(1, [1, 2, 3, 4, 8], max_tokens=10)
    sched.add(s1)
    step = sched.schedule()  # s1 hits block 0; its one uncached token decodes
    assert (step.kind, rows(step)) == (DECODE, [(1, 1), (0, 1)])
    assert s1.block_table == [0, 2]
    assert refs(sched) == [2, 1, 1]
    run(sched, step, [12, 11])
    assert len(s0) == 9  # its newest token starts a 3rd block, none is free
    step = sched.schedule()
    assert rows(step) == [(0, 1)] and step.finished_seq_ids == [1]
    assert list(sched.waiting) == [s1] and s1.block_table == []
    assert s0.block_table == [0, 1, 2]
    assert refs(sched) == [1, 1, 1]
    assert sched.block_manager.num_free_blocks == 0


# ---- finishing -----------------------------------------------------------------------------------------

def test_finish_on_any_eos_id():
    sched = make_scheduler(eos=(EOS, 7))
    s0, s1 = make_seq(0, [1, 2]), make_seq(1, [3, 4, 5])
    add_all(sched, s0, s1)
    finished = run(sched, sched.schedule(), [7, 20])
    assert finished == [s0]
    assert s0.status == SequenceStatus.FINISHED and s0.finish_reason == "stop"
    assert s0.completion_token_ids == [7]
    assert s0.block_table == []
    assert list(sched.running) == [s1]
    step = sched.schedule()
    assert (step.kind, rows(step)) == (DECODE, [(1, 1)])
    assert step.finished_seq_ids == [0]
    assert run(sched, step, [EOS]) == [s1]
    assert s1.finish_reason == "stop" and s1.completion_token_ids == [20, EOS]
    assert sched.is_finished()
    assert sched.block_manager.num_free_blocks == 8
    assert refs(sched) == [0] * 8


def test_ignore_eos_runs_to_max_tokens():
    sched = make_scheduler()
    seq = make_seq(0, [1, 2], max_tokens=2, ignore_eos=True)
    sched.add(seq)
    assert run(sched, sched.schedule(), [EOS]) == []
    assert seq.status == SequenceStatus.RUNNING and seq.finish_reason is None
    assert run(sched, sched.schedule(), [EOS]) == [seq]
    assert seq.finish_reason == "length"
    assert seq.completion_token_ids == [EOS, EOS]


def test_finish_on_max_tokens_frees_blocks_and_keeps_the_prefix_cached():
    sched = make_scheduler()
    seq = make_seq(0, [1, 2, 3], max_tokens=3)
    sched.add(seq)
    assert run(sched, sched.schedule(), [10]) == []
    for token_id in (11, 12):
        step = sched.schedule()
        assert (step.kind, rows(step)) == (DECODE, [(0, 1)])
        finished = run(sched, step, [token_id])
    assert finished == [seq]
    assert seq.finish_reason == "length" and seq.status == SequenceStatus.FINISHED
    assert seq.completion_token_ids == [10, 11, 12]
    assert seq.block_table == []
    assert sched.block_manager.num_free_blocks == 8
    assert refs(sched) == [0] * 8
    assert sched.is_finished()
    again = make_seq(1, [1, 2, 3, 10, 5])  # the computed full block stays cached
    sched.add(again)
    step = sched.schedule()
    assert step.kind == DECODE
    assert step.new == [NewSequence(1, [1, 2, 3, 10, 5], [0, 2], 4, 1, again.sampling_params, 5, 0)]


def test_finish_on_max_model_len():
    sched = make_scheduler(max_model_len=5)
    seq = make_seq(0, [1, 2, 3], max_tokens=10)
    sched.add(seq)
    assert run(sched, sched.schedule(), [10]) == []
    assert run(sched, sched.schedule(), [11]) == [seq]
    assert seq.finish_reason == "length"
    assert len(seq) == 5
    assert sched.schedule() is None


# ---- abort ---------------------------------------------------------------------------------------------

def test_abort_a_waiting_sequence():
    sched = make_scheduler(max_num_seqs=1)
    s0, s1 = make_seq(0, [1, 2, 3]), make_seq(1, [4, 5, 6])
    add_all(sched, s0, s1)
    run(sched, sched.schedule(), [10])
    sched.abort(s1)
    assert s1.status == SequenceStatus.FINISHED and s1.finish_reason == "abort"
    assert list(sched.waiting) == [] and list(sched.running) == [s0]
    assert sched.block_manager.num_free_blocks == 7
    step = sched.schedule()
    assert step.finished_seq_ids == []  # the runner never saw it
    assert rows(step) == [(0, 1)]


def test_abort_a_running_sequence_frees_its_blocks():
    sched = make_scheduler()
    s0, s1 = make_seq(0, [1, 2, 3]), make_seq(1, [4, 5, 6, 7, 8])
    add_all(sched, s0, s1)
    run(sched, sched.schedule(), [10, 11])
    assert s1.block_table == [1, 2]
    sched.abort(s1)
    assert s1.status == SequenceStatus.FINISHED and s1.finish_reason == "abort"
    assert s1.block_table == []
    assert list(sched.running) == [s0] and list(sched.waiting) == []
    assert refs(sched) == [1] + [0] * 7
    assert sched.block_manager.num_free_blocks == 7
    step = sched.schedule()
    assert rows(step) == [(0, 1)]
    assert step.finished_seq_ids == [1]  # the runner drops it
    sched.abort(s0)
    assert sched.is_finished()
    assert sched.schedule() is None


def test_abort_while_its_step_is_in_flight_drops_its_token():
    sched = make_scheduler()
    s0, s1 = make_seq(0, [1, 2, 3]), make_seq(1, [4, 5, 6])
    add_all(sched, s0, s1)
    booked = sched.launched(sched.schedule())
    sched.abort(s1)
    assert read_back(sched, booked, [10, 11]) == []
    assert s0.token_ids == [1, 2, 3, 10]
    assert s1.token_ids == [4, 5, 6] and s1.finish_reason == "abort"
    assert sched.block_manager.num_free_blocks == 7


def test_abort_a_finished_sequence_changes_nothing():
    sched = make_scheduler()
    s0, s1 = make_seq(0, [1, 2]), make_seq(1, [3, 4])
    add_all(sched, s0, s1)
    assert run(sched, sched.schedule(), [EOS, 20]) == [s0]
    sched.abort(s0)
    assert s0.finish_reason == "stop"
    assert list(sched.running) == [s1]
    assert sched.block_manager.num_free_blocks == 7
    assert sched.schedule().finished_seq_ids == [0]  # once, not twice


# ---- overlapped steps: step N+1 launched before step N is read back ------------------------------------------

def test_overlapped_steps_send_in_flight_tokens_as_none_and_drop_a_surplus_one():
    sched = make_scheduler()
    s0, s1 = make_seq(0, [1, 2, 3], max_tokens=3), make_seq(1, [5, 6, 7, 8, 9])
    add_all(sched, s0, s1)
    step0 = sched.schedule()
    assert rows(step0) == [(0, 3), (1, 5)]
    booked0 = sched.launched(step0)
    assert (len(s0), s0.token_ids, s0.last_token) == (4, [1, 2, 3], None)
    assert s1.num_cached_tokens == 5
    step1 = sched.schedule()  # decode, scheduled while step 0 is still in flight
    assert step1.kind == DECODE
    assert step1.cached == [CachedSequence(0, [], 1, None), CachedSequence(1, [], 1, None)]
    assert s0.block_table == [0] and s1.block_table == [1, 2]
    booked1 = sched.launched(step1)
    assert s0.num_pending == 2 and s0.num_cached_tokens == 4
    # step 0 comes back: s1 stopped at EOS, so its step-1 token is surplus and its blocks are freed
    assert read_back(sched, booked0, [10, EOS]) == [s1]
    assert s1.token_ids == [5, 6, 7, 8, 9, EOS] and len(s1) == 6
    assert s1.finish_reason == "stop" and s1.block_table == []
    assert s0.token_ids == [1, 2, 3, 10] and s0.num_pending == 1
    step2 = sched.schedule()
    assert step2.cached == [CachedSequence(0, [3], 1, None)]
    assert step2.finished_seq_ids == [1]
    booked2 = sched.launched(step2)
    assert read_back(sched, booked1, [11, 77]) == []  # s1's 77 is dropped
    assert s0.token_ids == [1, 2, 3, 10, 11] and s1.token_ids == [5, 6, 7, 8, 9, EOS]
    # s0 has max_tokens=3 and its third token is in flight: nothing more is scheduled for it
    assert sched.schedule() is None
    assert read_back(sched, booked2, [12]) == [s0]
    assert s0.completion_token_ids == [10, 11, 12] and s0.finish_reason == "length"
    assert sched.is_finished()
    assert sched.block_manager.num_free_blocks == 8
    # block 0 was computed while its last token was in flight; it is cached once that token is known
    again = make_seq(2, [1, 2, 3, 10, 5])
    sched.add(again)
    assert sched.schedule().new == [NewSequence(2, [1, 2, 3, 10, 5], [0, 4], 4, 1, again.sampling_params, 5, 0)]


def test_a_sequence_preempted_with_a_token_in_flight_gets_it_back():
    sched = make_scheduler(num_kvcache_blocks=2)
    s0, s1 = make_seq(0, [1, 2, 3, 4], max_tokens=2, ignore_eos=True), make_seq(1, [5, 6, 7])
    add_all(sched, s0, s1)
    booked0 = sched.launched(sched.schedule())  # both prefilled: 1 block each, s0 now needs a 2nd
    step1 = sched.schedule()  # no block free: s1 (newest) is preempted with its token in flight
    assert step1.cached == [CachedSequence(0, [1], 1, None)]
    assert step1.finished_seq_ids == [1]
    assert list(sched.waiting) == [s1] and s1.last_token is None
    booked1 = sched.launched(step1)
    assert read_back(sched, booked0, [20, 21]) == []
    assert s1.token_ids == [5, 6, 7, 21] and s1.status == SequenceStatus.WAITING and s1.num_cached_tokens == 0
    assert sched.schedule() is None  # s0's last token is in flight, s1 finds no free block
    assert read_back(sched, booked1, [22]) == [s0]
    assert s0.token_ids == [1, 2, 3, 4, 20, 22]
    step = sched.schedule()  # s1 comes back in full, with the token it got while preempted
    assert step.new == [NewSequence(1, [5, 6, 7, 21], [1], 0, 4, s1.sampling_params, 3, 0)]
    assert step.finished_seq_ids == [0]
    assert run(sched, step, [23]) == []
    assert s1.token_ids == [5, 6, 7, 21, 23]


# ---- mixed steps: decodes first, prompt chunks fill the rest of the budget ------------------------------------

def sampled(step: ScheduledStep, by_seq: dict[int, int]) -> list[int]:
    """The ids the model sampled, in the step's row order, from {seq_id: id}."""
    return [by_seq[seq_id] for seq_id in step.seq_ids]


def test_a_sequence_preempted_with_a_token_in_flight_waits_for_it_before_it_is_admitted_again():
    sched = make_scheduler(mixed_steps=True, num_kvcache_blocks=4)
    x = make_seq(0, [1, 2, 3], ignore_eos=True)
    sched.add(x)
    booked1 = sched.launched(sched.schedule())  # x prefills; its 4th token is in flight
    y = make_seq(1, [1, 2, 3, 4, 5, 6, 7, 8], ignore_eos=True)
    sched.add(y)
    step2 = sched.schedule()  # x decodes, y prefills (no hit: x's first block waits for its 4th token)
    assert sorted(rows(step2)) == [(0, 1), (1, 8)]
    booked2 = sched.launched(step2)
    read_back(sched, booked1, [4])  # x's first block is [1, 2, 3, 4] too: the prefix cache now names x's copy
    step3 = sched.schedule()  # x takes the last free block; y, its token in flight, preempts itself and waits
    assert rows(step3) == [(0, 1)] and step3.finished_seq_ids == [1]
    assert list(sched.waiting) == [y] and y.num_pending == 1
    booked3 = sched.launched(step3)
    read_back(sched, booked2, sampled(step2, {0: 20, 1: 21}))
    assert y.token_ids == [1, 2, 3, 4, 5, 6, 7, 8, 21]
    step4 = sched.schedule()  # y is admitted again, its first block shared with x and its second revived
    assert y.status == SequenceStatus.RUNNING and y.block_table[0] == x.block_table[0] and y.num_cached_tokens == 8
    assert rows(step4) == [(0, 1)]  # x; y's one uncached token decodes in the next step
    sched.launched(step4)
    read_back(sched, booked3, [22])
    step5 = sched.schedule()  # y goes to the runner in full, with the token it got while preempted
    assert step5.new == [NewSequence(1, [1, 2, 3, 4, 5, 6, 7, 8, 21], y.block_table, 8, 1, y.sampling_params, 8, 0)]


def test_mixed_step_decodes_every_running_sequence_and_fills_the_budget_with_a_chunk():
    sched = make_scheduler(mixed_steps=True, max_num_batched_tokens=6)
    s0 = make_seq(0, [1, 2, 3])
    sched.add(s0)
    step = sched.schedule()
    assert (step.kind, rows(step)) == (PREFILL, [(0, 3)])
    run(sched, step, [10])
    s1, s2 = make_seq(1, [4, 5, 6, 7, 8, 9, 10, 11]), make_seq(2, [12, 13])
    add_all(sched, s1, s2)
    step = sched.schedule()  # s0 decodes; 5 tokens of budget left: a chunk of s1, nothing for s2
    assert step.kind == PREFILL
    assert sorted(rows(step)) == [(0, 1), (1, 5)]
    assert list(sched.waiting) == [s2]
    run(sched, step, sampled(step, {0: 11, 1: 99}))
    assert s0.token_ids == [1, 2, 3, 10, 11] and s1.token_ids == [4, 5, 6, 7, 8, 9, 10, 11]  # a chunk samples nothing
    step = sched.schedule()  # s1 is mid-prompt: it is not decoded, its last 3 tokens go with s0's decode; s2 fits
    assert sorted(rows(step)) == [(0, 1), (1, 3), (2, 2)]
    run(sched, step, sampled(step, {0: 12, 1: 20, 2: 30}))
    step = sched.schedule()  # no prompt work left: a pure decode step (CUDA graphs)
    assert (step.kind, sorted(rows(step))) == (DECODE, [(0, 1), (1, 1), (2, 1)])


def test_mixed_step_decodes_even_when_they_take_the_whole_budget():
    sched = make_scheduler(mixed_steps=True, max_num_batched_tokens=2)
    s0, s1 = make_seq(0, [1]), make_seq(1, [2])  # one-token prompts: straight to decode
    add_all(sched, s0, s1)
    step = sched.schedule()
    assert (step.kind, sorted(rows(step))) == (DECODE, [(0, 1), (1, 1)])
    run(sched, step, [5, 6])
    s2 = make_seq(2, [3, 4, 5])
    sched.add(s2)
    step = sched.schedule()  # both decodes use the budget: s2 waits, no one starves forever (they finish)
    assert (step.kind, sorted(rows(step))) == (DECODE, [(0, 1), (1, 1)])
    assert list(sched.waiting) == [s2]
