from collections import deque
from dataclasses import dataclass, field

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.engine.step import CachedSequence, NewSequence, ScheduledStep, StepKind, StepResult


@dataclass(slots=True)
class BookedStep:
    """A step sent to the runner: its sequences by row, those that sample a token and the row each reads."""
    step: ScheduledStep
    seqs: list[Sequence] = field(default_factory=list)
    sampling: list[Sequence] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


class Scheduler:
    """Decides what runs each step. Mixed steps (the default, as vLLM's V1 scheduler): every running sequence
    past its prompt decodes one token, and the rest of the token budget (max_num_batched_tokens) goes to prompt
    chunks, so prefill rides along with decode instead of stalling it. Without them (nano-vllm's policy): a
    prefill batch when any prompt work is pending, else one decode batch.

    Prompt work first continues chunked prompts already running, then admits waiting sequences while the token
    budget, the sequence limit (max_num_seqs) and the free KV blocks allow; a prompt longer than the remaining
    budget is cut into chunks over several steps. When a decode runs out of blocks, the most recently admitted
    sequence is preempted: its blocks are freed and it is recomputed later.

    A step is booked in two halves, `launched` when it is queued on the device and `update` when its sampled ids
    are read back, so the engine may schedule and launch the next step in between.
    """

    def __init__(self, config: Config):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.mixed_steps = getattr(config, "mixed_steps", True)
        self.eos = config.eos
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self._blocks_sent: dict[int, int] = {}  # sequences the runner holds -> how many block ids it has
        self._forgotten: list[int] = []  # sequences the runner must drop at the next step
        self.num_preemptions = 0
        self._last_step: tuple[ScheduledStep | None, list[tuple[Sequence, int]]] = (None, [])

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def abort(self, seq: Sequence):
        """Drop an unfinished sequence (its caller gave up) and free its blocks."""
        if seq.is_finished:
            return
        # membership is checked: an interrupted step (Ctrl-C) may have left a sequence out of its queue
        if seq.status == SequenceStatus.RUNNING:
            if seq in self.running:
                self.running.remove(seq)
            self.block_manager.deallocate(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._retire(seq, "abort")

    # ---- choosing a step -------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        if self.mixed_steps:
            decodes = self._schedule_decode()
            chunks = self._schedule_prefill(self.max_num_batched_tokens - len(decodes))
            if not decodes and not chunks:  # what was admitted has its whole prompt cached: it decodes now
                decodes = self._schedule_decode()
            kind = StepKind.PREFILL if chunks else StepKind.DECODE  # a mixed step runs the varlen (prefill) path
            chunks += decodes
        else:
            chunks, kind = self._schedule_prefill(self.max_num_batched_tokens), StepKind.PREFILL
            if not chunks:
                chunks, kind = self._schedule_decode(), StepKind.DECODE
        return self._step_record(kind, chunks) if chunks else None

    def _schedule_prefill(self, budget: int) -> list[tuple[Sequence, int]]:
        budget = max(budget, 0)
        chunks = []
        for seq in self.running:  # chunked prompts in flight go first, in admission order
            if budget and seq.needs_prefill:
                chunks.append((seq, min(seq.num_uncached_tokens, budget)))
                budget -= chunks[-1][1]
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # seq.num_pending: preempted by this very schedule() with its newest token in flight (overlapped
            # steps); the runner takes a sequence in full, so it comes back once update() has that token
            if seq.num_pending or self._waits_for_parent(seq) or not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.needs_prefill:  # else its one uncached token runs in the next decode step
                chunks.append((seq, min(seq.num_uncached_tokens, budget)))
                budget -= chunks[-1][1]
        return chunks

    @staticmethod
    def _waits_for_parent(seq: Sequence) -> bool:
        """n > 1: the other branches wait until the first has prefilled the prompt, so its blocks are shared
        (prefix-cache hits) instead of computed n times."""
        parent = seq.parent
        return parent is not None and not parent.is_finished and (
            parent.status == SequenceStatus.WAITING or parent.num_cached_tokens < parent.num_prompt_tokens)

    def _schedule_decode(self) -> list[tuple[Sequence, int]]:
        scheduled, kept = [], []  # kept: visited and still running, in admission order
        try:  # `running` gets its visited sequences back even if the step is interrupted here (Ctrl-C)
            while self.running and len(scheduled) < self.max_num_seqs:
                seq = self.running[0]  # taken off only once its place is decided, so none is lost in between
                if seq.needs_prefill or self._reaches_length(seq, seq.num_tokens):
                    kept.append(self.running.popleft())  # mid-prompt (mixed steps), or its last token in flight
                    continue
                while not self.block_manager.can_append(seq):
                    if len(self.running) > 1:
                        self.preempt(self.running.pop())  # the newest other sequence gives its blocks back
                    else:
                        self.preempt(self.running.popleft())
                        break
                else:
                    self.block_manager.may_append(seq)
                    scheduled.append(seq)
                    kept.append(self.running.popleft())
        finally:
            self.running.extendleft(reversed(kept))
        return [(seq, 1) for seq in scheduled]

    def _step_record(self, kind: StepKind, chunks: list[tuple[Sequence, int]]) -> ScheduledStep:
        """New sequences go to the runner in full, the ones it holds as what changed since their last step."""
        step = ScheduledStep(kind, finished_seq_ids=self._forgotten)
        self._forgotten = []
        new_rows, cached_rows = [], []
        for seq, num_tokens in chunks:
            sent = self._blocks_sent.get(seq.seq_id)
            if sent is None:
                assert not seq.num_pending, "a sequence new to the runner has all its tokens known"
                step.new.append(NewSequence(seq.seq_id, list(seq.token_ids), list(seq.block_table),
                                            seq.num_cached_tokens, num_tokens, seq.sampling_params,
                                            seq.num_prompt_tokens, seq.seed))
                new_rows.append((seq, num_tokens))
            else:
                step.cached.append(CachedSequence(seq.seq_id, seq.block_table[sent:], num_tokens, seq.last_token))
                cached_rows.append((seq, num_tokens))
            self._blocks_sent[seq.seq_id] = len(seq.block_table)
        self._last_step = (step, new_rows + cached_rows)  # in the runner's row order, for launched()
        return step

    def preempt(self, seq: Sequence):
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        self._forget(seq)

    # ---- booking a step ----------------------------------------------------------------------------------------

    def postprocess(self, step: ScheduledStep, result: StepResult) -> list[Sequence]:
        """Book a step whose sampled tokens are already known; return the sequences that finished."""
        return self.update(self.launched(step), result)

    def launched(self, step: ScheduledStep) -> BookedStep:
        """Book a step sent to the device: its tokens' K/V count as cached, and every sequence that samples grows
        by a token still in flight."""
        booked = BookedStep(step)
        last, rows = self._last_step
        assert step is last, "launched() books the step schedule() just handed out"
        for row, (seq, num_tokens) in enumerate(rows):
            booked.seqs.append(seq)
            full_blocks = seq.num_cached_blocks
            seq.num_cached_tokens += num_tokens
            if seq.num_cached_blocks > full_blocks:
                # safe before the step ends: a later step reading the blocks runs after it on the device
                self.block_manager.hash_blocks(seq)
            if seq.num_cached_tokens == seq.num_tokens:  # not a mid-prompt chunk: a token is sampled
                seq.add_pending_token()
                booked.sampling.append(seq)
                booked.rows.append(row)
        return booked

    def update(self, booked: BookedStep, result: StepResult) -> list[Sequence]:
        """Fill in a launched step's sampled tokens, publish completed blocks, finish sequences."""
        finished = []
        for row, entries in (result.prompt_logprobs or {}).items():
            seq, scored = booked.seqs[row], booked.seqs[row].prompt_logprobs or []
            if len(scored) >= seq.num_prompt_tokens:
                continue  # scored in full before a preemption: its second prefill adds nothing
            if entries and entries[0] is None:  # from the prompt's start: preempted part-way, it scores it again
                scored = []
            seq.prompt_logprobs = (scored + entries)[:seq.num_prompt_tokens]
        for seq, row in zip(booked.sampling, booked.rows):
            if seq.is_finished:  # it finished one step earlier: this token is surplus
                continue
            token_id = result.token_ids[row]
            seq.resolve_token(token_id)
            if seq.logprobs is not None:
                seq.logprobs.append(result.logprobs[row])
                seq.cumulative_logprob += result.logprobs[row][token_id]
            index = len(seq.token_ids) - 1
            if seq.block_table and index // seq.block_size < seq.num_cached_blocks:  # it completed a block
                self.block_manager.hash_blocks(seq)
            reason = self._finish_reason(seq, index, token_id)
            if reason:
                seq.truncate(index + 1)  # a later step may already have launched it further
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: str):
        """End a sequence early (a stop string was found in its text). A stop string completed by the token that
        also reached max_tokens wins over "length", as in vLLM."""
        if seq.is_finished:
            seq.finish_reason = reason
        else:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str):
        if seq.status == SequenceStatus.RUNNING:
            self.block_manager.deallocate(seq)
            self.running.remove(seq)
        else:  # preempted while its last token was in flight
            self.waiting.remove(seq)
        self._retire(seq, reason)

    def _retire(self, seq: Sequence, reason: str):
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._forget(seq)

    def _forget(self, seq: Sequence):
        if self._blocks_sent.pop(seq.seq_id, None) is not None:
            self._forgotten.append(seq.seq_id)

    def _finish_reason(self, seq: Sequence, index: int, token_id: int) -> str | None:
        sp = seq.sampling_params
        if index + 1 - seq.num_prompt_tokens > sp.min_tokens or not sp.min_tokens:
            if not sp.ignore_eos and token_id in self.eos:
                if token_id != self.eos[0]:  # the model's other EOS ids act as stop tokens, as in vLLM
                    seq.stop_reason = token_id
                return "stop"
            if token_id in sp.stop_token_ids:
                seq.stop_reason = token_id
                return "stop"
        if self._reaches_length(seq, index + 1):
            return "length"
        return None

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        return (num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens
                or num_tokens >= self.max_model_len)
