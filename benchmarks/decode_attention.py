"""The triton backend's paged decode attention kernel alone, at bench.py's decode shapes, against the GPU's read
bandwidth.

    python benchmarks/decode_attention.py                          # Qwen3-0.6B heads, bf16 and fp8 caches
    python benchmarks/decode_attention.py --heads 32 --kv-heads 8  # Qwen3-8B heads
    python benchmarks/decode_attention.py --sweep --kv-cache-dtypes fp8_e4m3   # 27 tiles around the kernel's own

bench.py's workload (seed 0: 256 sequences, prompts and outputs of 100-1024 tokens) decodes, at step s, every
sequence whose output is longer than s, each with its prompt and s + 1 tokens in the cache. For each step given
this times one decode_attention call (one layer, replayed from a CUDA graph as the engine runs it) over that batch,
with the sequences' pages shuffled over a cache as large as the bench's, and reports the bytes of K and V the call
must read divided by its time, next to torch.sum over 2 GiB (a plain read of HBM). Tile configurations of the
Triton kernel next to the engine's own choice (for an fp8 cache the Gluon kernel, kernels/gluon_decode.py) are
timed in the same run, each against it. The cache is laid out as the triton backend allocates it
(engine/kv_cache.py: head-major blocks, and key-major values for an fp8 cache where a tile fits in a page).

The default steps sample the whole decode phase every 200 steps (256 sequences at step 50 down to 4 at step 1000),
so their sum weighs large and small batches about as bench.py's run does. A configuration faster here is still to
be confirmed with bench.py: on 2026-12-01, 64-key tiles took 1.5-2% less time here (bf16 cache; the steps were 50,
300, 550 and 800 then, without the run's tail of small batches) and made bench.py's 0.6B run 1.5-3% slower.
"""
import argparse
import random
from dataclasses import replace

import torch

from nanovllm.kernels.attention import TileConfig, decode_attention, decode_config
from nanovllm.layers.backends.triton_attn import TritonBackend
from nanovllm.layers.kv_quant import FP8_DTYPE


def add_shape_args(p: argparse.ArgumentParser):
    """The attention shape flags (defaults: Qwen3-0.6B's heads, the engine's 256-slot pages)."""
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=256)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--num-pages", type=int, default=4485, help="cache pages (the 0.6B bench's bf16 cache: 4485)")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 250, 450, 650, 850, 1000])
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "fp8_e4m3"], choices=["auto", "fp8_e4m3"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true",
                   help="time a grid of tiles instead (32-128 keys, 2-8 warps, 2-4 stages; longest first)")
    return p.parse_args()


def bench_lengths() -> tuple[list[int], list[int]]:
    """The prompt and output lengths of bench.py's default workload (its random draws, in its order: each
    prompt's length, then its tokens; then every output length)."""
    rng = random.Random(0)
    prompt_lens = []
    for _ in range(256):
        n = rng.randint(100, 1024)
        for _ in range(n):
            rng.randint(0, 10000)
        prompt_lens.append(n)
    return prompt_lens, [rng.randint(100, 1024) for _ in range(256)]


def bench_batches(steps: list[int]) -> list[list[int]]:
    """Context lengths of the sequences decoding at each step of bench.py's default workload."""
    prompt_lens, output_lens = bench_lengths()
    return [[p + s + 1 for p, o in zip(prompt_lens, output_lens) if o > s] for s in steps]


