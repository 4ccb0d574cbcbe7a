"""Native CPU kernels for bfloat16: `cpu_kernels.c`, compiled at first use and called through ctypes.

On a CPU decode step the GEMMs run at the cores' bf16 rate; what remains is many small PyTorch ops per layer
(norms, rotary, activation, the KV store, a gather and SDPA for attention), each a pass over memory with its own
dispatch. These kernels do each in one pass, with the same signatures as the PyTorch functions they replace
(layernorm.py, activation.py, rotary_embedding.py, torch_sdpa.py's decode and prefill attention, sampler.py's
greedy argmax), which stay the reference.

They need Linux on x86-64 with AVX-512 (F, BW, VL) and a C compiler (`$CC`, else `cc`). The shared library is
built once per source, compiler and CPU into `$NANOVLLM_CACHE_DIR/cpu-kernels` (default
`~/.cache/nanovllm/cpu-kernels`) with `-O3 -march=native -fopenmp`; its OpenMP calls run on the OpenMP runtime
torch has loaded, with torch.get_num_threads() threads. Where any of that is missing, or a call's dtypes or shapes
are not the kernels' (float32, an fp8 cache, a head_dim they do not take), each function returns None and the
caller runs the PyTorch reference. `NANOVLLM_CPU_KERNELS=0` turns them off (as `NANOVLLM_FUSED_KERNELS=0` does all
fused kernels).
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nanovllm.utils.kernels import fused_kernels_on

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")
BUILD_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "nv_rms_norm": [_P, _I64, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _F32, _INT],
    "nv_silu_and_mul": [_P, _I64, _P, _I64, _I64, _I64, _INT],
    "nv_rope_store": [_P, _P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _P, _P, _F32, _P, _P, _P, _P, _P, _P, _P,
                      _I64, _I64, _I64, _I64, _INT],
    "nv_decode_attention": [_P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F32, _INT],
    "nv_argmax_rows": [_P, _I64, _I64, _I64, _P, _INT],
    "nv_prefill_attention": [_P, _P, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _P, _I64,
                             _I64, _I64, _F32, _INT],
}


_settings = dict(enabled=os.environ.get("NANOVLLM_CPU_KERNELS", "1") != "0")  # read once: checked every call


def enabled() -> bool:
    """Not turned off by NANOVLLM_CPU_KERNELS=0, nor with every fused kernel (utils/kernels.py)."""
    return _settings["enabled"] and fused_kernels_on()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    root = os.environ.get("NANOVLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanovllm")
    return Path(root) / "cpu-kernels"


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here, or None when they can be."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are written for Linux on x86-64, not {sys.platform} on {platform.machine()}"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')!r}) on PATH"
    return None


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(BUILD_FLAGS).encode(),
                 " ".join(sorted(_cpu_flags())).encode()):
        key.update(part)
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: processes building at once each get a whole file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *BUILD_FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (a warning, once) where they cannot be built. Asked for on the first bfloat16
    call that a kernel would serve, so float32 runs never build them."""
    reason = unavailable_reason()
    if reason is None:
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"building them failed: {e}"
        else:
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
            return lib
    logger.warning("nanovllm: no native CPU kernels (%s); bfloat16 on the CPU runs PyTorch's ops, slower", reason)
    return None


def _lib() -> ctypes.CDLL | None:
    return library() if enabled() else None


def _bf16(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.bfloat16 and t.device.type == "cpu") for t in tensors)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor) -> bool:
    """2-D with unit stride along the row: the layout of a token-major activation or a view of one."""
    return x.dim() == 2 and x.stride(1) == 1


def _rms_norm(x, residual, weight, eps):
    if not _bf16(x, residual, weight) or not _rows(x) or not weight.is_contiguous() \
            or weight.shape != x.shape[1:] \
            or (residual is not None and (not _rows(residual) or residual.shape != x.shape)):
        return None
    if (lib := _lib()) is None:
        return None
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=x.dtype)
    residual_out = torch.empty_like(out) if residual is not None else None
    rc = lib.nv_rms_norm(x.data_ptr(), x.stride(0), _ptr(residual), residual.stride(0) if residual is not None else 0,
                         weight.data_ptr(), out.data_ptr(), cols, _ptr(residual_out), cols, rows, cols, eps,
                         torch.get_num_threads())
    if rc:
        return None
    return out if residual is None else (out, residual_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    return _rms_norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    return _rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    if not _bf16(x) or not _rows(x) or x.size(1) % 2 or (lib := _lib()) is None:
        return None
    rows, d = x.size(0), x.size(1) // 2
    out = torch.empty(rows, d, dtype=x.dtype)
    if lib.nv_silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), d, rows, d, torch.get_num_threads()):
        return None
    return out


def _heads(x: torch.Tensor) -> bool:
    """[tokens, heads, head_dim] with unit stride along head_dim (a view into the qkv projection)."""
    return x.dim() == 3 and x.stride(2) == 1


