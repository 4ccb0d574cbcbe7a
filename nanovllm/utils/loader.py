import json
import math
import os
import struct
import warnings
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


SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_loaded_shape(loaded_weight: torch.Tensor, shape: list[int]):
    """A checkpoint tensor must have exactly the (unsplit) shape the model built from config.json expects: copy_
    would broadcast a smaller one, and a rank's slice of a larger one could fit."""
    if list(loaded_weight.shape) != list(shape):
        raise ValueError(f"shape {list(loaded_weight.shape)}, expected {list(shape)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor):
    check_loaded_shape(loaded_weight, list(param.shape))
    param.data.copy_(loaded_weight)


def weight_files(path: str) -> list[str]:
    """The checkpoint's files, chosen as transformers chooses them: model.safetensors if there is one, else the
    shards that model.safetensors.index.json names (all of them must be there), else every *.safetensors."""
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return [os.path.join(path, SINGLE_FILE)]
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        from nanovllm.config import read_json  # config imports this module
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to file names")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if os.path.isabs(n) or os.path.normpath(n).split(os.sep)[0] == os.pardir]
        if outside:  # shards may sit in subfolders (transformers joins the names to the folder), not elsewhere
            raise ValueError(f"{index} names weight files outside the model folder: {outside}")
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ValueError(f"{index} names weight files that are not in the folder: {missing}")
        return [os.path.join(path, n) for n in names]
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
    """Load the checkpoint's files (weight_files); fused parameters take their parts through their weight_loader.

    Every parameter must get its weights, a fused one each of its parts. Parameters that share one tensor (a tied
    LM head and the embedding) take it from the first of their names the checkpoint holds, in the model's order:
    a tied checkpoint that also carries lm_head.weight loads the embedding, as vLLM does (with a warning if the
    head differs from it).
    """
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    files = weight_files(path)
    held = {}  # checkpoint tensor name -> its file
    for file in files:
        try:
            with safe_open(file, "pt", "cpu") as f:
                held.update(dict.fromkeys(f.keys(), file))
        except SafetensorError as e:
            raise _damaged(file, str(e)) from e
    by_tensor = {}
    for name, param in params.items():
        by_tensor.setdefault(id(param), []).append(name)
    # a parameter name that shares its tensor with an earlier name the checkpoint holds is not loaded
    held_targets = {_target_of(n, packed)[0] for n in held}
    skipped = {name for names in by_tensor.values() if len(names) > 1
               for name in [n for n in names if n in held_targets][1:]}
    loaded: dict[str, set] = {}  # parameter -> the parts (shard ids; None for a whole tensor) it got
    duplicates = []
    for file in files:
        try:
            _load_file(file, [n for n, f in held.items() if f == file], packed, params, modules, skipped, loaded,
                       duplicates)
        except SafetensorError as e:  # e.g. a file that changed on disk since Config checked it
            raise _damaged(file, str(e)) from e
    _check_complete(params, by_tensor, packed, loaded, path)
    for name, file in duplicates:
        _warn_if_tied_copy_differs(name, file, params, by_tensor)


def _load_file(file: str, names: list[str], packed: dict, params: dict, modules: dict, skipped: set[str],
               loaded: dict[str, set], duplicates: list):
    with safe_open(file, "pt", "cpu") as f:
        for name in names:
            target, shard_id = _target_of(name, packed)
            param = params.get(target)
            if param is None:
                module, _, leaf = target.rpartition(".")
                if leaf in ("weight", "bias") and module in modules:
                    # a weight or bias of a layer the model has, built without it: the config says otherwise
                    raise ValueError(f"checkpoint weight {name!r} has no place in the model built from its config "
                                     f"(a bias the config does not declare, e.g. attention_bias?)")
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            if target in skipped:
                duplicates.append((target, file))
                continue
            weight = f.get_tensor(name)
            if weight.dtype not in WEIGHT_DTYPES:
                raise ValueError(f"checkpoint weight {name!r} of {file} is {weight.dtype}: quantized checkpoints are "
                                 f"not supported (weights must be float16, bfloat16 or float32)")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, weight) if shard_id is None else loader(param, weight, shard_id)
            except (RuntimeError, ValueError) as e:  # a shape the config does not give
                raise _does_not_fit(name, file, target, param, e) from e
            loaded.setdefault(target, set()).add(shard_id)


def _does_not_fit(name: str, file: str, target: str, param: nn.Parameter, error: Exception) -> ValueError:
    return ValueError(f"checkpoint weight {name!r} of {file} does not fit the model that config.json describes "
                      f"({target}: {list(param.shape)} on this rank): {error}")


def _target_of(name: str, packed: dict) -> tuple[str, object]:
    for source, (fused, shard_id) in packed.items():
        if f".{source}." in name:
            return name.replace(f".{source}.", f".{fused}."), shard_id
    return name, None


def _check_complete(params: dict, by_tensor: dict, packed: dict, loaded: dict[str, set], path: str):
    """Every tensor loaded under one of its names, a fused parameter with each of its parts."""
    parts_of = {}  # fused module name -> {shard id: checkpoint module name}
    for source, (fused, shard_id) in packed.items():
        parts_of.setdefault(fused, {})[shard_id] = source
    missing = []
    for names in by_tensor.values():
        got = [n for n in names if n in loaded]
        if not got:
            missing.append(names[0])
            continue
        module, _, leaf = got[0].rpartition(".")
        prefix, _, fused = module.rpartition(".")
        parts = parts_of.get(fused)
        if parts is not None:
            missing += [f"{prefix}.{parts[s]}.{leaf}" for s in parts if s not in loaded[got[0]]]
    if missing:
        raise ValueError(f"checkpoint in {path!r} lacks weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _warn_if_tied_copy_differs(name: str, file: str, params: dict, by_tensor: dict):
    param = params[name]
    owner = by_tensor[id(param)][0]
    with safe_open(file, "pt", "cpu") as f:
        weight = f.get_tensor(name)
    copy = torch.empty_like(param)
    try:  # this rank's part, as the owner's; a tensor of another shape is refused as if it were loaded
        getattr(param, "weight_loader", default_weight_loader)(copy, weight)
    except (RuntimeError, ValueError) as e:
        raise _does_not_fit(name, file, name, param, e) from e
    if not torch.equal(copy, param):
        warnings.warn(f"the checkpoint's {name!r} differs from {owner!r}, which it shares a tensor with "
                      f"(tie_word_embeddings); using {owner!r}", stacklevel=2)


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
