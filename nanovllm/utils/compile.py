"""torch.compile for the small fused element-wise ops, on CUDA only.

On the CPU the eager functions run (compiling there needs a C++ toolchain and buys little). Compiled
functions are built once per process on first CUDA use. Set NANOVLLM_COMPILE=0 (before importing nanovllm)
to run everything eagerly.

Serving must never recompile: a recompile costs 0.5-2 s in the middle of a step, and after
torch._dynamo.config.recompile_limit of them dynamo silently falls back to eager. So:
  - `dynamic=True`: one graph for every token count. Dynamo would give size 1 a graph of its own (one more
    compile of every op at start-up), so inputs with a leading dimension of 1 (a one-token step, a batch of one)
    run the eager function instead: a few more small kernels on a step that is tiny anyway;
  - duck sizing is off while tracing. With it on, dynamo ties together sizes, strides and storage offsets
    that happen to be equal in the first call (the packed step inputs put `positions` at offset == token
    count) and guards on that coincidence, which a later batch breaks. The switch is torch's process-wide
    config: it is flipped only for the duration of each compiled call and restored after (dynamo has no
    per-function setting for it).
"""
import contextlib
import functools
import os

import torch
import torch.fx.experimental._config as fx_config

_settings = dict(enabled=os.environ.get("NANOVLLM_COMPILE", "1") != "0", devices=("cuda",), backend="inductor")
_compiled_fns: list[dict] = []  # each compiled function's cache, so a settings change can drop them


def compile_on_cuda(fn):
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