def _rope(positions, q, k, v, q_weight, k_weight, eps, cos_cache, sin_cache, k_cache, v_cache, slot_mapping):
    store = k_cache is not None
    if not _bf16(q, k, v, q_weight, k_weight, cos_cache, sin_cache, k_cache, v_cache) \
            or not (_heads(q) and _heads(k)) or positions.dtype != torch.int32 or not positions.is_contiguous() \
            or not (cos_cache.is_contiguous() and sin_cache.is_contiguous()) \
            or cos_cache.size(1) * 2 != q.size(2) or k.size(2) != q.size(2) \
            or not all(w is None or (w.is_contiguous() and w.shape == q.shape[2:]) for w in (q_weight, k_weight)):
        return None
    if q.size(0) and int(positions.max()) >= cos_cache.size(0):
        return None  # a position past the rotary tables (the reference's indexing raises)
    if store and (not _heads(v) or v.shape != k.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())
                  or slot_mapping.dtype != torch.int32 or not slot_mapping.is_contiguous()
                  or k_cache.shape[-2:] != k.shape[1:]):
        return None
    if q.size(0) == 0 or (store and int(slot_mapping.max()) >= k_cache.numel() // k[0].numel()):
        return None  # nothing to do, or a slot past the cache (the reference's indexing raises)
    if (lib := _lib()) is None:
        return None
    tokens, heads, head_dim = q.shape
    kv_heads = k.size(1)
    q_out = torch.empty(tokens, heads, head_dim, dtype=q.dtype)
    k_out = torch.empty(tokens, kv_heads, head_dim, dtype=k.dtype)
    rc = lib.nv_rope_store(positions.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0),
                           k.stride(1), _ptr(v) if store else None, v.stride(0) if store else 0,
                           v.stride(1) if store else 0, _ptr(q_weight), _ptr(k_weight), eps, cos_cache.data_ptr(),
                           sin_cache.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), _ptr(k_cache), _ptr(v_cache),
                           _ptr(slot_mapping) if store else None, tokens, heads, kv_heads, head_dim,
                           torch.get_num_threads())
    return None if rc else (q_out, k_out)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
         sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    return _rope(positions, q, k, None, None, None, 0.0, cos_cache, sin_cache, None, None, None)


def norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
              k_weight: torch.Tensor, eps: float, cos_cache: torch.Tensor,
              sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    return _rope(positions, q, k, None, q_weight, k_weight, eps, cos_cache, sin_cache, None, None, None)


def rope_store(positions, q, k, v, q_weight, k_weight, eps, cos_cache, sin_cache, k_cache, v_cache, slot_mapping,
               k_scale, v_scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    if k_scale is not None:  # an fp8 cache: the reference quantises
        return None
    return _rope(positions, q, k, v, q_weight, k_weight, eps, cos_cache, sin_cache, k_cache, v_cache, slot_mapping)


def _tables_fit(block_tables: torch.Tensor, k_cache: torch.Tensor, longest: int) -> bool:
    """int32 rows of block ids inside the cache, wide enough for `longest` keys (else the reference's indexing
    raises where the kernel would read out of bounds)."""
    return block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.stride(1) == 1 \
        and int(block_tables.max()) < k_cache.size(0) and longest <= block_tables.size(1) * k_cache.size(1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, tables_checked: bool = False) -> torch.Tensor | None:
    """torch_sdpa.reference_decode's result for a bf16 cache, or None. tables_checked: an earlier call of the same
    step took these tables and lengths (with a cache of the same shape), so they are not scanned again."""
    if not _bf16(q, k_cache, v_cache) or not q.is_contiguous() or q.size(0) == 0 \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.size(-1) != q.size(-1) \
            or context_lens.dtype != torch.int32 or not context_lens.is_contiguous() \
            or not (tables_checked or _tables_fit(block_tables, k_cache, int(context_lens.max()))) \
            or (lib := _lib()) is None:
        return None
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    rc = lib.nv_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                 block_tables.stride(0), context_lens.data_ptr(), out.data_ptr(), num_seqs, num_heads,
                                 k_cache.size(2), head_dim, k_cache.size(1), scale, torch.get_num_threads())
    return None if rc else out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      block_tables: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """torch_sdpa.reference_prefill's result for bf16 (keys from the cache when block_tables is given), or None."""
    cached = block_tables is not None
    if not _bf16(q, k, v) or not q.is_contiguous() or q.size(0) == 0 \
            or not (_heads(k) and _heads(v)) or k.shape != v.shape or k.size(2) != q.size(2) \
            or any(t.dtype != torch.int32 or not t.is_contiguous() for t in (cu_seqlens_q, cu_seqlens_k)):
        return None
    if cached and (not _bf16(k_cache, v_cache) or not (k_cache.is_contiguous() and v_cache.is_contiguous())
                   or k_cache.shape[-2:] != k.shape[1:]
                   or not _tables_fit(block_tables, k_cache, int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()))):
        return None
    if (lib := _lib()) is None:
        return None
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    rc = lib.nv_prefill_attention(q.data_ptr(), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
                                  v.stride(1), _ptr(k_cache) if cached else None, _ptr(v_cache) if cached else None,
                                  _ptr(block_tables), block_tables.stride(0) if cached else 0,
                                  k_cache.size(1) if cached else 1, cu_seqlens_q.data_ptr(),
                                  (cu_seqlens_k if cached else cu_seqlens_q).data_ptr(),  # uncached: keys = new tokens
                                  cu_seqlens_q.numel() - 1, out.data_ptr(), num_heads, k.size(1), head_dim, scale,
                                  torch.get_num_threads())
    return None if rc else out


def greedy(logits: torch.Tensor) -> torch.Tensor | None:
    """sampler._greedy (each row's first maximum) over bf16 logits, or None (also when a row holds a NaN)."""
    if not _bf16(logits) or not _rows(logits) or logits.size(1) == 0 or logits.size(1) >= 2 ** 31 \
            or (lib := _lib()) is None:
        return None
    out = torch.empty(logits.size(0), dtype=torch.int64)
    rc = lib.nv_argmax_rows(logits.data_ptr(), logits.stride(0), logits.size(0), logits.size(1), out.data_ptr(),
                            torch.get_num_threads())
    return None if rc else out
