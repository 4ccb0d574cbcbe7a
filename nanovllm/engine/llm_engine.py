import threading
import weakref
from contextlib import closing, contextmanager
from dataclasses import dataclass
from itertools import count
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.executor import Executor
from nanovllm.engine.model_runner import SampledTokens
from nanovllm.engine.requests import RequestBuilder, load_tokenizer
from nanovllm.engine.scheduler import BookedStep, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import StepKind, StepSummary
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True)
class InFlight:
    booked: BookedStep
    tokens: SampledTokens


class LLMEngine:
    """Requests in, outputs out: queues requests with the Scheduler and runs its steps on the Executor's ranks.
    Calls from several threads are served one after the other."""

    def __init__(self, model: str, **options):
        config = Config.from_options(model, **options)
        self.config = config
        self.executor = Executor(config)
        # released when the engine is collected or the interpreter exits; holds the executor, not the engine
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        try:
            config.num_kvcache_blocks = self.executor.num_kvcache_blocks
            self.tokenizer = load_tokenizer(config.model)
            tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
            if isinstance(tokenizer_eos, int) and tokenizer_eos not in config.eos:
                config.eos += (tokenizer_eos,)
            self.requests = RequestBuilder(config, self.tokenizer)
            self.scheduler = Scheduler(config)
        except BaseException:
            self.exit()
            raise
        self._seq_ids = count()
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside generate/step, to refuse re-entrant calls

    def exit(self):
        """Release the model, the KV cache, worker processes and the process group. Safe to call twice."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.exit()

    @contextmanager
    def _exclusive(self):
        if self._owner == threading.get_ident():
            raise RuntimeError("this LLM is already busy in this thread (generate or step called from inside "
                               "its own generate/stream loop); finish or close that loop first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                self.executor.check_open()
                yield
            finally:
                self._owner = None

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
        request = self.requests.one(prompt, sampling_params)
        with self._exclusive():
            return self._enqueue(request.token_ids, request.sampling_params)

    def _enqueue(self, token_ids: list[int], sampling_params: SamplingParams) -> Sequence:
        seq = Sequence(token_ids, sampling_params, next(self._seq_ids), self.config.kvcache_block_size)
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
        step = self.scheduler.schedule()
        if step is None:
            return None
        result = self.executor.call("run", step)
        return StepSummary(step.kind, step.num_tokens, self.scheduler.postprocess(step, result))

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
                step = self.scheduler.schedule()
                previous, in_flight = in_flight, None
                if step is not None:
                    tokens = self.executor.call("launch", step)
                    in_flight = InFlight(self.scheduler.launched(step), tokens)
                if previous is not None:
                    booked = previous.booked
                    finished = self.scheduler.update(booked, previous.tokens.result())
                    yield StepSummary(booked.step.kind, booked.step.num_tokens, finished)
                elif step is None:
                    if self.scheduler.is_finished():
                        return
                    raise RuntimeError("the scheduler can make no progress (no step to run, requests left)")
        except GeneratorExit:
            # the caller has all it asked for: a step still in flight may carry other requests (add_request),
            # whose tokens must be booked, not lost
            if in_flight is not None:
                self.scheduler.update(in_flight.booked, in_flight.tokens.result())
            raise

    # ---- generate ----------------------------------------------------------------------------------------------

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[dict]:
        self.executor.check_open()
        requests = self.requests.build(prompts, sampling_params)
        with self._exclusive():
            seqs = [self._enqueue(r.token_ids, r.sampling_params) for r in requests]
            try:
                with self.executor.in_step():
                    self._run_until_done(seqs, use_tqdm)
            except BaseException:
                for seq in seqs:
                    self.scheduler.abort(seq)
                raise
            return [self._output(seq) for seq in seqs]

    def _run_until_done(self, seqs: list[Sequence], use_tqdm: bool):
        pending = {seq.seq_id for seq in seqs}
        tps = {StepKind.PREFILL: 0.0, StepKind.DECODE: 0.0}
        with tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar, \
                closing(self._steps()) as steps:
            t = perf_counter()
            for summary in steps:
                now = perf_counter()
                if summary.num_tokens:
                    tps[summary.kind] = summary.num_tokens / max(now - t, 1e-9)
                t = now
                bar.set_postfix(prefill=f"{tps[StepKind.PREFILL]:.0f}tok/s", decode=f"{tps[StepKind.DECODE]:.0f}tok/s")
                done = [seq for seq in summary.finished if seq.seq_id in pending]
                pending.difference_update(seq.seq_id for seq in done)
                bar.update(len(done))
                if not pending:
                    break

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else None
        return {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason,
                "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens],
                "num_cached_tokens": seq.num_cached_prompt_tokens or 0}
