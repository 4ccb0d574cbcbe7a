import itertools
from collections.abc import Iterator
from contextlib import closing
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.engine.data_parallel import check_data_parallel_size
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.output import OutputProcessor
from nanovllm.engine.requests import Request
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import StepKind
from nanovllm.sampling_params import SamplingParams


class LLM(LLMEngine):
    """The user-facing entry point: `LLM(model_path, **options).generate(prompts, sampling_params)`, with chat
    and stream beside it, on the engine's requests and steps; also a context manager (`with LLM(path) as llm:`
    calls exit()). With `data_parallel_size=N > 1` it builds a
    DataParallelLLM instead: N engines on Ray (the [ray] extra)."""

    def __new__(cls, model: str, data_parallel_size: int = 1, **options):
        if check_data_parallel_size(data_parallel_size) == 1:
            return super().__new__(cls)
        from nanovllm.engine.data_parallel import DataParallelLLM
        return DataParallelLLM(model, data_parallel_size=data_parallel_size, **options)

    def __init__(self, model: str, data_parallel_size: int = 1, **options):
        super().__init__(model, **options)
        self._request_counter = itertools.count()  # outputs' request_id, as vLLM numbers an LLM's requests

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults with what the model folder's generation_config.json sets (see README)."""
        return SamplingParams(**self.config.generation_defaults)

    get_default_sampling_params = default_sampling_params  # vLLM's name

    def get_tokenizer(self):
        """The model folder's tokenizer (None when it has none), as vLLM's LLM.get_tokenizer()."""
        return self.tokenizer

    def generate(self, prompts: list[str] | list[list[int]] | list[dict],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """One output dict per prompt, in order; with n > 1 its completions are in "outputs"."""
        return self._generate(self._requests(prompts, sampling_params), use_tqdm)

    def _generate(self, requests: list[Request], use_tqdm: bool, cancelled=None) -> list[dict] | None:
        """generate() on checked requests. `cancelled()`, asked after each step, may end the call early: it then
        returns None and the requests are dropped."""
        with self._exclusive():
            groups = self._enqueue_all(requests)
            outputs = OutputProcessor(self.tokenizer, groups, stream=False, prompts=[r.prompt for r in requests],
                                      request_ids=[str(next(self._request_counter)) for _ in requests])
            for _ in self._run(groups, outputs, use_tqdm):
                if cancelled is not None and cancelled():
                    return None
            return outputs.outputs()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict] | None = None) -> list[dict]:
        """generate() over conversations rendered by the tokenizer's chat template (e.g. Qwen3's
        chat_template_kwargs={"enable_thinking": False}); the keyword options are vLLM's."""
        prompts = self.requests.render_chat(messages, chat_template_kwargs, chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, tools=tools)
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompts: list[str] | list[list[int]] | list[dict],
               sampling_params: SamplingParams | list[SamplingParams] | None = None,
               use_tqdm: bool = False) -> Iterator[dict]:
        """Events as tokens arrive: {"index", "completion", "text" (new text), "token_ids" (new ids), "finished",
        "finish_reason", "stop_reason"}. Leaving the loop early drops the requests still running."""
        requests = self._requests(prompts, sampling_params)  # bad input raises here, not at the first next()
        return self._stream(requests, use_tqdm)

    def _stream(self, requests: list[Request], use_tqdm: bool) -> Iterator[dict]:
        with self._exclusive():
            groups = self._enqueue_all(requests)
            outputs = OutputProcessor(self.tokenizer, groups, stream=True)
            for sampled in self._run(groups, outputs, use_tqdm):
                yield from outputs.events(sampled)

    def _requests(self, prompts, sampling_params) -> list[Request]:
        self.executor.check_open()
        if sampling_params is None:
            return self.requests.build(prompts, self.default_sampling_params(), defaults=True)
        return self.requests.build(prompts, sampling_params)

    def _enqueue_all(self, requests: list[Request]) -> list[list[Sequence]]:
        """n sequences per request: the first prefills the prompt, the others share its blocks."""
        groups = []
        for index, request in enumerate(requests):
            first = self._enqueue(request.token_ids, request.sampling_params)
            branches = [first] + [self._enqueue(request.token_ids, request.sampling_params, i, first)
                                  for i in range(1, request.sampling_params.n)]
            for seq in branches:
                seq.request_index = index
            groups.append(branches)
        return groups

    def _run(self, groups: list[list[Sequence]], outputs: OutputProcessor, use_tqdm: bool) -> Iterator[list[Sequence]]:
        """Step until every sequence of this call has finished; yield this call's sequences that got tokens. On
        any exit (done, error, the caller leaving a stream) what is still running is dropped."""
        seqs = [seq for branches in groups for seq in branches]
        pending = {seq.seq_id for seq in seqs}
        follow = outputs.follows_tokens  # else only finished sequences matter: less work per step
        tokens = {StepKind.PREFILL: 0, StepKind.DECODE: 0}
        seconds = {StepKind.PREFILL: 1e-9, StepKind.DECODE: 1e-9}  # throughput over the call, not one noisy step
        try:
            with self.executor.in_step(), closing(self._steps()) as steps, \
                    tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
                t = perf_counter()
                for summary in steps:
                    now = perf_counter()
                    tokens[summary.kind] += summary.num_tokens
                    seconds[summary.kind] += now - t
                    t = now
                    if use_tqdm:
                        bar.set_postfix(**{kind.value: f"{tokens[kind] / seconds[kind]:.0f}tok/s" for kind in tokens})
                    if follow:
                        mine = [seq for seq in summary.sampled if outputs.owns(seq)]
                        for seq in outputs.update(mine):
                            self.scheduler.finish(seq, "stop")
                    else:
                        mine = summary.finished
                    done = [seq.seq_id for seq in mine if seq.is_finished and seq.seq_id in pending]
                    pending.difference_update(done)
                    bar.update(len(done))
                    yield mine
                    if not pending:
                        break
        finally:
            with self._interrupts.deferred():
                for seq in seqs:
                    self.scheduler.abort(seq)
