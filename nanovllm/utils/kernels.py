"""Fused kernels behind plain-PyTorch ops: Triton on the GPU, native C on the CPU.

A function decorated with `@fused_kernel("module", "name")` is the reference its kernels are tested against, and
runs as written where no kernel serves the call. On CUDA it runs as `nanovllm.kernels.<module>.<name>`, a Triton
kernel with the same signature, imported on first use (Triton compiles a kernel in about a second where inductor
took one to seven per graph, which is most of a cold start-up). With `cpu=True`, a call on the CPU first tries
`nanovllm.kernels.cpu.<name>`, native code for bfloat16 (kernels/cpu.py), which returns None for what it does not
take.
NANOVLLM_FUSED_KERNELS=0 keeps the PyTorch ops everywhere (to compare, or to debug a kernel).
"""
import contextlib
import functools
import importlib
import os

import torch

_settings = dict(enabled=os.environ.get("NANOVLLM_FUSED_KERNELS", "1") != "0")


def fused_kernel(module: str, name: str, cpu: bool = False):
    def wrap(fn):
        kernel = cpu_kernels = None

        @functools.wraps(fn)
        def dispatch(x: torch.Tensor, *args):
            nonlocal kernel, cpu_kernels
            if not _settings["enabled"]:
                return fn(x, *args)
            if x.is_cuda:
                if kernel is None:
                    kernel = getattr(importlib.import_module(f"nanovllm.kernels.{module}"), name)
                return kernel(x, *args)
            if cpu and x.device.type == "cpu":
                if cpu_kernels is None:
                    cpu_kernels = importlib.import_module("nanovllm.kernels.cpu")
                out = getattr(cpu_kernels, name)(x, *args)
                if out is not None:
                    return out
            return fn(x, *args)

        dispatch.reference = fn
        return dispatch

    return wrap


def fused_kernels_on() -> bool:
    return _settings["enabled"]


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Tests: run the PyTorch ops (enabled=False), or the kernels again."""
    saved = _settings["enabled"]
    _settings["enabled"] = enabled
    try:
        yield
    finally:
        _settings["enabled"] = saved
