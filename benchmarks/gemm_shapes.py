"""Decode-sized GEMMs of Qwen3-0.6B and 8B: cuBLAS (torch.mm) against a Triton split-K GEMM, weights cold in L2.

Each timing replays a CUDA graph of one projection over enough distinct weight copies that none is left in L2 by the
one before, so a GEMM pays what it pays inside a decode step. The Triton kernel writes fp32 partial sums
[split, M, N] when split > 1 (the consumer would add them), bf16 otherwise.

    python benchmarks/gemm_shapes.py [--rows 16 64 128 256] [--sizes 0.6B 8B]
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl

from decode_attention import time_call

SHAPES = {  # name: (N, K) of y = x @ W^T, W [N, K]
    "0.6B": dict(qkv=(4096, 1024), o=(1024, 2048), gate_up=(6144, 1024), down=(1024, 3072)),
    "8B": dict(qkv=(6144, 4096), o=(4096, 4096), gate_up=(24576, 4096), down=(4096, 12288)),
}


@triton.jit
def _partial_tile(a_ptr, w_ptr, M, k_per, stride_am, stride_wn, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    """This program's [BM, BN] tile of x @ W^T over its share of the keys (program ids: rows, columns, split)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(2) * k_per + tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_per, BK):
        a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
        acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc)
        a_ptrs += BK
        w_ptrs += BK
    return acc, offs_m, offs_n


@triton.jit
def _splitk_gemm(a_ptr, w_ptr, c_ptr, M, N, k_per, stride_am, stride_wn,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    acc, offs_m, offs_n = _partial_tile(a_ptr, w_ptr, M, k_per, stride_am, stride_wn, BM, BN, BK)
    c = c_ptr + tl.program_id(2).to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT == 1:
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=offs_m[:, None] < M)
    else:
        tl.store(c, acc, mask=offs_m[:, None] < M)

REPLAYS = 20  # a graph holds this many passes over the weight copies


def triton_gemm(a, w, out, bm, bn, bk, split, stages, warps):
    m, k = a.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm), n // bn, split)
    _splitk_gemm[grid](a, w, out, m, n, k // split, a.stride(0), w.stride(0), BM=bm, BN=bn, BK=bk, SPLIT=split,
                       num_stages=stages, num_warps=warps)


@triton.jit
def _splitk_fixup_gemm(a_ptr, w_ptr, c_ptr, ws_ptr, count_ptr, M, N, k_per, stride_am, stride_wn,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    """The same, bf16 out for any split: each program stores its partial tile, and the last of a tile's SPLIT
    programs to finish (an atomic count) adds the partials in split order, stores the tile and resets the count."""
    acc, offs_m, offs_n = _partial_tile(a_ptr, w_ptr, M, k_per, stride_am, stride_wn, BM, BN, BK)
    c = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT == 1:
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=offs_m[:, None] < M)
    else:
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        in_tile = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        ws = ws_ptr + tile.to(tl.int64) * (SPLIT * BM * BN) + in_tile
        tl.store(ws + tl.program_id(2) * (BM * BN), acc)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(ws + s * (BM * BN), cache_modifier=".cg")
            tl.store(c, total.to(c_ptr.dtype.element_ty), mask=offs_m[:, None] < M)
            tl.atomic_xchg(count_ptr + tile, 0)


def fixup_gemm(a, w, out, ws, counts, bm, bn, bk, split, stages, warps):
    m, k = a.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm), n // bn, split)
    _splitk_fixup_gemm[grid](a, w, out, ws, counts, m, n, k // split, a.stride(0), w.stride(0), BM=bm, BN=bn,
                             BK=bk, SPLIT=split, num_stages=stages, num_warps=warps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--sizes", nargs="+", default=["0.6B", "8B"])
    args = p.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    for size in args.sizes:
        for name, (n, k) in SHAPES[size].items():
            copies = max(4, -(-3 * l2 // (n * k * 2)))
            ws = [torch.randn(n, k, device=dev, dtype=bf) * 0.02 for _ in range(copies)]
            mb = n * k * 2 / 1e6
            for m in args.rows:
                a = torch.randn(m, k, device=dev, dtype=bf)
                ref = (a @ ws[0].t()).float()
                out = torch.empty(m, n, device=dev, dtype=bf)
                t_cublas = time_call(lambda: [torch.mm(a, w.t(), out=out) for w in ws], REPLAYS) * 1e6 / copies
                results = []
                bms = [b for b in (16, 32, 64, 128) if b <= max(16, triton.next_power_of_2(m))][-2:]
                for bm, bn, bk, split in itertools.product(bms, (32, 64, 128), (64, 128), (1, 2, 4, 8)):
                    stages = 3 if bm * bk + bn * bk >= 256 * 128 else 4
                    if n % bn or k % (bk * split):
                        continue
                    part = torch.empty(split, m, n, device=dev, dtype=torch.float32 if split > 1 else bf)
                    try:
                        triton_gemm(a, ws[0], part, bm, bn, bk, split, stages, 4)
                    except Exception:  # out of shared memory and the like
                        continue
                    got = part.float().sum(0) if split > 1 else part.float()
                    if not torch.allclose(got, ref, atol=2e-2, rtol=2e-2):
                        print(f"  WRONG {name} m={m} {(bm, bn, bk, split, stages)}")
                        continue
                    t = time_call(lambda: [triton_gemm(a, w, part, bm, bn, bk, split, stages, 4) for w in ws],
                                  REPLAYS) * 1e6 / copies
                    results.append((t, (bm, bn, bk, split, stages)))
                results.sort()
                best = ", ".join(f"{t:.1f} {c}" for t, c in results[:3])
                work = torch.empty(64 * 2**20, device=dev, dtype=torch.float32)
                counts = torch.zeros(4096, device=dev, dtype=torch.int32)
                fixed = []
                for _, (bm, bn, bk, split, stages) in results[:4]:
                    fixup_gemm(a, ws[0], out, work, counts, bm, bn, bk, split, stages, 4)
                    ok = torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2) and not counts.any()
                    t = time_call(lambda: [fixup_gemm(a, w, out, work, counts, bm, bn, bk, split, stages, 4)
                                           for w in ws], REPLAYS) * 1e6 / copies
                    fixed.append(f"{t:.1f} {(bm, bn, bk, split, stages)}{'' if ok else ' WRONG'}")
                best += "; with the fix-up (bf16 out): " + ", ".join(fixed)
                print(f"{size} {name:7s} {mb:6.1f} MB m={m:4d}: cuBLAS {t_cublas:6.1f} us "
                      f"({mb / t_cublas:.2f} TB/s); Triton best {best}", flush=True)


if __name__ == "__main__":
    main()
