"""Starting the ranks: a worker that dies during start-up makes LLM() raise within seconds, naming the rank and
its exit code, and leaves no process, shared-memory entry or rendezvous file behind (CPU, gloo)."""
import glob
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from nanovllm import LLM, SamplingParams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leftovers() -> set[str]:
    return set(glob.glob("/dev/shm/*")) | set(glob.glob(os.path.join(tempfile.gettempdir(), "nanovllm-dist-*")))


def run_script(tmp_path, body: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    return done, time.perf_counter() - start


def test_script_without_main_guard_fails_fast_and_says_why(qwen3_path, tmp_path):
    before = leftovers()
    done, seconds = run_script(tmp_path, f"""
        from nanovllm import LLM, SamplingParams
        llm = LLM({qwen3_path!r}, tensor_parallel_size=2, kvcache_block_size=16)
        print("built")
    """)
    assert done.returncode != 0 and "built" not in done.stdout
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: tensor-parallel worker rank 1 failed during start-up (exit code 1)")
    assert 'if __name__ == "__main__":' in last_line
    # the parent's own start-up (imports, config) is in this figure too; the worker dies as soon as it re-imports
    assert seconds < 60, seconds
    assert leftovers() <= before


def test_worker_dying_before_our_code_runs(qwen3_path, tmp_path):
    """An import error in the re-imported script (here only in the child) is reported the same way."""
    done, _ = run_script(tmp_path, f"""
        if __name__ == "__mp_main__":  # a spawned worker re-importing this script
            raise ImportError("a module only the workers lack")
        from nanovllm import LLM, SamplingParams
        if __name__ == "__main__":
            LLM({qwen3_path!r}, tensor_parallel_size=2, kvcache_block_size=16)
    """)
    assert "RuntimeError: tensor-parallel worker rank 1 failed during start-up (exit code 1)" in done.stderr


@pytest.mark.parametrize("delay", [0.0, 1.5, 4.0])
def test_worker_killed_during_start_up(qwen3_path, delay):
    """Killed while importing, while joining the group or while building: LLM() raises soon after, every time."""
    before = leftovers()
    outcome = {}

    def build():
        try:
            LLM(qwen3_path, tensor_parallel_size=2, kvcache_block_size=16).exit()
            outcome["built"] = True
        except RuntimeError as e:
            outcome["error"], outcome["at"] = str(e), time.perf_counter()

    thread = threading.Thread(target=build)
    thread.start()
    deadline = time.perf_counter() + 60
    while not multiprocessing.active_children() and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    workers = multiprocessing.active_children()
    killed_at = time.perf_counter()
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    if "built" in outcome:  # the start-up finished before the kill: nothing to test at this delay
        pytest.skip("start-up finished before the worker was killed")
    assert "tensor-parallel worker rank 1" in outcome["error"] and "exit code -9" in outcome["error"]
    assert "__main__" not in outcome["error"]  # a killed worker had no import problem
    assert outcome["at"] - killed_at < 10
    assert multiprocessing.active_children() == []
    assert leftovers() <= before


def test_rank_0_killed_leaves_nothing_behind(qwen3_path, tmp_path):
    """SIGKILL gives rank 0 no chance to clean up: its workers notice the closed pipe, exit and remove the
    rendezvous file."""
    before = leftovers()
    done, _ = run_script(tmp_path, f"""
        import os, signal
        from nanovllm import LLM
        if __name__ == "__main__":
            llm = LLM({qwen3_path!r}, tensor_parallel_size=2, kvcache_block_size=16)
            print(llm.executor.worker_processes[0].pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert done.returncode == -signal.SIGKILL
    worker = int(done.stdout.split()[-1])
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and (os.path.exists(f"/proc/{worker}") or leftovers() - before):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}")
    assert leftovers() <= before


def test_llm_is_a_context_manager(qwen3_path):
    hook = sys.excepthook
    with LLM(qwen3_path, tensor_parallel_size=2, kvcache_block_size=16) as llm:
        assert sys.excepthook is hook  # torch's "[rank0]:" traceback prefix stays out of the user's process
        workers = llm.executor.worker_processes
        assert [w.is_alive() for w in workers] == [True]
    assert [w.exitcode for w in workers] == [0]
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_reading_a_step_back_stops_waiting_when_a_peer_is_gone():
    """Rank 0 polls its step's event under TP and raises the watch's reason instead of waiting forever."""
    from nanovllm.engine.readback import wait_watching

    class NeverDone:  # a step whose collectives wait for a rank that died
        def query(self):
            return False

    class Done:
        def query(self):
            return True

    polls = []

    def watch():
        polls.append(1)
        return "tensor-parallel worker rank 1 exited (exit code -9)" if len(polls) == 3 else None

    with pytest.raises(RuntimeError, match=r"^tensor-parallel worker rank 1 exited \(exit code -9\)$"):
        wait_watching(NeverDone(), watch)
    assert len(polls) == 3
    wait_watching(Done(), lambda: pytest.fail("a finished step needs no peer check"))


def test_a_worker_that_died_without_a_word_gives_no_detail():
    """Rank 0's build fails when a worker dies; the worker's pipe then polls readable but holds nothing, and
    reading it raised EOFError in place of the RuntimeError that names the worker (seen when the kill landed
    during the KV-cache size all-reduce)."""
    import multiprocessing as mp
    from nanovllm.engine.executor import last_detail
    parent, child = mp.Pipe()
    child.send(("failed", "ValueError: no room"))
    assert last_detail(parent) == "ValueError: no room"
    child.close()
    assert parent.poll() and last_detail(parent) is None


def test_a_failed_step_waits_a_moment_to_name_the_dead_worker():
    """Rank 0's collective can fail on the closed socket before the killed worker is reaped: dead_worker(wait)
    looks again for up to `wait` seconds, so the failure names the worker rather than gloo's socket error."""
    import multiprocessing as mp
    import time
    from nanovllm.engine.executor import Executor
    executor = Executor.__new__(Executor)  # only its worker list matters here
    worker = mp.get_context("spawn").Process(target=time.sleep, args=(0.3,))
    worker.start()
    executor._workers = [worker]
    try:
        assert executor.dead_worker() is None  # still running
        t = time.monotonic()
        assert executor.dead_worker(wait=10.0) == "tensor-parallel worker rank 1 exited (exit code 0)"
        assert time.monotonic() - t < 5.0  # found when it exits, not at the end of the wait
    finally:
        worker.join()
