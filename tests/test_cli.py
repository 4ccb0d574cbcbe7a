"""The scripts' bad flags end in one argparse-style error line (exit code != 0), not a traceback from inside the
engine."""
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, args, words", [
    ("bench.py", ["--num-seqs", "0"], "--num-seqs must be >= 1, got 0"),
    ("bench.py", ["--max-input-len", "5000"], "exceeds --max-model-len 4096"),
    ("bench.py", ["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    ("bench.py", ["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0, got 0.0"),
    ("bench.py", ["--size", "tiny", "--device", "cpu", "--kvcache-block-size", "100"],
     "kvcache_block_size must be a power of two >= 16, got 100"),
    ("bench.py", ["--kernels", "--decode-batch", "4"], "--kernels profiles the headline run alone"),
    ("bench.py", ["--size", "tiny", "--device", "cpu", "--kernels"], "--kernels profiles CUDA kernels"),
    ("example.py", ["--model", "."], "has no config.json"),
    ("benchmarks/cpu_vs_transformers.py", ["--num-prompts", "200"], "--num-prompts must be in 1..168"),
    ("benchmarks/cpu_vs_transformers.py", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
])
def test_bad_flags_give_one_error_line(script, args, words, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert words in done.stderr.strip().splitlines()[-1]
