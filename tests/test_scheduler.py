"""Scheduler on the CPU with tiny numbers (blocks of 4 tokens, a handful of blocks): no model is run.

Each test plays the engine's loop by hand: `schedule()`, then `postprocess()` with the token ids the model
would have sampled.
"""
from itertools import count
from types import SimpleNamespace

from nanovllm.engine.block_manager import compute_hash
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = 4
EOS = 99
_ids = count()


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, eos=(EOS,),
                  num_kvcache_blocks=8, kvcache_block_size=BS, enable_prefix_caching=True)
    config.update(overrides)
    return Scheduler(SimpleNamespace(**config))


def make_seq(token_ids: list[int], max_tokens: int = 8, ignore_eos: bool = False) -> Sequence:
    return Sequence(token_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), next(_ids), BS)


def add_all(sched: Scheduler, *seqs: Sequence):
    for seq in seqs:
        sched.add(seq)


# ---- prefill admission ---------------------------------------------------------------------------------

def test_prefill_admission_bounded_by_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    s0, s1, s2 = make_seq([1, 2, 3]), make_seq([4, 5, 6]), make_seq([7, 8, 9])
    add_all(sched, s0, s1, s2)
    assert sched.schedule() == ([s0, s1], True)
    assert list(sched.running) == [s0, s1]
    assert list(sched.waiting) == [s2]
    assert [s0.num_scheduled_tokens, s1.num_scheduled_tokens] == [3, 3]
    assert [s0.block_table, s1.block_table] == [[0], [1]]
    assert s0.status == s1.status == SequenceStatus.RUNNING
    assert s2.status == SequenceStatus.WAITING and s2.block_table == []


def test_prefill_admission_bounded_by_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    s0, s1, s2 = make_seq([1, 2, 3, 4]), make_seq([5, 6, 7, 8]), make_seq([9, 10])
    add_all(sched, s0, s1, s2)
    assert sched.schedule() == ([s0, s1], True)
    assert [s0.num_scheduled_tokens, s1.num_scheduled_tokens] == [4, 4]
    assert list(sched.waiting) == [s2]  # budget spent: s2 is not even allocated
    assert s2.block_table == []
    assert list(sched.block_manager.free_block_ids) == [2, 3, 4, 5, 6, 7]


def test_admission_stops_at_first_sequence_without_blocks():
    sched = make_scheduler(num_kvcache_blocks=3)
    s0, s1, s2 = make_seq([1, 2, 3, 4, 5]), make_seq([6, 7, 8, 9, 10]), make_seq([11])
    add_all(sched, s0, s1, s2)
    assert sched.schedule() == ([s0], True)  # s1 needs 2 blocks, 1 is free; s2 waits behind it (FIFO)
    assert list(sched.waiting) == [s1, s2]
    assert s0.block_table == [0, 1]


def test_budget_remainder_starts_a_chunk_of_the_next_prompt():
    sched = make_scheduler(max_num_batched_tokens=8)
    s0, s1 = make_seq([1, 2, 3, 4, 5]), make_seq([6, 7, 8, 9, 10])
    add_all(sched, s0, s1)
    assert sched.schedule() == ([s0, s1], True)
    assert [s0.num_scheduled_tokens, s1.num_scheduled_tokens] == [5, 3]
    assert sched.postprocess([s0, s1], [20, 21]) == []
    assert s0.token_ids == [1, 2, 3, 4, 5, 20]
    assert s1.token_ids == [6, 7, 8, 9, 10]  # a chunk samples no token
    assert s1.num_cached_tokens == 3
    # the chunk in flight goes first; s0 waits for the next decode step
    assert sched.schedule() == ([s1], True)
    assert s1.num_scheduled_tokens == 2
    assert sched.postprocess([s1], [22]) == []
    assert s1.token_ids == [6, 7, 8, 9, 10, 22]
    assert sched.schedule() == ([s0, s1], False)
    assert [s0.num_scheduled_tokens, s1.num_scheduled_tokens] == [1, 1]


# ---- chunked prefill -----------------------------------------------------------------------------------

