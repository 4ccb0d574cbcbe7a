"""The split-KV decode kernel for an fp8 KV cache in Gluon (Triton's dialect with explicit layouts and copies),
used on Hopper GPUs (sm_90: its warpgroup MMAs) in place of attention._decode_split_kernel where it applies
(`applies`). Importing this module raises ImportError on a Triton without Gluon's 3.6 API; attention.py then keeps
the Triton kernel everywhere.

Same contract and 128-key tiles as that kernel's fp8 case with tiles inside a page, for key-major values in runs
of VALUE_RUN keys (the triton backend's V layout where this kernel serves, see engine/kv_cache.py). What differs:

- The tensor cores read the cache's e4m3 bytes as they are (Hopper's fp8 warpgroup MMA, operands in shared memory
  or, for V, in registers as loaded), so no key or value is converted to 16 bits: an MMA of 16 rows (Ampere's,
  the Triton kernel's) takes fp8 on sm_90 only by converting it, which cost a third of that kernel's instructions.
  The products run transposed, keys and head_dim as the MMA's 64-row side and the query heads as its columns:
  S^T = K Q'^T and O^T += V^T P'. Q' and P' hold two e4m3 parts per query head, adjacent columns whose sum is the
  exact value or close to it: q * s = hi + lo with s a power of two per head that puts its largest |q| in
  [128, 256) (a 16-bit query's first 8 significant bits exactly, hence every bf16 query), and 256 P = hi + lo
  (P to about 2**-9 relative, as a bf16 P would be; a P below 2**-18 of the row's largest, which e4m3 cannot
  hold, counts as 0 in both the weights and their sum). A head's score is the sum of its two columns, and its
  output the sum of its two output columns. The MMAs accumulate in fp32 as Hopper's fp8 MMA does (its adds are
  not IEEE over an instruction's 32 products), so the result is within the fp8 cache's rounding of the Triton
  kernel's, not the same bits.
- Copies: two shared-memory buffers take turns, the cp.async copies of tile t + 1 issued while tile t is
  computed, so each program keeps a tile in flight (Triton's pipeliner gives that kernel's loop one buffer).

    keys of a split:    [ tile 0 | tile 1 | tile 2 | ... ]      BLOCK_N keys each, inside one page
    ring slot:              0        1        0
    iteration t:        wait for tile t, S^T = K Q'^T, softmax, copy tile t + 1 into the other slot, O^T += V^T P'

Why runs of 4 keys: V^T is the MMA's register operand, 4 consecutive keys (its k) of one head_dim position in a
register, so V must be key-major for that load to be one word; stored key-major over a whole page, each new
token's values landed in head_dim separate 32-byte sectors per head (a store 4 bytes apart, 16 sectors, with runs
of 4). O^T's rows are relabelled (row m is head_dim position d(m), see the kernel) so that a thread's two rows of
an MMA are adjacent positions and its loads 8 bytes.
"""
import torch
import triton

if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
    # Gluon is experimental and its API moves between releases; this kernel was built and checked on 3.6
    raise ImportError(f"the Gluon decode kernel needs Triton 3.6 or newer, found {triton.__version__}")

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma  # noqa: E402

from nanovllm.kernels.store_kvcache import values_key_major  # noqa: E402
from nanovllm.layers.kv_quant import FP8_DTYPE  # noqa: E402
from nanovllm.utils.kernels import cuda_capability  # noqa: E402

STAGES = 2
NUM_WARPS = 4  # one warpgroup
MAX_REGISTERS = 168  # 3 programs of 128 threads fit a multiprocessor's 65,536 registers (147 used at 8 columns)
BLOCK_N = 128
MAX_GROUP = 16  # query heads a KV head: two MMA columns each, 32 at most
VALUE_RUN = 4  # keys per key-major run of V: one 32-bit word of the MMA's operand
V_ROW_BYTES = 256  # V tiles in shared memory as rows of 256 bytes (conflict-free loads, see the kernel)


