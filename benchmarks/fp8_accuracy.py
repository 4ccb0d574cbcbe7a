"""Accuracy cost of the fp8 KV cache on the embedded demo model (Qwen2.5-Coder-0.5B-Instruct), bf16 on the CPU.

    python benchmarks/fp8_accuracy.py                 # calibrated scales (the engine's default)
    python benchmarks/fp8_accuracy.py --fixed-scale 1 # every scale 1.0 (vLLM's default without calibration)

Two engines, one with a bf16 KV cache and one with an fp8 cache, each generate greedily from the same chat
prompts (128 tokens, EOS ignored so every prompt gives 128). Reported:
  - the share of positions whose greedy token equals the bf16-KV run's, and where each prompt first diverges
    (after a first difference the texts go their own ways; --noise-floor shows what bf16's own batch-shape
    rounding does to that share);
  - teacher-forced: both runs' token sequences are scored by both engines (one prefill each over prompt +
    completion; with an fp8 cache a prefill attends to exactly what the cache would hold), giving the logprob of
    every chosen token under each cache; the mean |logprob_fp8 - logprob_bf16| over all those tokens, and the
    share of positions where the two engines' argmax agree.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from nanovllm import LLM, SamplingParams
from nanovllm.demo import demo_model_path
from nanovllm.utils.context import Context, forward_context

PROMPTS = [
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring and tests.",
    "Explain the difference between a process and a thread, with an example in C.",
    "Implement a binary search tree in JavaScript with insert, delete and in-order traversal.",
    "Write a SQL schema for a library (books, members, loans) and a query for overdue loans.",
    "How does Python's garbage collector handle reference cycles? Show a short example.",
    "Write a Rust function that parses a CSV line into fields, handling quoted commas.",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the demo model, built on first use)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--fixed-scale", type=float, help="replace every calibrated K/V scale by this value")
    p.add_argument("--noise-floor", action="store_true",
                   help="also run the bf16-KV engine on one prompt at a time: how far greedy runs drift apart "
                        "from batch-shape rounding alone")
    args = p.parse_args()
    if not 1 <= args.num_prompts <= len(PROMPTS):
        p.error(f"--num-prompts must be in 1..{len(PROMPTS)} (the prompts this script has), got {args.num_prompts}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.fixed_scale is not None and not args.fixed_scale > 0:
        p.error(f"--fixed-scale must be > 0, got {args.fixed_scale}")
    return args


def chat_token_ids(llm: LLM, text: str) -> list[int]:
    tok = llm.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    return tok.encode(rendered, add_special_tokens=False)


@torch.inference_mode()
def token_logprobs(llm: LLM, head: torch.Tensor, prompt: list[int],
                   completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each completion token, argmax at each completion position), teacher-forced in one prefill.
    Nothing is stored (slot -1), so the prefill attends to the new tokens' own K/V, as the cache would hold them."""
    model = llm.executor.runner.model
    device = llm.executor.runner.device
    ids = torch.tensor(prompt + completion, dtype=torch.int64, device=device)
    n = ids.numel()
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    with forward_context(Context(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n,
                                 slot_mapping=torch.full((n,), -1, dtype=torch.int32, device=device))):
        hidden = model(ids, torch.arange(n, device=device))
    # logits of the positions that predict the completion, in float32 so that bf16 logit rounding stays out
    rows = hidden[len(prompt) - 1:n - 1].float()
    logprobs = F.log_softmax(F.linear(rows, head), -1)
    target = torch.tensor(completion, device=device)
    return logprobs.gather(1, target[:, None])[:, 0].cpu(), logprobs.argmax(-1).cpu()


def main():
    args = parse_args()
    path = args.model or demo_model_path(progress=True)
    options = dict(dtype="bfloat16", device="cpu", enforce_eager=True, max_model_len=1024, kvcache_block_size=16)
    t0 = time.perf_counter()
    engines = {"bf16": LLM(path, **options), "fp8": LLM(path, kv_cache_dtype="fp8_e4m3", **options)}
    scales = [layer.kv_scales for layer in engines["fp8"].executor.runner.layers]
    if args.fixed_scale is not None:
        for s in scales:
            s.k.fill_(args.fixed_scale)
            s.v.fill_(args.fixed_scale)
    k_exp = sorted({int(x) for s in scales for x in torch.log2(s.k).tolist()})
    v_exp = sorted({int(x) for s in scales for x in torch.log2(s.v).tolist()})
    print(f"fp8 scales: K 2^{k_exp[0]}..2^{k_exp[-1]}, V 2^{v_exp[0]}..2^{v_exp[-1]}"
          f"{' (fixed)' if args.fixed_scale is not None else ' (calibrated)'}")

    prompts = [chat_token_ids(engines["bf16"], text) for text in PROMPTS[:args.num_prompts]]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    t1 = time.perf_counter()
    runs = {name: [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
            for name, llm in engines.items()}
    t2 = time.perf_counter()
    heads = {name: llm.executor.runner.model.lm_head.weight.float() for name, llm in engines.items()}

    equal = total = 0
    diffs, argmax_agree, argmax_total = [], 0, 0
    for i, prompt in enumerate(prompts):
        a, b = runs["bf16"][i], runs["fp8"][i]
        same = sum(x == y for x, y in zip(a, b))
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        equal, total = equal + same, total + len(a)
        for completion in (a, b):
            lp_bf16, top_bf16 = token_logprobs(engines["bf16"], heads["bf16"], prompt, completion)
            lp_fp8, top_fp8 = token_logprobs(engines["fp8"], heads["fp8"], prompt, completion)
            diffs.append((lp_fp8 - lp_bf16).abs())
            argmax_agree += int((top_fp8 == top_bf16).sum())
            argmax_total += len(completion)
        print(f"prompt {i} ({len(prompt)} tokens): {same}/{len(a)} greedy tokens equal, "
              f"first difference at {first if first is not None else '-'}")
    diffs = torch.cat(diffs)
    if args.noise_floor:
        alone = [engines["bf16"].generate([p], sp, use_tqdm=False)[0]["token_ids"] for p in prompts]
        same = sum(x == y for a, b in zip(runs["bf16"], alone) for x, y in zip(a, b))
        print(f"noise floor: bf16-KV one prompt at a time vs batched: {same}/{total} = {same / total:.1%} equal")
    print(f"greedy tokens equal to the bf16-KV run: {equal}/{total} = {equal / total:.1%}")
    print(f"teacher-forced argmax agreement: {argmax_agree}/{argmax_total} = {argmax_agree / argmax_total:.1%}")
    print(f"chosen tokens' |logprob fp8 - logprob bf16|: mean {diffs.mean():.4f}, median {diffs.median():.4f}, "
          f"p99 {diffs.quantile(0.99):.4f}, max {diffs.max():.4f} over {diffs.numel()} tokens")
    print(f"wall {time.perf_counter() - t0:.0f}s (start-up {t1 - t0:.0f}s, generation {t2 - t1:.0f}s, "
          f"scoring {time.perf_counter() - t2:.0f}s)")
    for llm in engines.values():
        llm.exit()


if __name__ == "__main__":
    main()