def test_long_prompt_is_prefilled_in_chunks_of_the_budget():
    sched = make_scheduler(max_num_batched_tokens=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    seq = make_seq(prompt)
    sched.add(seq)
    bm = sched.block_manager
    assert sched.schedule() == ([seq], True)
    assert seq.num_scheduled_tokens == 4
    assert seq.block_table == [0, 1, 2]  # the whole prompt's blocks are taken at admission
    assert sched.postprocess([seq], [50]) == []
    assert seq.token_ids == prompt and seq.num_cached_tokens == 4
    h0 = compute_hash([1, 2, 3, 4])
    assert bm.hash_to_block_id == {h0: 0}  # the computed block is published, the others not yet
    assert sched.schedule() == ([seq], True)
    assert seq.num_scheduled_tokens == 4
    assert sched.postprocess([seq], [51]) == []
    assert seq.token_ids == prompt and seq.num_cached_tokens == 8
    assert bm.hash_to_block_id == {h0: 0, compute_hash([5, 6, 7, 8], h0): 1}
    assert sched.schedule() == ([seq], True)
    assert seq.num_scheduled_tokens == 2
    assert sched.postprocess([seq], [52]) == []
    assert seq.token_ids == prompt + [52]  # only the last chunk samples
    assert seq.num_cached_tokens == 10
    assert sched.schedule() == ([seq], False)
    assert seq.num_scheduled_tokens == 1


def test_prefix_hit_on_a_chunk_already_computed():
    sched = make_scheduler(max_num_batched_tokens=6)
    s0 = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    sched.add(s0)
    assert sched.schedule() == ([s0], True)
    sched.postprocess([s0], [50])  # 6 tokens computed: block 0 published
    s1 = make_seq([1, 2, 3, 4, 30, 31])
    sched.add(s1)
    assert sched.schedule() == ([s0, s1], True)
    assert [s0.num_scheduled_tokens, s1.num_scheduled_tokens] == [4, 2]
    assert s1.block_table == [0, 3]
    assert s1.num_cached_tokens == 4
    assert [b.ref_count for b in sched.block_manager.blocks[:4]] == [2, 1, 1, 1]


def test_full_prefix_hit_goes_straight_to_decode():
    sched = make_scheduler()
    s0 = make_seq([1, 2, 3, 4, 5])
    sched.add(s0)
    sched.schedule()
    sched.postprocess([s0], [6])
    s1 = make_seq([1, 2, 3, 4, 7])  # only its last token is uncached
    sched.add(s1)
    assert sched.schedule() == ([s0, s1], False)
    assert s1.block_table == [0, 2]
    assert s1.num_cached_tokens == 4 and s1.num_scheduled_tokens == 1
    assert list(sched.running) == [s0, s1]


# ---- decode --------------------------------------------------------------------------------------------

def test_decode_after_prefill_adds_blocks_at_boundaries():
    sched = make_scheduler()
    s0, s1 = make_seq([1, 2, 3, 4]), make_seq([5, 6])
    add_all(sched, s0, s1)
    assert sched.schedule() == ([s0, s1], True)
    assert sched.postprocess([s0, s1], [10, 11]) == []
    assert s0.token_ids == [1, 2, 3, 4, 10] and s1.token_ids == [5, 6, 11]
    assert sched.schedule() == ([s0, s1], False)
    assert s0.block_table == [0, 2]  # the 5th token starts a block
    assert s1.block_table == [1]
    assert [s0.num_scheduled_tokens, s1.num_scheduled_tokens] == [1, 1]
    assert sched.postprocess([s0, s1], [12, 13]) == []
    assert [s0.num_cached_tokens, s1.num_cached_tokens] == [5, 3]
    assert sched.schedule() == ([s0, s1], False)
    assert s1.block_table == [1]  # the 4th token still fits block 1
    sched.postprocess([s0, s1], [14, 15])
    assert sched.schedule() == ([s0, s1], False)
    assert s1.block_table == [1, 3]
    assert list(sched.block_manager.free_block_ids) == [4, 5, 6, 7]


def test_decode_bounded_by_max_num_seqs_keeps_order():
    sched = make_scheduler(max_num_seqs=2)
    s0, s1 = make_seq([1]), make_seq([2])  # one-token prompts go straight to decode
    add_all(sched, s0, s1)
    assert sched.schedule() == ([s0, s1], False)
    assert list(sched.running) == [s0, s1]


# ---- preemption ----------------------------------------------------------------------------------------

def test_preempts_most_recently_admitted_and_readmits_it_later():
    sched = make_scheduler(num_kvcache_blocks=2, max_num_seqs=2)
    bm = sched.block_manager
    s0 = make_seq([1, 2, 3, 4], max_tokens=2)
    s1 = make_seq([5, 6], max_tokens=5)
    s2 = make_seq([8, 9])
    add_all(sched, s0, s1, s2)
    assert sched.schedule() == ([s0, s1], True)
    assert list(sched.waiting) == [s2]
    assert sched.postprocess([s0, s1], [10, 11]) == []
    assert [s0.block_table, s1.block_table] == [[0], [1]]
    # s0's 5th token needs a block, none is free: s1 (admitted last) gives its block back
    assert sched.schedule() == ([s0], False)
    assert s0.block_table == [0, 1]
    assert list(sched.running) == [s0]
    assert list(sched.waiting) == [s1, s2]  # to the front of the queue
    assert s1.status == SequenceStatus.WAITING
    assert s1.block_table == [] and s1.num_cached_tokens == 0
    assert s1.token_ids == [5, 6, 11]  # its sampled token is kept and recomputed
    assert list(bm.free_block_ids) == []
    finished = sched.postprocess([s0], [12])
    assert finished == [s0] and s0.finish_reason == "length"
    assert list(bm.free_block_ids) == [1, 0]
    # s1 comes back first and prefills all its tokens, generated one included
    assert sched.schedule() == ([s1, s2], True)
    assert [s1.block_table, s2.block_table] == [[1], [0]]
    assert [s1.num_scheduled_tokens, s2.num_scheduled_tokens] == [3, 2]
    assert bm.hash_to_block_id == {}  # block 0 held s0's prefix; it was overwritten
    assert sched.postprocess([s1, s2], [13, 14]) == []
    assert s1.token_ids == [5, 6, 11, 13]
    assert s1.num_completion_tokens == 2


def test_victim_is_the_last_admitted_not_the_next_in_line():
    sched = make_scheduler(num_kvcache_blocks=3, max_num_seqs=3)
    s0, s1, s2 = make_seq([1, 2, 3, 4]), make_seq([5, 6]), make_seq([7, 8])
    add_all(sched, s0, s1, s2)
    assert sched.schedule() == ([s0, s1, s2], True)
    sched.postprocess([s0, s1, s2], [10, 11, 12])
    assert sched.schedule() == ([s0, s1], False)  # s0 needs a block: s2 is preempted, s1 keeps running
    assert [s0.block_table, s1.block_table, s2.block_table] == [[0, 2], [1], []]
    assert list(sched.running) == [s0, s1]
    assert list(sched.waiting) == [s2]


def test_last_running_sequence_preempts_itself():
    sched = make_scheduler(num_kvcache_blocks=2, max_num_seqs=2)
    s0, s1 = make_seq([1, 2, 3]), make_seq([4, 5, 6, 7])
    add_all(sched, s0, s1)
    sched.schedule()
    sched.postprocess([s0, s1], [10, 11])  # s0 has 4 tokens (fits), s1 has 5 (needs a block)
    assert sched.schedule() == ([s0], False)
    assert list(sched.running) == [s0]
    assert list(sched.waiting) == [s1]
    assert s1.block_table == [] and s1.status == SequenceStatus.WAITING
    assert list(sched.block_manager.free_block_ids) == [1]


def test_preempting_a_sequence_that_shares_a_prefix_frees_only_its_own_blocks():
    sched = make_scheduler(num_kvcache_blocks=3, max_num_seqs=2)
    bm = sched.block_manager
    s0 = make_seq([1, 2, 3, 4, 5, 6, 7], max_tokens=10)
    sched.add(s0)
    assert sched.schedule() == ([s0], True)
    sched.postprocess([s0], [10])  # block 0 published
    s1 = make_seq([1, 2, 3, 4, 8], max_tokens=10)
    sched.add(s1)
    assert sched.schedule() == ([s0, s1], False)  # s1 hits block 0; its one uncached token decodes
    assert s1.block_table == [0, 2]
    assert [b.ref_count for b in bm.blocks] == [2, 1, 1]
    sched.postprocess([s0, s1], [11, 12])
    assert len(s0) == 9  # its newest token starts a 3rd block, none is free
    assert sched.schedule() == ([s0], False)
    assert list(sched.waiting) == [s1] and s1.block_table == []
    assert s0.block_table == [0, 1, 2]
    assert [b.ref_count for b in bm.blocks] == [1, 1, 1]
    assert list(bm.free_block_ids) == []


# ---- finishing -----------------------------------------------------------------------------------------

def test_finish_on_any_eos_id():
    sched = make_scheduler(eos=(EOS, 7))
    s0, s1 = make_seq([1, 2]), make_seq([3, 4, 5])
    add_all(sched, s0, s1)
    sched.schedule()
    finished = sched.postprocess([s0, s1], [7, 20])
    assert finished == [s0]
    assert s0.status == SequenceStatus.FINISHED and s0.finish_reason == "stop"
    assert s0.completion_token_ids == [7]
    assert s0.block_table == []
    assert list(sched.running) == [s1]
    assert sched.schedule() == ([s1], False)
    assert sched.postprocess([s1], [EOS]) == [s1]
    assert s1.finish_reason == "stop" and s1.completion_token_ids == [20, EOS]
    assert sched.is_finished()
    assert list(sched.block_manager.free_block_ids) == [2, 3, 4, 5, 6, 7, 0, 1]


def test_ignore_eos_runs_to_max_tokens():
    sched = make_scheduler()
    seq = make_seq([1, 2], max_tokens=2, ignore_eos=True)
    sched.add(seq)
    sched.schedule()
    assert sched.postprocess([seq], [EOS]) == []
    assert seq.status == SequenceStatus.RUNNING and seq.finish_reason is None
    sched.schedule()
    assert sched.postprocess([seq], [EOS]) == [seq]
    assert seq.finish_reason == "length"
    assert seq.completion_token_ids == [EOS, EOS]


def test_finish_on_max_tokens_frees_blocks():
    sched = make_scheduler()
    seq = make_seq([1, 2, 3], max_tokens=3)
    sched.add(seq)
    bm = sched.block_manager
    sched.schedule()
    assert sched.postprocess([seq], [10]) == []
    for token_id in (11, 12):
        assert sched.schedule() == ([seq], False)
        finished = sched.postprocess([seq], [token_id])
    assert finished == [seq]
    assert seq.finish_reason == "length" and seq.status == SequenceStatus.FINISHED
    assert seq.completion_token_ids == [10, 11, 12]
    assert seq.block_table == []
    assert list(bm.free_block_ids) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert [b.ref_count for b in bm.blocks] == [0] * 8
    assert bm.hash_to_block_id == {compute_hash([1, 2, 3, 10]): 0}  # the computed full block stays cached
    assert sched.is_finished()


def test_finish_on_max_model_len():
    sched = make_scheduler(max_model_len=5)
    seq = make_seq([1, 2, 3], max_tokens=10)
    sched.add(seq)
    sched.schedule()
    assert sched.postprocess([seq], [10]) == []
    sched.schedule()
    assert sched.postprocess([seq], [11]) == [seq]
    assert seq.finish_reason == "length"
    assert len(seq) == 5


# ---- overlapped steps: step N+1 launched before step N is read back ------------------------------------------

def test_overlapped_steps_fill_pending_tokens_and_drop_a_surplus_one():
    from nanovllm.engine.sequence import PENDING_TOKEN
    sched = make_scheduler()
    s0, s1 = make_seq([1, 2, 3], max_tokens=3), make_seq([5, 6, 7, 8, 9])
    add_all(sched, s0, s1)
    step0 = sched.launched(sched.schedule()[0])  # prefill of both
    assert step0 == [(s0, 3, 0), (s1, 5, 1)]
    assert s0.token_ids == [1, 2, 3, PENDING_TOKEN] and s1.num_cached_tokens == 5
    seqs, is_prefill = sched.schedule()  # decode launched while step 0 is still in flight
    assert (seqs, is_prefill) == ([s0, s1], False)
    step1 = sched.launched(seqs)
    assert s0.token_ids == [1, 2, 3, PENDING_TOKEN, PENDING_TOKEN] and s0.num_cached_tokens == 4
    assert s0.block_table == [0] and s1.block_table == [1, 2]
    # step 0 comes back: s1 stopped at EOS, so its step-1 token is surplus and its blocks are freed
    assert sched.resolve(step0, [10, EOS]) == [s1]
    assert s1.token_ids == [5, 6, 7, 8, 9, EOS] and s1.finish_reason == "stop" and not s1.block_table
    assert s0.token_ids == [1, 2, 3, 10, PENDING_TOKEN]
    assert sched.resolve(step1, [11, 77]) == []  # s1's 77 is dropped
    assert s0.token_ids == [1, 2, 3, 10, 11] and s1.token_ids == [5, 6, 7, 8, 9, EOS]
    # s0 has max_tokens=3: its third token is launched, then nothing more is scheduled for it
    step2 = sched.launched(sched.schedule()[0])
    assert sched.schedule() == ([], False)
    assert sched.resolve(step2, [12]) == [s0]
    assert s0.completion_token_ids == [10, 11, 12] and s0.finish_reason == "length"
    assert sched.is_finished()
    assert sorted(sched.block_manager.free_block_ids) == list(range(8))


def test_a_sequence_preempted_with_a_token_in_flight_gets_it_back():
    from nanovllm.engine.sequence import PENDING_TOKEN
    sched = make_scheduler(num_kvcache_blocks=2)
    s0, s1 = make_seq([1, 2, 3, 4], ignore_eos=True), make_seq([5, 6, 7])
    add_all(sched, s0, s1)
    step0 = sched.launched(sched.schedule()[0])  # both prefilled: 1 block each, both now 1 token short of 2
    seqs, _ = sched.schedule()  # s0 needs a 2nd block, none free: s1 (newest) is preempted
    assert seqs == [s0] and sched.waiting[0] is s1 and s1.token_ids == [5, 6, 7, PENDING_TOKEN]
    step1 = sched.launched(seqs)
    assert sched.resolve(step0, [20, 21]) == []
    assert s1.token_ids == [5, 6, 7, 21] and s1.status == SequenceStatus.WAITING and s1.num_cached_tokens == 0
    assert sched.resolve(step1, [22]) == []
    assert s0.token_ids == [1, 2, 3, 4, 20, 22]
