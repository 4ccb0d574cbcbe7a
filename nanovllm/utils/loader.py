import json
import math
import os
import struct
from glob import glob

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.utils.math import cdiv

# bits per element of each safetensors dtype (F4 / F6 pack several elements per byte)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8,
              "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself enforces


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor):
    param.data.copy_(loaded_weight)


def weight_files(path: str) -> list[str]:
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model folder {path!r} has no *.safetensors files")
    return files


def check_weight_files(path: str):
    """Refuse a folder whose *.safetensors are cut short or corrupt, reading only their headers."""
    for file in weight_files(path):
        problem = _safetensors_problem(file)
        if problem:
            raise _damaged(file, problem)


def _damaged(file: str, problem: str) -> ValueError:
    return ValueError(f"weight file {file!r} is damaged or incomplete ({problem}); "
                      f"re-download or re-convert the checkpoint")


def _safetensors_problem(file: str) -> str | None:
    """What is wrong with the file's layout: 8-byte little-endian header length N, N bytes of JSON, the data."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        if size < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            return f"header length {header_len} does not fit in the file's {size} bytes"
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # not UTF-8 or not JSON
            return f"header is not valid JSON: {e}"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(entry)
        if problem:
            return f"tensor {name!r}: {problem}"
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + header_len + data_end > size:
        return f"the tensors need {8 + header_len + data_end} bytes, the file has {size}"
    return None


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "entry lacks dtype, shape or data_offsets"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"bad shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"bad data_offsets {offsets!r}"
    bits = DTYPE_BITS.get(entry["dtype"])
    if bits is not None and (offsets[1] - offsets[0]) * 8 != math.prod(shape) * bits:
        return (f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape {shape} of "
                f"{entry['dtype']} needs {cdiv(math.prod(shape) * bits, 8)}")
    return None


def load_model(model: nn.Module, path: str):
    """Load every *.safetensors in `path`; fused parameters take their shards through their weight_loader."""
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for file in weight_files(path):
        try:
            _load_file(file, packed, params, modules, loaded)
        except SafetensorError as e:  # e.g. a file that changed on disk since Config checked it
            raise _damaged(file, str(e)) from e
    _check_complete(model, params, loaded, path)


def _load_file(file: str, packed: dict, params: dict, modules: dict, loaded: set[str]):
    with safe_open(file, "pt", "cpu") as f:
        for name in f.keys():
            target, shard_id = _target_of(name, packed)
            param = params.get(target)
            if param is None:
                module, _, leaf = target.rpartition(".")
                if leaf in ("weight", "bias") and module in modules:
                    # a weight or bias of a layer the model has, built without it: the config says otherwise
                    raise ValueError(f"checkpoint weight {name!r} has no place in the model built from its config "
                                     f"(a bias the config does not declare, e.g. attention_bias?)")
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            loader = getattr(param, "weight_loader", default_weight_loader)
            weight = f.get_tensor(name)
            try:
                loader(param, weight) if shard_id is None else loader(param, weight, shard_id)
            except RuntimeError as e:  # a shape the config does not give (copy_ / narrow refuse it)
                raise ValueError(f"checkpoint weight {name!r} of {file} has shape {list(weight.shape)}, which does not "
                                 f"fit the model that config.json describes ({target}: {list(param.shape)}): "
                                 f"{e}") from e
            loaded.add(target)


def _target_of(name: str, packed: dict) -> tuple[str, object]:
    for source, (fused, shard_id) in packed.items():
        if f".{source}." in name:
            return name.replace(f".{source}.", f".{fused}."), shard_id
    return name, None


def _check_complete(model: nn.Module, params: dict, loaded: set[str], path: str):
    # a tied lm_head shares its tensor with the embedding and needs no weight of its own
    by_tensor = {}
    for name, param in params.items():
        by_tensor.setdefault(id(param), []).append(name)
    missing = [names[0] for names in by_tensor.values() if not loaded.intersection(names)]
    if missing:
        raise ValueError(f"checkpoint in {path!r} lacks weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")


def init_dummy_weights(model: nn.Module, seed: int):
    """load_format="dummy": small random weights drawn in place on the weights' device (fast even for 8B)."""
    generators = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        g = generators.get(param.device)
        if g is None:
            g = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.uniform_(-0.05, 0.05, generator=g)
