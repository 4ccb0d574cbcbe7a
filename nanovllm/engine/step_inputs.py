"""Pure functions from a step's rows to the flat int lists the model's step takes; no tensors, no device.

The runner keeps a `SeqState` per sequence between steps (`apply_step` updates them from a ScheduledStep),
lays a step out with `prefill_layout` / `decode_layout`, and only uploads and runs what comes out.
"""
from dataclasses import dataclass, field

from nanovllm.engine.step import ScheduledStep
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.math import cdiv


@dataclass(slots=True)
class SeqState:
    """What the runner keeps of a sequence between steps."""
    token_ids: list[int]  # the tokens prefill may need (the prompt; after preemption the completion too)
    block_table: list[int]
    num_computed: int  # tokens whose K/V is in the cache or queued ahead of any reader
    sampling_params: SamplingParams
    num_prompt_tokens: int = 0
    seed: int = 0


@dataclass(slots=True)
class Row:
    """One sequence's share of a step."""
    seq_id: int
    state: SeqState
    num_tokens: int  # scheduled this step
    last_token: int | None = None  # decode: the input token; None = the runner's previous sample, in flight

    @property
    def samples(self) -> bool:
        """Whether this step ends at the sequence's newest token (a mid-prompt chunk samples nothing)."""
        return self.state.num_computed + self.num_tokens >= len(self.state.token_ids)

    @property
    def output_position(self) -> int:
        """Index among the completion's tokens of the token this step samples."""
        return max(self.state.num_computed + self.num_tokens - self.state.num_prompt_tokens, 0)


@dataclass(slots=True)
class PrefillLayout:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    cu_seqlens_q: list[int]
    cu_seqlens_k: list[int]
    max_seqlen_q: int
    max_seqlen_k: int
    block_tables: list[int]  # flattened [num_seqs, width], -1 padded; empty when no key comes from the cache
    width: int
    logits_indices: list[int]  # which tokens' logits to compute: each row's last, all of a prompt-logprobs row's
    scores_prompts: bool = False  # some row scores its prompt tokens (a one-token chunk adds no extra logit)
    # the trailing rows of one token (a mixed step's decodes) as decode rows, when asked for and keys come from
    # the cache: their key counts, their block tables (flattened, `width` wide), longest first when ordered
    decode_context_lens: list[int] = field(default_factory=list)
    decode_block_tables: list[int] = field(default_factory=list)
    decode_order: list[int] = field(default_factory=list)


@dataclass(slots=True)
class DecodeLayout:
    input_ids: list[int]  # -1 where the token is still in flight
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[int]
    width: int
    order: list[int]  # the rows longest context first (ties in batch order); empty unless asked for


def apply_step(states: dict[int, SeqState], step: ScheduledStep) -> list[Row]:
    """Bring the runner's states up to date with a step record; return the step's rows in batch order."""
    for seq_id in step.finished_seq_ids:
        states.pop(seq_id, None)
    rows = []
    for new in step.new:
        state = SeqState(new.token_ids, new.block_table, new.num_cached_tokens, new.sampling_params,
                         new.num_prompt_tokens, new.seed)
        states[new.seq_id] = state
        rows.append(Row(new.seq_id, state, new.num_scheduled_tokens, new.token_ids[-1]))
    for cached in step.cached:
        state = states[cached.seq_id]
        state.block_table.extend(cached.new_block_ids)
        rows.append(Row(cached.seq_id, state, cached.num_scheduled_tokens, cached.last_token))
    return rows


def finish_step(rows: list[Row]):
    """The step is queued: its tokens' K/V count as computed."""
    for row in rows:
        row.state.num_computed += row.num_tokens


def slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1:

        block_table [7, 3]  block_size 4     positions 2..5  ->  slots [30, 31, 12, 13]
                     (7*4 + 2, 7*4 + 3, 3*4 + 0, 3*4 + 1)
    """
    out = []
    for i in range(start // block_size, cdiv(end, block_size)):
        base = block_table[i] * block_size
        out.extend(range(base + max(start - i * block_size, 0), base + min(end - i * block_size, block_size)))
    return out


def block_table_rows(tables: list[list[int]]) -> tuple[list[int], int]:
    """Block tables padded with -1 to the longest, flattened row by row, and that width."""
    width = max(len(t) for t in tables)
    flat = []
    for t in tables:
        flat.extend(t)
        flat.extend([-1] * (width - len(t)))
    return flat, width


def prefill_layout(rows: list[Row], block_size: int, decode_rows: bool = False,
                   ordered: bool = False) -> PrefillLayout:
    """Flatten the scheduled chunk of every sequence into one varlen batch.

        seq A: cached [a0 a1 a2] new [a3 a4]      seq B: new [b0 b1 b2]
        input_ids    = [a3 a4 b0 b1 b2]           positions = [3 4 0 1 2]
        cu_seqlens_q = [0 2 5]   (new tokens)     cu_seqlens_k = [0 5 8]   (all keys each new token may see)
        slot_mapping = cache slot of a3 a4 b0 b1 b2

    decode_rows (AttentionBackend.decodes_in_mixed_steps): also the trailing one-token rows (the scheduler puts a
    mixed step's decodes last) as a decode step's rows, ordered as decode_layout orders them.
    """
    input_ids, positions, slot_mapping = [], [], []
    cu_q, cu_k = [0], [0]
    for row in rows:
        state = row.state
        start, end = state.num_computed, state.num_computed + row.num_tokens
        if start < len(state.token_ids):
            input_ids.extend(state.token_ids[start:end])
        else:  # a decode row of a mixed step: its newest token (-1: in flight)
            input_ids.append(-1 if row.last_token is None else row.last_token)
        positions.extend(range(start, end))
        cu_q.append(cu_q[-1] + end - start)
        cu_k.append(cu_k[-1] + end)
        if state.block_table:  # a warm-up sequence may have none: nothing is stored
            slot_mapping.extend(slots(state.block_table, start, end, block_size))
    paged = cu_k[-1] > cu_q[-1]  # some keys come from the cache
    tables, width = block_table_rows([r.state.block_table for r in rows]) if paged else ([], 0)
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    indices, scored = [], False
    for row, start, end in zip(rows, cu_q, cu_q[1:]):
        if wants_prompt_logprobs(row):
            indices.extend(range(start, end))
            scored = True
        else:
            indices.append(end - 1)
    lay = PrefillLayout(input_ids, positions, slot_mapping, cu_q, cu_k, max_q, max_k, tables, width, indices,
                        scored)
    if decode_rows and paged:
        tail = 0
        while tail < len(rows) and rows[-1 - tail].num_tokens == 1:
            tail += 1
        if tail:
            lay.decode_context_lens = [b - a for a, b in zip(cu_k[-tail - 1:], cu_k[-tail:])]
            # a copy of the tail rows rather than a view into `tables`: uploaded as its own part it starts 16-byte
            # aligned, so the decode kernel meets the variant its CUDA graphs compiled (utils/packing.py)
            lay.decode_block_tables = tables[(len(rows) - tail) * width:]
            if ordered:
                lay.decode_order = longest_first(lay.decode_context_lens)
    return lay


def longest_first(context_lens: list[int]) -> list[int]:
    """Row indices by context length, longest first (ties in batch order)."""
    return sorted(range(len(context_lens)), key=context_lens.__getitem__, reverse=True)


def wants_prompt_logprobs(row: Row) -> bool:
    """A chunk of a prompt whose tokens' logprobs were asked for."""
    return (row.state.sampling_params.prompt_logprobs is not None
            and row.state.num_computed < row.state.num_prompt_tokens)


def decode_layout(rows: list[Row], block_size: int, ordered: bool = False) -> DecodeLayout:
    """One new token per sequence at position num_computed, attending to every cached token and itself.
    ordered: also the rows by context length, longest first (AttentionBackend.orders_decode)."""
    positions = [row.state.num_computed for row in rows]
    slot_mapping = [row.state.block_table[p // block_size] * block_size + p % block_size
                    for row, p in zip(rows, positions)]
    input_ids = [-1 if row.last_token is None else row.last_token for row in rows]
    tables, width = block_table_rows([row.state.block_table for row in rows])
    context_lens = [p + 1 for p in positions]
    order = longest_first(context_lens) if ordered else []
    return DecodeLayout(input_ids, positions, slot_mapping, context_lens, tables, width, order)
