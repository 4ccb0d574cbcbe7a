"""bench.py's arithmetic and its --kernels report: the decode steps' KV reads, the kinds of kernels, the idle time."""
import importlib.util
import inspect
import os
import random
import re
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO_ROOT, "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_slots_read_counts_each_running_sequence_once_a_step(bench):
    rng = random.Random(0)
    prompts = [rng.randint(1, 50) for _ in range(20)]
    outputs = [rng.randint(1, 40) for _ in range(20)]
    cached, running, expected = list(prompts), list(outputs), 0
    cached = [p + 1 for p in cached]  # the prefill samples the first token; its KV is stored by decode step 1
    for _ in range(max(outputs)):  # one decode step: every sequence with tokens left attends over its cache
        for i, left in enumerate(running):
            if left > 1:
                expected += cached[i]
                cached[i] += 1
                running[i] -= 1
    assert bench.decode_slots_read(prompts, outputs) == expected
    assert bench.decode_slots_read([100], [1]) == 0  # the prefill's token alone: no decode step


def test_every_nanovllm_triton_kernel_has_a_kind(bench):
    pytest.importorskip("triton")
    import triton

    from nanovllm.kernels import attention, fused, inputs, sampling, store_kvcache
    names = [name for module in (attention, fused, inputs, sampling, store_kvcache)
             for name, obj in inspect.getmembers(module) if isinstance(obj, triton.runtime.JITFunction)
             and name.endswith("_kernel")]
    assert len(names) >= 12
    assert [name for name in names if bench.kernel_kind(name) == "other"] == []


@pytest.mark.parametrize("name, kind", [
    ("_decode_split_kernel", "decode attention"),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>", "decode attention"),
    ("_prefill_kernel", "prefill attention"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "prefill attention"),
    ("nvjet_sm90_tst_64x32_64x16_4x2_h_bz_TNT", "GEMM"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all-reduce"),
    ("Memcpy DtoH (Device -> Pinned)", "copies"),
    ("void at::native::vectorized_gather_kernel<16, int>(char*, char*, int*)", "other"),
])
def test_kernel_kind_of_names_the_profiler_reports(bench, name, kind):
    assert bench.kernel_kind(name) == kind


KIND_LINE = re.compile(r"^  (.+?)\s+([\d.]+)s\s+([\d.]+)%\s+(\d+) kernels$")


def kinds_of(report: str) -> dict[str, tuple[float, float, int]]:
    return {m[1]: (float(m[2]), float(m[3]), int(m[4])) for m in map(KIND_LINE.match, report.splitlines()) if m}


def test_kernel_report_splits_busy_time_and_idle(bench):
    # 1,000 decode kernels of 100 us each 1 us apart, then 0.25 s idle, one GEMM of 0.5 s; listed out of order
    kernels = [(i * 101.0, i * 101.0 + 100, "_decode_split_kernel") for i in range(1000)]
    last = kernels[-1][1]
    kernels.insert(0, (last + 250_000, last + 750_000, "nvjet_sm90_tst_64x32_64x16_4x2_h_bz_TNT"))
    report = bench.kernel_report(kernels, wall=1.0, kv_bytes_read=400_000_000_000)
    lines = report.splitlines()
    assert lines[0] == "GPU time by kind of kernel (1001 kernels, 0.600s busy of 1.000s wall):"
    assert kinds_of(report) == {"GEMM": (0.5, 83.3, 1), "decode attention": (0.1, 16.7, 1000)}
    assert list(kinds_of(report)) == ["GEMM", "decode attention"]  # the larger first
    span = last + 750_000
    assert lines[3] == (f"between kernels: 0.001s in gaps of at most 2 us, 0.250s idle in longer ones; "
                        f"{1.0 - span / 1e6:.3f}s before the first kernel and after the last")
    # the idle spell starts at 0.101 s of the 0.851 s span: the second tenth
    assert lines[4] == "idle in gaps over 2 us by tenth of the run (ms): 0.0 250.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"
    assert lines[5] == ("decode attention read 0.40 TB of KV cache (each running sequence's once a decode step): "
                        "4.00 TB/s")
    assert "decode attention read" not in bench.kernel_report([(0.0, 5.0, "nvjet_a")], 0.1, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_report_of_a_small_run_cuda(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench.py"), "--kernels", "--num-seqs", "16",
                           "--max-input-len", "300", "--max-output-len", "64", "--min-len", "32"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "(under the profiler)" in out
    kinds = kinds_of(out)
    assert {"decode attention", "prefill attention", "GEMM", "RMSNorm", "sampler"} <= kinds.keys(), out
    assert kinds.get("other", (0.0, 0.0, 0))[1] < 5.0, out  # the share of kernels of no known kind
    assert re.fullmatch(r"decode attention read [\d.]+ TB of KV cache .*: [\d.]+ TB/s", out.splitlines()[-1]), out
