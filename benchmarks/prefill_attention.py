"""The triton backend's causal varlen prefill kernel alone, at the steps bench.py's run takes while it prefills,
against the arithmetic it does (and against flash-attn's varlen kernel where flash-attn is installed).

    python benchmarks/prefill_attention.py                          # Qwen3-0.6B heads
    python benchmarks/prefill_attention.py --heads 32 --kv-heads 8  # Qwen3-8B heads

bench.py's workload (seed 0: 256 prompts of 100-1024 tokens) is prefilled in mixed steps of at most
max_num_batched_tokens: every sequence already prefilled decodes one token, the rest of the budget goes to prompt
chunks in admission order (the scheduler's rule, nanovllm/engine/scheduler.py). A step whose sequences have no
cached keys attends to its own k and v (unpaged); later steps read every key from the paged cache. This replays
those steps, one attention layer each, from a CUDA graph, with each tile configuration in `variants`, and reports
the time of all steps and the rate of the causal products (4 * head_dim flops a query head and visible key).
"""
import argparse

import torch

from nanovllm.kernels.attention import TileConfig, decode_attention, prefill_attention, prefill_config

from decode_attention import add_shape_args, bench_lengths, time_variant


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-steps", type=int, default=0, help="time only the first N steps (0: all)")
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args()


def prefill_steps(prompt_lens: list[int], budget: int) -> list[list[tuple[int, int]]]:
    """Each step's sequences as (query tokens, keys) in the order the runner packs them: chunks, then decodes."""
    done = [0] * len(prompt_lens)  # prompt tokens prefilled
    generated = [0] * len(prompt_lens)
    admitted = 0
    steps = []
    while done[-1] < prompt_lens[-1]:
        decodes = [i for i in range(admitted) if done[i] == prompt_lens[i]]
        left = budget - len(decodes)
        chunks = []
        for i in range(len(prompt_lens)):
            if not left:
                break
            if i >= admitted:
                admitted += 1
            if done[i] < prompt_lens[i]:
                n = min(prompt_lens[i] - done[i], left)
                chunks.append((i, n))
                left -= n
        step = [(n, done[i] + n) for i, n in chunks]
        step += [(1, prompt_lens[i] + generated[i] + 1) for i in decodes]
        for i, n in chunks:
            done[i] += n
        for i in decodes:
            generated[i] += 1
        steps.append(step)
    return steps


