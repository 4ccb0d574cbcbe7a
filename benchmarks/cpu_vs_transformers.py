"""nanovllm against transformers' own batched generate on the same chat prompts, in one process.

    # 32 code-task prompts, 128 new tokens each (EOS ignored, so both engines do the same work)
    python benchmarks/cpu_vs_transformers.py --num-prompts 32 --max-tokens 128
    # the HumanEval-sized job: 164 prompts, up to 512 new tokens, stopping at EOS, nanovllm only
    python benchmarks/cpu_vs_transformers.py --num-prompts 164 --max-tokens 512 --stop-at-eos --engines nanovllm

Defaults: the embedded demo model (Qwen2.5-Coder-0.5B-Instruct), bfloat16, the CPU, greedy. transformers gets
the whole batch at once, left-padded, with its default (SDPA) attention and dynamic KV cache.

The shared machines this runs on change speed from minute to minute (other tenants' memory traffic: a decode
step streams every weight), so `--repeats N` times each engine N times, alternating, each engine built once, and
compares the best run of each; every run's figure is printed too. nanovllm's prefix cache is off so that repeats
do the same work (transformers has none).
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from code_prompts import NUM_TASKS, code_task_messages  # noqa: E402

ENGINES = ("nanovllm", "transformers")


@dataclass(slots=True)
class Result:
    engine: str
    seconds: float
    outputs: list[list[int]]  # new token ids per prompt, up to EOS when stopping at EOS

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.outputs))

    @property
    def tps(self) -> float:
        return self.new_tokens / self.seconds


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="a local Qwen2/Qwen3 folder, or 'demo' (default)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop each sequence at EOS (default: exactly --max-tokens each, the same work for both)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--num-kvcache-blocks", type=int, default=-1,
                   help="nanovllm's KV blocks of 256 tokens (-1: as many as the batch needs)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each engine this many times, alternating, and compare the best runs (default 1)")
    p.add_argument("--progress", action="store_true", help="nanovllm's progress bar (prefill/decode tok/s)")
    args = p.parse_args()
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 1 <= args.num_prompts <= NUM_TASKS:
        p.error(f"--num-prompts must be in 1..{NUM_TASKS} (the code tasks there are), got {args.num_prompts}")
    if args.model != "demo" and not os.path.isdir(os.path.expanduser(args.model)):
        p.error(f"--model must be 'demo' or a local model folder, {args.model!r} is not a directory")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def nanovllm_runner(path: str, prompts: list[list[int]], args):
    """Build nanovllm once; return (run, close): run() times one generate over every prompt."""
    from nanovllm import LLM, SamplingParams
    block = 256
    longest = max(map(len, prompts)) + args.max_tokens
    # every sequence resident at once: the CPU default (16 max_model_len sequences) would hold back a large batch
    blocks = args.num_kvcache_blocks
    if blocks == -1:
        blocks = sum(-(-(len(p) + args.max_tokens) // block) for p in prompts)
    llm = LLM(path, dtype=args.dtype, device="cpu", enforce_eager=True, max_model_len=longest,
              max_num_seqs=len(prompts), num_kvcache_blocks=blocks, kvcache_block_size=block,
              enable_prefix_caching=False)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=not args.stop_at_eos)

    def run() -> Result:
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=args.progress)
        return Result("nanovllm", time.perf_counter() - t, [o["token_ids"] for o in outs])
    return run, llm.exit


def transformers_runner(path: str, prompts: list[list[int]], args, pad_id: int, eos_ids: list[int]):
    """Load the transformers model once; return (run, close): run() times one batched generate."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=args.max_tokens, pad_token_id=pad_id)
    if args.stop_at_eos:
        kwargs["eos_token_id"] = eos_ids
    else:
        model.generation_config.eos_token_id = None  # exactly max_new_tokens for every row
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, pad_token_id=pad_id)  # warm-up

    def run() -> Result:
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(ids, **kwargs)
            seconds = time.perf_counter() - t
        outputs = []
        for row in out[:, width:].tolist():
            if args.stop_at_eos:
                cut = next((i + 1 for i, tok in enumerate(row) if tok in eos_ids), len(row))
                row = row[:cut]
            outputs.append(row)
        return Result("transformers", seconds, outputs)
    return run, lambda: None


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from nanovllm import demo_model_path
    path = demo_model_path() if args.model == "demo" else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for m in code_task_messages(args.num_prompts)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = [tokenizer.eos_token_id] if isinstance(tokenizer.eos_token_id, int) else list(tokenizer.eos_token_id)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts)) / len(prompts):.0f} tokens on average, up to "
          f"{args.max_tokens} new tokens, {'stopping at EOS' if args.stop_at_eos else 'EOS ignored'}, {args.dtype}, "
          f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    runners = {}
    try:
        for engine in args.engines:
            runners[engine] = nanovllm_runner(path, prompts, args) if engine == "nanovllm" else \
                transformers_runner(path, prompts, args, pad_id, eos_ids)
        best: dict[str, Result] = {}
        for i in range(args.repeats):
            for engine, (run, _) in runners.items():
                r = run()
                if engine not in best or r.seconds < best[engine].seconds:
                    best[engine] = r
                print(f"{engine:>12}: {r.new_tokens} new tokens in {r.seconds:.1f}s = {r.tps:.2f} tok/s "
                      f"(run {i + 1}/{args.repeats}, load average now: {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for _, close in runners.values():
            close()
    results = best
    if args.repeats > 1:
        for engine, r in results.items():
            print(f"{engine:>12}: best of {args.repeats}: {r.tps:.2f} tok/s")
    if len(results) == 2:
        ours, theirs = results["nanovllm"], results["transformers"]
        print(f"nanovllm / transformers throughput{' (best runs)' if args.repeats > 1 else ''}: "
              f"{ours.tps / theirs.tps:.2f}x")
        # bf16 greedy paths part ways once batching and padding round differently; report how long they agree
        agree = [common_prefix(a, b) for a, b in zip(ours.outputs, theirs.outputs)]
        print(f"identical outputs: {sum(a == b for a, b in zip(ours.outputs, theirs.outputs))}/{len(agree)}, "
              f"mean common prefix {sum(agree) / len(agree):.0f} tokens")


if __name__ == "__main__":
    main()
