"""BlockManager on the CPU with tiny numbers, checked by what a caller sees: the block ids an allocation hands out,
reference counts, the number of free blocks, and prefix hits (num_cached_tokens after allocate).

Prefill and decode are simulated the way the Scheduler drives the manager: `num_cached_tokens` advances by the
tokens computed, then `hash_blocks` publishes the blocks that became full, then the sampled token is appended and
the next step's `may_append` gives it a block when it starts one.
"""
from itertools import count

from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine import block_manager
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4
_ids = count()


def make_seq(token_ids: list[int], block_size: int = BS) -> Sequence:
    return Sequence(token_ids, SamplingParams(), next(_ids), block_size)


def allocated(bm: BlockManager, token_ids: list[int]) -> Sequence:
    seq = make_seq(token_ids)
    bm.allocate(seq)
    return seq


def prefill(bm: BlockManager, seq: Sequence, num_tokens: int | None = None):
    """Compute K/V for the next `num_tokens` uncached tokens (all of them by default) and publish full blocks."""
    seq.num_cached_tokens += seq.num_uncached_tokens if num_tokens is None else num_tokens
    bm.hash_blocks(seq)


def refs(bm: BlockManager) -> list[int]:
    return bm.ref_counts()


def fresh(num_blocks: int) -> list[int]:
    """Tokens no other prompt shares, filling num_blocks blocks: a sequence that can only take free blocks."""
    start = 1000 + 100 * next(_ids)
    return list(range(start, start + num_blocks * BS))


A10 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # 2 full blocks of 4 and a partial one


# ---- allocate / deallocate -------------------------------------------------------------------------------

