"""The ranks of one engine: start, call, watch and stop them (after vLLM's MultiprocExecutor).

Rank 0's ModelRunner lives in this process, ranks 1..N-1 in spawned worker processes. Rank 0 forwards every call
(method name + arguments) to the workers through a private pipe each, then runs it itself; the ranks meet inside
the model's collectives. The process group meets through a fresh temporary file: two engines on one machine
never share a port or a name.
"""
import gc
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.config import Config, head_dim_of
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.layers.backends import create_backend

MAIN_GUARD_HINT = ("it died before running any nanovllm code, which is what happens when the script that "
                   "builds the LLM has no `if __name__ == \"__main__\":` guard: worker processes are started with "
                   "'spawn' and re-import that script. Put the code that builds the LLM under that guard")


def rank_device(config: Config, rank: int) -> torch.device:
    device = torch.device("cuda", rank) if config.device.type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start_rank(config: Config, rank: int, device: torch.device, init_file: str | None) -> ModelRunner:
    """Join the process group (under TP) and build this rank's model and cache."""
    if config.tensor_parallel_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        hook = sys.excepthook
        dist.init_process_group(backend, init_method=f"file://{init_file}",
                                world_size=config.tensor_parallel_size, rank=rank)
        if rank == 0:  # torch prefixes every later traceback with "[rank0]:", again for each engine: the user's
            sys.excepthook = hook  # process is not a rank of theirs (workers keep the prefix)
    try:
        return ModelRunner(config, rank, device)
    except BaseException:
        stop_process_group(abort=False)
        raise


def stop_process_group(abort: bool):
    """abort: a peer is gone or out of step; make NCCL kernels that wait for it give up instead of hanging."""
    if not dist.is_initialized():
        return
    if abort and dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:
            pass
    if dist.is_initialized():
        dist.destroy_process_group()