def make_case(lens: list[int], args, dtype: torch.dtype, fp8: bool, gen: torch.Generator):
    page = args.page_size
    pages_needed = [-(-n // page) for n in lens]
    width = max(pages_needed)
    perm = torch.randperm(args.num_pages, generator=gen)
    assert sum(pages_needed) <= args.num_pages, "cache too small for this batch"
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_needed):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    shape = (args.num_pages, page, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    scales = None
    if fp8:
        k_cache, v_cache = k_cache.to(FP8_DTYPE), v_cache.to(FP8_DTYPE)
        scales = (torch.full((args.kv_heads,), 0.05, device="cuda"), torch.full((args.kv_heads,), 0.05, device="cuda"))
    # head-major blocks: [pages, kv_heads, page, head_dim] in memory, seen as [pages, page, kv_heads, head_dim]
    k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    run = key_major_values(args, dtype, fp8)
    if run:  # runs of `run` keys, [runs, kv_heads, head_dim, run] in memory, seen as value blocks of `run` slots
        runs = v_cache.reshape(args.num_pages * page // run, run, args.kv_heads, args.head_dim)
        v_cache = runs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    q = torch.randn(len(lens), args.heads, args.head_dim, dtype=dtype, device="cuda")
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device="cuda"), tables.cuda(), scales


def key_major_values(args, dtype: torch.dtype, fp8: bool) -> int:
    """The triton backend's choice for these shapes on this GPU: keys per key-major run of V (0: not key-major)."""
    return TritonBackend(torch.device("cuda", torch.cuda.current_device())).key_major_values(
        args.page_size, args.head_dim, dtype, "fp8_e4m3" if fp8 else "auto", args.heads // args.kv_heads)


def time_call(fn, iters: int) -> float:
    """Seconds per call on the GPU: iters calls captured in one CUDA graph, the best of three replays. (Launched
    from Python one by one, a small batch's call is bound by the launch: 65-120 us against 11.5 us on the GPU for
    bench.py's last decode steps, varying from run to run, which swamped the kernels' differences.)"""
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return best


def time_variant(name: str, call, reference, iters: int, line: list[str]):
    """(output, seconds a call, max difference from reference, or from itself without one), or None with a line
    saying why when the call fails (e.g. a tile too large for shared memory)."""
    try:
        out = call()
    except Exception as e:
        line.append(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return None
    diff = (out.float() - (out if reference is None else reference).float()).abs().max().item()
    return out, time_call(call, iters), diff


def read_bandwidth() -> float:
    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda").fill_(1)
    seconds = time_call(lambda: x.sum(), 20)
    del x
    return 2 ** 31 / seconds


def variants(cfg: TileConfig) -> dict[str, TileConfig]:
    """The kernel's own tile configuration first, then neighbours of it."""
    out = {
        "default": cfg,
        "longest first": cfg,
        "longest first (argsort in the call)": cfg,
        "3 stages": TileConfig(cfg.block_m, cfg.block_n, cfg.num_warps, 3),
        "half the keys, 3 stages": TileConfig(cfg.block_m, cfg.block_n // 2, cfg.num_warps, 3),
        "8 warps": TileConfig(cfg.block_m, cfg.block_n, 8, cfg.num_stages),
        "longest first, Triton kernel": cfg,
    }
    if cfg.max_registers is not None:
        out["no register cap"] = replace(cfg, max_registers=None)
    return out


# the variants that run as the engine does (no config, kernel="auto": the Gluon kernel for an fp8 cache on the GPU,
# see kernels/gluon_decode.py); every other variant is a tile of the Triton kernel and runs it
AUTO = ("default", "longest first", "longest first (argsort in the call)")


def sweep_variants(cfg: TileConfig) -> dict[str, TileConfig]:
    """The kernel's own configuration, then a grid of tiles, all with the engine's longest-first order."""
    out = {"longest first": cfg, "longest first, Triton kernel": cfg}
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (2, 3, 4):
                out[f"longest first, {block_n} keys, {warps} warps, {stages} stages"] = \
                    TileConfig(cfg.block_m, block_n, warps, stages)
    return out


def main():
    args = parse_args()
    dtype = torch.bfloat16
    bandwidth = read_bandwidth()
    print(f"torch.sum over 2 GiB: {bandwidth / 1e9:,.0f} GB/s")
    batches = bench_batches(args.steps)
    gen = torch.Generator().manual_seed(0)
    scale = args.head_dim ** -0.5
    for kv_dtype in args.kv_cache_dtypes:
        fp8 = kv_dtype == "fp8_e4m3"
        cfg = decode_config(args.head_dim, args.heads // args.kv_heads, dtype, fp8,
                            bool(key_major_values(args, dtype, fp8)))
        totals: dict[str, float] = {}
        failed: set[str] = set()
        total_bytes = 0
        for step, lens in zip(args.steps, batches):
            q, k_cache, v_cache, context_lens, tables, scales = make_case(lens, args, dtype, fp8, gen)
            kv_bytes = 2 * sum(lens) * args.kv_heads * args.head_dim * k_cache.element_size()
            total_bytes += kv_bytes
            ks, vs = scales if fp8 else (None, None)
            reference = None
            line = [f"{kv_dtype} step {step:4d} batch {len(lens):3d} ({kv_bytes / 1e9:.2f} GB):"]
            longest_first = torch.argsort(context_lens, descending=True)
            for name, config in (sweep_variants(cfg) if args.sweep else variants(cfg)).items():
                ordered, sort_in_call = name.startswith("longest first"), name.endswith("(argsort in the call)")

                def call():
                    order = None
                    if ordered:
                        order = torch.argsort(context_lens, descending=True) if sort_in_call else longest_first
                    # the engine's own choice takes no config (a config means the Triton kernel's tiles)
                    auto = name in AUTO
                    return decode_attention(q, k_cache, v_cache, context_lens, tables, scale,
                                            None if auto else config, None, ks, vs, order,
                                            kernel="auto" if auto else "triton")
                timed = time_variant(name, call, reference, args.iters, line)
                if timed is None:
                    failed.add(name)
                    continue
                out, seconds, diff = timed
                reference = out if reference is None else reference
                totals[name] = totals.get(name, 0.0) + seconds
                line.append(f"  {name}: {seconds * 1e6:.0f} us {kv_bytes / seconds / 1e9:,.0f} GB/s "
                            f"(max diff {diff:.1e})")
            print("\n".join(line))
            del q, k_cache, v_cache
        base = next(iter(totals.values()))
        for name, seconds in totals.items():
            if name in failed:
                continue
            gbs = total_bytes / seconds
            print(f"{kv_dtype} all steps, {name}: {seconds * 1e6:.0f} us, {gbs / 1e9:,.0f} GB/s, "
                  f"{gbs / bandwidth:.1%} of torch.sum's read, {base / seconds:.3f}x the first")


if __name__ == "__main__":
    main()
