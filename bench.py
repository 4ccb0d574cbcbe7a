"""Throughput benchmark, nano-vllm's workload by default.

    python bench.py                      # dummy Qwen3-0.6B weights, 256 sequences (needs a GPU to be quick)
    python bench.py --size 8B            # dummy Qwen3-8B
    python bench.py --model PATH         # a real local checkpoint
    python bench.py --size tiny --num-seqs 8 --max-input-len 64 --max-output-len 32   # a CPU smoke run
    python bench.py --data-parallel-size 2   # two replicas on Ray (the [ray] extra), 2 x 256 sequences

Without --model the weights are random ("dummy") on the real architecture, so a fresh machine benchmarks
without any download; throughput does not depend on the weights' values.
"""
import argparse
import json
import os
import tempfile
import time
from random import randint, seed

from nanovllm import LLM, SamplingParams

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
    p.add_argument("--model", help="local Hugging Face model folder (default: dummy weights, see --size)")
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
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", help='"fp8_e4m3": an fp8 KV cache (twice the tokens)')
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="read each step's tokens back before scheduling the next (no overlap)")
    p.add_argument("--profile", action="store_true", help="split the time into host launching and GPU (CUDA)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for every request (vLLM's meaning)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling for every request (0 = off)")
    p.add_argument("--no-mixed-steps", action="store_true", help="nano-vllm's prefill-first steps")
    args = p.parse_args()
    if args.profile and args.data_parallel_size > 1:
        p.error("--profile times one engine in this process: use it with --data-parallel-size 1")
    return args


class StepProfile:
    """Where the time goes: host time spent launching steps (preparing inputs, queuing the model and the
    sampler) and the model's own time on the GPU (CUDA events), for prefill and decode steps."""

    def __init__(self, llm):
        import torch
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


def main():
    args = parse_args()
    seed(0)
    lo = min(args.min_len, args.max_input_len, args.max_output_len)
    num_seqs = args.num_seqs * args.data_parallel_size
    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(lo, args.max_input_len))]
                        for _ in range(num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, top_p=args.top_p, top_k=args.top_k, ignore_eos=True,
                                      max_tokens=randint(lo, args.max_output_len))
                       for _ in range(num_seqs)]
    path = args.model or dummy_model_folder(args.size)
    t = time.perf_counter()
    llm = LLM(path, load_format="auto" if args.model else "dummy", max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, attention_backend=args.attention_backend,
              enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, device=args.device, dtype=args.dtype,
              async_scheduling=not args.no_async_scheduling, data_parallel_size=args.data_parallel_size,
              mixed_steps=not args.no_mixed_steps, kv_cache_dtype=args.kv_cache_dtype)
    if args.data_parallel_size > 1:
        print(f"LLM() ready in {time.perf_counter() - t:.1f}s ({args.data_parallel_size} replicas: {llm.replicas})")
    else:
        print(f"LLM() ready in {time.perf_counter() - t:.1f}s (attention backend: "
              f"{llm.executor.runner.attn_backend.name}, KV blocks: {llm.config.num_kvcache_blocks})")
    llm.generate([[1, 2, 3, 4]] * args.data_parallel_size, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    profile = StepProfile(llm) if args.profile else None
    t = time.perf_counter()
    llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
    t = time.perf_counter() - t
    total_tokens = sum(sp.max_tokens for sp in sampling_params)
    print(f"Total: {total_tokens}tok, Time: {t:.2f}s, Throughput: {total_tokens / t:.2f}tok/s")
    if profile:
        profile.report(t)
    llm.exit()


if __name__ == "__main__":
    main()