def causal_flops(step: list[tuple[int, int]], heads: int, head_dim: int) -> int:
    pairs = sum(q * (k - q) + q * (q + 1) // 2 for q, k in step)
    return 4 * head_dim * heads * pairs


def make_step(step, args, dtype, gen):
    q_lens = torch.tensor([q for q, _ in step])
    k_lens = torch.tensor([k for _, k in step])
    cu_q = torch.zeros(len(step) + 1, dtype=torch.int32)
    cu_k = torch.zeros(len(step) + 1, dtype=torch.int32)
    cu_q[1:], cu_k[1:] = q_lens.cumsum(0), k_lens.cumsum(0)
    tokens = int(cu_q[-1])
    q = torch.randn(tokens, args.heads, args.head_dim, dtype=dtype, device="cuda", generator=gen)
    k = torch.randn(tokens, args.kv_heads, args.head_dim, dtype=dtype, device="cuda", generator=gen)
    v = torch.randn(tokens, args.kv_heads, args.head_dim, dtype=dtype, device="cuda", generator=gen)
    paged = bool((k_lens > q_lens).any())
    pages = [-(-kl // args.page_size) for kl in k_lens.tolist()]
    num_pages = sum(pages)
    # head-major blocks, as the triton backend allocates them; shuffled pages
    shape = (num_pages, args.kv_heads, args.page_size, args.head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda", generator=gen).transpose(1, 2)
    v_cache = torch.randn(shape, dtype=dtype, device="cuda", generator=gen).transpose(1, 2)
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0))
    tables = torch.full((len(step), max(pages)), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, cu_q=cu_q.cuda(), cu_k=cu_k.cuda(),
                max_q=int(q_lens.max()), max_k=int(k_lens.max()), tables=tables.cuda() if paged else None)


def variants(cfg: TileConfig) -> dict[str, TileConfig]:
    """The kernel's own tiles first; then 64 x 32 (the best of eleven on bench.py's steps, 2026-12-03)."""
    out = {"default": cfg}
    if (cfg.block_m, cfg.block_n) != (64, 32):
        out["64x32 w4 s2"] = TileConfig(64, 32, 4, 2)
    return out


def flash_attn_call(case, scale):
    """flash-attn's varlen kernel on the step (unpaged steps only: its paged form wants slot-major blocks)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    if case["tables"] is not None:
        return None
    return lambda: flash_attn_varlen_func(case["q"], case["k"], case["v"], case["cu_q"], case["cu_q"], case["max_q"],
                                          case["max_q"], softmax_scale=scale, causal=True)


def main():
    args = parse_args()
    dtype = torch.bfloat16
    steps = prefill_steps(bench_lengths()[0], args.max_num_batched_tokens)
    if args.max_steps:
        steps = steps[:args.max_steps]
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = args.head_dim ** -0.5
    cfg = prefill_config(args.head_dim, dtype)
    totals: dict[str, float] = {}
    flops_total = 0
    fa_total = fa_flops = 0.0
    for s, step in enumerate(steps):
        case = make_step(step, args, dtype, gen)
        flops = causal_flops(step, args.heads, args.head_dim)
        flops_total += flops
        line = [f"step {s}: {len(step)} seqs, {int(case['cu_q'][-1])} tokens, "
                f"{'paged' if case['tables'] is not None else 'unpaged'}, {flops / 1e9:.1f} GFLOP:"]
        reference = None
        step_seconds = {}
        for name, config in variants(cfg).items():
            def call():
                return prefill_attention(case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"],
                                         case["cu_q"], case["cu_k"], case["max_q"], case["tables"], scale, config)
            timed = time_variant(name, call, reference, args.iters, line)
            if timed is None:
                totals[name] = step_seconds[name] = float("inf")
                continue
            out, seconds, diff = timed
            reference = out if reference is None else reference
            totals[name] = totals.get(name, 0.0) + seconds
            step_seconds[name] = seconds
            line.append(f"  {name}: {seconds * 1e6:.0f} us, {flops / seconds / 1e12:.0f} TFLOP/s (max diff {diff:.1e})")
        tail = 0  # the trailing one-token rows of a step that reads the cache: the scheduler's decodes
        while case["tables"] is not None and tail < len(step) and step[-1 - tail][0] == 1:
            tail += 1
        for name, config in variants(cfg).items():
            name = f"decodes apart, {name}"
            if not tail:  # nothing to take apart: the same call
                totals[name] = totals.get(name, 0.0) + step_seconds[name.split(", ")[1]]
                continue
            # as the triton backend runs a mixed step: the chunks' rows, then the decodes through the decode kernel
            chunks, split = len(step) - tail, int(case["cu_q"][-1]) - tail
            lens = case["cu_k"][chunks + 1:] - case["cu_k"][chunks:-1]
            tables = case["tables"][chunks:].contiguous()
            order = torch.argsort(lens, descending=True, stable=True).int()

            def apart():
                out = torch.empty_like(case["q"])
                if chunks:
                    prefill_attention(case["q"][:split], case["k"][:split], case["v"][:split], case["k_cache"],
                                      case["v_cache"], case["cu_q"][:chunks + 1], case["cu_k"][:chunks + 1],
                                      case["max_q"], case["tables"], scale, config, out=out[:split])
                decode_attention(case["q"][split:], case["k_cache"], case["v_cache"], lens, tables, scale,
                                 seq_order=order, out=out[split:])
                return out
            timed = time_variant(name, apart, reference, args.iters, line)
            if timed is None:
                totals[name] = float("inf")
                continue
            _, seconds, diff = timed
            totals[name] = totals.get(name, 0.0) + seconds
            line.append(f"  {name} ({tail} rows): {seconds * 1e6:.0f} us, {flops / seconds / 1e12:.0f} TFLOP/s "
                        f"(max diff {diff:.1e})")
        fa = flash_attn_call(case, scale)
        timed = fa and time_variant("flash-attn varlen", fa, reference, args.iters, line)
        if timed:
            _, seconds, diff = timed
            fa_total += seconds
            fa_flops += flops
            line.append(f"  flash-attn varlen: {seconds * 1e6:.0f} us, {flops / seconds / 1e12:.0f} TFLOP/s "
                        f"(max diff {diff:.1e})")
        print("\n".join(line), flush=True)
        del case
    base = totals["default"]
    for name, seconds in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"all {len(steps)} steps, {name}: {seconds * 1e3:.2f} ms, {flops_total / seconds / 1e12:.0f} TFLOP/s, "
              f"{base / seconds:.3f}x the default")
    if fa_total:
        print(f"flash-attn on the unpaged steps: {fa_total * 1e3:.2f} ms, {fa_flops / fa_total / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
