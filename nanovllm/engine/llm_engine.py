import gc
import random
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from time import perf_counter

from nanovllm.config import Config, in_vocabulary
from nanovllm.engine.exclusive import InterruptDeferral, OneCallAtATime
from nanovllm.engine.executor import Executor
from nanovllm.engine.readback import SampledTokens
from nanovllm.engine.requests import RequestBuilder, load_tokenizer
from nanovllm.engine.scheduler import BookedStep, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import StepSummary
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True)
class InFlight:
    booked: BookedStep
    tokens: SampledTokens


class FrozenHeap:
    """gc.freeze() for as long as any engine of the process serves: the collector's full passes then skip the
    models and tokenizers, which would otherwise stall a step loop for a long walk. The frozen set is
    process-wide, so an engine's release thaws it (its model sits in reference cycles and must be collectable)
    and freezes it again while other engines still serve."""

    def __init__(self):
        self._serving: set[Executor] = set()  # the executors of the engines whose start-up froze the heap

    def freeze(self, executor: Executor):
        gc.collect()
        gc.freeze()
        self._serving.add(executor)

    def release(self, executor: Executor):
        """An engine's finaliser: thaw, let the executor free the device and drop the model (a collection can
        reach it now), then freeze again for the engines still serving."""
        if executor not in self._serving:  # start-up failed before the freeze
            executor.shutdown()
            return
        self._serving.discard(executor)
        gc.unfreeze()
        try:
            executor.shutdown()
        finally:
            if self._serving:
                gc.collect()
                gc.freeze()


FROZEN_HEAP = FrozenHeap()


