"""Finished and growing sequences in, what the user sees out: text (incremental where stop strings or streaming
need it), stop strings, output dicts and stream events."""
from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from nanovllm.engine.sequence import Logprob, Sequence


def text_token_ids(seq: Sequence) -> list[int]:
    """The completion tokens whose text the user sees: as in vLLM, the stop token (EOS or one of stop_token_ids)
    that ended it is left out of the text, unless include_stop_str_in_output; token_ids keep it."""
    ids = seq.completion_token_ids
    if seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str) \
            and not seq.sampling_params.include_stop_str_in_output:
        return ids[:-1]
    return ids


class Output(dict):
    """An output dict (nano-vllm's) whose keys also read as attributes, as vLLM's RequestOutput and
    CompletionOutput: `out["text"]` or `out.outputs[0].text`. A prompt's output also has vLLM's `request_id`, an
    attribute only: it numbers the engine's requests, so it is not one of the fields by which the outputs of the
    same request in two calls compare equal."""
    __slots__ = ("request_id",)

    def __getstate__(self) -> dict:  # the slot, for pickle's every protocol and for copy
        return {"request_id": self.request_id} if hasattr(self, "request_id") else {}

    def __setstate__(self, state: dict):
        for name, value in state.items():
            setattr(self, name, value)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"an output has no field {name!r}; its fields: {sorted(self)}") from None


@dataclass(slots=True)
class Completion:
    """One completion's text as its tokens arrive."""
    seq: Sequence
    decoder: DecodeStream | None  # None: the text is decoded once, at the end
    text: str = ""  # what the decoder released: complete characters only
    num_decoded: int = 0  # completion tokens fed to the decoder
    num_released: int = 0  # of those, the tokens whose text is in `text` (the rest end in a partial character)
    num_sent_tokens: int = 0  # stream events: what was already sent
    num_sent_chars: int = 0
    finish_sent: bool = False


