"""Paged KV-cache bookkeeping: a fixed pool of blocks, reference counts, and prefix caching.

A sequence's block table maps its logical blocks to physical ones:

    tokens       | t0 .. t255 | t256 .. t511 | t512 .. t600 |
    block_table  |     7      |      3       |      12      |     slot of t300 = 3 * 256 + (300 - 256)

Prefix caching: once a *full* block's K/V has been computed, the block is published under
hash(previous block's hash, its token ids) (xxhash64, chained, so equal hashes mean equal prefixes). A later
sequence whose leading blocks hash the same reuses them (ref_count += 1) after checking the token ids, which
guards against hash collisions. A block whose ref_count drops to 0 goes to the back of the free list but keeps
its hash, so an identical prefix arriving before the block is reused for something else revives it.
Blocks are only published after their K/V exists, so a chunked prefill never hands out blocks still empty.
"""
from collections import deque

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []

    def publish(self, h: int, token_ids: list[int]):
        self.hash = h
        self.token_ids = token_ids

    def reset(self):
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


def compute_hash(token_ids: list[int], prefix: int = -1) -> int:
    h = xxhash.xxh64()
    if prefix != -1:
        h.update(prefix.to_bytes(8, "little"))
    h.update(np.array(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks are handed out never-used first, in id order, then freed ones in the order they were freed. A
        # never-used block gets its Block when first handed out: a small model on a large GPU has millions of
        # blocks (16M took 14 s to make up front), most never used.
        self._num_blocks = num_blocks
        self.blocks: list[Block] = []  # blocks[i] exists once block i has been handed out
        self.free_block_ids: deque[int] = deque()  # freed blocks, oldest first
        self.hash_to_block_id: dict[int, int] = {}
        self.used_block_ids: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_blocks - len(self.blocks) + len(self.free_block_ids)

    def ref_counts(self) -> list[int]:
        """Each block's reference count, by block id."""
        return [b.ref_count for b in self.blocks] + [0] * (self._num_blocks - len(self.blocks))

    def _take_free_block(self) -> int:
        if len(self.blocks) < self._num_blocks:
            block_id = len(self.blocks)
            self.blocks.append(Block(block_id))
        else:
            block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its old contents are about to be overwritten
        block.reset()
        self.used_block_ids.add(block_id)
        return block_id

    def _release_block(self, block_id: int):
        self.used_block_ids.remove(block_id)
        self.free_block_ids.append(block_id)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical ids of the leading full blocks whose K/V is already cached.

        The block holding the last token is never taken from the cache: its logits must be computed, and
        writing that token's K/V into a block other sequences share would disturb them.
        """
        if not self.enable_prefix_caching or (seq.sampling_params.prompt_logprobs is not None and seq.parent is None):
            # prompt logprobs need every prompt token's logits; branches 2..n of n > 1 report none, so they share
            return []
        hits, h = [], -1
        for i in range((len(seq) - 1) // self.block_size):
            token_ids = seq.block(i)
            h = compute_hash(token_ids, h)
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        in_use = sum(1 for block_id in hits if self.blocks[block_id].ref_count > 0)
        return seq.num_blocks - in_use <= self.num_free_blocks

    def allocate(self, seq: Sequence):
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:  # revive a freed block that still holds this prefix
                self.free_block_ids.remove(block_id)
                self.used_block_ids.add(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(len(hits), seq.num_blocks):
            seq.block_table.append(self._take_free_block())
        seq.num_cached_tokens = len(hits) * self.block_size

    def deallocate(self, seq: Sequence):
        # Free the tail first: the free list is reused front to back, so shared prefix blocks stay cached longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release_block(block_id)
        seq.num_cached_tokens = 0
        seq.block_table.clear()

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= (seq.num_blocks > len(seq.block_table))

    def may_append(self, seq: Sequence):
        """Give the sequence a new block when its newest token starts one."""
        if seq.num_blocks > len(seq.block_table):
            seq.block_table.append(self._take_free_block())

    def hash_blocks(self, seq: Sequence):
        """Publish every full block whose K/V is computed (or queued on the device ahead of any reader) and
        whose token ids are all known."""
        if not self.enable_prefix_caching:
            return
        first = seq.num_cached_blocks  # blocks are published in order, so walk back to the first unpublished
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash == -1:
            first -= 1
        for i in range(first, seq.num_cached_blocks):
            block = self.blocks[seq.block_table[i]]
            prefix = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
            token_ids = seq.block(i)
            if len(token_ids) < self.block_size:  # a sampled token not read back yet: publish once it is known
                break
            h = compute_hash(token_ids, prefix)
            block.publish(h, token_ids)
            self.hash_to_block_id[h] = block.block_id
