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
    ("bench.py", ["--size", "tiny", "--device", "cpu", "--profile"], "--profile times each step's share of the GPU"),
    ("bench.py", ["--profile", "--decode-batch", "4"], "--profile splits the headline run's time"),
    # a workload the engine refuses once it is built (a request that can never fit its cache)
    ("bench.py", ["--size", "tiny", "--device", "cpu", "--kvcache-block-size", "16", "--num-kvcache-blocks", "1",
                  "--num-seqs", "1", "--max-input-len", "20", "--max-output-len", "12", "--min-len", "12"],
     "needs 2 KV blocks of 16 tokens but the cache has only num_kvcache_blocks=1: it can never fit"),
    ("example.py", ["--temperature", "inf"], "must be a finite number >= 0"),
    ("example.py", ["--model", "."], "has no config.json"),
    ("benchmarks/cpu_vs_transformers.py", ["--num-prompts", "200"], "--num-prompts must be in 1..168"),
    ("benchmarks/cpu_vs_transformers.py", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
])
def test_bad_flags_give_one_error_line(script, args, words, tmp_path):
    done = run_script(script, args, tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert words in done.stderr.strip().splitlines()[-1]


def run_script(script: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def test_bench_on_a_model_with_a_small_vocabulary(tmp_path):
    """bench.py drew prompt ids from 0..10,000 whatever the model, so a local model with a smaller vocabulary (the
    tests' 512) failed in the engine's check with a traceback; the ids now stay below the vocabulary's size."""
    from conftest import make_model
    folder = make_model(tmp_path / "m", "qwen3")
    done = run_script("bench.py", ["--model", folder, "--device", "cpu", "--num-seqs", "3", "--max-input-len", "24",
                                   "--max-output-len", "6", "--min-len", "4"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Throughput" in done.stdout


@pytest.mark.parametrize("stream", [False, True])
def test_example_without_a_tokenizer_says_so(tmp_path, stream):
    """The example chats in text; a folder without tokenizer files ended in a traceback (with --stream an
    AttributeError on None)."""
    from conftest import make_model
    folder = make_model(tmp_path / "m", "qwen3")
    done = run_script("example.py", ["--model", folder, "--max-tokens", "4", "--dtype", "float32",
                                     *(["--stream"] if stream else [])], tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "has no tokenizer" in done.stderr.strip().splitlines()[-1]
