"""A decode step's layers without attention: cuBLAS projections against split-K Triton ones for o_proj and
down_proj whose fp32 partial sums the next residual add + RMSNorm adds (down_proj with SiLU-and-mul in its loads).

Every layer has its own weights (a model's worth, cold in L2 as in a step), and a read of 256 MB stands in for
attention between qkv and o (it evicts L2, as attention's KV read does). Each variant is one CUDA graph of all
layers, timed by replays; the split-K tiles are picked per projection and row count by timing each over the
layers' weights first.

    python benchmarks/decode_layers.py [--sizes 0.6B 8B] [--rows 16 64 128 192 256]
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl

from decode_attention import time_call
from nanovllm.kernels.fused import _rms_norm_kernel, add_rms_norm, silu_and_mul
from nanovllm.kernels.store_kvcache import row_warps

MODELS = {"0.6B": dict(layers=28, hidden=1024, q=2048, kv=1024, inter=3072),
          "8B": dict(layers=36, hidden=4096, q=4096, kv=1024, inter=12288)}


@triton.jit
def _splitk_kernel(a_ptr, w_ptr, p_ptr, M, stride_am, stride_wn, K_PER: tl.constexpr, N: tl.constexpr,
                   INTER: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SILU: tl.constexpr):
    """Program (m, n, s): the [BM, BN] tile of a @ W^T over the s-th K_PER keys, fp32, to p[s]. SILU: a row of a
    is [gate (INTER) | up (INTER)] and the GEMM's input is silu(gate) * up, rounded to bf16 as silu_and_mul's."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(2) * K_PER + tl.arange(0, BK)
    rows = offs_m[:, None] < M
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K_PER, BK):
        if SILU:
            gate = tl.load(a_ptrs, mask=rows, other=0.0).to(tl.float32)
            up = tl.load(a_ptrs + INTER, mask=rows, other=0.0).to(tl.float32)
            a = (gate / (1.0 + tl.exp(-gate)) * up).to(w_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptrs, mask=rows, other=0.0)
        acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc)
        a_ptrs += BK
        w_ptrs += BK
    p = p_ptr + tl.program_id(2).to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(p, acc, mask=rows)


