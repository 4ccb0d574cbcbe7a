"""BlockManager bookkeeping on the CPU with tiny numbers: exact block ids, reference counts and free-list order.

Prefill and decode are simulated the way Scheduler.postprocess drives the manager: `num_cached_tokens` advances
by the tokens computed, then `hash_blocks` publishes the blocks that became full, then the sampled token is
appended and the next step's `may_append` gives it a block when it starts one.
"""
from itertools import count

from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager, compute_hash
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4
_ids = count()


def make_seq(token_ids: list[int], block_size: int = BS) -> Sequence:
    return Sequence(token_ids, SamplingParams(), next(_ids), block_size)


def prefill(bm: BlockManager, seq: Sequence, num_tokens: int | None = None):
    """Compute K/V for the next `num_tokens` uncached tokens (all of them by default) and publish full blocks."""
    seq.num_cached_tokens += seq.num_uncached_tokens if num_tokens is None else num_tokens
    bm.hash_blocks(seq)


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def chain_hashes(token_ids: list[int], num_blocks: int, block_size: int = BS) -> list[int]:
    hashes, h = [], -1
    for i in range(num_blocks):
        h = compute_hash(token_ids[i * block_size:(i + 1) * block_size], h)
        hashes.append(h)
    return hashes


A10 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # 2 full blocks of 4 and a partial one


# ---- allocate / deallocate -------------------------------------------------------------------------------

def test_allocate_takes_free_blocks_front_to_back():
    bm = BlockManager(6, BS)
    seq = make_seq(A10)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert seq.block_table == [0, 1, 2]
    assert refs(bm) == [1, 1, 1, 0, 0, 0]
    assert list(bm.free_block_ids) == [3, 4, 5]
    assert bm.used_block_ids == {0, 1, 2}
    assert seq.num_cached_tokens == 0
    assert bm.hash_to_block_id == {}  # nothing is published before its K/V is computed


def test_deallocate_frees_tail_first():
    bm = BlockManager(6, BS)
    seq = make_seq(A10)
    bm.allocate(seq)
    prefill(bm, seq)
    bm.deallocate(seq)
    assert list(bm.free_block_ids) == [3, 4, 5, 2, 1, 0]  # the prefix block is reused last
    assert refs(bm) == [0] * 6
    assert bm.used_block_ids == set()
    assert seq.block_table == [] and seq.num_cached_tokens == 0


def test_deallocate_keeps_shared_prefix_until_last_user():
    bm = BlockManager(6, BS)
    a, b = make_seq(A10[:9]), make_seq(A10[:9])
    bm.allocate(a)
    prefill(bm, a)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    bm.deallocate(a)
    assert refs(bm) == [1, 1, 0, 1, 0, 0]
    assert list(bm.free_block_ids) == [4, 5, 2]
    bm.deallocate(b)
    assert list(bm.free_block_ids) == [4, 5, 2, 3, 1, 0]
    assert refs(bm) == [0] * 6


# ---- publication and prefix hits -------------------------------------------------------------------------

def test_hash_blocks_publishes_only_full_computed_blocks():
    bm = BlockManager(6, BS)
    seq = make_seq(A10)
    bm.allocate(seq)
    prefill(bm, seq)  # 10 tokens computed: blocks 0 and 1 are full, block 2 holds 2 tokens
    h0, h1 = chain_hashes(A10, 2)
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    assert (bm.blocks[0].hash, bm.blocks[0].token_ids) == (h0, [1, 2, 3, 4])
    assert (bm.blocks[1].hash, bm.blocks[1].token_ids) == (h1, [5, 6, 7, 8])
    assert (bm.blocks[2].hash, bm.blocks[2].token_ids) == (-1, [])


def assert_allocated_without_hits(bm, seq):
    """seq (3 blocks) gets the three free blocks of a 6-block manager, none of them cached or shared."""
    bm.allocate(seq)
    assert seq.block_table == [3, 4, 5]
    assert seq.num_cached_tokens == 0
    assert refs(bm) == [1] * 6


def test_no_hit_before_kv_is_published():
    bm = BlockManager(6, BS)
    a, b = make_seq(A10), make_seq(A10)
    bm.allocate(a)  # same prefill step: a's K/V does not exist yet
    assert_allocated_without_hits(bm, b)


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
    assert list(bm.free_block_ids) == [4, 5]
    assert bm.used_block_ids == {0, 1, 2, 3}


