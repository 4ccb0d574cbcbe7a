"""What crosses the scheduler -> runner boundary each step, and what comes back.

The runner keeps each sequence's state between steps, so a step carries a sequence in full only the first time
the runner sees it (or again after preemption, when the runner has dropped it) and otherwise only what changed:

    step N    new:    [NewSequence(7, prompt, blocks [3, 9], cached 0, scheduled 300)]
    step N+1  cached: [CachedSequence(7, new blocks [], scheduled 1, last_token None)]   None: the runner's own
    step N+2  cached: [CachedSequence(7, new blocks [4], scheduled 1, last_token 881)]        sample, in flight
              finished_seq_ids: [5]       the runner forgets sequence 5 (finished, preempted or aborted)
"""
from dataclasses import dataclass, field
from enum import Enum

from nanovllm.engine.sequence import Logprob
from nanovllm.sampling_params import SamplingParams


class StepKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True)
class NewSequence:
    seq_id: int
    token_ids: list[int]  # every token known so far (after preemption: the completion too)
    block_table: list[int]
    num_cached_tokens: int  # prefix-cache hits: their K/V is already in the cache
    num_scheduled_tokens: int
    sampling_params: SamplingParams
    num_prompt_tokens: int
    seed: int  # the request's seed, or one the engine drew for it: a row's draws depend on it alone


@dataclass(slots=True)
class CachedSequence:
    seq_id: int
    new_block_ids: list[int]
    num_scheduled_tokens: int
    last_token: int | None  # None: the token the runner sampled for it in the previous step, still in flight


@dataclass(slots=True)
class ScheduledStep:
    kind: StepKind
    new: list[NewSequence] = field(default_factory=list)
    cached: list[CachedSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def seq_ids(self) -> list[int]:
        """Sequence of each row of the batch: the new ones first, then the cached ones."""
        return [s.seq_id for s in self.new] + [s.seq_id for s in self.cached]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.new) + sum(s.num_scheduled_tokens for s in self.cached)

    def __len__(self) -> int:
        return len(self.new) + len(self.cached)


@dataclass(slots=True)
class StepResult:
    token_ids: list[int]  # one sampled id per row; a row that ran a mid-prompt chunk has one too, unused
    # rows that asked: the sampled token's logprob and the top-N ({token id: logprob}); None elsewhere
    logprobs: list[dict[int, Logprob] | None] | None = None
    # row -> one entry per prompt token this chunk scored (the logprobs of token i given tokens < i)
    prompt_logprobs: dict[int, list[dict[int, Logprob]]] | None = None


@dataclass(slots=True)
class StepSummary:
    """What one engine step did: for outputs, progress bars and throughput figures."""
    kind: StepKind
    num_tokens: int
    finished: list  # list[Sequence]
    sampled: list  # list[Sequence] that received a token (the finished ones included)