def splitk(a, w, partials, cfg, silu=False):
    bm, bn, bk, split, stages, warps = cfg
    m = a.shape[0]
    n, k = w.shape
    _splitk_kernel[(triton.cdiv(m, bm), n // bn, split)](
        a, w, partials, m, a.stride(0), w.stride(0), K_PER=k // split, N=n, INTER=k if silu else 0, BM=bm, BN=bn, BK=bk,
        SILU=silu, num_stages=stages, num_warps=warps)


@triton.jit
def _add_partials_rms_norm_kernel(p_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps, M,
                                  N: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """One row: x = sum of the SPLIT partials (in order) rounded to bf16, then fused add + RMSNorm."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        x += tl.load(p_ptr + (s * M + t) * N + offs, mask=mask, other=0.0)
    dtype = residual_ptr.dtype.element_ty
    x = (x.to(dtype).to(tl.float32) + tl.load(residual_ptr + t * N + offs, mask=mask, other=0.0).to(tl.float32))
    x = x.to(dtype)
    tl.store(residual_out_ptr + t * N + offs, x, mask=mask)
    x = x.to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / N) + eps)
    tl.store(out_ptr + t * N + offs, (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype), mask=mask)


def add_partials_rms_norm(partials, residual, weight, eps, out, residual_out):
    split, m, n = partials.shape
    block = triton.next_power_of_2(n)
    _add_partials_rms_norm_kernel[(m,)](partials, residual, weight, out, residual_out, eps, m, N=n, SPLIT=split,
                                        BLOCK=block, num_warps=row_warps(block))


def configs(m, n, k):
    bms = [b for b in (16, 32, 64) if b <= max(16, triton.next_power_of_2(m))][-2:]
    for bm, bn, bk, split in itertools.product(bms, (32, 64, 128), (128,), (1, 2, 4, 8)):
        if n % bn == 0 and k % (bk * split) == 0:
            yield bm, bn, bk, split, 3 if bm * bk + bn * bk >= 256 * 128 else 4, 4


def pick(a, ws, silu):
    """The fastest split-K config for x @ W^T over all layers' weights (each timed in one graph)."""
    m = a.shape[0]
    n, k = ws[0].shape
    best = None
    for cfg in configs(m, n, k):
        part = torch.empty(cfg[3], m, n, device=a.device, dtype=torch.float32)
        try:
            t = time_call(lambda: [splitk(a, w, part, cfg, silu) for w in ws], 5) / len(ws)
        except Exception:  # out of shared memory and the like
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["0.6B", "8B"])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    flush = torch.ones(2 ** 27, device=dev, dtype=bf)  # 256 MB: attention's stand-in
    for size in args.sizes:
        c = MODELS[size]
        h, q, kv, inter, layers = c["hidden"], c["q"], c["kv"], c["inter"], c["layers"]
        g = torch.Generator(device=dev).manual_seed(0)

        def weight(n, k):
            return (torch.randn(n, k, device=dev, dtype=bf, generator=g) * k ** -0.5)

        wqkv = [weight(q + 2 * kv, h) for _ in range(layers)]
        wo = [weight(h, q) for _ in range(layers)]
        wgu = [weight(2 * inter, h) for _ in range(layers)]
        wd = [weight(h, inter) for _ in range(layers)]
        norms = [torch.ones(h, device=dev, dtype=bf) + 0.1 * torch.randn(h, device=dev, dtype=bf, generator=g)
                 for _ in range(2 * layers)]
        for m in args.rows:
            x0 = torch.randn(m, h, device=dev, dtype=bf, generator=g)
            attn = torch.randn(m, q, device=dev, dtype=bf, generator=g) * 0.5
            gu0 = torch.randn(m, 2 * inter, device=dev, dtype=bf, generator=g)
            t_o, cfg_o = pick(attn, wo, False)
            t_d, cfg_d = pick(gu0, wd, True)
            t_d0, cfg_d0 = pick(silu_and_mul(gu0), wd, False)
            t_co = time_call(lambda: [attn @ w.t() for w in wo], 5) / layers
            t_cd = time_call(lambda: [silu_and_mul(gu0) @ w.t() for w in wd], 5) / layers
            po = torch.empty(cfg_o[3], m, h, device=dev, dtype=torch.float32)
            pd = torch.empty(cfg_d[3], m, h, device=dev, dtype=torch.float32)
            out, res = torch.empty(m, h, device=dev, dtype=bf), torch.empty(m, h, device=dev, dtype=bf)
            outs = {}

            def cublas():
                x, r = x0, torch.zeros_like(x0)
                for i in range(layers):
                    hs, r = add_rms_norm(x, r, norms[2 * i], 1e-6)
                    qkv = hs @ wqkv[i].t()
                    flush.sum()
                    a = attn + qkv[:, :1].to(bf) * 0  # depends on qkv, as attention's output does
                    hs, r = add_rms_norm(a @ wo[i].t(), r, norms[2 * i + 1], 1e-6)
                    x = silu_and_mul(hs @ wgu[i].t()) @ wd[i].t()
                outs["cublas"] = add_rms_norm(x, r, norms[0], 1e-6)[0]

            def split(fuse_silu):
                def run():
                    x, r, first = None, torch.zeros_like(x0), True
                    for i in range(layers):
                        if first:
                            hs, r = add_rms_norm(x0, r, norms[0], 1e-6)
                            first = False
                        else:
                            hs, r = torch.empty_like(out), torch.empty_like(res)
                            add_partials_rms_norm(pd_, r_prev, norms[2 * i], 1e-6, hs, r)
                        qkv = hs @ wqkv[i].t()
                        flush.sum()
                        a = attn + qkv[:, :1].to(bf) * 0
                        splitk(a, wo[i], po, cfg_o)
                        hs2, r2 = torch.empty_like(out), torch.empty_like(res)
                        add_partials_rms_norm(po, r, norms[2 * i + 1], 1e-6, hs2, r2)
                        gu = hs2 @ wgu[i].t()
                        if fuse_silu:
                            pd_ = pd
                            splitk(gu, wd[i], pd_, cfg_d, silu=True)
                        else:
                            pd_ = torch.empty(cfg_d0[3], m, h, device=dev, dtype=torch.float32)
                            splitk(silu_and_mul(gu), wd[i], pd_, cfg_d0)
                        r_prev = r2
                    final, _ = torch.empty_like(out), torch.empty_like(res)
                    add_partials_rms_norm(pd_, r_prev, norms[0], 1e-6, final, _)
                    outs["fused" if fuse_silu else "split"] = final
                return run

            t_flush = time_call(lambda: [flush.sum() for _ in range(layers)], 3)
            t_a = time_call(cublas, 3) - t_flush
            t_b = time_call(split(True), 3) - t_flush
            t_c = time_call(split(False), 3) - t_flush
            err = max((outs[v].float() - outs["cublas"].float()).abs().max().item() for v in ("fused", "split"))
            print(f"{size} m={m:4d}: a step's layers less the flush: cuBLAS {t_a * 1e6:7.1f} us, split-K o/down "
                  f"with SiLU in down's loads {t_b * 1e6:7.1f} ({(t_b - t_a) * 1e6:+.1f}), split-K without "
                  f"{t_c * 1e6:7.1f} ({(t_c - t_a) * 1e6:+.1f}); per GEMM (us): o cuBLAS {t_co * 1e6:.1f} split "
                  f"{t_o * 1e6:.1f} {cfg_o}, down cuBLAS+SiLU {t_cd * 1e6:.1f} split+SiLU {t_d * 1e6:.1f} "
                  f"{cfg_d}, split alone {t_d0 * 1e6:.1f} {cfg_d0}; max |diff| of the last norm {err:.3g}",
                  flush=True)


if __name__ == "__main__":
    main()
