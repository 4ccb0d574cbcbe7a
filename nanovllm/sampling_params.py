import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from nanovllm.utils.checks import as_bool

# vLLM raises temperatures in (0, 0.01) to 0.01: dividing logits by less overflows float32 to inf
MIN_TEMPERATURE = 1e-2
FLOAT32_MAX = float(np.finfo(np.float32).max)  # logits and biases are float32 on the device


@dataclass(slots=True)
class SamplingParams:
    """How to pick each new token and when to stop, with vLLM's fields, meanings, defaults and ranges.

    temperature=0 is greedy (argmax); otherwise softmax(logits / temperature) restricted by top_k, top_p and
    min_p. top_k 0 or -1 is off. stop and stop_token_ids end a completion; min_tokens suppresses EOS and the stop
    tokens until that many tokens exist. logprobs=N returns the top-N alternatives of every generated token plus
    the sampled one (raw log-softmax of the model's logits); prompt_logprobs likewise for the prompt tokens.
    truncate_prompt_tokens=k keeps the prompt's last k tokens (-1: the last max_model_len); detokenize=False leaves
    the output text empty (token ids only, no detokenising cost). logit_bias {token id: bias} adds to those
    logits before the penalties; allowed_token_ids restricts every draw to those tokens (vLLM's order: the
    allow-list, min_tokens' bans and the biases, then the penalties, then temperature and the filters).
    bad_words: words never generated: a word's last token is banned wherever the completion's tokens so far end
    with the rest of it (each word tokenised as given and with a leading space, as vLLM does).
    """
    temperature: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    ignore_eos: bool = False
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # bad_words as token-id sequences, set by generate (it needs the tokenizer); see bad_words_token_ids
    _bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            setattr(self, name, _number(name, getattr(self, name)))
        for name in ("top_k", "min_tokens", "n"):
            setattr(self, name, _integer(name, getattr(self, name)))
        for name in ("max_tokens", "seed", "logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name, getattr(self, name)))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            setattr(self, name, as_bool(name, getattr(self, name)))
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.allowed_token_ids = _allowed_token_ids(self.allowed_token_ids)
        self.bad_words = _bad_words(self.bad_words)
        if self.seed == -1:  # vLLM's spelling of "no seed"
            self.seed = None
        self._check_ranges()
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if self.temperature == 0:  # greedy: the filters cannot change the argmax, so they are dropped
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def clone(self) -> "SamplingParams":
        """A deep copy (vLLM's method): editing the copy's lists or dicts leaves this one as it is."""
        return copy.deepcopy(self)

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """The bad words' token-id sequences (vLLM's name), set on the request's own copy that generate
        tokenises (the caller's object keeps None, as it is never edited)."""
        return self._bad_words_token_ids

    def _check_ranges(self):
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               "temperature", self.temperature, "a finite number >= 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= -1, "top_k", self.top_k, "0 or -1 (off), or >= 1")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a finite number > 0")
        if self.max_tokens is None:
            _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        else:
            _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "None or >= 1")
            _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"in [0, max_tokens={self.max_tokens}]")
        _check(self.n >= 1, "n", self.n, ">= 1")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n must be 1 with temperature=0 (greedy gives n equal completions), got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(value >= -1, name, value, "None, -1 (the whole vocabulary) or >= 0")
        if self.truncate_prompt_tokens is not None:
            _check(self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1, "truncate_prompt_tokens",
                   self.truncate_prompt_tokens, "None, -1 (max_model_len) or >= 1")
        if self.stop and not self.detokenize:
            raise ValueError(f"stop strings {self.stop!r} are matched on the text: they need detokenize=True "
                             "(stop_token_ids work without it)")


def _number(name: str, value) -> float:
    """A float from any real number (numpy's too), not a bool."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{name} must be a number in float's range, got an int of {len(str(abs(value)))} "
                         "digits") from None


def _integer(name: str, value) -> int:
    """An int from any integral number (numpy's too), not a bool."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _check(ok: bool, name: str, value, allowed: str):
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError(f"stop must not contain an empty string, got {list(stop)!r}")
    return list(stop)


def _stop_token_ids(ids) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, Integral) for i in ids):
        raise TypeError(f"stop_token_ids must be a list of int, got {ids!r}")
    ids = [int(i) for i in ids]
    if any(i < 0 for i in ids):
        raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(ids)!r}")
    return list(dict.fromkeys(ids))  # vLLM drops repeats, keeping the order


def _logit_bias(bias) -> dict[int, float] | None:
    """{token id: bias} with int ids (or strings of them, as JSON keys arrive) and numeric biases; None when
    empty. A bias may be -inf (the token is never drawn), not +inf or NaN (the row's softmax would be NaN)."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out = {}
    for token, value in bias.items():
        if isinstance(token, str):
            try:
                token = int(token)
            except ValueError:
                raise TypeError(f"logit_bias keys must be token ids (int), got {token!r}") from None
        if isinstance(token, bool) or not isinstance(token, Integral):
            raise TypeError(f"logit_bias keys must be token ids (int), got {token!r}")
        if int(token) < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {int(token)}")
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"logit_bias values must be numbers, got {value!r} for token {int(token)}")
        value = _number(f"logit_bias[{int(token)}]", value)
        if math.isnan(value) or value != -math.inf and abs(value) > FLOAT32_MAX:
            raise ValueError(f"logit_bias values must be finite or -inf (never drawn), and within float32's range "
                             f"(|bias| <= {FLOAT32_MAX:.3e}), got {value} for token {int(token)}")
        out[int(token)] = value
    return out or None


def _allowed_token_ids(ids) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, Integral) for i in ids):
        raise TypeError(f"allowed_token_ids must be a list of int, got {ids!r}")
    if not ids:
        raise ValueError("allowed_token_ids must not be empty (None allows every token)")
    if any(i < 0 for i in ids):
        raise ValueError(f"allowed_token_ids must be token ids >= 0, got {list(ids)!r}")
    return list(dict.fromkeys(int(i) for i in ids))


def _bad_words(words) -> list[str] | None:
    if words is None:
        return None
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise TypeError(f"bad_words must be a list of str, got {words!r}")
    if any(not w.strip() for w in words):
        raise ValueError(f"bad_words must not hold an empty or blank word, got {list(words)!r}")
    return list(words) or None
