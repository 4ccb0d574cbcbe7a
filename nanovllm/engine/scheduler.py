from collections import deque

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


class Scheduler:
    """Decides what runs each step: a prefill batch when any prompt work is pending, else one decode batch.

    Prefill steps first continue chunked prompts already running, then admit waiting sequences while the token
    budget (max_num_batched_tokens), the sequence limit (max_num_seqs) and the free KV blocks allow. A prompt
    longer than the remaining budget is cut into chunks over several steps. When a decode step runs out of blocks,
    the most recently admitted sequence is preempted: its blocks are freed and it is recomputed later.

    A step is booked in two halves: `launched` when it is queued on the device (its tokens' K/V count as cached,
    each sampling sequence grows by a PENDING_TOKEN) and `resolve` when its sampled ids are read back. The engine
    may schedule and launch the next step in between; `postprocess` does both halves at once.
    """

    def __init__(self, config: Config):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos = config.eos
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        seqs = self._schedule_prefill()
        if seqs:
            return seqs, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled = []
        for seq in self.running:  # chunked prompts in flight go first, in admission order
            if budget and seq.needs_prefill:
                budget -= self._take_chunk(seq, budget)
                scheduled.append(seq)
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.needs_prefill:  # else its one uncached token runs in the next decode step
                budget -= self._take_chunk(seq, budget)
                scheduled.append(seq)
        return scheduled

    @staticmethod
    def _take_chunk(seq: Sequence, budget: int) -> int:
        seq.num_scheduled_tokens = min(seq.num_uncached_tokens, budget)
        return seq.num_scheduled_tokens

    def _schedule_decode(self) -> list[Sequence]:
        scheduled, done = [], []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            if self._reaches_length(seq, seq.num_tokens):  # its last token is still in flight; nothing to add
                done.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled + done))
        return scheduled

    def preempt(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Account for one step whose sampled tokens are already known; return the sequences that finished."""
        return self.resolve(self.launched(seqs), token_ids)

    def launched(self, seqs: list[Sequence]) -> list[tuple[Sequence, int, int]]:
        """Book a step that has been sent to the device: its tokens' K/V count as cached, and every sequence
        that samples grows by a PENDING_TOKEN. Returns (sequence, token index, output row) for each of those."""
        records = []
        for row, seq in enumerate(seqs):
            full_blocks = seq.num_cached_blocks
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.num_cached_blocks > full_blocks:
                # safe before the step ends: a later step reading the blocks runs after it on the device
                self.block_manager.hash_blocks(seq)
            if seq.num_cached_tokens == seq.num_tokens:  # not a mid-prompt chunk: a token is sampled
                seq.append_token(PENDING_TOKEN)
                seq.pending_row = row
                records.append((seq, seq.num_tokens - 1, row))
        return records

    def resolve(self, records: list[tuple[Sequence, int, int]], token_ids: list[int]) -> list[Sequence]:
        """Fill in a launched step's sampled tokens, publish completed blocks, finish sequences."""
        finished = []
        for seq, index, row in records:
            if seq.is_finished:  # it finished one step earlier: this token is surplus
                continue
            token_id = token_ids[row]
            seq.set_token(index, token_id)
            if seq.block_table and index // seq.block_size < seq.num_cached_blocks:  # it completed a block
                self.block_manager.hash_blocks(seq)
            reason = self._finish_reason(seq, index, token_id)
            if reason:
                seq.truncate(index + 1)  # a later step may already have launched it further
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish(self, seq: Sequence, reason: str):
        if seq.status == SequenceStatus.RUNNING:
            self.block_manager.deallocate(seq)
            self.running.remove(seq)
        else:  # preempted while its last token was in flight
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _finish_reason(self, seq: Sequence, index: int, token_id: int) -> str | None:
        if not seq.ignore_eos and token_id in self.eos:
            return "stop"
        if self._reaches_length(seq, index + 1):
            return "length"
        return None

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        return num_tokens - seq.num_prompt_tokens >= seq.max_tokens or num_tokens >= self.max_model_len