class OutputProcessor:
    """Tracks the completions of one generate/stream call. `update` takes the sequences that received tokens in
    a step and returns those a stop string has ended; `events` and `outputs` give what the user sees."""

    def __init__(self, tokenizer, requests: list[list[Sequence]], stream: bool, prompts: list[str | None] = (),
                 request_ids: list[str] = ()):
        self.tokenizer = tokenizer
        self.requests = requests
        self.prompts = list(prompts) or [None] * len(requests)  # the prompts' text, where given as text
        self.request_ids = list(request_ids)  # the engine's numbering, for outputs() (a stream reports none)
        self.completions: dict[int, Completion] = {}
        self._token_texts: dict[int, str] = {}  # logprobs' decoded_token, each id decoded once
        self.stream = stream
        for branches in requests:
            for seq in branches:
                sp = seq.sampling_params
                incremental = tokenizer is not None and sp.detokenize and (stream or bool(sp.stop))
                decoder = DecodeStream(skip_special_tokens=sp.skip_special_tokens) if incremental else None
                self.completions[seq.seq_id] = Completion(seq, decoder)

    @property
    def follows_tokens(self) -> bool:
        """Whether each step's new tokens matter (a stream, or text to watch for stop strings), or only the end."""
        return self.stream or any(c.decoder is not None for c in self.completions.values())

    def owns(self, seq: Sequence) -> bool:
        return seq.seq_id in self.completions

    def update(self, seqs: list[Sequence]) -> list[Sequence]:
        """Detokenise new tokens; return the sequences whose text now holds a stop string (cut at it)."""
        stopped = []
        for seq in seqs:
            c = self.completions.get(seq.seq_id)
            if c is not None and c.decoder is not None and self._advance(c):
                stopped.append(seq)
        return stopped

    def _advance(self, c: Completion) -> bool:
        sp, ids = c.seq.sampling_params, text_token_ids(c.seq)
        backend = self.tokenizer.backend_tokenizer
        while c.num_decoded < len(ids):
            chunk = c.decoder.step(backend, ids[c.num_decoded])
            c.num_decoded += 1
            if chunk is not None:
                c.text += chunk
                c.num_released = c.num_decoded
            # as vLLM: a stop string counts from the token after min_tokens on. DecodeStream holds back text that
            # ends in a partial UTF-8 character, whole characters before it included: those are searched too
            if sp.stop and c.num_decoded > sp.min_tokens:
                held = "" if chunk is not None else self._held_text(c, ids).rstrip("\ufffd")
                if self._cut_at_stop(c, len(chunk or held), held):
                    return True
        if c.seq.is_finished:
            self._flush(c, ids)
        return False

    def _held_text(self, c: Completion, ids: list[int]) -> str:
        """The text of the tokens the decoder holds back, decoded after a few released ones for context."""
        skip_special = c.seq.sampling_params.skip_special_tokens
        start = max(0, c.num_released - 4)
        before = self.tokenizer.decode(ids[start:c.num_released], skip_special_tokens=skip_special)
        window = self.tokenizer.decode(ids[start:c.num_decoded], skip_special_tokens=skip_special)
        return window[len(before):] if window.startswith(before) else ""

    def _flush(self, c: Completion, ids: list[int]):
        """A finished completion's text is the decode of all its tokens, as without a decoder: what the decoder
        still holds (a last partial character, after whole ones already searched for stop strings) is added. The
        completion ended for another reason, so stop strings are not looked for again (only those containing
        U+FFFD could meet the partial character), and a stream's text only grows."""
        if c.num_released == c.num_decoded or isinstance(c.seq.stop_reason, str):
            return  # nothing held, or the text was cut at a stop string already
        c.num_released = c.num_decoded
        full = self.tokenizer.decode(ids, skip_special_tokens=c.seq.sampling_params.skip_special_tokens)
        if full.startswith(c.text):
            c.text = full

    @staticmethod
    def _cut_at_stop(c: Completion, new_chars: int, held: str = "") -> bool:
        """A stop string may span tokens: look for each one only where the newest text completes it (one that
        completed earlier, before min_tokens, does not count). `held`: text after c.text not released yet."""
        sp = c.seq.sampling_params
        text = c.text + held
        hits = [(text.find(s, max(0, len(text) - new_chars - len(s) + 1)), s) for s in sp.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, stop = min(hits)
        c.text = text[:i + len(stop)] if sp.include_stop_str_in_output else text[:i]
        c.seq.stop_reason = stop
        return True

    def text(self, c: Completion) -> str | None:
        if c.decoder is not None:
            return c.text
        if self.tokenizer is None:
            return None
        if not c.seq.sampling_params.detokenize:
            return ""
        skip_special = c.seq.sampling_params.skip_special_tokens
        return self.tokenizer.decode(text_token_ids(c.seq), skip_special_tokens=skip_special)

    # ---- what the user sees ------------------------------------------------------------------------------------

    def events(self, seqs: list[Sequence]) -> list[dict]:
        """Stream events for sequences that got tokens or finished: new text (held back while it may still
        become a stop string), new token ids, whether it finished."""
        events = []
        for seq in seqs:
            c = self.completions.get(seq.seq_id)
            if c is None or c.finish_sent:  # overlapped steps: a step launched before it stopped names it again
                continue
            ids = seq.completion_token_ids
            text = self.text(c) or ""
            safe = len(text)
            if not seq.is_finished and seq.sampling_params.stop:
                safe -= max(len(s) for s in seq.sampling_params.stop) - 1
            new_ids, new_text = ids[c.num_sent_tokens:], text[c.num_sent_chars:max(safe, c.num_sent_chars)]
            if not new_ids and not new_text and not seq.is_finished:
                continue
            c.num_sent_tokens, c.num_sent_chars = len(ids), c.num_sent_chars + len(new_text)
            c.finish_sent = seq.is_finished
            index, branch = self._position(seq)
            events.append({"index": index, "completion": branch, "text": new_text, "token_ids": new_ids,
                           "finished": seq.is_finished, "finish_reason": seq.finish_reason,
                           "stop_reason": seq.stop_reason})
        return events

    def _position(self, seq: Sequence) -> tuple[int, int]:
        return seq.request_index, seq.branch

    def outputs(self) -> list[dict]:
        results = []
        for branches, prompt, request_id in zip(self.requests, self.prompts, self.request_ids, strict=True):
            completions = [self._completion(seq) for seq in branches]
            first = branches[0]
            prompt_logprobs = first.prompt_logprobs
            if prompt_logprobs is None and first.sampling_params.prompt_logprobs is not None:
                prompt_logprobs = [None]  # a one-token prompt goes straight to decode: nothing scored it
            self._decode_logprob_tokens(prompt_logprobs, first)
            top = {key: value for key, value in completions[0].items() if key != "index"}
            results.append(Output(top, prompt=prompt, finished=True,
                                  prompt_token_ids=first.token_ids[:first.num_prompt_tokens],
                                  prompt_logprobs=prompt_logprobs,
                                  num_cached_tokens=first.num_cached_prompt_tokens or 0, outputs=completions))
            results[-1].request_id = request_id
        return results

    def _completion(self, seq: Sequence) -> Output:
        self._decode_logprob_tokens(seq.logprobs, seq)
        return Output(index=seq.branch, text=self.text(self.completions[seq.seq_id]),
                      token_ids=seq.completion_token_ids, finish_reason=seq.finish_reason,
                      stop_reason=seq.stop_reason, logprobs=seq.logprobs, cumulative_logprob=seq.cumulative_logprob)

    def _decode_logprob_tokens(self, entries: list[dict[int, Logprob] | None] | None, seq: Sequence):
        """Each Logprob's decoded_token, as vLLM fills it: the token decoded alone (`tokenizer.decode([id])`); left
        None without a tokenizer or with detokenize=False."""
        if not entries or self.tokenizer is None or not seq.sampling_params.detokenize:
            return
        texts = self._token_texts
        for entry in entries:
            for token_id, logprob in (entry or {}).items():
                if logprob.decoded_token is None:
                    text = texts.get(token_id)
                    if text is None:
                        text = texts[token_id] = self.tokenizer.decode([token_id])
                    logprob.decoded_token = text
