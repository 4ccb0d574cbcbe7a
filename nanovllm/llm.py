from nanovllm.engine.data_parallel import check_data_parallel_size
from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The user-facing entry point: `LLM(model_path, **options).generate(prompts, sampling_params)`; also a
    context manager (`with LLM(path) as llm:` calls exit()). With `data_parallel_size=N > 1` it builds a
    DataParallelLLM instead: N engines on Ray (the [ray] extra)."""

    def __new__(cls, model: str, data_parallel_size: int = 1, **options):
        if check_data_parallel_size(data_parallel_size) == 1:
            return super().__new__(cls)
        from nanovllm.engine.data_parallel import DataParallelLLM
        return DataParallelLLM(model, data_parallel_size=data_parallel_size, **options)

    def __init__(self, model: str, data_parallel_size: int = 1, **options):
        super().__init__(model, **options)
