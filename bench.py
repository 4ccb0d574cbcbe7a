r"""Throughput benchmark, nano-vllm's workload by default.

    python bench.py                      # dummy Qwen3-0.6B weights, 256 sequences (needs a GPU to be quick)
    python bench.py --size 8B            # dummy Qwen3-8B
    python bench.py --model PATH         # a real local checkpoint ("--model demo": the embedded demo model)
    python bench.py --size tiny --num-seqs 8 --max-input-len 64 --max-output-len 32   # a CPU smoke run
    python bench.py --data-parallel-size 2   # two replicas on Ray (the [ray] extra), 2 x 256 sequences
    python bench.py --top-p 0.95 --top-k 20  # Qwen3's recommended filters on every request

    # decode throughput at fixed batch sizes: N prompts of --max-input-len tokens, --max-output-len new tokens each
    python bench.py --device cpu --model demo --dtype bfloat16 --enforce-eager --temperature 0 \
        --decode-batch 1 64 --max-input-len 150 --max-output-len 32

Without --model the weights are random ("dummy") on the real architecture, so a fresh machine benchmarks
without any download; throughput does not depend on the weights' values.

Prefill and decode tok/s come from a run driven one step at a time (LLM.step), each step timed. On the CPU that is
the only run (its steps cannot overlap anyway); on a GPU the headline is `generate()` with overlapped steps and
`--phases` adds the step-by-step run. `--kernels` runs the headline under the torch profiler instead and splits its
GPU time by kind of kernel (attention, GEMMs, norms, ...), with the idle time between kernels and the bandwidth at
which decode attention read the KV cache.
"""
import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from random import Random, randint, seed

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import load_hf_config
from nanovllm.engine.kv_cache import block_bytes

QWEN3_COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
                    max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                    rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
SIZES = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    # a toy of the same shape family, for CPU smoke runs
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, head_dim=32, vocab_size=10240,
                 bos_token_id=10238, eos_token_id=10239),
}


