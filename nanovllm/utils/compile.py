"""torch.compile for the small fused element-wise ops, on CUDA only (NANOVLLM_COMPILE=0 runs them eagerly).

Serving never recompiles: one dynamic graph per op, size-1 inputs run eagerly, duck sizing off while tracing.
"""
import contextlib
import functools
import os

import torch
import torch.fx.experimental._config as fx_config

_settings = dict(enabled=os.environ.get("NANOVLLM_COMPILE", "1") != "0", devices=("cuda",), backend="inductor")
_compiled_fns: list[dict] = []  # each compiled function's cache, so a settings change can drop them


def compile_on_cuda(fn):
    """Compile fn on first CUDA use. A leading dimension of 1 runs eagerly: dynamo would compile a graph of its own
    for it. Duck sizing ties sizes and offsets that happen to be equal in the first call (the packed step inputs
    put `positions` at offset == token count); it is torch's process-wide switch, so it is off only per call."""
    cache = {}
    _compiled_fns.append(cache)

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args):
        if not compiling_on(x.device) or x.size(0) == 1:
            return fn(x, *args)
        compiled = cache.get("fn")
        if compiled is None:
            compiled = cache["fn"] = torch.compile(fn, dynamic=True, backend=_settings["backend"])
        duck = fx_config.use_duck_shape
        fx_config.use_duck_shape = False
        try:
            return compiled(x, *args)
        finally:
            fx_config.use_duck_shape = duck

    dispatch.eager = fn
    return dispatch


def compiling_on(device: torch.device) -> bool:
    return _settings["enabled"] and device.type in _settings["devices"]


@contextlib.contextmanager
def compile_settings(devices: tuple[str, ...], backend: str):
    """Tests: compile on other devices or with another backend (e.g. "aot_eager" on the CPU, which traces and
    guards like inductor without generating code). Compiled functions are dropped on entry and on exit."""
    saved = dict(_settings)
    _drop_compiled()
    _settings.update(enabled=True, devices=devices, backend=backend)
    try:
        yield
    finally:
        _settings.clear()
        _settings.update(saved)
        _drop_compiled()


def _drop_compiled():
    for cache in _compiled_fns:
        cache.clear()
    torch._dynamo.reset()  # dynamo keeps its own cache per code object