def worker_main(config: Config, rank: int, init_file: str, conn: Connection, num_threads: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops the workers
    if config.device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        device = rank_device(config, rank)
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        raise SystemExit(1)
    # the parent's script was re-imported without trouble and the device is there: rank 0 may now wait for this
    # rank in the process group's rendezvous, which has no way to notice a rank that never comes
    conn.send(("started", None))
    try:
        runner = start_rank(config, rank, device, init_file)
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        raise SystemExit(1)
    conn.send(("built", None))
    gc.collect()
    gc.freeze()  # as LLMEngine does: the model outlives every step
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # rank 0 is gone, maybe killed before it could remove the rendezvous file
            if rank == 1:
                with suppress(FileNotFoundError):
                    os.unlink(init_file)
            break
        if method == "release":
            runner.release()
            stop_process_group(abort=False)
            break
        getattr(runner, method)(*args)


def last_detail(conn) -> str | None:
    """The failure detail a worker sent before it exited; None when it died without a word. (A pipe closed by
    the worker's death polls as readable, and reading it raises EOFError.)"""
    try:
        return conn.recv()[1] if conn.poll() else None
    except (EOFError, OSError):
        return None


class Executor:

    def __init__(self, config: Config):
        self.world_size = config.tensor_parallel_size
        self.runner: ModelRunner | None = None
        self.broken: str | None = None  # why the ranks had to be stopped
        self.closed = False
        self.closing = False  # exit() was called: no new step starts
        self._stepping = threading.RLock()  # held while a step runs; exit() waits for it (RLock: a handler may exit)
        self._on_cuda = config.device.type == "cuda"
        self._workers: list[mp.Process] = []
        self._conns: list[Connection] = []
        self._init_file = None
        if self.world_size > 1 and dist.is_initialized():
            # the ranks meet in this process's default group, and a process has one: leave the one there alone
            raise RuntimeError(
                "tensor_parallel_size > 1 needs this process's default torch.distributed process group, and it is "
                "already set up (another LLM with tensor_parallel_size > 1 that has not been exit()ed, or the "
                "program's own init_process_group): exit() that LLM first, or build this one in another process")
        # every rank checks its attention backend against the configuration; under TP a refusal there would come
        # after the workers had started (seconds) and as their start-up failure: check here first
        create_backend(config.attention_backend, rank_device(config, 0), config.kv_cache_dtype,
                       config.kvcache_block_size, head_dim_of(config.hf_config), config.torch_dtype)
        try:
            if self.world_size > 1:
                self._spawn_workers(config)
                self._await_workers("started")
            self.runner = self._build_rank_0(config)
            if self.world_size > 1:
                self._await_workers("built")
                self.runner.watch_peers(self.dead_worker)
        except BaseException:
            self.shutdown(abort=True)
            raise

    # ---- starting ----------------------------------------------------------------------------------------------

    def _spawn_workers(self, config: Config):
        fd, self._init_file = tempfile.mkstemp(prefix="nanovllm-dist-")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it; it only needs a unique name
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // self.world_size)  # share the cores instead of oversubscribing
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(config, rank, self._init_file, child, threads),
                                  daemon=True)
            process.start()
            child.close()
            self._workers.append(process)
            self._conns.append(parent)

    def _await_workers(self, stage: str):
        """Wait until every worker reports `stage`; a worker that fails or exits first raises RuntimeError."""
        for rank, (process, conn) in enumerate(zip(self._workers, self._conns), start=1):
            while not conn.poll(0.05):
                if not process.is_alive():
                    conn.poll(0.2)  # a last message may still be on its way
                    if not conn.poll():
                        raise RuntimeError(self._start_failure(rank, process, None, stage))
            try:
                message, detail = conn.recv()
            except EOFError:
                process.join(1.0)
                raise RuntimeError(self._start_failure(rank, process, None, stage)) from None
            if message != stage:
                process.join(5.0)
                raise RuntimeError(self._start_failure(rank, process, detail, stage))

    def _start_failure(self, rank: int, process: mp.Process, detail: str | None, stage: str) -> str:
        process.join(1.0)
        code = process.exitcode
        why = f"tensor-parallel worker rank {rank} failed during start-up (exit code {code})"
        if detail:
            return f"{why}: {detail}"
        if code is not None and code < 0:  # a signal killed it (the OOM killer, a kill): no import went wrong
            return f"{why}: killed by signal {-code}"
        if stage == "started":
            return f"{why}; {MAIN_GUARD_HINT}"
        return why

    def _build_rank_0(self, config: Config) -> ModelRunner:
        """Rank 0 builds while the workers do; a worker that dies meanwhile would leave rank 0 waiting in a
        collective, so a watchdog aborts the group and the build fails with that worker's reason."""
        device = rank_device(config, 0)
        if self.world_size == 1:
            return start_rank(config, 0, device, None)
        done = threading.Event()
        watchdog = threading.Thread(target=self._watch_start, args=(done,), daemon=True)
        watchdog.start()
        try:
            return start_rank(config, 0, device, self._init_file)
        except (ValueError, TypeError):
            raise  # rank 0's own refusal of an option, which every rank meets: not a worker's failure
        except BaseException as e:
            for rank, (process, conn) in enumerate(zip(self._workers, self._conns), start=1):
                if conn.poll(1.0) or not process.is_alive():
                    raise RuntimeError(self._start_failure(rank, process, last_detail(conn), "built")) from e
            raise
        finally:
            done.set()
            watchdog.join()

    def _watch_start(self, done: threading.Event):
        # gloo notices a dead peer by its closed socket; NCCL would wait for it until its own timeout
        while not done.wait(0.2):
            if self.dead_worker() is not None:
                if dist.is_initialized() and dist.get_backend() == "nccl":
                    dist.distributed_c10d._abort_process_group()
                return

    # ---- calling -----------------------------------------------------------------------------------------------

    def call(self, method: str, *args):
        """Run a ModelRunner method on every rank; rank 0's return value comes back."""
        self.check_open()
        for conn in self._conns:
            conn.send((method, args))
        return getattr(self.runner, method)(*args)

    @property
    def worker_processes(self) -> list[mp.Process]:
        """Ranks 1.. (empty without tensor parallelism)."""
        return list(self._workers)

    @property
    def num_kvcache_blocks(self) -> int:
        return self.runner.num_kvcache_blocks

    def check_open(self):
        if self.broken:
            raise RuntimeError(self.broken)
        if self.closed or self.closing:
            raise RuntimeError("this LLM has been shut down with exit(); create a new one")

    @contextmanager
    def one_step(self, check: bool = True):
        """Around each step: exit() from another thread waits for the step that runs, and the call's next step
        is refused with exit()'s reason instead of meeting a released model. check=False: enter even so (the
        caller looks at `closed` itself)."""
        with self._stepping:
            if check:
                self.check_open()
            yield

    @contextmanager
    def stopping(self):
        """exit(): from here no step starts; wait for the one that runs (at most one step's time)."""
        self.closing = True
        with self._stepping:
            yield

    def dead_worker(self, wait: float = 0.0) -> str | None:
        """Why a worker is gone (None: all alive), waiting up to `wait` seconds for one to be found dead: a peer's
        collective can fail on the closed socket a moment before the dying process is reaped."""
        deadline = time.monotonic() + wait
        while True:
            for rank, process in enumerate(self._workers, start=1):
                if not process.is_alive():
                    return f"tensor-parallel worker rank {rank} exited (exit code {process.exitcode})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    @contextmanager
    def in_step(self):
        """Under TP a step that fails part-way (a worker died, Ctrl-C, an error) leaves the ranks out of step: a
        later call would hang in a collective or mix up steps. So every rank is stopped and further calls are
        refused with the reason. A single rank recovers and goes on."""
        try:
            yield
        except GeneratorExit:
            raise  # a stream left between steps (its step in flight is read back first): the ranks are in step
        except BaseException as e:
            if self.world_size == 1 or self.closed or self.closing:
                raise
            cause = self.dead_worker(wait=0.0 if isinstance(e, KeyboardInterrupt) else 0.5) or \
                f"a step stopped part-way ({type(e).__name__}: {e})"
            self.broken = (f"{cause}; the tensor-parallel ranks are out of step, so this LLM was shut down: "
                           f"create a new one")
            self.shutdown(abort=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise RuntimeError(self.broken) from e

    # ---- stopping ----------------------------------------------------------------------------------------------

    def shutdown(self, abort: bool | None = None):
        """Release the model, the KV cache, worker processes and the process group. Safe to call twice.
        abort (default: when a worker has died): kill the workers instead of asking them to finish."""
        if self.closed:
            return
        self.closed = True
        if abort is None:
            abort = self.dead_worker() is not None
        if abort or self.runner is None:
            self._stop_workers(grace=0)
        else:
            for conn in self._conns:
                conn.send(("release", ()))
        if self.runner is not None:
            self.runner.release(wait=not abort)
            self.runner = None
        if self.world_size > 1:
            stop_process_group(abort)
        self._stop_workers(grace=10.0)
        if self._on_cuda and not abort:
            gc.collect()  # anything the model or the cache is still tied to through a reference cycle
            torch.cuda.empty_cache()

    def _stop_workers(self, grace: float):
        """Give the workers `grace` seconds to exit, then kill what is left."""
        for process in self._workers:
            process.join(timeout=max(grace, 0.01))
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        self._workers, self._conns = [], []
        if self._init_file and os.path.exists(self._init_file):
            os.unlink(self._init_file)