def dummy_model_folder(size: str) -> str:
    folder = tempfile.mkdtemp(prefix=f"nanovllm-bench-{size}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**QWEN3_COMMON, **SIZES[size]}, f)
    return folder


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face model folder, or 'demo' for the embedded demo model "
                                    "(default: dummy weights, see --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="0.6B", help="Qwen3 shape for dummy weights")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--min-len", type=int, default=100, help="lower bound of prompt and output lengths")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--data-parallel-size", "--dp", type=int, default=1,
                   help="engine replicas on Ray; the workload grows with them (N x --num-seqs sequences)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--custom-all-reduce", action="store_true",
                   help="tensor parallel: decode-sized all-reduces over symmetric memory (disable_custom_all_reduce="
                        "False) instead of NCCL")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", help='"fp8_e4m3": an fp8 KV cache (twice the tokens)')
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="read each step's tokens back before scheduling the next (no overlap)")
    p.add_argument("--num-kvcache-blocks", type=int, default=-1, help="-1: sized by the engine")
    p.add_argument("--kvcache-block-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    p.add_argument("--decode-batch", type=int, nargs="+", metavar="N",
                   help="decode throughput at these batch sizes: N prompts of exactly --max-input-len tokens, "
                        "exactly --max-output-len new tokens each (EOS ignored)")
    p.add_argument("--phases", action="store_true", help="GPU: also time prefill and decode steps apart")
    p.add_argument("--profile", action="store_true", help="split the time into host launching and GPU (CUDA)")
    p.add_argument("--kernels", action="store_true",
                   help="GPU: the headline run under the torch profiler, its GPU time by kind of kernel (rank 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for every request (vLLM's meaning)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling for every request (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="for every request (1 = off)")
    p.add_argument("--no-mixed-steps", action="store_true", help="nano-vllm's prefill-first steps")
    args = p.parse_args()
    for name in ("num_seqs", "max_input_len", "max_output_len", "min_len", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_input_len + args.max_output_len > args.max_model_len:
        p.error(f"--max-input-len {args.max_input_len} + --max-output-len {args.max_output_len} exceeds "
                f"--max-model-len {args.max_model_len}")
    try:  # the sampling settings every request gets
        SamplingParams(**sampling_settings(args))
    except (ValueError, TypeError) as e:
        p.error(str(e))
    if args.data_parallel_size > 1 and (args.profile or args.phases or args.decode_batch or args.kernels):
        p.error("--profile, --phases, --kernels and --decode-batch time one engine in this process: use "
                "--data-parallel-size 1")
    if args.kernels and (args.profile or args.decode_batch):
        p.error("--kernels profiles the headline run alone: leave out --profile and --decode-batch")
    if args.profile and args.decode_batch:
        p.error("--profile splits the headline run's time: leave out --decode-batch")
    if args.decode_batch and min(args.decode_batch) < 1:
        p.error(f"--decode-batch sizes must be >= 1, got {args.decode_batch}")
    if args.decode_batch and args.max_output_len < 2:
        p.error(f"--decode-batch needs --max-output-len >= 2 (one prefill token, then decode), "
                f"got {args.max_output_len}")
    return args


class StepProfile:
    """Where the time goes: host time spent launching steps (preparing inputs, queuing the model and the
    sampler) and the model's own time on the GPU (CUDA events), for prefill and decode steps."""

    def __init__(self, llm):
        self.rows = []  # (is_prefill, host seconds, start event, end event, batch size)
        runner = llm.executor.runner
        launch, run_model = runner.launch, runner.run_model

        def timed_launch(step):
            t = time.perf_counter()
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            out = launch(step)
            self.rows.append((step.kind.value == "prefill", time.perf_counter() - t, *self._events, len(step)))
            return out

        def timed_run_model(*args):
            self._events[0].record()
            out = run_model(*args)
            self._events[1].record()
            return out

        runner.launch, runner.run_model = timed_launch, timed_run_model

    def report(self, total: float):
        for phase in (True, False):
            rows = [r for r in self.rows if r[0] == phase]
            if rows:
                host = sum(r[1] for r in rows)
                gpu = sum(r[2].elapsed_time(r[3]) for r in rows) / 1e3
                print(f"{'prefill' if phase else 'decode '}: {len(rows)} steps, model on GPU {gpu:.2f}s, "
                      f"host launching {host:.2f}s, mean batch {sum(r[4] for r in rows) / len(rows):.0f}")
        print(f"wall {total:.2f}s")


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    sampling_params: list[SamplingParams]

    @property
    def output_tokens(self) -> int:
        return sum(sp.max_tokens for sp in self.sampling_params)


def sampling_settings(args) -> dict:
    """The sampling options every request of the run gets."""
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty)


def random_workload(args, vocab_size: int) -> Workload:
    """nano-vllm's workload (its draws, in its order), data_parallel_size times over; token ids below 10,000 (below
    the vocabulary's size for a smaller one)."""
    seed(0)
    lo = min(args.min_len, args.max_input_len, args.max_output_len)
    num_seqs = args.num_seqs * args.data_parallel_size
    top = min(10000, vocab_size - 1)
    prompts = [[randint(0, top) for _ in range(randint(lo, args.max_input_len))] for _ in range(num_seqs)]
    sps = [SamplingParams(**sampling_settings(args), ignore_eos=True, max_tokens=randint(lo, args.max_output_len))
           for _ in range(num_seqs)]
    return Workload(prompts, sps)


def fixed_batch_workload(args, batch: int, vocab_size: int) -> Workload:
    rng = Random(batch)  # other tokens for each batch size, so that the prefix cache serves none of them
    top = min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(args.max_input_len)] for _ in range(batch)]
    sp = SamplingParams(**sampling_settings(args), ignore_eos=True, max_tokens=args.max_output_len)
    return Workload(prompts, [sp] * batch)


@dataclass(slots=True)
class PhaseTimes:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / max(self.decode_s, 1e-9)

    def report(self, label: str = ""):
        print(f"{label}Prefill: {self.prefill_tokens}tok in {self.prefill_s:.2f}s, "
              f"{self.prefill_tokens / max(self.prefill_s, 1e-9):.2f}tok/s | Decode: {self.decode_tokens}tok in "
              f"{self.decode_s:.2f}s ({self.decode_steps} steps, mean batch "
              f"{self.decode_tokens / max(self.decode_steps, 1):.1f}), {self.decode_tps:.2f}tok/s")


