from copy import copy
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.math import cdiv


class Logprob(float):
    """One entry of a logprobs dict: vLLM's Logprob (`.logprob`, `.rank`, `.decoded_token`) that is also the float
    it holds, so code written for either reads it: `lp[t].logprob`, `lp[t] + 1.0`, `math.exp(lp[t])`.

    rank: 1 for the most likely token; a sampled or prompt token's is how many tokens are at least as likely
    (ties count against it, as vLLM counts), a top-N entry's its place. decoded_token: `tokenizer.decode([id])`,
    None without a tokenizer or with `detokenize=False`."""
    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self = super().__new__(cls, logprob)
        self.rank = rank
        self.decoded_token = decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):  # pickled across processes (Ray replicas) with its fields
        return Logprob, (float(self), self.rank, self.decoded_token)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request as the scheduler sees it: its tokens, how many have K/V in the cache, and its KV blocks.

    `num_tokens` counts sampled tokens still in flight (overlapped scheduling books a step before its ids are
    read back); `token_ids` holds the known ones only. `num_pending` is 2 between booking step N+1 and reading
    back step N, else 0 or 1.
    """

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, seq_id: int, block_size: int):
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = copy(token_ids)
        self.num_tokens = len(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0
        self.block_size = block_size
        self.block_table: list[int] = []
        self.sampling_params = sampling_params
        self.finish_reason: str | None = None
        self.num_cached_prompt_tokens: int | None = None  # prefix-cache hits when first admitted
        self.stop_reason: str | int | None = None  # the stop string or stop token id that ended it
        self.seed = 0 if sampling_params.seed is None else sampling_params.seed  # the engine draws one if unset
        self.logprobs: list[dict[int, Logprob]] | None = [] if sampling_params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if sampling_params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.request_index = 0  # which prompt of its generate call, and which of its n completions
        self.branch = 0
        self.parent: "Sequence | None" = None  # n > 1: the branch whose prompt prefill the others wait for

    def __len__(self):
        return self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_pending(self) -> int:
        return self.num_tokens - len(self.token_ids)

    @property
    def last_token(self) -> int | None:
        """The newest token, None while it is still in flight."""
        return None if self.num_pending else self.token_ids[-1]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def needs_prefill(self) -> bool:
        return self.num_uncached_tokens > 1

    @property
    def num_cached_blocks(self) -> int:
        return self.num_cached_tokens // self.block_size

    @property
    def num_blocks(self) -> int:
        return cdiv(self.num_tokens, self.block_size)

    def block(self, i: int) -> list[int]:
        """The token ids of logical block i (only the known ones)."""
        return self.token_ids[i * self.block_size: (i + 1) * self.block_size]

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)
        self.num_tokens += 1

    def add_pending_token(self):
        self.num_tokens += 1

    def resolve_token(self, token_id: int):
        """The in-flight token's id is known."""
        assert self.num_pending > 0
        self.token_ids.append(token_id)

    def truncate(self, num_tokens: int):
        """Drop positions past num_tokens (a token launched after the sequence had in fact finished)."""
        del self.token_ids[num_tokens:]
        self.num_tokens = num_tokens
