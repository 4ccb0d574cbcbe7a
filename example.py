"""nano-vllm's example: two chat prompts through the engine.

    python example.py                         # the embedded demo model (converted on the first run, ~2 min)
    python example.py --stream                # print the text as it is generated
    python example.py --model ~/huggingface/Qwen3-0.6B --max-tokens 128 --temperature 0
"""
import argparse
import math
import os

from nanovllm import LLM, SamplingParams

PROMPTS = ["introduce yourself", "list all prime numbers within 100"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < math.inf:  # written this way so that NaN is refused too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a local Hugging Face folder of a Qwen3 or Qwen2 model (default: the embedded demo model)")
    parser.add_argument("--max-tokens", type=_positive_int, default=256, help="new tokens per prompt (default 256)")
    parser.add_argument("--temperature", type=_temperature, default=0.6, help="sampling temperature (default 0.6)")
    parser.add_argument("--stream", action="store_true", help="print each answer as its tokens arrive")
    parser.add_argument("--dtype", default="bfloat16",
                        help="weights and activations dtype (default bfloat16, the checkpoint's own: on the CPU "
                             "it reads half the bytes of float32 per token; 'auto' = float32 on CPU)")
    args = parser.parse_args()
    if args.model is not None:
        args.model = os.path.expanduser(args.model)
        if not os.path.isdir(args.model):
            parser.error(f"--model must be a local model folder, {args.model!r} is not a directory")
    return args


def build(args) -> LLM:
    """The engine, or a one-line error (as argparse gives) for what only the engine can check: the model
    folder's contents, the dtype, the demo model's packages."""
    from nanovllm.demo import DemoModelError, demo_model_path
    try:
        return LLM(args.model or demo_model_path(), enforce_eager=True, tensor_parallel_size=1, dtype=args.dtype)
    except (ValueError, TypeError, DemoModelError) as e:
        raise SystemExit(f"example.py: error: {e}")


def main() -> None:
    args = parse_args()
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    sampling_params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    with build(args) as llm:
        try:  # what the engine or the tokenizer refuses (a max_tokens past the model's context, no chat template)
            if args.stream:
                stream_chats(llm, conversations, sampling_params)
                return
            outputs = llm.chat(conversations, sampling_params)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"example.py: error: {e}")
    for conversation, output in zip(conversations, outputs):
        print("\n")
        print(f"Prompt: {conversation[0]['content']!r}")
        print(f"Completion: {output['text']!r}")


def stream_chats(llm: LLM, conversations: list[list[dict]], sampling_params: SamplingParams) -> None:
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer: the example chats in text (give one with a folder "
                         "that holds tokenizer files)")
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        print(f"\n\nPrompt: {prompt!r}\nCompletion: ", end="", flush=True)
        for event in llm.stream([tokenizer.encode(prompt, add_special_tokens=False)], sampling_params):
            print(event["text"], end="", flush=True)
    print()


if __name__ == "__main__":
    main()
