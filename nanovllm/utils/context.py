"""Per-forward attention metadata, set by the ModelRunner around each model call.

Attention layers sit deep inside the model, so instead of threading these tensors through every forward
signature the runner publishes them here for the duration of one step. The context manager always resets it,
also when the step raises, so a failed step can never leak stale metadata into the next one.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Context:
    is_prefill: bool = False
    # prefill: cumulative query / key lengths per sequence, [num_seqs + 1] int32
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # cache slot of every new token, [num_tokens] int32; -1 = padding, not stored
    slot_mapping: torch.Tensor | None = None
    # decode: number of cached tokens each sequence attends to (new token included), [num_seqs] int32
    context_lens: torch.Tensor | None = None
    # [num_seqs, max_num_blocks] int32, physical block ids; only set when attention must read the paged cache
    block_tables: torch.Tensor | None = None
    # decode, for a backend that starts its programs in an order (AttentionBackend.orders_decode): the rows,
    # longest context first, [num_seqs] int32, computed on the host with the step's other inputs
    decode_order: torch.Tensor | None = None
    # prefill reading the cache, for a backend that asks (AttentionBackend.decodes_in_mixed_steps): the last
    # num_decode_rows sequences have one new token each (a mixed step's decodes), described again as a decode
    # step's rows: context_lens, decode_order and decode_block_tables ([num_decode_rows, max_num_blocks]) are
    # theirs; cu_seqlens_*, max_seqlen_* and block_tables still cover every sequence
    num_decode_rows: int = 0
    decode_block_tables: torch.Tensor | None = None
    # a backend's own data derived from the fields above, built by the step's first layer for the others
    plan: object = None


# A ContextVar rather than a rebound module global: set/reset pair up exactly, even when steps nest or raise.
_CONTEXT: ContextVar[Context] = ContextVar("nanovllm_forward_context", default=Context())


def get_context() -> Context:
    return _CONTEXT.get()


@contextmanager
def forward_context(ctx: Context):
    """Publish one step's metadata for the attention layers; the previous (empty) context comes back afterwards."""
    token = _CONTEXT.set(ctx)
    try:
        yield _CONTEXT.get()
    finally:
        _CONTEXT.reset(token)
