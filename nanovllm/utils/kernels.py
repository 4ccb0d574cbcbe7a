"""The GPU's fused Triton kernels behind plain-PyTorch ops.

A function decorated with `@triton_on_cuda("module", "name")` runs as written off CUDA (it is the CPU path and
the reference the kernel is tested against) and on CUDA as `nanovllm.kernels.<module>.<name>`, a Triton kernel
with the same signature, imported on first use. Triton compiles a kernel in about a second where inductor took
one to seven per graph, which is most of a cold start-up. NANOVLLM_FUSED_KERNELS=0 keeps the PyTorch ops on CUDA
(to compare, or to debug a kernel).
"""
import contextlib
import functools
import importlib
import os

import torch

_settings = dict(enabled=os.environ.get("NANOVLLM_FUSED_KERNELS", "1") != "0")


def triton_on_cuda(module: str, name: str):
    def wrap(fn):
        kernel = None

        @functools.wraps(fn)
        def dispatch(x: torch.Tensor, *args):
            nonlocal kernel
            if not (x.is_cuda and _settings["enabled"]):
                return fn(x, *args)
            if kernel is None:
                kernel = getattr(importlib.import_module(f"nanovllm.kernels.{module}"), name)
            return kernel(x, *args)

        dispatch.reference = fn
        return dispatch

    return wrap


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Tests: run the PyTorch ops on CUDA too (enabled=False), or the kernels again."""
    saved = _settings["enabled"]
    _settings["enabled"] = enabled
    try:
        yield
    finally:
        _settings["enabled"] = saved
