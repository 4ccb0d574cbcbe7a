import atexit
import gc
import os
import signal
import tempfile
from contextlib import closing, contextmanager, nullcontext
from itertools import count
from numbers import Integral
from time import perf_counter

import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def worker_main(config: Config, rank: int, dist_init_file: str, conn):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops the workers
    if config.device.type == "cpu":  # share the cores between the ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    runner = ModelRunner(config, rank, dist_init_file, [conn])
    runner.loop()


class LLMEngine:

    def __init__(self, model: str, **options):
        config = Config.from_options(model, **options)
        self.config = config
        self._seq_ids = count()
        self._workers, self._conns = [], []
        self._dist_init_file = None
        self._closed = False
        self._broken: str | None = None  # why a tensor-parallel engine had to stop its ranks
        if config.tensor_parallel_size > 1:
            self._start_workers(config)
        atexit.register(self.exit)
        try:
            self.model_runner = ModelRunner(config, 0, self._dist_init_file, self._conns)
        except BaseException:
            self._stop_workers(kill=True)
            raise
        try:
            config.num_kvcache_blocks = self.model_runner.num_kvcache_blocks
            self.tokenizer = load_tokenizer(model)
            tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
            if isinstance(tokenizer_eos, int) and tokenizer_eos not in config.eos:
                config.eos += (tokenizer_eos,)
            self.scheduler = Scheduler(config)
        except BaseException:  # the runner holds most of the GPU and maybe worker processes: give them back
            self._shut_down(abort=False)
            raise

    def _start_workers(self, config: Config):
        fd, self._dist_init_file = tempfile.mkstemp(prefix="nanovllm-dist-")
        os.close(fd)
        os.unlink(self._dist_init_file)  # the file store creates it; it only needs a unique name
        ctx = mp.get_context("spawn")
        for rank in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(config, rank, self._dist_init_file, child))
            process.start()
            child.close()
            self._workers.append(process)
            self._conns.append(parent)

    def _stop_workers(self, kill: bool = False, grace: float = 5.0):
        """Wait for the workers to exit; with kill, give them `grace` seconds and then kill them."""
        for process in self._workers:
            process.join(timeout=None if not kill else grace)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        self._workers, self._conns = [], []
        if self._dist_init_file and os.path.exists(self._dist_init_file):
            os.unlink(self._dist_init_file)

    def exit(self):
        """Release the model, the KV cache, worker processes and the process group. Safe to call twice."""
        self._shut_down(abort=self._dead_worker() is not None)

    def _shut_down(self, abort: bool):
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.exit)
        runner = getattr(self, "model_runner", None)
        if abort:  # the workers may be stuck in a collective: kill them, then let rank 0 go without waiting
            self._stop_workers(kill=True, grace=0)
        if runner is not None:
            if abort:
                runner.exit(abort=True)
            else:
                runner.call("exit")
            del self.model_runner
        self._stop_workers()
        if self.config.device.type == "cuda" and not abort:
            gc.collect()  # anything the model or the cache is still tied to through a reference cycle
            torch.cuda.empty_cache()

    def _dead_worker(self) -> str | None:
        for rank, process in enumerate(self._workers, start=1):
            if not process.is_alive():
                return f"tensor-parallel worker rank {rank} exited (exit code {process.exitcode})"
        return None

    @contextmanager
    def _ranks_in_step(self):
        """Under tensor parallelism a step that fails part-way (a worker died, Ctrl-C, an error) leaves the ranks
        out of step: a later call would hang in a collective or mix up steps. So the engine stops every rank and
        refuses further work with the reason; create a new LLM. A single rank recovers and goes on."""
        try:
            yield
        except BaseException as e:
            if self.config.tensor_parallel_size == 1 or self._closed:
                raise
            cause = self._dead_worker() or f"a step stopped part-way ({type(e).__name__}: {e})"
            self._broken = (f"{cause}; the tensor-parallel ranks are out of step, so this LLM was shut down: "
                            f"create a new one")
            self._shut_down(abort=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise RuntimeError(self._broken) from e

    def _check_open(self):
        if self._broken:
            raise RuntimeError(self._broken)
        if self._closed:
            raise RuntimeError("this LLM has been shut down with exit(); create a new one")

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
        token_ids = self._tokenize(prompt)
        self._check_request(token_ids, sampling_params)
        return self._enqueue(token_ids, sampling_params)

    def _enqueue(self, token_ids: list[int], sampling_params: SamplingParams) -> Sequence:
        seq = Sequence(token_ids, sampling_params, next(self._seq_ids), self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if hasattr(prompt, "tolist"):  # a numpy array or torch tensor of token ids
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model folder {self.config.model!r} has no tokenizer: pass prompts as token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = [int(t) if isinstance(t, Integral) and not isinstance(t, bool) else t for t in prompt]
        else:
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError(f"prompt {prompt!r} is empty: a prompt needs at least one token")
        vocab_size = self.config.hf_config.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"token ids must be ints, got {t!r} ({type(t).__name__})")
            if not 0 <= t < vocab_size:
                raise ValueError(f"token id {t} is out of range: it must be in [0, vocab_size={vocab_size})")
        return token_ids

    def _check_request(self, token_ids: list[int], sp: SamplingParams):
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        n, max_len = len(token_ids), self.config.max_model_len
        if n + sp.max_tokens > max_len:
            raise ValueError(f"prompt length {n} + max_tokens {sp.max_tokens} = {n + sp.max_tokens} exceeds "
                             f"max_model_len={max_len}")
        # the last sampled token never needs a cache slot
        bs, num_blocks = self.config.kvcache_block_size, self.config.num_kvcache_blocks
        needed = -(-(n + sp.max_tokens - 1) // bs)
        if needed > num_blocks:
            raise ValueError(f"prompt length {n} + max_tokens {sp.max_tokens} needs {needed} KV blocks of "
                             f"{bs} tokens but the cache has only num_kvcache_blocks={num_blocks}: it can never fit")

    # ---- running -----------------------------------------------------------------------------------------

    def step(self) -> tuple[list[Sequence], int]:
        """Run one scheduled batch to completion. Returns the finished sequences and the number of tokens
        processed (positive for a prefill step, negative for a decode step, as nano-vllm reports it)."""
        self._check_open()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return [], 0
        num_tokens = self._num_tokens(seqs, is_prefill)
        with self._ranks_in_step():
            token_ids = self.model_runner.call("run", seqs, is_prefill)
        return self.scheduler.postprocess(seqs, token_ids), num_tokens

    @staticmethod
    def _num_tokens(seqs: list[Sequence], is_prefill: bool) -> int:
        return sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)

    def _overlapped_steps(self):
        """Like repeated step(), but step N+1 is scheduled and queued on the device before step N's tokens are
        read back, so the host's bookkeeping hides behind device work. A sequence's token still in flight is a
        PENDING_TOKEN that the next decode step reads on the device; a sequence that turns out to have stopped
        (EOS) one step earlier just has that step's token dropped. Yields (finished, num_tokens) per step."""
        in_flight = None  # (records, sampled token ids on the device, num_tokens)
        try:
            while True:
                seqs, is_prefill = self.scheduler.schedule()
                previous, in_flight = in_flight, None
                if seqs:
                    num_tokens = self._num_tokens(seqs, is_prefill)
                    sampled = self.model_runner.call("launch", seqs, is_prefill)
                    in_flight = (self.scheduler.launched(seqs), sampled, num_tokens)
                if previous is not None:
                    records, sampled, num_tokens = previous
                    yield self.scheduler.resolve(records, sampled.tolist()), num_tokens
                elif not seqs:
                    if self.scheduler.is_finished():
                        return
                    raise RuntimeError("the scheduler can make no progress (no step to run, requests left)")
        except GeneratorExit:
            # the caller stopped early (generate() has all it asked for): the step already launched may carry
            # other requests (add_request), whose tokens must be filled in, not left pending
            if in_flight is not None:
                records, sampled, _ = in_flight
                self.scheduler.resolve(records, sampled.tolist())
            raise

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[dict]:
        self._check_open()
        requests = self._validate(prompts, sampling_params)
        seqs = [self._enqueue(token_ids, sp) for token_ids, sp in requests]  # checked by _validate
        try:
            with self._ranks_in_step():
                self._run_until_done(seqs, use_tqdm)
        except BaseException:
            self._abort(seqs)
            raise
        return [self._output(seq) for seq in seqs]

    def _validate(self, prompts, sampling_params) -> list[tuple[list[int], SamplingParams]]:
        """Check every request before any is queued, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str or a list of token-id lists, got {type(prompts).__name__}")
        if prompts and all(isinstance(p, Integral) and not isinstance(p, bool) for p in prompts):
            raise TypeError("prompts must be a list of prompts: wrap a single token-id list as [token_ids]")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries but there are "
                                 f"{len(prompts)} prompts: give one SamplingParams or one per prompt")
        else:
            sampling_params = [sampling_params] * len(prompts)
        requests = []
        for prompt, sp in zip(prompts, sampling_params):
            token_ids = self._tokenize(prompt)
            self._check_request(token_ids, sp)
            requests.append((token_ids, sp))
        return requests

    def _run_until_done(self, seqs: list[Sequence], use_tqdm: bool):
        pending = {seq.seq_id for seq in seqs}
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        steps = self._overlapped_steps() if self.config.async_scheduling else iter(self.step, None)
        prefill_tps = decode_tps = 0.0
        with bar, closing(steps) if hasattr(steps, "close") else nullcontext():
            t = perf_counter()
            for finished, num_tokens in steps:
                now = perf_counter()
                dt, t = max(now - t, 1e-9), now
                if num_tokens > 0:
                    prefill_tps = num_tokens / dt
                elif num_tokens < 0:
                    decode_tps = -num_tokens / dt
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
                done = [seq for seq in finished if seq.seq_id in pending]
                pending.difference_update(seq.seq_id for seq in done)
                bar.update(len(done))
                if not pending:
                    break

    def _abort(self, seqs: list[Sequence]):
        """Drop this call's unfinished requests (after an interrupt or error) so later calls start clean."""
        sched = self.scheduler
        for seq in seqs:
            if seq in sched.running:
                sched.running.remove(seq)
                sched.block_manager.deallocate(seq)
            elif seq in sched.waiting:
                sched.waiting.remove(seq)

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else None
        return {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason}


def load_tokenizer(model: str):
    if not any(os.path.exists(os.path.join(model, name)) for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(model)