def timed_steps(llm, work: Workload) -> PhaseTimes:
    """Run the workload one step at a time (no overlap of host and device), timing prefill and decode steps."""
    for prompt, sp in zip(work.prompts, work.sampling_params):
        llm.add_request(prompt, sp)
    times = PhaseTimes()
    while not llm.is_finished():
        t = time.perf_counter()
        summary = llm.step()
        dt = time.perf_counter() - t
        if summary is None:
            continue
        if summary.kind.value == "prefill":  # a mixed step counts as prefill: it runs the varlen path
            times.prefill_tokens += summary.num_tokens
            times.prefill_s += dt
        else:
            times.decode_tokens += summary.num_tokens
            times.decode_s += dt
            times.decode_steps += 1
    return times


KERNEL_KINDS = (  # (kind, parts of kernel names, lower case): the first kind with a part in the name wins
    # flash-attn's paged kernels are its "splitkv" ones, which its prefill over cached prefixes runs too
    ("decode attention", ("_decode_split_kernel", "_decode_merge_kernel", "splitkv")),
    ("prefill attention", ("_prefill_kernel", "flash_fwd")),
    ("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce", "cublas")),
    ("all-reduce", ("nccl", "all_reduce", "allreduce", "one_shot", "two_shot", "multimem")),
    ("RMSNorm", ("_rms_norm_kernel",)),
    ("q/k norm, rotary, KV store", ("_rope_kernel", "_store_kvcache_kernel")),
    ("SiLU and mul", ("_silu_and_mul_kernel",)),
    ("sampler", ("_race_part_kernel", "_race_merge_kernel", "_thresholds_kernel", "_penalties_kernel",
                 "_noise_kernel")),
    ("step inputs", ("_stage_decode_kernel", "_fill_in_flight_kernel")),
    ("copies", ("memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(part in low for part in parts)), "other")


def decode_slots_read(prompt_lens: list[int], output_lens: list[int]) -> int:
    """KV cache slots the decode steps read when each reads every running sequence's cache once: the prefill
    samples a sequence's first token, then its decode step s (1 <= s < output len) attends over prompt + s slots."""
    return sum((n - 1) * length + (n - 1) * n // 2 for length, n in zip(prompt_lens, output_lens))


def kernel_report(kernels: list[tuple[float, float, str]], wall: float, kv_bytes_read: int) -> str:
    """kernels: (start, end, name) in microseconds, one per kernel the GPU ran in a wall of `wall` seconds."""
    kernels = sorted(kernels)
    busy, count = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["other"], 0.0), {}
    for start, end, name in kernels:
        kind = kernel_kind(name)
        busy[kind] += (end - start) / 1e6
        count[kind] = count.get(kind, 0) + 1
    total = sum(busy.values())
    lines = [f"GPU time by kind of kernel ({len(kernels)} kernels, {total:.3f}s busy of {wall:.3f}s wall):"]
    lines += [f"  {kind:28s} {t:8.3f}s {100 * t / total:5.1f}% {count[kind]:9d} kernels"
              for kind, t in sorted(busy.items(), key=lambda kv: -kv[1]) if kind in count]
    gaps = [(b[0] - a[1], a[1]) for a, b in zip(kernels, kernels[1:])]  # (length, start)
    span = (kernels[-1][1] - kernels[0][0]) / 1e6 if kernels else 0.0
    lines.append(f"between kernels: {sum(g for g, _ in gaps if 0 < g <= 2) / 1e6:.3f}s in gaps of at most 2 us, "
                 f"{sum(g for g, _ in gaps if g > 2) / 1e6:.3f}s idle in longer ones; {wall - span:.3f}s before the "
                 f"first kernel and after the last")
    tenths = [0.0] * 10
    for g, start in gaps:
        if g > 2:
            tenths[min(int((start - kernels[0][0]) / 1e6 / span * 10), 9)] += g / 1e3
    lines.append("idle in gaps over 2 us by tenth of the run (ms): " + " ".join(f"{t:.1f}" for t in tenths))
    if busy["decode attention"] > 0:
        lines.append(f"decode attention read {kv_bytes_read / 1e12:.2f} TB of KV cache (each running sequence's "
                     f"once a decode step): {kv_bytes_read / busy['decode attention'] / 1e12:.2f} TB/s")
    return "\n".join(lines)


def print_throughput(tokens: int, seconds: float, note: str = "") -> None:
    """nano-vllm's result line (scripts read it)."""
    print(f"Total: {tokens}tok, Time: {seconds:.2f}s, Throughput: {tokens / seconds:.2f}tok/s{note}")


def profiled_generate(llm, work: Workload):
    """The headline run under the torch profiler (this process: rank 0 under tensor parallelism)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        t = time.perf_counter()
        llm.generate(work.prompts, work.sampling_params, use_tqdm=False)
        torch.cuda.synchronize()
        t = time.perf_counter() - t
    print_throughput(work.output_tokens, t, " (under the profiler)")
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    slots = decode_slots_read([len(p) for p in work.prompts], [sp.max_tokens for sp in work.sampling_params])
    print(kernel_report(kernels, t, slots * block_bytes(llm.config) // llm.config.kvcache_block_size))


def timed_generate(llm, work: Workload, profile: StepProfile | None) -> float:
    t = time.perf_counter()
    llm.generate(work.prompts, work.sampling_params, use_tqdm=False)
    t = time.perf_counter() - t
    print_throughput(work.output_tokens, t)
    if profile:
        profile.report(t)
    return t


def main():
    args = parse_args()
    if args.model == "demo":
        from nanovllm.demo import DemoModelError, demo_model_path
        try:
            args.model = demo_model_path()
        except DemoModelError as e:
            raise SystemExit(f"bench.py: error: {e}")
    path = args.model or dummy_model_folder(args.size)
    max_num_seqs = max(args.max_num_seqs, *(args.decode_batch or [1]))
    t = time.perf_counter()
    try:
        llm = LLM(path, load_format="auto" if args.model else "dummy", max_model_len=args.max_model_len,
                  tensor_parallel_size=args.tensor_parallel_size, attention_backend=args.attention_backend,
                  enforce_eager=args.enforce_eager, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, device=args.device, dtype=args.dtype,
                  async_scheduling=not args.no_async_scheduling, num_kvcache_blocks=args.num_kvcache_blocks,
                  kvcache_block_size=args.kvcache_block_size, kv_cache_dtype=args.kv_cache_dtype,
                  mixed_steps=not args.no_mixed_steps, data_parallel_size=args.data_parallel_size,
                  disable_custom_all_reduce=not args.custom_all_reduce)
    except (ValueError, TypeError) as e:  # an option only the engine can check (the folder, device, dtype...)
        raise SystemExit(f"bench.py: error: {e}")
    try:
        run(llm, args, load_hf_config(path).vocab_size, time.perf_counter() - t)
    except (ValueError, TypeError) as e:  # a request the engine refuses (e.g. past a model's shorter context)
        raise SystemExit(f"bench.py: error: {e}")
    finally:
        llm.exit()


def run(llm, args, vocab_size: int, start_seconds: float):
    if args.data_parallel_size > 1:
        on_cpu = False
        print(f"{args.data_parallel_size} replicas ready in {start_seconds:.1f}s: {llm.replicas}")
    else:
        on_cpu = llm.config.device.type == "cpu"
        if on_cpu and args.kernels:
            raise ValueError("--kernels profiles CUDA kernels, and this run is on the CPU")
        if on_cpu and args.profile:
            raise ValueError("--profile times each step's share of the GPU, and this run is on the CPU")
        print(f"attention backend: {llm.executor.runner.attn_backend.name}, KV blocks: "
              f"{llm.config.num_kvcache_blocks}, device: {llm.config.device}, dtype: {llm.config.torch_dtype}, "
              f"torch threads: {torch.get_num_threads()}")
    llm.generate([[1, 2, 3, 4]] * args.data_parallel_size, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    if args.decode_batch:
        decode_tps = {}
        for batch in args.decode_batch:
            times = timed_steps(llm, fixed_batch_workload(args, batch, vocab_size))
            times.report(f"[batch {batch}] ")
            decode_tps[batch] = times.decode_tps
        base = args.decode_batch[0]
        for batch, tps in decode_tps.items():
            print(f"decode at batch {batch}: {tps:.2f}tok/s, {tps / decode_tps[base]:.2f}x batch {base}")
    else:
        work = random_workload(args, vocab_size)
        if args.kernels:
            profiled_generate(llm, work)
        elif not on_cpu:  # the headline: overlapped steps, as users run them
            timed_generate(llm, work, StepProfile(llm) if args.profile else None)
        if on_cpu or args.phases:
            times = timed_steps(llm, work)
            times.report()
            if on_cpu:
                print_throughput(work.output_tokens, times.prefill_s + times.decode_s)


if __name__ == "__main__":
    main()