def test_chunked_prefill_publishes_only_computed_blocks():
    bm = BlockManager(6, BS)
    a, b = make_seq(A10), make_seq(A10)
    bm.allocate(a)
    prefill(bm, a, 6)  # first chunk: block 0 full, block 1 half computed
    h0 = chain_hashes(A10, 1)[0]
    assert bm.hash_to_block_id == {h0: 0}
    bm.allocate(b)
    assert b.block_table == [0, 3, 4]
    assert b.num_cached_tokens == 4
    prefill(bm, a, 4)  # second chunk finishes a: block 1 is published now, block 0 is not republished
    assert bm.hash_to_block_id == {h0: 0, chain_hashes(A10, 2)[1]: 1}


def test_freed_block_keeps_hash_and_is_revived():
    bm = BlockManager(6, BS)
    a, b = make_seq(A10), make_seq(A10)
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    assert list(bm.free_block_ids) == [3, 4, 5, 2, 1, 0]
    h0, h1 = chain_hashes(A10, 2)
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]  # 0 and 1 revived out of the free list, 3 from its front
    assert b.num_cached_tokens == 8
    assert refs(bm) == [1, 1, 0, 1, 0, 0]
    assert list(bm.free_block_ids) == [4, 5, 2]
    assert bm.used_block_ids == {0, 1, 3}


