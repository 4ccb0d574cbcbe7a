"""What a step sends back: its sampled ids, logprobs and prompt logprobs, copied to the host behind the sampler
so that reading one step's results waits for that step alone."""
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanovllm.engine.sequence import Logprob
from nanovllm.engine.step import StepResult
from nanovllm.engine.step_inputs import Row, wants_prompt_logprobs
from nanovllm.layers.sampler import SamplerOutput, TokenLogprobs, compute_logprobs


@dataclass(slots=True)
class PromptScores:
    """One row's prompt logprobs of a step: `count` entries from `offset` in the step's scores."""
    scores: TokenLogprobs | None
    first: bool  # the chunk starts the prompt: token 0 has no logprob
    count: int
    offset: int = 0
    targets: list[int] | None = None


@dataclass(slots=True)
class StepOutput:
    sampler: SamplerOutput
    num_logprobs: list[int | None]  # per row, as its SamplingParams asked
    prompt_logprobs: dict[int, PromptScores] | None = None
    num_prompt_logprobs: list[int | None] | None = None


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return host.copy_(t, non_blocking=True)


PEER_POLL_SECONDS = 1e-4


class SampledTokens:
    """A step's sampled ids (and logprobs) on their way to the host: copies queued right behind the sampler and an
    event, so reading waits for this step alone, not for the steps launched after it.

    watch (tensor parallelism): says why a peer rank is gone, or None. The wait then polls the event and raises
    RuntimeError with that reason within a poll of the peer's death: the step's collectives can never finish, and
    a blocking wait would never return."""

    def __init__(self, output: StepOutput, watch: Callable[[], str | None] | None = None):
        self._output = output
        self._watch = watch
        out = output.sampler
        self._ids = _host_copy(out.token_ids)
        self._logprobs = None if out.logprobs is None else [_host_copy(t) for t in out.logprobs.tensors()]
        self._prompt = {i: [_host_copy(t) for t in p.scores.tensors()] for i, p in
                        (output.prompt_logprobs or {}).items() if p.scores is not None}
        self._ready = None
        if out.token_ids.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(out.token_ids.device))

    def tolist(self) -> list[int]:
        if self._ready is not None:
            if self._watch is None:
                self._ready.synchronize()
            else:
                wait_watching(self._ready, self._watch)
        return self._ids.tolist()

    def result(self) -> StepResult:
        ids = self.tolist()
        logprobs = None
        if self._logprobs is not None:
            chosen, top_ids, top_lps, ranks = (t.tolist() for t in self._logprobs)
            logprobs = [None if n is None else _entry(ids[i], chosen[i], ranks[i], top_ids[i][:n], top_lps[i][:n])
                        for i, n in enumerate(self._output.num_logprobs)]
        prompt = None
        if self._output.prompt_logprobs is not None:
            prompt = {}
            for i, p in self._output.prompt_logprobs.items():
                entries = [None] if p.first else []
                if p.count:
                    n = self._output.num_prompt_logprobs[i]
                    chosen, top_ids, top_lps, ranks = (t.tolist() for t in self._prompt[i])
                    for j in range(p.offset, p.offset + p.count):
                        entries.append(_entry(p.targets[j - p.offset], chosen[j], ranks[j], top_ids[j][:n],
                                              top_lps[j][:n]))
                prompt[i] = entries
        return StepResult(ids, logprobs, prompt)


def wait_watching(event: torch.cuda.Event, watch: Callable[[], str | None]):
    """Wait for `event`, checking between polls that no peer is gone."""
    while not event.query():
        why = watch()
        if why is not None:
            raise RuntimeError(why)
        time.sleep(PEER_POLL_SECONDS)


def _entry(token: int, logprob: float, rank: int, top_ids: list[int],
           top_logprobs: list[float]) -> dict[int, Logprob]:
    """{token id: Logprob}: the chosen token first, then the top-N most likely first, the chosen one once (vLLM
    builds its dict in that order; a chosen token among the top N takes its entry there, rank included)."""
    entry = {token: Logprob(logprob, rank)}
    for place, (top_id, top_logprob) in enumerate(zip(top_ids, top_logprobs), 1):
        entry[top_id] = Logprob(top_logprob, place)
    return entry


def score_prompts(rows: list[Row], logits: torch.Tensor) -> dict[int, PromptScores]:
    """For rows scoring their prompt: the logprobs of prompt token p + 1 given tokens <= p, for each p of the
    chunk (each row contributes all its chunk's positions to logits, in order; other rows their last)."""
    picks, targets, spans, at = [], [], {}, 0
    for i, row in enumerate(rows):
        if not wants_prompt_logprobs(row):
            at += 1
            continue
        state = row.state
        start, end = state.num_computed, state.num_computed + row.num_tokens
        scored = range(start, min(end, state.num_prompt_tokens - 1))  # the last prompt position predicts output
        spans[i] = (len(picks), len(scored), start == 0)
        picks.extend(at + p - start for p in scored)
        targets.extend(state.token_ids[p + 1] for p in scored)
        at += row.num_tokens
    if not picks:
        return {i: PromptScores(None, first, 0) for i, (_, _, first) in spans.items()}
    num_top = max(max(rows[i].state.sampling_params.prompt_logprobs for i in spans), 1)
    scores = compute_logprobs(logits, torch.tensor(targets, device=logits.device), num_top,
                              torch.tensor(picks, device=logits.device))
    return {i: PromptScores(scores if n else None, first, n, offset, targets[offset:offset + n])
            for i, (offset, n, first) in spans.items()}

def last_of_each_row(rows: list[Row]) -> list[int]:
    """Where each row's last token sits among the computed logits (see PrefillLayout.logits_indices)."""
    out, at = [], 0
    for row in rows:
        at += row.num_tokens if wants_prompt_logprobs(row) else 1
        out.append(at - 1)
    return out