def test_allocate_takes_free_blocks_in_id_order():
    bm = BlockManager(6, BS)
    seq = make_seq(A10)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert seq.block_table == [0, 1, 2]
    assert seq.num_cached_tokens == 0
    assert refs(bm) == [1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    assert allocated(bm, fresh(2)).block_table == [3, 4]


def test_no_hit_before_kv_is_computed():
    bm = BlockManager(6, BS)
    bm.allocate(make_seq(A10))  # same prefill step: its K/V does not exist yet
    b = allocated(bm, A10)
    assert b.block_table == [3, 4, 5]
    assert b.num_cached_tokens == 0
    assert refs(bm) == [1] * 6


def test_deallocate_hands_the_prefix_out_last():
    bm = BlockManager(6, BS)
    seq = make_seq(A10)
    bm.allocate(seq)
    prefill(bm, seq)
    bm.deallocate(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0
    assert refs(bm) == [0] * 6
    assert bm.num_free_blocks == 6
    # never-used blocks go first, then the freed ones tail first
    assert allocated(bm, fresh(4)).block_table == [3, 4, 5, 2]
    b = allocated(bm, [1, 2, 3, 4, 5])
    assert b.num_cached_tokens == 4  # the prefix block was kept for last: it still hits
    assert b.block_table == [0, 1]
    assert bm.num_free_blocks == 0


def test_deallocate_keeps_shared_prefix_until_last_user():
    bm = BlockManager(6, BS)
    a = make_seq(A10[:9])
    bm.allocate(a)
    prefill(bm, a)
    b = allocated(bm, A10[:9])
    assert b.block_table == [0, 1, 3]
    bm.deallocate(a)
    assert refs(bm) == [1, 1, 0, 1, 0, 0]
    assert bm.num_free_blocks == 3
    bm.deallocate(b)
    assert refs(bm) == [0] * 6
    assert bm.num_free_blocks == 6


def test_shared_blocks_are_not_handed_out_while_in_use():
    bm = BlockManager(6, BS)
    a = make_seq(A10[:9])
    bm.allocate(a)
    prefill(bm, a)
    b = allocated(bm, A10[:9])
    bm.deallocate(a)  # only a's own block 2 is free again
    assert allocated(bm, fresh(3)).block_table == [4, 5, 2]
    assert bm.num_free_blocks == 0
    assert refs(bm) == [1, 1, 1, 1, 1, 1]
    assert b.block_table == [0, 1, 3]


# ---- publication and prefix hits -------------------------------------------------------------------------

def test_only_full_computed_blocks_hit():
    bm = BlockManager(8, BS)
    a = make_seq(A10)
    bm.allocate(a)
    prefill(bm, a)  # 10 tokens computed: blocks 0 and 1 are full, block 2 holds 2 tokens
    b = allocated(bm, A10 + [11, 12, 13])  # could hit 3 blocks; the 3rd is not full in a
    assert b.num_cached_tokens == 8
    assert b.block_table == [0, 1, 3, 4]
    assert refs(bm) == [2, 2, 1, 1, 1, 0, 0, 0]


def test_hit_on_published_blocks_of_a_running_sequence():
    bm = BlockManager(6, BS)
    a, b = make_seq(A10), make_seq(A10)
    bm.allocate(a)
    prefill(bm, a)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    assert b.num_cached_tokens == 8
    assert refs(bm) == [2, 2, 1, 1, 0, 0]
    assert bm.num_free_blocks == 2


def test_chunked_prefill_publishes_only_computed_blocks():
    bm = BlockManager(8, BS)
    a = make_seq(A10)
    bm.allocate(a)
    prefill(bm, a, 6)  # first chunk: block 0 full, block 1 half computed
    b = allocated(bm, A10)
    assert b.block_table == [0, 3, 4]
    assert b.num_cached_tokens == 4
    prefill(bm, a, 4)  # second chunk finishes a: block 1 hits now
    c = allocated(bm, A10)
    assert c.block_table == [0, 1, 5]
    assert c.num_cached_tokens == 8
    assert refs(bm) == [3, 2, 1, 1, 1, 1, 0, 0]


def test_freed_block_keeps_its_prefix_and_is_revived():
    bm = BlockManager(6, BS)
    a, b = make_seq(A10), make_seq(A10)
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]  # 0 and 1 revived, 3 is the next free block
    assert b.num_cached_tokens == 8
    assert refs(bm) == [1, 1, 0, 1, 0, 0]
    assert bm.num_free_blocks == 3
    assert allocated(bm, fresh(3)).block_table == [4, 5, 2]  # the revived blocks are no longer free


def test_reused_block_no_longer_hits():
    bm = BlockManager(4, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    c = allocated(bm, [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30])
    assert c.block_table == [2, 3, 1]  # block 1 is overwritten with c's tokens
    bm.deallocate(c)
    b = allocated(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert b.num_cached_tokens == 4  # block 0 still hits, block 1 no longer does
    assert b.block_table == [0, 1, 3]
    assert refs(bm) == [1, 1, 0, 1]


def test_reused_block_does_not_hit_under_its_old_prefix_when_refilled_with_the_same_tokens():
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    y = make_seq([0, 0, 0, 0, 9])
    bm.allocate(y)
    prefill(bm, y)
    assert (a.block_table, y.block_table) == ([0, 1], [2, 3])
    bm.deallocate(a)
    x = allocated(bm, fresh(4))
    c = allocated(bm, [0, 0, 0, 0, 5, 6, 7, 8])  # a's block 1 gets a's tokens again, after y's prefix
    assert (x.block_table, c.block_table) == ([4, 5, 6, 7], [2, 1])
    prefill(bm, c)
    bm.deallocate(x)
    b = allocated(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert b.num_cached_tokens == 4  # block 1's K/V now belongs to another prefix: only block 0 hits
    assert b.block_table == [0, 7, 6]


def test_hash_collision_is_caught_by_token_check(monkeypatch):
    monkeypatch.setattr(block_manager, "compute_hash", lambda token_ids, prefix=-1: 42)  # every block collides
    bm = BlockManager(6, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    b = allocated(bm, [40, 41, 42, 43, 44])  # its first block's hash finds one of a's blocks
    assert b.num_cached_tokens == 0
    assert b.block_table == [3, 4]
    assert refs(bm) == [0, 0, 0, 1, 1, 0]  # a's blocks were not revived
    assert bm.num_free_blocks == 4


def test_block_holding_last_token_never_comes_from_cache():
    bm = BlockManager(6, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    b = allocated(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    assert b.block_table == [0, 2]
    assert b.num_cached_tokens == 4
    c = allocated(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # both of a's blocks are published
    assert c.block_table == [0, 1, 3]
    assert c.num_cached_tokens == 8
    assert refs(bm) == [3, 2, 1, 1, 0, 0]


def test_hash_is_chained_over_the_prefix():
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    prefill(bm, a)
    b = allocated(bm, [0, 0, 0, 0, 5, 6, 7, 8, 9])  # block 1 equals a's block 1, after a different block 0
    assert b.num_cached_tokens == 0
    assert b.block_table == [3, 4, 5]
    c = allocated(bm, [1, 2, 3, 4, 0, 0, 0, 0, 9])  # only the first block matches
    assert c.num_cached_tokens == 4
    assert c.block_table == [0, 6, 7]
    assert refs(bm) == [2, 1, 1, 1, 1, 1, 1, 1]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a = make_seq(A10)
    bm.allocate(a)
    prefill(bm, a)
    b = allocated(bm, A10)
    assert b.block_table == [3, 4, 5]
    assert b.num_cached_tokens == 0
    bm.deallocate(a)
    c = allocated(bm, A10)  # nor from freed blocks
    assert c.num_cached_tokens == 0
    assert c.block_table == [2, 1, 0]
    assert refs(bm) == [1] * 6


# ---- can_allocate --------------------------------------------------------------------------------------

def test_can_allocate_counts_hits_on_in_use_blocks_as_free():
    bm = BlockManager(3, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    x = make_seq([50, 51])
    bm.allocate(a)
    prefill(bm, a)
    bm.allocate(x)
    assert bm.num_free_blocks == 0
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 3 blocks, 2 of them hits on a's blocks
    assert not bm.can_allocate(b)  # still needs 1 new block, none free
    bm.deallocate(x)
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 2]
    assert refs(bm) == [2, 2, 1]
    assert bm.num_free_blocks == 0


def test_can_allocate_charges_revived_free_blocks():
    bm = BlockManager(3, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    x = allocated(bm, [50, 51])
    assert x.block_table == [2]
    assert bm.num_free_blocks == 2
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # its 2 hits are free blocks: 3 free blocks needed, 2 left
    assert not bm.can_allocate(b)
    bm.deallocate(x)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 2]
    assert b.num_cached_tokens == 8


# ---- decode: can_append / may_append -------------------------------------------------------------------

def decode_step(bm: BlockManager, seq: Sequence, token_id: int):
    """One decode step as the scheduler runs it: block for the newest token, compute it, publish, sample."""
    bm.may_append(seq)
    prefill(bm, seq, 1)
    seq.append_token(token_id)


def test_may_append_adds_a_block_exactly_when_the_newest_token_starts_one():
    bm = BlockManager(2, BS)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq)
    prefill(bm, seq)
    seq.append_token(4)  # 4 tokens: the newest one still fits block 0
    assert bm.can_append(seq)
    decode_step(bm, seq, 5)
    assert seq.block_table == [0]
    assert bm.num_free_blocks == 1
    # token 5 starts block 1
    assert len(seq) == 5 and seq.num_blocks == 2
    assert bm.can_append(seq)
    decode_step(bm, seq, 6)
    assert seq.block_table == [0, 1]
    assert bm.num_free_blocks == 0
    assert refs(bm) == [1, 1]
    for t in (7, 8, 9):  # the 6th, 7th and 8th tokens fit block 1: no free block needed
        assert bm.can_append(seq)
        decode_step(bm, seq, t)
        assert seq.block_table == [0, 1]
    # the 9th token starts block 2, but no block is free
    assert len(seq) == 9 and seq.num_cached_tokens == 8
    assert not bm.can_append(seq)
    bm.deallocate(seq)
    b = allocated(bm, [1, 2, 3, 4, 5, 6, 7, 8])  # block 0, completed by a decode step, hits
    assert b.num_cached_tokens == 4 and b.block_table == [0, 1]


def test_can_append_needs_no_block_mid_block():
    bm = BlockManager(1, BS)
    seq = make_seq([1, 2])
    bm.allocate(seq)
    prefill(bm, seq)
    seq.append_token(3)
    assert bm.num_free_blocks == 0
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert seq.block_table == [0]


# ---- property test: random operations against a reference model of the prefix cache ---------------------

NUM_BLOCKS = 8


class Reference:
    """Which prefix each published block holds, kept by the test from the ids the manager hands out."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.published: dict[tuple[int, ...], int] = {}  # whole prefix up to a block's end -> its block id

    def hits(self, seq: Sequence) -> list[int]:
        """Leading full blocks, short of the one holding the last token, whose prefix is published."""
        hits = []
        for i in range((len(seq) - 1) // BS):
            block_id = self.published.get(tuple(seq.token_ids[:(i + 1) * BS]))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def taken(self, block_ids: list[int]):
        """These blocks were handed out to be overwritten: their old prefixes are gone."""
        self.published = {p: b for p, b in self.published.items() if b not in block_ids}

    def computed(self, seq: Sequence, first_block: int):
        if self.enabled:
            for i in range(first_block, seq.num_cached_blocks):
                self.published[tuple(seq.token_ids[:(i + 1) * BS])] = seq.block_table[i]


def check_invariants(bm: BlockManager, live: list[Sequence]):
    owners: dict[int, list[tuple[Sequence, int]]] = {}
    for seq in live:
        assert len(seq.block_table) == seq.num_blocks
        assert len(set(seq.block_table)) == len(seq.block_table)
        for i, block_id in enumerate(seq.block_table):
            owners.setdefault(block_id, []).append((seq, i))
    assert refs(bm) == [len(owners.get(i, [])) for i in range(bm.num_blocks)]
    assert bm.num_free_blocks == bm.num_blocks - len(owners)  # no leaked and no double-freed block
    for users in owners.values():  # a shared block sits at the same place after the same prefix
        (first, i), *others = users
        end = (i + 1) * BS
        for seq, j in others:
            assert i == j
            assert first.token_ids[:end] == seq.token_ids[:end]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_operations_match_the_reference(data):
    prefix_caching = data.draw(st.booleans(), label="enable_prefix_caching")
    bm = BlockManager(NUM_BLOCKS, BS, prefix_caching)
    ref = Reference(prefix_caching)
    waiting: list[Sequence] = []
    live: list[Sequence] = []
    tokens = st.integers(0, 1)  # a tiny alphabet, so prefixes repeat and the cache gets hit
    # prompts open with whole blocks from a pool of two, so that full-block prefixes repeat often
    prompts = st.tuples(st.lists(st.sampled_from([[0, 0, 0, 0], [0, 1, 0, 1]]), max_size=3),
                        st.lists(tokens, min_size=1, max_size=5)).map(lambda p: sum(p[0], []) + p[1])
    ops = ["add", "allocate", "allocate", "step", "step", "step", "step", "deallocate"]
    for _ in range(data.draw(st.integers(1, 40), label="num_ops")):
        op = data.draw(st.sampled_from(ops), label="op")
        if op == "add":
            waiting.append(make_seq(data.draw(prompts, label="prompt")))
        elif op == "allocate" and waiting:
            seq = waiting[data.draw(st.integers(0, len(waiting) - 1), label="which")]
            hits = ref.hits(seq)
            charged = seq.num_blocks - sum(1 for b in hits if bm.blocks[b].ref_count > 0)
            assert bm.can_allocate(seq) == (charged <= bm.num_free_blocks)
            if charged <= bm.num_free_blocks:
                free_before = bm.num_free_blocks
                bm.allocate(seq)
                assert seq.block_table[:len(hits)] == hits
                assert seq.num_cached_tokens == len(hits) * BS < len(seq)  # the last token is always computed
                assert free_before - bm.num_free_blocks == charged
                ref.taken(seq.block_table[len(hits):])
                waiting.remove(seq)
                live.append(seq)
        elif op == "step" and live:
            seq = live[data.draw(st.integers(0, len(live) - 1), label="which")]
            chunk = data.draw(st.integers(1, seq.num_uncached_tokens), label="chunk")
            first_block = seq.num_cached_blocks
            prefill(bm, seq, chunk)
            ref.computed(seq, first_block)
            if seq.num_cached_tokens == len(seq):  # last chunk or decode: a token is sampled
                seq.append_token(data.draw(tokens, label="sampled"))
                if bm.can_append(seq):
                    num_blocks = len(seq.block_table)
                    bm.may_append(seq)
                    ref.taken(seq.block_table[num_blocks:])
                else:  # preempted: blocks freed, recomputed later
                    bm.deallocate(seq)
                    live.remove(seq)
                    waiting.append(seq)
        elif op == "deallocate" and live:
            seq = live.pop(data.draw(st.integers(0, len(live) - 1), label="which"))
            bm.deallocate(seq)
            assert seq.block_table == [] and seq.num_cached_tokens == 0
            if data.draw(st.booleans(), label="preempted"):
                waiting.append(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.deallocate(seq)
    assert bm.num_free_blocks == NUM_BLOCKS
    assert refs(bm) == [0] * NUM_BLOCKS
    everything = allocated(bm, fresh(NUM_BLOCKS))  # every block is free exactly once
    assert sorted(everything.block_table) == list(range(NUM_BLOCKS))
