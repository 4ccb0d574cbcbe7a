"""The split-KV decode kernel for an fp8 KV cache in Gluon (Triton's dialect with explicit layouts and copies),
used on CUDA GPUs in place of attention._decode_split_kernel where it applies (`applies`). Importing this module
raises ImportError on a Triton without Gluon's 3.6 API; attention.py then keeps the Triton kernel everywhere.

Same contract, tiles and arithmetic as that kernel's fp8 case with tiles inside a page, for key-major values in
runs of VALUE_RUN keys (the triton backend's V layout where this kernel serves, see engine/kv_cache.py); the two
give the same bits on an H200. What differs is the copy pipeline. Triton's pipeliner gives that kernel's loop one
shared-memory buffer per operand, whatever num_stages says, and issues the copies of tile t + 1 after tile t's dots
and waits for them at once: a program alternates between waiting for memory and computing, and only the other
programs on its multiprocessor overlap the two. Here two buffers take turns: the cp.async copies of tile t + 1 are
issued before tile t is computed, so each program keeps a tile in flight. Capped at 168 registers (ptxas's own
choice is 186; 160 under the cap, no spills), three programs fit a multiprocessor, as for the Triton kernel.

    keys of a split:    [ tile 0 | tile 1 | tile 2 | ... ]      BLOCK_N keys each, inside one page
    ring slot:              0        1        0
    iteration t:        wait for tile t, copy tile t + 1 into the other slot, then Q.K^T, softmax, P.V on tile t

Why runs of 4 keys: the P.V product takes V as its second operand with 4 consecutive keys of one column in a
register (fp8 MMA operands run along k), so V must be key-major for that load to be one word; stored key-major over
a whole page, each new token's values landed in head_dim separate 32-byte sectors per head (a store 4 bytes
apart, 16 sectors, with runs of 4). The operand is read with a layout that differs from the MMA's only in the
order of each thread's registers: its 4 columns 8 * NUM_WARPS apart are read as 4 adjacent head_dim positions, so
a thread's 16 bytes are one shared-memory load (the accumulator's columns are relabelled so; the output's store maps
them back).
"""
import functools

import torch
import triton

if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
    # Gluon is experimental and its API moves between releases; this kernel was built and checked on 3.6
    raise ImportError(f"the Gluon decode kernel needs Triton 3.6 or newer, found {triton.__version__}")

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2  # noqa: E402

from nanovllm.kernels.store_kvcache import values_key_major  # noqa: E402
from nanovllm.layers.kv_quant import FP8_DTYPE  # noqa: E402
from nanovllm.utils.kernels import cuda_capability  # noqa: E402

STAGES = 2
NUM_WARPS = 4
MAX_REGISTERS = 168  # 3 programs of 128 threads fit the 65,536 registers of a multiprocessor
BLOCK_N = 128
BLOCK_H = 16  # query heads of a KV head, padded to the MMA's 16 rows
VALUE_RUN = 4  # keys per key-major run of V: one 32-bit word of the MMA's operand
V_ROW_BYTES = 256  # V tiles in shared memory as rows of 256 bytes (conflict-free loads, see the kernel)


def serves(head_dim: int, dtype: torch.dtype, page_size: int, device: torch.device) -> bool:
    """Whether the kernel can serve a cache of these shapes on `device` (a CUDA GPU with fp8 conversions, sm_89+;
    16-bit queries; head_dim 64 or 128; pages of at least one 128-key tile), given values key-major in runs of
    VALUE_RUN keys; `applies` checks a call's query heads and tensors too."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128)
            and page_size >= BLOCK_N and cuda_capability(device) >= (8, 9))


def applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> bool:
    """Whether this kernel serves a decode_attention call: `serves` for its shapes, an fp8 cache with values
    key-major in runs of VALUE_RUN keys, at most 16 query heads a KV head, and the Triton kernel's tiles being
    128 keys (so the splits are the same)."""
    # decode_attention has checked that K and V agree (value_block_size): V's blocks are its runs
    if k_cache.dtype != FP8_DTYPE or not values_key_major(v_cache) or v_cache.size(1) != VALUE_RUN:
        return False
    num_heads, head_dim = q.shape[1], q.shape[2]
    return (block_n == BLOCK_N and num_heads // k_cache.size(2) <= BLOCK_H
            and serves(head_dim, q.dtype, k_cache.size(1), q.device))


@functools.lru_cache(maxsize=None)  # a launch argument of every eager call
def _v_load_layout(head_dim: int) -> gl.DistributedLinearLayout:
    """The P.V product's V operand layout (mma_v2's operand 1, k_width 4, over [BLOCK_N, head_dim] with the warps
    along head_dim), with a thread's registers reordered: after its first 4 keys (one word) come its columns
    8 * NUM_WARPS apart, then its further keys. Converting to the operand layout then moves no data."""
    columns = [[0, n] for n in (8 * NUM_WARPS * 2 ** i for i in range(4)) if n < head_dim]
    keys = [[k, 0] for k in (16 * 2 ** i for i in range(8)) if k < BLOCK_N]
    warps = [[0, 8 * 2 ** i] for i in range(NUM_WARPS.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=[[1, 0], [2, 0]] + columns + keys,
                                      lane_bases=[[4, 0], [8, 0], [0, 1], [0, 2], [0, 4]], warp_bases=warps,
                                      block_bases=[], shape=[BLOCK_N, head_dim])


def decode_split(grid, args: tuple, q: torch.Tensor, k_cache: torch.Tensor, ordered: bool):
    """Launch over decode_attention's grid with the split kernel's runtime arguments `args` (the Triton kernel's:
    see decode_attention); q and k_cache give the shapes."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.size(2)
    _decode_split_kernel_fp8[grid](
        *args, GROUP=num_heads // num_kv_heads, BLOCK_H=BLOCK_H, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
        PAGE_SIZE=k_cache.size(1), ORDERED=ordered, NUM_KV_HEADS=num_kv_heads, STRIDE_KSLOT=k_cache.stride(1),
        RUN=VALUE_RUN, V_ROW=V_ROW_BYTES, V_LOAD=_v_load_layout(head_dim), STAGES=STAGES, NUM_WARPS=NUM_WARPS,
        num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )


