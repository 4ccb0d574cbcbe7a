from collections import deque

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides what runs each step: a prefill batch when any prompt work is pending, else one decode batch.

    Prefill steps first continue chunked prompts already running, then admit waiting sequences while the token
    budget (max_num_batched_tokens), the sequence limit (max_num_seqs) and the free KV blocks allow. A prompt
    longer than the remaining budget is cut into chunks over several steps. When a decode step runs out of blocks,
    the most recently admitted sequence is preempted: its blocks are freed and it is recomputed later.
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
        scheduled = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
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
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def preempt(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Account for one step's computed tokens; return the sequences that finished."""
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            full_blocks = seq.num_cached_blocks
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.num_cached_blocks > full_blocks:  # a block was completed: publish it for prefix caching
                self.block_manager.hash_blocks(seq)
            if seq.num_cached_tokens < seq.num_tokens:  # a prompt chunk: no token sampled yet
                continue
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        if not seq.ignore_eos and token_id in self.eos:
            return "stop"
        if seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
