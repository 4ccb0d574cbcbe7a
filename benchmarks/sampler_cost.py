"""GPU cost of one sampling step per setting: Qwen3's vocabulary, bench.py's batch, bfloat16 logits.

    python benchmarks/sampler_cost.py            # 256 rows
    python benchmarks/sampler_cost.py --rows 64

Each step builds its SamplingTensors on the host as the runner does, then samples; the figure is the mean time
of a step after three warm-up steps (which compile), CUDA events around 50 steps. Settings without a top_k cap
are timed twice: by thresholds (what the GPU runs) and with the full sort (what the CPU runs), an A/B.
"""
import argparse

import torch

from nanovllm import SamplingParams
from nanovllm.layers.sampler import sample, sampling_tensors

SETTINGS = {
    "temperature 0.6": SamplingParams(temperature=0.6),
    "greedy": SamplingParams(temperature=0),
    "+ top_k 20, top_p 0.95": SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
    "+ min_p 0.05": SamplingParams(temperature=0.6, min_p=0.05),
    "+ top_p 0.95": SamplingParams(temperature=0.6, top_p=0.95),
    "+ top_k 50 | top_p 0.9 rows": [SamplingParams(temperature=0.6, top_k=50),
                                    SamplingParams(temperature=1, top_p=0.9)],
    "+ repetition_penalty 1.1": SamplingParams(temperature=0.6, repetition_penalty=1.1),
    "+ logprobs 5": SamplingParams(temperature=0.6, logprobs=5),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this measures the sampler on a CUDA GPU; torch sees none")
    if args.rows < 1 or args.vocab < 2:
        p.error(f"--rows must be >= 1 and --vocab >= 2, got {args.rows} and {args.vocab}")
    device = torch.device("cuda")
    logits = torch.randn(args.rows, args.vocab, device=device).to(torch.bfloat16)
    counts = torch.zeros(args.rows, args.vocab, dtype=torch.int32, device=device)
    mask = torch.zeros(args.rows, args.vocab, dtype=torch.bool, device=device)
    seeds, positions = list(range(args.rows)), [100] * args.rows
    for (name, sp), by_sort in [(item, by_sort) for item in SETTINGS.items() for by_sort in (False, True)]:
        rows = [sp[i % len(sp)] for i in range(args.rows)] if isinstance(sp, list) else [sp] * args.rows
        t = sampling_tensors(rows, seeds, positions, device, output_counts=counts, prompt_mask=mask)
        if by_sort and not t.by_thresholds:
            continue
        name += " (full sort)" if by_sort else ""

        def step():
            t = sampling_tensors(rows, seeds, positions, device, output_counts=counts, prompt_mask=mask)
            t.by_thresholds &= not by_sort
            return sample(logits, t)
        with torch.inference_mode():  # as the runner samples
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                step()
            end.record()
            torch.cuda.synchronize()
        print(f"{name:40s} {start.elapsed_time(end) / 50 * 1000:9.0f} us per step ({args.rows} rows)")


if __name__ == "__main__":
    main()
