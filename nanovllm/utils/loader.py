import os
from glob import glob

import torch
from safetensors import safe_open
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor):
    param.data.copy_(loaded_weight)


def load_model(model: nn.Module, path: str):
    """Load every *.safetensors in `path`; fused parameters take their shards through their weight_loader."""
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model folder {path!r} has no *.safetensors files")
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                target, shard_id = _target_of(name, packed)
                param = params.get(target)
                if param is None:
                    continue  # e.g. rotary inv_freq buffers some checkpoints carry
                loader = getattr(param, "weight_loader", default_weight_loader)
                weight = f.get_tensor(name)
                loader(param, weight) if shard_id is None else loader(param, weight, shard_id)
                loaded.add(target)
    _check_complete(model, params, loaded, path)


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
