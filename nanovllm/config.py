import json
import os
import warnings
from dataclasses import dataclass, field, fields
from numbers import Integral, Real

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.layers.backends import BACKENDS
from nanovllm.layers.kv_quant import FP8_DTYPE, KV_CACHE_DTYPES
from nanovllm.layers.rotary_embedding import rope_context_length, rope_tables
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.checks import as_bool
from nanovllm.utils.loader import check_weight_files

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"float": "float32", "half": "float16"}  # vLLM's other spellings
LOAD_FORMATS = ("auto", "dummy")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class Config:
    """Engine options. Every field but `model` and the derived ones can be passed to `LLM(model, **options)`."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = True  # vLLM's option, other default: False sums over symmetric memory
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True
    seed: int = 0
    load_format: str = "auto"
    async_scheduling: bool = True
    mixed_steps: bool = True
    kv_cache_dtype: str = "auto"
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for (-1: the vocabulary)
    tokenizer: str | None = None  # vLLM's option: a folder with the tokenizer files; None: the model folder
    trust_remote_code: bool = False  # handed to transformers' AutoConfig / AutoTokenizer (the models are ours)
    # derived in __post_init__
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos: tuple[int, ...] = ()  # the engine puts the tokenizer's own (the primary EOS) first
    torch_dtype: torch.dtype = field(default=torch.float32, repr=False)
    generation_defaults: dict = field(default_factory=dict)  # SamplingParams fields the model folder sets

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in fields(cls)
                if f.name not in ("model", "hf_config", "eos", "torch_dtype", "generation_defaults")]

    @classmethod
    def from_options(cls, model: str, **options) -> "Config":
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for LLM(); valid options are {cls.options()}")
        config = cls(model, **options)
        asked = options.get("max_model_len")
        if asked is not None and asked > config.max_model_len:  # nano-vllm cuts it to the model's limit; say so
            limit = rope_context_length(config.hf_config)[1]
            warnings.warn(f"max_model_len={asked} is longer than the model's {limit}; using {config.max_model_len}",
                          stacklevel=4)  # LLM(...)'s line
        asked = options.get("max_num_seqs")
        if asked is not None and asked > config.max_num_seqs:
            warnings.warn(f"max_num_seqs={asked} is more than max_num_batched_tokens={config.max_num_batched_tokens}"
                          f", the tokens of one step, and a decode step takes one of each running sequence; using "
                          f"{config.max_num_seqs}", stacklevel=4)
        return config

    def __post_init__(self):
        self._check_numbers()
        # every running sequence decodes in each decode step, one token each, within the step's token budget
        # (vLLM refuses max_num_batched_tokens < max_num_seqs; a small budget to force chunked prefill is common)
        self.max_num_seqs = min(self.max_num_seqs, self.max_num_batched_tokens)
        self.model = model_folder(self.model)
        self.tokenizer = self.model if self.tokenizer is None else tokenizer_folder(self.tokenizer)
        self.hf_config = load_hf_config(self.model, self.trust_remote_code)
        if self.load_format != "dummy":
            check_weight_files(self.model)  # here, before the runner allocates anything on the device
        self.device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.hf_config, self.device)
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"config.json of {self.model!r} gives max_position_embeddings={limit!r}: the model's "
                             "context length must be an int >= 1")
        self.max_model_len = min(self.max_model_len, rope_context_length(self.hf_config)[0])
        self._check_tensor_parallel()
        self.eos = eos_token_ids(self.model, self.hf_config)
        self.generation_defaults = generation_defaults(self.model)

    def _check_numbers(self):
        positive = ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "tensor_parallel_size",
                    "kvcache_block_size")
        for name in positive + ("num_kvcache_blocks", "seed", "max_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(self, name, int(value))  # numpy's ints too
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bs = self.kvcache_block_size
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {bs}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (the whole vocabulary) or >= 0, got {self.max_logprobs}")
        if self.num_kvcache_blocks == 0 or self.num_kvcache_blocks < -1:
            raise ValueError(f"num_kvcache_blocks must be -1 (computed) or >= 1, got {self.num_kvcache_blocks}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, Real):
            raise TypeError(f"gpu_memory_utilization must be a number in (0, 1], got {u!r}")
        self.gpu_memory_utilization = u = float(u)  # numpy's floats too
        if not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        for name in ("enforce_eager", "enable_prefix_caching", "async_scheduling", "mixed_steps",
                     "disable_custom_all_reduce", "trust_remote_code"):
            setattr(self, name, as_bool(name, getattr(self, name)))
        for name, allowed in (("attention_backend", BACKENDS), ("load_format", LOAD_FORMATS),
                              ("kv_cache_dtype", KV_CACHE_DTYPES)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be one of {allowed} (a str), got {value!r}")
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.kv_cache_dtype == "fp8":
            self.kv_cache_dtype = "fp8_e4m3"

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """The KV cache's element type: the model's dtype, or float8 e4m3 (with per-head scales)."""
        return FP8_DTYPE if self.kv_cache_dtype == "fp8_e4m3" else self.torch_dtype

    def _check_tensor_parallel(self):
        tp, hf = self.tensor_parallel_size, self.hf_config
        for name in ("num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"):
            if getattr(hf, name) % tp:
                raise ValueError(f"the model's {name}={getattr(hf, name)} is not divisible by "
                                 f"tensor_parallel_size={tp}")
        if self.device.type == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs but torch sees "
                             f"{torch.cuda.device_count()}")


def local_folder(value: str | os.PathLike, what: str, holds: str, optional: bool = False) -> str:
    """A local folder named by the option `what` (model, tokenizer), as a str with `~` expanded; holds: what such
    a folder has in it, for the message about a file. optional: the option may also be None (said in the
    TypeError)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path to a local {what} folder{' or None' if optional else ''}, got "
                        f"{type(value).__name__}")
    given = os.fspath(value)
    path = os.path.expanduser(given)
    shown = repr(given) if path == given else f"{given!r} ({path})"
    if os.path.isfile(path):
        raise ValueError(f"{what} {shown} is a file, expected a {what} folder ({holds})")
    if not os.path.isdir(path):
        raise ValueError(f"{what} folder {shown} does not exist (nanovllm loads local Hugging Face folders only)")
    return path


