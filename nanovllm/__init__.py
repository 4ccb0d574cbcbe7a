"""nanovllm: a small, fast offline LLM inference engine (a nano-vllm clone) that also runs on the CPU."""
from importlib.metadata import PackageNotFoundError, version

from nanovllm.engine.sequence import Logprob
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "Logprob", "SamplingParams", "demo_model_path"]

try:
    __version__ = version("nanovllm")  # pyproject.toml's, when installed
except PackageNotFoundError:
    __version__ = "unknown"


def __getattr__(name: str):
    # the engine pulls in torch and transformers: import it on first use, so `python -m nanovllm.demo` is quick
    if name == "LLM":
        from nanovllm.llm import LLM
        return LLM
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")


def demo_model_path(*args, **kwargs) -> str:
    """The embedded demo model (Qwen2.5-Coder-0.5B-Instruct) as a local folder; see nanovllm.demo."""
    from nanovllm.demo import demo_model_path as build
    return build(*args, **kwargs)
