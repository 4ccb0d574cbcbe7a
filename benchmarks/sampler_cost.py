"""GPU cost of one sampling step per setting: Qwen3's vocabulary, bench.py's batch, bfloat16 logits.

    python benchmarks/sampler_cost.py            # 256 rows
    python benchmarks/sampler_cost.py --rows 64

Each step builds its SamplingTensors on the host as the runner does, then samples; the figure is the mean time
of a step after three warm-up steps (which compile), CUDA events around 50 steps.
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
    "+ top_p 0.95 (full sort)": SamplingParams(temperature=0.6, top_p=0.95),
    "+ repetition_penalty 1.1": SamplingParams(temperature=0.6, repetition_penalty=1.1),
    "+ logprobs 5": SamplingParams(temperature=0.6, logprobs=5),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    args = p.parse_args()
    device = torch.device("cuda")
    logits = torch.randn(args.rows, args.vocab, device=device).to(torch.bfloat16)
    counts = torch.zeros(args.rows, args.vocab, dtype=torch.int32, device=device)
    mask = torch.zeros(args.rows, args.vocab, dtype=torch.bool, device=device)
    seeds, positions = list(range(args.rows)), [100] * args.rows
    for name, sp in SETTINGS.items():
        def step():
            t = sampling_tensors([sp] * args.rows, seeds, positions, device, output_counts=counts, prompt_mask=mask)
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
        print(f"{name:28s} {start.elapsed_time(end) / 50 * 1000:9.0f} us per step ({args.rows} rows)")


if __name__ == "__main__":
    main()
