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
import contextvars
import functools
import importlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_settings = dict(enabled=os.environ.get("NANOVLLM_FUSED_KERNELS", "1") != "0")


def cuda_properties(device: torch.device):
    """torch's properties of a CUDA device (index None: the current one), read once per device: kernels' launch
    choices ask on every call."""
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def cuda_capability(device: torch.device) -> tuple[int, int]:
    properties = cuda_properties(device)
    return properties.major, properties.minor


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


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


def run_warm_up(tasks: list[Callable[[], object]], device: torch.device, concurrently: bool = True) -> None:
    """Run start-up work that launches kernels on `device`, the tasks at once where `concurrently`.

    Most of a cold start is Triton compiling kernels one after another, each on the first call that needs it.
    Here each task runs in its own thread and all of them share one Triton compile pool (`triton.AsyncCompileMode`:
    a kernel several tasks need is compiled once, and compiles run in parallel because Triton's compiler and ptxas
    release the GIL), so one task's compile no longer waits for another's. The tasks' results are dropped and their
    kernels interleave on the device, so give only warm-up work that is safe to race (scratch memory, no
    collectives: under tensor parallelism pass concurrently=False, as every rank must join collectives in one
    order). Without Triton the tasks run one after another. The first task error is raised once all have ended."""
    if not concurrently or len(tasks) < 2:
        for task in tasks:
            task()
        return
    try:
        import triton
    except ImportError:
        return run_warm_up(tasks, device, concurrently=False)
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

    def on_device(task: Callable[[], object]) -> None:
        if index is not None:
            torch.cuda.set_device(index)  # a new thread starts on device 0
        task()

    workers = min(len(tasks), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="nanovllm-compile") as compiler, \
            triton.AsyncCompileMode(compiler):
        with ThreadPoolExecutor(len(tasks), thread_name_prefix="nanovllm-warm-up") as pool:
            # each task in a copy of this context, where the compile mode is active
            futures = [pool.submit(contextvars.copy_context().run, on_device, task) for task in tasks]
        for future in futures:
            future.result()