class LLMEngine:
    """Requests in, steps out (`add_request`, `step`): queues requests with the Scheduler and runs its steps on
    the Executor's ranks; `LLM` builds generate/chat/stream on it. Calls from several threads are served one after
    the other."""

    def __init__(self, model: str, **options):
        start = perf_counter()
        config = Config.from_options(model, **options)
        self.config = config
        self.executor = Executor(config)
        # released when the engine is collected or the interpreter exits; holds the executor, not the engine
        self._finalizer = weakref.finalize(self, FROZEN_HEAP.release, self.executor)
        try:
            config.num_kvcache_blocks = self.executor.num_kvcache_blocks
            self.tokenizer = load_tokenizer(config)
            tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
            if isinstance(tokenizer_eos, int) and in_vocabulary(tokenizer_eos, config.hf_config.vocab_size,
                                                                 "the tokenizer's eos_token_id"):
                # the primary EOS first (see Scheduler._finish_reason)
                config.eos = (tokenizer_eos,) + tuple(t for t in config.eos if t != tokenizer_eos)
            self.requests = RequestBuilder(config, self.tokenizer)
            self.scheduler = Scheduler(config)
        except BaseException:
            self.exit()
            raise
        runner = self.executor.runner
        split = ", ".join(f"{name} {t:.1f} s" for name, t in runner.start_up_seconds.items())
        tp = f"; tensor parallel {config.tensor_parallel_size}, {runner.all_reduce.describe()}" \
            if runner.all_reduce else ""
        print(f"nanovllm: LLM() ready in {perf_counter() - start:.1f} s ({split}; {config.num_kvcache_blocks} KV "
              f"blocks of {config.kvcache_block_size} tokens{tp})", file=sys.stderr)
        self._seq_ids = count()
        self._rng = random.Random(config.seed)  # seeds for requests that bring none
        self._one_call = OneCallAtATime()
        self._interrupts = InterruptDeferral()  # Ctrl-C waits for the scheduler's bookkeeping
        FROZEN_HEAP.freeze(self.executor)  # the model and the tokenizer live as long as the engine

    def exit(self):
        """Release the model, the KV cache, worker processes and the process group. Safe to call twice. A call
        running in another thread stops at its next step with RuntimeError."""
        with self.executor.stopping():
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.exit()

    @contextmanager
    def _exclusive(self):
        with self._one_call(), self._interrupts.installed():
            self.executor.check_open()
            yield

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int] | dict, sampling_params: SamplingParams) -> Sequence:
        """nano-vllm's manual loop: one sequence, run by step(), its tokens on the returned Sequence. It has no
        text, so what needs text or several branches is refused rather than ignored."""
        request = self.requests.one(prompt, sampling_params)
        sp = request.sampling_params
        if sp.n > 1:
            raise ValueError(f"add_request() runs one sequence, got n={sp.n}: use generate() or stream() for n > 1")
        if sp.stop:
            raise ValueError(f"add_request() does not detokenise, so stop strings {sp.stop!r} would never match: use "
                             "generate() or stream(), or stop_token_ids")
        with self._exclusive():
            return self._enqueue(request.token_ids, request.sampling_params)

    def _enqueue(self, token_ids: list[int], sampling_params: SamplingParams, branch: int = 0,
                 parent: Sequence | None = None) -> Sequence:
        """A request without a seed gets one from the engine's seeded stream; branch i of n draws with seed + i."""
        seq = Sequence(token_ids, sampling_params, next(self._seq_ids), self.config.kvcache_block_size)
        seq.seed = (parent.seed if parent is not None else
                    sampling_params.seed if sampling_params.seed is not None else self._rng.getrandbits(62)) + branch
        seq.branch, seq.parent = branch, parent
        self.scheduler.add(seq)
        return seq

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    # ---- steps -------------------------------------------------------------------------------------------------

    def step(self) -> StepSummary | None:
        """Schedule, run and book one step: which kind it was, its tokens, the sequences that finished. None when
        there is nothing to run."""
        with self._exclusive(), self.executor.in_step():
            return self._step()

    def _step(self) -> StepSummary | None:
        with self.executor.one_step():
            with self._interrupts.deferred():
                step = self.scheduler.schedule()
            if step is None:
                return None
            result = self.executor.call("run", step)
            with self._interrupts.deferred():
                booked = self.scheduler.launched(step)
                finished = self.scheduler.update(booked, result)
            return StepSummary(step.kind, step.num_tokens, finished, booked.sampling)

    def _steps(self):
        """Steps one after the other, or overlapped (async_scheduling)."""
        if self.config.async_scheduling:
            yield from self._overlapped_steps()
            return
        while (summary := self._step()) is not None:
            yield summary
        if not self.scheduler.is_finished():
            raise RuntimeError("the scheduler can make no progress (no step to run, requests left)")

    def _overlapped_steps(self):
        """Like repeated step(), but step N+1 is queued on the device before step N's tokens are read back, so
        host bookkeeping hides behind device work. A sequence that turns out to have stopped one step earlier
        just has that step's token dropped."""
        in_flight = None
        try:
            while True:
                summary = None
                with self.executor.one_step():
                    with self._interrupts.deferred():
                        step = self.scheduler.schedule()
                    previous, in_flight = in_flight, None
                    if step is not None:
                        tokens = self.executor.call("launch", step)
                        with self._interrupts.deferred():
                            in_flight = InFlight(self.scheduler.launched(step), tokens)
                    if previous is not None:
                        booked = previous.booked
                        result = previous.tokens.result()
                        with self._interrupts.deferred():
                            finished = self.scheduler.update(booked, result)
                        summary = StepSummary(booked.step.kind, booked.step.num_tokens, finished, booked.sampling)
                    elif step is None:
                        if self.scheduler.is_finished():
                            return
                        raise RuntimeError("the scheduler can make no progress (no step to run, requests left)")
                if summary is not None:
                    yield summary
        except GeneratorExit:
            # the caller has all it asked for: a step still in flight may carry other requests (add_request),
            # whose tokens must be booked, not lost (unless exit() has released the engine meanwhile)
            if in_flight is not None:
                with self.executor.one_step(check=False):
                    if not self.executor.closed:
                        self.scheduler.update(in_flight.booked, in_flight.tokens.result())
            raise