def serves(head_dim: int, dtype: torch.dtype, page_size: int, device: torch.device) -> bool:
    """Whether the kernel can serve a cache of these shapes on `device` (a Hopper GPU, sm_90: its warpgroup MMAs;
    16-bit queries; head_dim 64 or 128; pages of at least one 128-key tile), given values key-major in runs of
    VALUE_RUN keys; `applies` checks a call's query heads and tensors too."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128)
            and page_size >= BLOCK_N and cuda_capability(device) == (9, 0))


def applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> bool:
    """Whether this kernel serves a decode_attention call: `serves` for its shapes, an fp8 cache with values
    key-major in runs of VALUE_RUN keys, at most MAX_GROUP query heads a KV head, and the Triton kernel's tiles
    being 128 keys (so the splits are the same)."""
    # decode_attention has checked that K and V agree (value_block_size): V's blocks are its runs
    if k_cache.dtype != FP8_DTYPE or not values_key_major(v_cache) or v_cache.size(1) != VALUE_RUN:
        return False
    num_heads, head_dim = q.shape[1], q.shape[2]
    return (block_n == BLOCK_N and num_heads // k_cache.size(2) <= MAX_GROUP
            and serves(head_dim, q.dtype, k_cache.size(1), q.device))


def decode_split(grid, args: tuple, q: torch.Tensor, k_cache: torch.Tensor, ordered: bool):
    """Launch over decode_attention's grid with the split kernel's runtime arguments `args` (the Triton kernel's:
    see decode_attention); q and k_cache give the shapes."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.size(2)
    group = num_heads // num_kv_heads
    _decode_split_kernel_fp8[grid](
        *args, GROUP=group, COLS=max(8, triton.next_power_of_2(2 * group)), HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
        PAGE_SIZE=k_cache.size(1), ORDERED=ordered, NUM_KV_HEADS=num_kv_heads, STRIDE_KSLOT=k_cache.stride(1),
        RUN=VALUE_RUN, V_ROW=V_ROW_BYTES, STAGES=STAGES, NUM_WARPS=NUM_WARPS, num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
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
    GROUP: gl.constexpr, COLS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    PAGE_SIZE: gl.constexpr, ORDERED: gl.constexpr, NUM_KV_HEADS: gl.constexpr, STRIDE_KSLOT: gl.constexpr,
    RUN: gl.constexpr, V_ROW: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr,
):
    # the MMAs' layout: 64-row MMAs over 4 warps, COLS columns (each query head twice: its high and low e4m3
    # parts, adjacent; padded to a power of two from 8); V^T as the register operand, 4 keys a word; copies of 16
    # bytes a thread, rows of HEAD_DIM (K) or V_ROW (V) bytes
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                    instr_shape=[16, COLS, 32])
    op_v: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_s, k_width=4)
    k_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // HEAD_DIM, HEAD_DIM // 16], [NUM_WARPS, 1], [1, 0])
    v_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // V_ROW, V_ROW // 16], [NUM_WARPS, 1], [1, 0])
    q_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NUM_WARPS, 1], [1, 0])
    # shared memory: K and Q' as the MMA reads them (rows of HEAD_DIM bytes swizzled), P' likewise; V in rows of
    # V_ROW bytes, 16-byte vectors swizzled over 8 phases (at head_dim 128 a half-warp's 8-byte loads cover the
    # 32 banks once)
    mma_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, HEAD_DIM), element_bitwidth=8, rank=2)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, BLOCK_N), element_bitwidth=8,
                                                       rank=2)
    v_smem_layout: gl.constexpr = gl.SwizzledSharedLayout(16, 1, 8, order=[1, 0])

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

    RUN_ROWS: gl.constexpr = HEAD_DIM * RUN // V_ROW
    k_smem = gl.allocate_shared_memory(k_cache_ptr.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], mma_smem)
    v_smem = gl.allocate_shared_memory(v_cache_ptr.dtype.element_ty, [STAGES, BLOCK_N // RUN * RUN_ROWS, V_ROW],
                                       v_smem_layout)
    q_smem = gl.allocate_shared_memory(k_cache_ptr.dtype.element_ty, [COLS, HEAD_DIM], mma_smem)
    p_smem = gl.allocate_shared_memory(v_cache_ptr.dtype.element_ty, [COLS, BLOCK_N], p_smem_layout)
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

    # the queries: row 2h + 0 / 1 holds head h's high / low e4m3 part of q * s, s a power of two per head that
    # puts its largest |q| in [128, 256): hi + lo is a 16-bit query's leading 8 bits exactly
    rows_q = gl.arange(0, COLS, layout=gl.SliceLayout(1, q_layout))
    cols_q = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
    head_q = kv_head * GROUP + rows_q // 2
    q = gl.load(q_ptr + seq64 * stride_qb + head_q[:, None] * stride_qh + cols_q[None, :],
                mask=(rows_q // 2 < GROUP)[:, None], other=0.0).to(gl.float32)
    # exponent fields: a largest |q| of biased exponent e gets s = 2**(134 - e) (field 261 - e), clamped to normal
    # floats; 1 / s has field 254 - (261 - e)
    q_exp = (gl.max(gl.abs(q), 1).to(gl.int32, bitcast=True) >> 23) & 255
    s_exp = gl.minimum(gl.maximum(261 - q_exp, 1), 253)
    q = q * (s_exp << 23).to(gl.float32, bitcast=True)[:, None]
    q_hi = q.to(k_cache_ptr.dtype.element_ty)
    q_lo = (q - q_hi.to(gl.float32)).to(k_cache_ptr.dtype.element_ty)
    q_smem.store(gl.where((rows_q % 2 == 0)[:, None], q_hi, q_lo))
    k_scale = gl.load(k_scale_ptr + kv_head)
    v_scale = gl.load(v_scale_ptr + kv_head)
    col_scale = qk_scale * k_scale * ((254 - s_exp) << 23).to(gl.float32, bitcast=True)  # per row of q
    col_scale = gl.convert_layout(col_scale, gl.SliceLayout(0, mma_s))
    fence_async_shared()

    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, mma_s))
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_s))
    m_i = gl.full([COLS], float("-inf"), gl.float32, gl.SliceLayout(0, mma_s))
    l_i = gl.zeros([BLOCK_N, COLS], gl.float32, mma_s)  # per key slot, summed at the end
    acc = gl.zeros([HEAD_DIM, COLS], gl.float32, mma_s)  # O^T, a head's columns hi and lo
    num_tiles = gl.cdiv(end - start, BLOCK_N)
    for t in range(num_tiles):
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()
        gl.thread_barrier()
        slot = t % STAGES
        # S^T [keys, COLS] = K q'^T; a head's score is the sum of its two columns
        st = warpgroup_mma(k_smem.index(slot), q_smem.permute((1, 0)), gl.zeros([BLOCK_N, COLS], gl.float32, mma_s),
                           use_acc=False)
        hi, lo = st.reshape([BLOCK_N, COLS // 2, 2]).split()
        s = hi + lo
        s = gl.convert_layout(gl.join(s, s).reshape([BLOCK_N, COLS]), mma_s) * col_scale[None, :]
        s = gl.where((keys < end - start - t * BLOCK_N)[:, None], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        # the next tile's copies go to the other slot, whose last readers (tile t - 1) have finished
        _issue_tile(k_smem, v_smem, k_base, v_base, bt_row_ptr, t + STAGES - 1, start, end, k_offs, v_offs,
                    stride_kpage, stride_vrun, STAGES, BLOCK_N, PAGE_SIZE, STRIDE_KSLOT, RUN)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - (m_safe - 8.0)[None, :])  # 256 * P
        p = gl.where(p >= 0.0009765625, p, 0.0)  # what e4m3 rounds to 0 (P < 2**-18) counts in neither sum
        alpha = gl.exp2(m_i - m_safe)
        l_i = l_i * alpha[None, :] + p
        acc = acc * alpha[None, :]
        p_hi = p.to(v_cache_ptr.dtype.element_ty)
        p_lo = (p - p_hi.to(gl.float32)).to(v_cache_ptr.dtype.element_ty)
        p_smem.store(gl.permute(gl.where((cols % 2 == 0)[None, :], p_hi, p_lo), (1, 0)))
        fence_async_shared()
        gl.thread_barrier()
        # V^T with its rows relabelled: row m holds head_dim position d(m) = 16 (m // 16) + 2 (m % 8) + m // 8 % 2,
        # so a thread's rows m and m + 8 are adjacent positions: with a run's 4 keys, one 8-byte load
        vt = v_smem.index(slot).reshape([BLOCK_N // RUN, HEAD_DIM // 16, 8, 2, RUN]).permute((1, 3, 2, 0, 4))
        vt = vt.reshape([HEAD_DIM, BLOCK_N]).load(op_v)
        acc = warpgroup_mma(vt, p_smem.permute((1, 0)), acc)
        m_i = m_new
    async_copy.wait_group(0)

    l_sum = gl.sum(l_i, 0)
    out = acc / gl.maximum(l_sum, 1e-30)[None, :] * v_scale
    hi, lo = out.reshape([HEAD_DIM, COLS // 2, 2]).split()
    out = hi + lo  # [head_dim, heads]
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [NUM_WARPS, 1], [0, 1])
    out = gl.convert_layout(out, out_layout)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, out_layout))
    offs_d = offs_d // 16 * 16 + offs_d % 8 * 2 + offs_d // 8 % 2  # row m of O^T: head_dim position d(m)
    offs_h = gl.arange(0, COLS // 2, layout=gl.SliceLayout(0, out_layout))
    heads = kv_head * GROUP + offs_h
    mask = (offs_h < GROUP)[None, :] & (offs_d < HEAD_DIM)[:, None]
    if num_splits == 1:
        gl.store(o_ptr + seq64 * stride_ob + heads[None, :] * stride_oh + offs_d[:, None],
                 out.to(o_ptr.dtype.element_ty), mask=mask)
    else:
        gl.store(part_o_ptr + seq64 * stride_pb + heads[None, :] * stride_ph + split * stride_ps + offs_d[:, None],
                 out, mask=mask)
        m_h, _ = m_i.reshape([COLS // 2, 2]).split()
        l_h, _ = l_sum.reshape([COLS // 2, 2]).split()
        lse = gl.convert_layout(m_h + gl.log2(l_h) - 8.0, gl.SliceLayout(0, out_layout))
        gl.store(part_lse_ptr + seq64 * stride_lb + heads * stride_lh + split, lse, mask=offs_h < GROUP)
