from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The user-facing entry point: `LLM(model_path, **options).generate(prompts, sampling_params)`; also a
    context manager (`with LLM(path) as llm:` calls exit())."""
