"""torch.compile for the small fused element-wise ops, on CUDA only.

On the CPU the eager functions run (compiling there needs a C++ toolchain and buys little). Compiled
functions are built once per process on first CUDA use; `dynamic=True` keeps one graph across token counts.
Set NANOVLLM_COMPILE=0 (before importing nanovllm) to run everything eagerly.
"""
import functools
import os

import torch


def compile_on_cuda(fn):
    compiled = None
    enabled = os.environ.get("NANOVLLM_COMPILE", "1") != "0"

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args):
        nonlocal compiled
        if not (enabled and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args)

    dispatch.eager = fn
    return dispatch
