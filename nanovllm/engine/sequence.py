from copy import copy
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams


# Stands for a sampled token still on the device: with overlapped steps a sequence grows by one position at launch,
# and the id is filled in when the step's results are read back.
PENDING_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, how many of them have K/V in the cache, and its KV blocks.

    `num_cached_tokens` counts tokens whose K/V is already in the paged cache (prefix-cache hits and
    earlier prefill chunks). A sequence whose only uncached token is the last one runs in a decode step;
    one with more runs in a prefill step, `num_scheduled_tokens` of them at a time.
    """

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, seq_id: int, block_size: int):
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = copy(token_ids)
        self.last_token = token_ids[-1]
        self.num_tokens = len(self.token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0
        self.block_size = block_size
        self.block_table: list[int] = []
        self.temperature = sampling_params.temperature
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos
        self.finish_reason: str | None = None
        self.pending_row = -1  # row of the in-flight step's output that holds the PENDING_TOKEN's value

    def __len__(self):
        return self.num_tokens

    def __getitem__(self, key):
        return self.token_ids[key]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

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
        return (self.num_tokens + self.block_size - 1) // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    def block(self, i: int) -> list[int]:
        assert 0 <= i < self.num_blocks
        return self.token_ids[i * self.block_size: (i + 1) * self.block_size]

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)
        self.last_token = token_id
        self.num_tokens += 1

    def set_token(self, index: int, token_id: int):
        """Fill in a PENDING_TOKEN once its value is known."""
        self.token_ids[index] = token_id
        if index == self.num_tokens - 1:
            self.last_token = token_id

    def truncate(self, num_tokens: int):
        """Drop positions past num_tokens (a token launched after the sequence had in fact finished)."""
        del self.token_ids[num_tokens:]
        self.num_tokens = num_tokens
        self.last_token = self.token_ids[-1]

    # Worker processes only need what prepare_prefill/prepare_decode read: a decode step ships the last
    # token instead of the whole history (a PENDING_TOKEN with its row in the previous step's output).
    def __getstate__(self):
        tokens = self.token_ids if self.needs_prefill or self.num_cached_tokens == 0 else self.last_token
        return (self.seq_id, self.num_tokens, self.num_prompt_tokens, self.num_cached_tokens,
                self.num_scheduled_tokens, self.block_size, self.block_table, self.temperature, self.pending_row,
                tokens)

    def __setstate__(self, state):
        (self.seq_id, self.num_tokens, self.num_prompt_tokens, self.num_cached_tokens,
         self.num_scheduled_tokens, self.block_size, self.block_table, self.temperature, self.pending_row,
         tokens) = state
        if isinstance(tokens, list):
            self.token_ids = tokens
            self.last_token = tokens[-1]
        else:
            self.token_ids = []
            self.last_token = tokens