def test_reused_block_loses_its_hash():
    bm = BlockManager(4, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    assert list(bm.free_block_ids) == [2, 3, 1, 0]
    c = make_seq([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30])
    bm.allocate(c)
    assert c.block_table == [2, 3, 1]  # block 1 is overwritten with c's tokens
    h0 = chain_hashes(a.token_ids, 1)[0]
    assert bm.hash_to_block_id == {h0: 0}
    assert (bm.blocks[1].hash, bm.blocks[1].token_ids) == (-1, [])
    bm.deallocate(c)
    assert list(bm.free_block_ids) == [0, 1, 3, 2]
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # block 0 still hits, block 1 no longer does
    assert b.block_table == [0, 1, 3]
    assert refs(bm) == [1, 1, 0, 1]
    assert bm.blocks[1].hash == -1


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(6, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    b = make_seq([40, 41, 42, 43, 44])
    bm.hash_to_block_id[chain_hashes(b.token_ids, 1)[0]] = 0  # b's hash now points at a block holding a's tokens
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table == [3, 4]
    assert refs(bm) == [0, 0, 0, 1, 1, 0]
    assert list(bm.free_block_ids) == [5, 2, 1, 0]  # block 0 was not revived


def test_block_holding_last_token_never_comes_from_cache():
    bm = BlockManager(6, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    assert len(bm.hash_to_block_id) == 2  # both blocks of a are published
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(b)
    assert b.block_table == [0, 2]
    assert b.num_cached_tokens == 4
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(c)
    assert c.block_table == [0, 1, 3]
    assert c.num_cached_tokens == 8
    assert refs(bm) == [3, 2, 1, 1, 0, 0]


def test_hash_is_chained_over_the_prefix():
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    prefill(bm, a)
    b = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # block 1 equals a's block 1, after a different block 0
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table == [3, 4, 5]
    c = make_seq([1, 2, 3, 4, 0, 0, 0, 0, 9])  # only the first block matches
    bm.allocate(c)
    assert c.num_cached_tokens == 4
    assert c.block_table == [0, 6, 7]
    assert refs(bm) == [2, 1, 1, 1, 1, 1, 1, 1]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a, b = make_seq(A10), make_seq(A10)
    bm.allocate(a)
    prefill(bm, a)
    assert bm.hash_to_block_id == {}
    assert [blk.hash for blk in bm.blocks] == [-1] * 6
    assert_allocated_without_hits(bm, b)


# ---- can_allocate --------------------------------------------------------------------------------------

def test_can_allocate_counts_hits_on_in_use_blocks_as_free():
    bm = BlockManager(3, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    x = make_seq([50, 51])
    bm.allocate(a)
    prefill(bm, a)
    bm.allocate(x)
    assert list(bm.free_block_ids) == []
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 3 blocks, 2 of them hits on a's blocks
    assert not bm.can_allocate(b)  # still needs 1 new block, none free
    bm.deallocate(x)
    assert list(bm.free_block_ids) == [2]
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 2]
    assert refs(bm) == [2, 2, 1]
    assert list(bm.free_block_ids) == []


def test_can_allocate_charges_revived_free_blocks():
    bm = BlockManager(3, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    prefill(bm, a)
    bm.deallocate(a)
    x = make_seq([50, 51])
    bm.allocate(x)
    assert x.block_table == [2]
    assert list(bm.free_block_ids) == [1, 0]
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # its 2 hits sit in the free list: 3 free blocks needed, 2 left
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
    assert list(bm.free_block_ids) == [1]
    assert bm.hash_to_block_id == {compute_hash([1, 2, 3, 4]): 0}  # block 0 filled and computed
    # token 5 starts block 1
    assert len(seq) == 5 and seq.num_blocks == 2
    assert bm.can_append(seq)
    decode_step(bm, seq, 6)
    assert seq.block_table == [0, 1]
    assert list(bm.free_block_ids) == []
    assert refs(bm) == [1, 1]
    for t in (7, 8, 9):  # the 6th, 7th and 8th tokens fit block 1: no free block needed
        assert bm.can_append(seq)
        decode_step(bm, seq, t)
        assert seq.block_table == [0, 1]
    # the 9th token starts block 2, but no block is free
    assert len(seq) == 9 and seq.num_cached_tokens == 8
    assert not bm.can_append(seq)
    h0, h1 = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 2)
    assert bm.hash_to_block_id == {h0: 0, h1: 1}


def test_can_append_needs_no_block_mid_block():
    bm = BlockManager(1, BS)
    seq = make_seq([1, 2])
    bm.allocate(seq)
    prefill(bm, seq)
    seq.append_token(3)
    assert list(bm.free_block_ids) == []
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert seq.block_table == [0]


# ---- property test: random operation sequences keep the bookkeeping consistent -------------------------

NUM_BLOCKS = 8


def check_invariants(bm: BlockManager, live: list[Sequence]):
    free = list(bm.free_block_ids)
    assert len(free) == len(set(free)), f"duplicate ids in the free list {free}"
    assert set(free).isdisjoint(bm.used_block_ids)
    assert set(free) | bm.used_block_ids == set(range(bm.num_blocks))
    owners: dict[int, list[tuple[Sequence, int]]] = {}
    for seq in live:
        assert len(seq.block_table) == seq.num_blocks
        assert len(set(seq.block_table)) == len(seq.block_table)
        hashes = chain_hashes(seq.token_ids, seq.num_cached_blocks, seq.block_size)
        for i, block_id in enumerate(seq.block_table):
            owners.setdefault(block_id, []).append((seq, i))
            block = bm.blocks[block_id]
            if i < seq.num_cached_blocks and bm.enable_prefix_caching:
                # a computed full block is published under the chain hash of this sequence's prefix
                assert (block.hash, block.token_ids) == (hashes[i], seq.block(i))
            elif i >= seq.num_cached_blocks:
                assert block.hash == -1, "a block whose K/V is not computed yet is published"
    for block in bm.blocks:
        assert block.ref_count == len(owners.get(block.block_id, []))
        assert (block.ref_count == 0) == (block.block_id in free)  # no leaked and no double-owned block
    for block_id, users in owners.items():
        (first, i), *others = users
        for seq, j in others:
            assert i == j
            end = (i + 1) * first.block_size
            assert first.token_ids[:end] == seq.token_ids[:end]
    for h, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == h
    if not bm.enable_prefix_caching:
        assert bm.hash_to_block_id == {}


def expected_hits(bm: BlockManager, seq: Sequence) -> list[int]:
    """Reference model: leading full blocks, short of the one holding the last token, published with equal tokens."""
    if not bm.enable_prefix_caching:
        return []
    hits = []
    for i, h in enumerate(chain_hashes(seq.token_ids, (len(seq) - 1) // BS)):
        block_id = bm.hash_to_block_id.get(h)
        if block_id is None or bm.blocks[block_id].token_ids != seq.block(i):
            break
        hits.append(block_id)
    return hits


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_operations_keep_invariants(data):
    prefix_caching = data.draw(st.booleans(), label="enable_prefix_caching")
    bm = BlockManager(NUM_BLOCKS, BS, prefix_caching)
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
            hits = expected_hits(bm, seq)
            charged = seq.num_blocks - sum(1 for b in hits if bm.blocks[b].ref_count > 0)
            assert bm.can_allocate(seq) == (charged <= bm.num_free_blocks)
            if charged <= bm.num_free_blocks:
                free_before = bm.num_free_blocks
                bm.allocate(seq)
                assert seq.block_table[:len(hits)] == hits
                assert seq.num_cached_tokens == len(hits) * BS < len(seq)  # the last token is always computed
                assert free_before - bm.num_free_blocks == charged
                waiting.remove(seq)
                live.append(seq)
        elif op == "step" and live:
            seq = live[data.draw(st.integers(0, len(live) - 1), label="which")]
            chunk = data.draw(st.integers(1, seq.num_uncached_tokens), label="chunk")
            prefill(bm, seq, chunk)
            if seq.num_cached_tokens == len(seq):  # last chunk or decode: a token is sampled
                seq.append_token(data.draw(tokens, label="sampled"))
                if bm.can_append(seq):
                    bm.may_append(seq)
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
    assert len(bm.free_block_ids) == NUM_BLOCKS
    assert sorted(bm.free_block_ids) == list(range(NUM_BLOCKS))
    assert bm.used_block_ids == set()
    assert refs(bm) == [0] * NUM_BLOCKS