def model_folder(model: str | os.PathLike) -> str:
    return local_folder(model, "model", "with config.json and *.safetensors")


def tokenizer_folder(tokenizer: str | os.PathLike) -> str:
    """LLM(tokenizer=...): a local folder that holds a tokenizer."""
    path = local_folder(tokenizer, "tokenizer", f"with one of {list(TOKENIZER_FILES)}", optional=True)
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer folder {os.fspath(tokenizer)!r} holds no tokenizer (none of "
                         f"{list(TOKENIZER_FILES)})")
    return path


def load_hf_config(model: str | os.PathLike, trust_remote_code: bool = False) -> PretrainedConfig:
    model = model_folder(model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"model folder {model!r} has no config.json")
    try:
        hf_config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # not JSON, or values transformers' config classes refuse (their own error types)
        raise ValueError(f"config.json of model folder {model!r} cannot be read: {e}") from e
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {hf_config.model_type!r} of {model!r} is not supported; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ValueError(f"config.json of {model!r} has a quantization_config (quant_method {method!r}): quantized "
                         f"checkpoints are not supported; use the model's float16 / bfloat16 weights")
    try:
        rope_tables(hf_config, head_dim_of(hf_config))  # a rotary embedding the model cannot run: refused here
    except ValueError as e:
        raise ValueError(f"config.json of {model!r}: {e}") from None
    return hf_config


def head_dim_of(hf_config: PretrainedConfig) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def eos_token_ids(model: str, hf_config: PretrainedConfig) -> tuple[int, ...]:
    """End-of-sequence ids from config.json and generation_config.json (chat models often list several); ids
    outside the vocabulary (e.g. -1 for none) are left out with a warning: no draw can produce them."""
    ids = []
    sources = [("config.json", getattr(hf_config, "eos_token_id", None))]
    gen_path = os.path.join(model, "generation_config.json")
    if os.path.isfile(gen_path):
        sources.append(("generation_config.json", read_json(gen_path).get("eos_token_id")))
    for source, value in sources:
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and not isinstance(t, bool) and t not in ids and in_vocabulary(
                    t, hf_config.vocab_size, f"{source}'s eos_token_id"):
                ids.append(t)
    return tuple(ids)


def in_vocabulary(token_id: int, vocab_size: int, what: str) -> bool:
    if 0 <= token_id < vocab_size:
        return True
    warnings.warn(f"{what} {token_id} is outside the model's vocabulary [0, {vocab_size}); not used as an "
                  f"end-of-sequence id", stacklevel=4)
    return False


# generation_config.json key -> SamplingParams field, the ones vLLM takes from a model folder
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model: str) -> dict:
    """The sampling settings a model folder recommends (Qwen3: temperature 0.6, top_p 0.95, top_k 20)."""
    path = os.path.join(model, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    data = read_json(path)
    defaults = {field: data[key] for key, field in GENERATION_CONFIG_FIELDS.items() if data.get(key) is not None}
    try:  # checked here, at LLM(), rather than at every generate() that takes the defaults
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} sets a sampling default that SamplingParams refuses: {e}") from e
    return defaults


def read_json(path: str) -> dict:
    """A JSON object from a model folder's file; a file that is not one is a ValueError naming it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda' (a str or torch.device), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's dtype on GPU, float32 on CPU (CPU half precision is slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be 'auto', a dtype name or a torch.dtype, got {dtype!r}")
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        model_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(model_dtype, str):
            model_dtype = DTYPES.get(model_dtype)
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES) + list(DTYPE_ALIASES)}, got {dtype!r}")
    return DTYPES[name]
