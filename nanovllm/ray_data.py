"""Batch inference with Ray Data: one engine per actor of a `map_batches` stage.

    process = build_processor(model, sampling_params=dict(temperature=0, max_tokens=128), concurrency=4)
    results = process(ray.data.read_parquet("prompts.parquet"))   # adds generated_text, token_ids, finish_reason

The dataset has a `prompt` column (text or token ids) or a `messages` column (chat conversations, rendered with
the tokenizer's chat template and the generation prompt). Needs the [ray] extra.
"""
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from nanovllm.engine.data_parallel import connect_ray, driver_config, import_ray, wants_gpu
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

OUTPUT_COLUMNS = ("generated_text", "token_ids", "finish_reason")


def as_sampling_params(value: SamplingParams | dict | None) -> SamplingParams | None:
    """None: the model folder's defaults (generation_config.json), as in generate(). One completion per row: the
    output columns have room for one."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = SamplingParams(**value)
    if not isinstance(value, SamplingParams):
        raise TypeError(f"sampling_params must be SamplingParams, a dict of its fields or None, "
                        f"got {type(value).__name__}")
    if value.n != 1:
        raise ValueError(f"a Ray Data processor writes one completion per row: n must be 1, got {value.n} (repeat "
                         "the rows, with seeds, for more)")
    return value


class LLMProcessor:
    """A `map_batches` class: `ds.map_batches(LLMProcessor, fn_constructor_kwargs=dict(model=..., **options),
    concurrency=N, num_gpus=tp, batch_size=...)`. Reads `prompt` or `messages`, adds the output columns."""

    def __init__(self, model: str, sampling_params: SamplingParams | dict | None = None, **options):
        # torch's CPU threads follow OMP_NUM_THREADS, which Ray sets to the actor's num_cpus
        self.sampling_params = as_sampling_params(sampling_params)
        self.engine = LLM(model, **options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        outputs = self.engine.generate(self._prompts(batch), self.sampling_params, use_tqdm=False)
        columns = {name: _objects([out[key] for out in outputs])
                   for name, key in zip(OUTPUT_COLUMNS, ("text", "token_ids", "finish_reason"))}
        return {**batch, **columns}

    def _prompts(self, batch: dict[str, np.ndarray]) -> list:
        if "prompt" in batch:
            return [p if isinstance(p, str) else list(p) for p in batch["prompt"]]
        if "messages" in batch:
            return self.engine.requests.render_chat([[dict(m) for m in c] for c in batch["messages"]], None)
        raise ValueError(f"the dataset needs a 'prompt' or a 'messages' column, it has {sorted(batch)}")


def _objects(values: list) -> np.ndarray:
    """A 1-D object array, also for equal-length lists (which np.array would stack into 2-D)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def build_processor(model: str, sampling_params: SamplingParams | dict | None = None, *, concurrency: int = 1,
                    batch_size: int = 256, num_cpus: float = 1, **options) -> Callable:
    """`process(ds) -> ds` running `concurrency` engines over the dataset. Bad options fail here, on the driver.
    On GPUs each engine takes `tensor_parallel_size` of them; a large batch_size keeps each engine's batch full.
    num_cpus: what Ray reserves for each engine (on the CPU its torch threads)."""
    config = driver_config(model, options)
    sampling_params = as_sampling_params(sampling_params)
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"num_cpus must be a number > 0, got {num_cpus!r}")
    ray = import_ray()
    if not ray.is_initialized():
        connect_ray(ray)
    cluster = ray.cluster_resources()
    gpus = config.tensor_parallel_size if wants_gpu(options.get("device", "auto"), cluster.get("GPU", 0)) else 0
    if concurrency * num_cpus >= cluster.get("CPU", 0):
        warnings.warn(f"{concurrency} engines x num_cpus={num_cpus} take all {cluster.get('CPU', 0):g} CPUs of the "
                      "Ray cluster: the dataset's own read and write tasks then wait for a CPU that never frees "
                      "(pass a smaller concurrency or num_cpus)", RuntimeWarning, stacklevel=2)
    kwargs = dict(model=os.path.abspath(os.fspath(model)), sampling_params=sampling_params, **options)

    def process(ds):
        return ds.map_batches(LLMProcessor, fn_constructor_kwargs=kwargs, num_gpus=gpus, num_cpus=num_cpus,
                              batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                              batch_format="numpy")
    return process
