"""Would a decode step's GEMMs run faster if their weights were already in L2?

A decode layer of Qwen3-0.6B reads 30 MB of weights in four small GEMMs (o, gate_up, down, then the next layer's
qkv), right after its attention kernel has streamed the batch's KV cache. Each GEMM pays a fixed latency on top of
its bytes. L2 (50 MB on the H200) holds one layer's weights; this times, graph-captured over 28 layers, the
layer's GEMMs after a streaming read that stands in for attention, with and without an L2 prefetch of the
weights issued just before that read:

    none     the read, then the GEMMs (what the engine does)
    line     a small kernel issues prefetch.global.L2::evict_last for every 128-byte line, then the read
    bulk     a small kernel issues cp.async.bulk.prefetch.L2 (Hopper) in 64 KiB pieces, evict_last policy
    bulk_n   the same with the normal eviction policy
    read     the streaming read alone (subtracted from the others)

    python benchmarks/l2_prefetch.py [--rows 16 64 128 256]
"""
import argparse

import torch
import triton
import triton.language as tl

from decode_attention import time_call


@triton.jit
def _prefetch_lines(addr_ptr, bytes_ptr, sink_ptr, BLOCK: tl.constexpr, LINES: tl.constexpr):
    t = tl.program_id(0)
    base = tl.load(addr_ptr + t)
    size = tl.load(bytes_ptr + t)
    for i in range(tl.program_id(1) * LINES, (tl.program_id(1) + 1) * LINES, BLOCK):
        offs = (i + tl.arange(0, BLOCK)).to(tl.int64) * 128
        live = (offs < size).to(tl.int32)
        r = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, live], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(sink_ptr + tl.arange(0, BLOCK), r, mask=r != 0)


@triton.jit
def _prefetch_bulk(addr_ptr, bytes_ptr, sink_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   EVICT_LAST: tl.constexpr):
    t = tl.program_id(0)
    base = tl.load(addr_ptr + t)
    size = tl.load(bytes_ptr + t)
    offs = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    n = tl.minimum(size - offs, CHUNK).to(tl.int32)
    n = tl.where(offs < size, n, 0)
    if EVICT_LAST:
        r = tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.gt.s32 p, $2, 0; "
            "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
            "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, n], dtype=tl.int32, is_pure=False, pack=1)
    else:
        r = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, n], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(sink_ptr + tl.arange(0, BLOCK), r, mask=r != 0)


class Prefetcher:
    """Prefetches a fixed list of tensors into L2 with one launch."""

    def __init__(self, tensors: list[torch.Tensor], mode: str):
        dev = tensors[0].device
        self.addr = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=dev)
        self.bytes = torch.tensor([t.numel() * t.element_size() for t in tensors], dtype=torch.int64, device=dev)
        self.sink = torch.zeros(1024, dtype=torch.int32, device=dev)
        self.mode = mode
        biggest = int(self.bytes.max())
        if mode == "line":
            self.lines = 4096
            self.grid = (len(tensors), triton.cdiv(biggest, 128 * self.lines))
        else:
            self.chunk, self.block = 64 * 1024, 32
            self.grid = (len(tensors), triton.cdiv(biggest, self.chunk * self.block))

    def __call__(self):
        if self.mode == "line":
            _prefetch_lines[self.grid](self.addr, self.bytes, self.sink, BLOCK=256, LINES=self.lines, num_warps=2)
        else:
            _prefetch_bulk[self.grid](self.addr, self.bytes, self.sink, CHUNK=self.chunk, BLOCK=self.block,
                                      EVICT_LAST=self.mode == "bulk", num_warps=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--q", type=int, default=2048)
    p.add_argument("--kv", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3072)
    p.add_argument("--kv-mb-per-row", type=float, default=2.0, help="the stand-in attention's read per batch row")
    args = p.parse_args()
    dev = torch.device("cuda")
    prop = torch.cuda.get_device_properties(dev)
    print(f"{prop.name}: {prop.multi_processor_count} SMs, L2 {prop.L2_cache_size / 2**20:.0f} MiB")
    bf = torch.bfloat16
    h, q, kv, inter, n_layers = args.hidden, args.q, args.kv, args.inter, args.layers
    layers = [dict(qkv=torch.randn(q + 2 * kv, h, device=dev, dtype=bf) * 0.02,
                   o=torch.randn(h, q, device=dev, dtype=bf) * 0.02,
                   gate_up=torch.randn(2 * inter, h, device=dev, dtype=bf) * 0.02,
                   down=torch.randn(h, inter, device=dev, dtype=bf) * 0.02) for _ in range(n_layers)]
    layer_mb = sum(w.numel() * 2 for w in layers[0].values()) / 2**20
    print(f"weights a layer: {layer_mb:.1f} MiB")
    kv_buf = torch.randn(int(max(args.rows) * args.kv_mb_per_row * 2**20 / 2), device=dev, dtype=bf)
    sink = torch.empty((), device=dev, dtype=bf)

    for rows in args.rows:
        x = torch.randn(rows, h, device=dev, dtype=bf)
        attn_in = torch.randn(rows, q, device=dev, dtype=bf)
        read = kv_buf[: int(rows * args.kv_mb_per_row * 2**20 / 2)]

        def step(mode):
            for i, w in enumerate(layers):
                nxt = layers[(i + 1) % n_layers]
                if mode not in ("none", "read"):
                    prefetchers[mode][i]()
                torch.sum(read, dim=0, out=sink)
                if mode == "read":
                    continue
                y = attn_in @ w["o"].t()
                gu = y @ w["gate_up"].t()
                d = gu[:, :inter] @ w["down"].t()
                _ = (d + x) @ nxt["qkv"].t()

        prefetchers = {m: [Prefetcher([w["o"], w["gate_up"], w["down"], layers[(i + 1) % n_layers]["qkv"]], m)
                           for i, w in enumerate(layers)] for m in ("line", "bulk", "bulk_n")}
        times = {}
        for mode in ("read", "none", "line", "bulk", "bulk_n"):
            times[mode] = time_call(lambda: step(mode), 10) * 1e6 / n_layers
        line = "  ".join(f"{m} {t - times['read']:.1f}" for m, t in times.items() if m != "read")
        print(f"rows {rows:4d}: read {times['read']:.1f} us a layer ({read.numel() * 2 / 2**20:.0f} MiB); "
              f"GEMMs on top of it, us a layer: {line}")


if __name__ == "__main__":
    main()
