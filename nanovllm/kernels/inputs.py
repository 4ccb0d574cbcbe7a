"""A step's input bookkeeping on the GPU, one kernel each where PyTorch ops launched five to eight.

`fill_in_flight` puts the previous step's samples into this step's input ids; `stage_decode_inputs` copies a
decode step's rows into a CUDA graph's static inputs and pads the rest of the graph's batch. Their PyTorch
functions (nanovllm.engine.model_runner.fill_in_flight, nanovllm.engine.cuda_graphs.stage_decode_inputs) are
the reference and the path off CUDA.
"""
import torch
import triton
import triton.language as tl

_FILL_BLOCK = 1024
_TABLE_BLOCK = 128  # block-table columns per loop step


# the sizes change every step: specialising on their values (== 1, multiples of 16) would compile mid-serving
@triton.jit(do_not_specialize=["N"])
def _fill_in_flight_kernel(ids_ptr, pending_ptr, last_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    pending = tl.load(pending_ptr + offs, mask=mask, other=-1)
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    previous = tl.load(last_ptr + tl.maximum(pending, 0), mask=mask & (pending >= 0), other=0)
    tl.store(out_ptr + offs, tl.where(pending >= 0, previous.to(ids.dtype), ids), mask=mask)


def fill_in_flight(ids: torch.Tensor, pending: torch.Tensor, last_sampled: torch.Tensor) -> torch.Tensor:
    assert ids.is_contiguous() and pending.is_contiguous() and last_sampled.is_contiguous()
    out = torch.empty_like(ids)
    n = ids.numel()
    if n:
        _fill_in_flight_kernel[(triton.cdiv(n, _FILL_BLOCK),)](ids, pending, last_sampled, out, n,
                                                              BLOCK=_FILL_BLOCK, num_warps=4)
    return out


@triton.jit(do_not_specialize=["n", "width", "stride_tables"])
def _stage_decode_kernel(ids_ptr, pos_ptr, slots_ptr, lens_ptr, tables_ptr, order_ptr,
                         s_ids_ptr, s_pos_ptr, s_slots_ptr, s_lens_ptr, s_tables_ptr, s_order_ptr,
                         n, width, stride_tables, stride_s_tables, max_blocks,
                         HAS_ORDER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row < n:
        tl.store(s_ids_ptr + row, tl.load(ids_ptr + row))
        tl.store(s_pos_ptr + row, tl.load(pos_ptr + row))
        tl.store(s_slots_ptr + row, tl.load(slots_ptr + row))
        tl.store(s_lens_ptr + row, tl.load(lens_ptr + row))
        if HAS_ORDER:
            tl.store(s_order_ptr + row, tl.load(order_ptr + row))
        else:
            tl.store(s_order_ptr + row, row)
    else:  # padding: nothing stored, nothing attended to
        tl.store(s_slots_ptr + row, -1)
        tl.store(s_lens_ptr + row, 0)
        tl.store(s_order_ptr + row, row)
    own = tl.where(row < n, width, 0)  # the row's own columns; -1 past them
    src = tables_ptr + row.to(tl.int64) * stride_tables
    dst = s_tables_ptr + row.to(tl.int64) * stride_s_tables
    for start in range(0, max_blocks, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        blocks = tl.load(src + cols, mask=cols < own, other=-1)
        tl.store(dst + cols, blocks, mask=cols < max_blocks)


def stage_decode_inputs(input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                        context_lens: torch.Tensor, block_tables: torch.Tensor, decode_order: torch.Tensor | None,
                        static_ids: torch.Tensor, static_positions: torch.Tensor, static_slots: torch.Tensor,
                        static_lens: torch.Tensor, static_tables: torch.Tensor, static_order: torch.Tensor,
                        bs: int) -> None:
    n, width = block_tables.shape
    assert 1 <= n <= bs and block_tables.stride(1) == 1 and static_tables.stride(1) == 1
    assert width <= static_tables.size(1)
    _stage_decode_kernel[(bs,)](
        input_ids, positions, slot_mapping, context_lens, block_tables,
        decode_order if decode_order is not None else input_ids,
        static_ids, static_positions, static_slots, static_lens, static_tables, static_order,
        n, width, block_tables.stride(0), static_tables.stride(0), static_tables.size(1),
        HAS_ORDER=decode_order is not None, BLOCK=_TABLE_BLOCK, num_warps=1)