@gluon.jit
def _issue_tile(k_smem, v_smem, k_base, v_base, bt_row_ptr, t, start, end, k_offs, v_offs, stride_kpage,
                stride_vrun, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                STRIDE_KSLOT: gl.constexpr, RUN: gl.constexpr):
    """Start copying tile t (keys start + t * BLOCK_N ..) into ring slot t % STAGES; a tile past the end copies
    nothing. Keys past the end inside the last tile are copied too (allocated slots of the same page; the loop
    masks their scores, and an fp8 cache holds no NaN that 0 * v would keep)."""
    start_n = start + t * BLOCK_N
    valid = start_n < end
    page = gl.load(bt_row_ptr + start_n // PAGE_SIZE, mask=valid, other=0).to(gl.int64)
    row = gl.multiple_of(start_n % PAGE_SIZE, BLOCK_N)  # tiles start at multiples of BLOCK_N
    slot = t % STAGES
    async_copy.async_copy_global_to_shared(k_smem.index(slot),
                                           k_base + page * stride_kpage + row * STRIDE_KSLOT + k_offs, mask=valid)
    v_run = page * (PAGE_SIZE // RUN) + row // RUN  # V's block (a run of RUN keys) of the tile's first key
    async_copy.async_copy_global_to_shared(v_smem.index(slot), v_base + v_run * stride_vrun + v_offs, mask=valid)
    async_copy.commit_group()


@gluon.jit(do_not_specialize=["split_size", "num_splits", "stride_bt", "stride_pb", "stride_ph", "stride_ps",
                              "stride_lb", "stride_lh"])
def _decode_split_kernel_fp8(
    q_ptr, k_cache_ptr, v_cache_ptr, context_lens_ptr, block_tables_ptr, o_ptr, part_o_ptr, part_lse_ptr,
    seq_order_ptr, qk_scale, k_scale_ptr, v_scale_ptr, split_size, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kpage, stride_kh, stride_vrun, stride_vh, stride_bt,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    PAGE_SIZE: gl.constexpr, ORDERED: gl.constexpr, NUM_KV_HEADS: gl.constexpr, STRIDE_KSLOT: gl.constexpr,
    RUN: gl.constexpr, V_ROW: gl.constexpr, V_LOAD: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr,
):
    # registers: the MMA accumulator layout (m16n8 tiles, the warps side by side along keys / head_dim) and its
    # operands, 4 elements a thread along k (fp8 as loaded from shared memory, then float16); copies of 16 bytes a
    # thread, rows of HEAD_DIM (K) or V_ROW (V) bytes
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    op_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    k_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // HEAD_DIM, HEAD_DIM // 16], [NUM_WARPS, 1], [1, 0])
    v_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // V_ROW, V_ROW // 16], [NUM_WARPS, 1], [1, 0])
    # shared memory: 16-byte vectors of a row swizzled over up to 8 phases (at most one phase per vector of a row)
    k_smem_layout: gl.constexpr = gl.SwizzledSharedLayout(16, 1, min(8, HEAD_DIM // 16), order=[1, 0])
    v_smem_layout: gl.constexpr = gl.SwizzledSharedLayout(16, 1, 8, order=[1, 0])
    # V's operand: a thread's columns j, j + 8 * NUM_WARPS, ... are read from head_dim positions COLS * j' + i
    # (j' = j % (8 * NUM_WARPS), i = j // (8 * NUM_WARPS)), 4 keys each: adjacent in a run, one 16-byte load
    COLS: gl.constexpr = HEAD_DIM // (8 * NUM_WARPS)

    if ORDERED:
        pid = gl.program_id(0)
        seq = gl.load(seq_order_ptr + pid // NUM_KV_HEADS).to(gl.int32)
        kv_head = pid % NUM_KV_HEADS
    else:
        seq = gl.program_id(0)
        kv_head = gl.program_id(1)
    split = gl.program_id(2)
    ctx_len = gl.load(context_lens_ptr + seq)
    start = split * split_size
    if (num_splits > 1) & (start >= ctx_len):
        return
    end = gl.minimum(start + split_size, ctx_len)
    seq64 = seq.to(gl.int64)

    # K tiles [keys, head_dim]; V tiles BLOCK_N // RUN runs of [head_dim, RUN], as rows of V_ROW bytes (a run is
    # HEAD_DIM * RUN / V_ROW rows: 2 at head_dim 128, so a quarter-warp's 16-byte loads, 4 runs x 2 columns, fall
    # in 8 different swizzle phases, one bank group each)
    RUN_ROWS: gl.constexpr = HEAD_DIM * RUN // V_ROW
    k_smem = gl.allocate_shared_memory(k_cache_ptr.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], k_smem_layout)
    v_smem = gl.allocate_shared_memory(v_cache_ptr.dtype.element_ty, [STAGES, BLOCK_N // RUN * RUN_ROWS, V_ROW],
                                       v_smem_layout)
    k_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, k_copy))
    k_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, k_copy))
    k_offs = k_rows[:, None] * STRIDE_KSLOT + k_cols[None, :]
    v_rows = gl.arange(0, BLOCK_N // RUN * RUN_ROWS, layout=gl.SliceLayout(1, v_copy))
    v_cols = gl.arange(0, V_ROW, layout=gl.SliceLayout(0, v_copy))
    v_offs = (v_rows // RUN_ROWS)[:, None] * stride_vrun + ((v_rows % RUN_ROWS) * V_ROW)[:, None] + v_cols[None, :]
    bt_row_ptr = block_tables_ptr + seq64 * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    for t in gl.static_range(STAGES - 1):
        _issue_tile(k_smem, v_smem, k_base, v_base, bt_row_ptr, t, start, end, k_offs, v_offs, stride_kpage,
                    stride_vrun, STAGES, BLOCK_N, PAGE_SIZE, STRIDE_KSLOT, RUN)

    # the query heads of this KV head as float16 (e4m3 converts to it exactly), saturating past its range
    offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, mma))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, mma))
    mask_h = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    q = gl.load(q_ptr + seq64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_h[:, None],
                other=0.0)
    q = gl.minimum(gl.maximum(q.to(gl.float32), -65504.0), 65504.0).to(gl.float16)
    q = gl.convert_layout(q, op_a)
    k_scale = gl.load(k_scale_ptr + kv_head)
    v_scale = gl.load(v_scale_ptr + kv_head)
    qk_scale = qk_scale * k_scale

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
    l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, mma))
    acc = gl.zeros([BLOCK_H, HEAD_DIM], gl.float32, mma)
    arange_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    num_tiles = gl.cdiv(end - start, BLOCK_N)
    for t in range(num_tiles):
        # tile t has landed once at most STAGES - 2 younger groups are pending; the barrier makes every thread's
        # copies visible, and frees slot (t - 1) % STAGES (read by the last iteration) for the next copy
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        _issue_tile(k_smem, v_smem, k_base, v_base, bt_row_ptr, t + STAGES - 1, start, end, k_offs, v_offs,
                    stride_kpage, stride_vrun, STAGES, BLOCK_N, PAGE_SIZE, STRIDE_KSLOT, RUN)
        slot = t % STAGES
        k = k_smem.index(slot).permute((1, 0)).load(op_b).to(gl.float16)  # K^T: [head_dim, keys]
        qk = mma_v2(q, k, gl.zeros([BLOCK_H, BLOCK_N], gl.float32, mma)) * qk_scale
        qk = gl.where((arange_n < end - start - t * BLOCK_N)[None, :], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_smem.index(slot).reshape([BLOCK_N // RUN, 8 * NUM_WARPS, COLS, RUN]).permute((0, 3, 2, 1))
        v = gl.convert_layout(v.reshape([BLOCK_N, HEAD_DIM]).load(V_LOAD), op_b).to(gl.float16)  # [keys, j]
        acc = mma_v2(gl.convert_layout(p.to(gl.float16), op_a), v, acc)
        m_i = m_new
    async_copy.wait_group(0)

    out = acc / gl.maximum(l_i, 1e-30)[:, None] * v_scale
    mask = mask_h[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs_d = offs_d % (8 * NUM_WARPS) * COLS + offs_d // (8 * NUM_WARPS)  # acc column j: head_dim here
    if num_splits == 1:
        gl.store(o_ptr + seq64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask)
    else:
        gl.store(part_o_ptr + seq64 * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 out, mask=mask)
        lse = m_i + gl.log2(l_i)
        gl.store(part_lse_ptr + seq64 * stride_lb + heads * stride_lh + split, lse, mask=mask_h)
