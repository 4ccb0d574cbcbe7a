"""Prompts and SamplingParams in, checked token-id requests out. Everything is checked before anything is
queued, so a bad request leaves the engine untouched."""
import dataclasses
import functools
import os
from dataclasses import dataclass
from numbers import Integral

from transformers import AutoTokenizer

from nanovllm.config import TOKENIZER_FILES, Config
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.math import cdiv

try:  # transformers renders chat templates with jinja2 (its own optional need: without it chat fails there)
    from jinja2 import TemplateError
except ImportError:
    TemplateError = ()


@dataclass(slots=True)
class Request:
    token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None  # the caller's text, reported in the output as vLLM's RequestOutput.prompt


def load_tokenizer(config: Config):
    """The tokenizer of config.tokenizer (the model folder unless LLM(tokenizer=...)); None where it has none."""
    if not any(os.path.exists(os.path.join(config.tokenizer, name)) for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(config.tokenizer, trust_remote_code=config.trust_remote_code)
    except Exception as e:  # tokenizers' own parse errors are plain Exceptions
        raise ValueError(f"the tokenizer files of {config.tokenizer!r} cannot be read: {type(e).__name__}: "
                         f"{e}") from e


PROMPT_DICT_KEYS = ("prompt", "prompt_token_ids")  # vLLM's TextPrompt and TokensPrompt


def prompt_of_dict(prompt: dict) -> tuple[str | list[int], str | None]:
    """(what to tokenise or the token ids, the prompt's text) of vLLM's prompt dicts: {"prompt": text} (TextPrompt)
    or {"prompt_token_ids": ids} (TokensPrompt), whose optional "prompt" is the ids' text, reported in the output
    and not tokenised."""
    keys = set(prompt)
    if not keys & set(PROMPT_DICT_KEYS):
        raise ValueError(f"a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys "
                         f"{sorted(map(str, keys))}")
    if keys - set(PROMPT_DICT_KEYS):
        raise ValueError(f"prompt dict keys {sorted(map(str, keys - set(PROMPT_DICT_KEYS)))} are not supported: "
                         f"only {' and '.join(map(repr, PROMPT_DICT_KEYS))} are read")
    text = prompt.get("prompt")
    if "prompt" in keys and not isinstance(text, str):
        hint = "" if "prompt_token_ids" in keys else ": token ids go under 'prompt_token_ids'"
        raise TypeError(f"a prompt dict's 'prompt' is text (str), got {type(text).__name__}{hint}")
    if "prompt_token_ids" not in keys:
        return text, text
    ids = prompt["prompt_token_ids"]
    if not (isinstance(ids, (list, tuple)) or hasattr(ids, "tolist")):
        raise TypeError(f"a prompt dict's 'prompt_token_ids' is a list of token ids, got {type(ids).__name__}")
    return ids, text


def check_chat_options(chat_template, add_generation_prompt, continue_final_message, tools) -> dict:
    """LLM.chat's template options, checked, as apply_chat_template's keyword arguments."""
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message=True goes on writing the last message, so it needs "
                         "add_generation_prompt=False")
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a Jinja template (str) or None, got {type(chat_template).__name__}")
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise TypeError(f"tools must be a list of tool dicts or None, got {type(tools).__name__}")
    return dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools)


def chat_message(message: dict, conversation: int, index: int) -> dict:
    """A chat message checked for the template: a non-empty str role, and content that is text. Content may be a
    list of OpenAI-style parts ({"type": "text", "text": ...}), joined with newlines as vLLM does for text-only
    models; it may be left out only by an assistant message that carries tool_calls."""
    where = f"message {index} of conversation {conversation}"
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{where} needs a 'role' (a non-empty str such as 'user'), got {message!r}")
    content = message.get("content")
    if content is None:
        if message.get("tool_calls"):
            return message
        raise ValueError(f"{where} ({role!r}) needs a 'content' (a str or a list of text parts), got {message!r}")
    if isinstance(content, str):
        return message
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where} ({role!r}): 'content' must be a str or a list of text parts, got "
                        f"{type(content).__name__}")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") not in (None, "text"):
            raise ValueError(f"{where} ({role!r}) holds a part of type {part.get('type')!r}: this model reads text "
                             "only")
        else:
            raise TypeError(f"{where} ({role!r}): a content part must be {{'type': 'text', 'text': str}}, got {part!r}")
    return {**message, "content": "\n".join(texts)}


class RequestBuilder:

    def __init__(self, config: Config, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        # a batch's requests usually share their bad words: tokenise each list once, not once a request
        self._bad_words_of = functools.lru_cache(maxsize=64)(lambda words: self.bad_words_token_ids(list(words)))

    def render_chat(self, conversations, chat_template_kwargs: dict | None = None, *, chat_template: str | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    tools: list[dict] | None = None) -> list[dict]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, through the tokenizer's
        chat template (or `chat_template`) as prompt dicts: the token ids (the template writes the special tokens
        itself) and the rendered text, which the output reports as its prompt (vLLM's). The keyword options are
        vLLM's LLM.chat ones, handed to apply_chat_template."""
        if self.tokenizer is None:
            raise ValueError(f"model folder {self.config.model!r} has no tokenizer: chat needs its chat template")
        if not isinstance(conversations, (list, tuple)):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, or a list of such lists")
        if not conversations:
            raise ValueError("messages is empty: a conversation needs at least one message")
        template_options = check_chat_options(chat_template, add_generation_prompt, continue_final_message, tools)
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict or None, got {type(chat_template_kwargs).__name__}")
        if isinstance(conversations[0], dict):
            conversations = [conversations]
        kwargs = dict(chat_template_kwargs or {})
        prompts = []
        for c, conversation in enumerate(conversations):
            if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
                raise TypeError(f"a conversation must be a list of message dicts, got {conversation!r}")
            if not conversation:
                raise ValueError(f"conversation {c} is empty: a conversation needs at least one message")
            conversation = [chat_message(m, c, i) for i, m in enumerate(conversation)]
            try:
                text = self.tokenizer.apply_chat_template(conversation, tokenize=False, **template_options, **kwargs)
            except TemplateError as e:  # a broken template, or one that refuses the conversation
                raise ValueError(f"the chat template failed on conversation {c}: {type(e).__name__}: {e}") from e
            prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False), "prompt": text})
        return prompts

    def build(self, prompts, sampling_params, defaults: bool = False) -> list[Request]:
        """defaults: sampling_params are the model folder's defaults, not the caller's: a default max_tokens that
        would run past max_model_len is cut to fit (a caller's own is refused)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str, token-id lists or prompt dicts, got "
                            f"{type(prompts).__name__}")
        if prompts and all(isinstance(p, Integral) and not isinstance(p, bool) for p in prompts):
            raise TypeError("prompts must be a list of prompts: wrap a single token-id list as [token_ids]")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries but there are "
                                 f"{len(prompts)} prompts: give one SamplingParams or one per prompt")
        else:
            sampling_params = [sampling_params] * len(prompts)
        return [self.one(prompt, sp, defaults) for prompt, sp in zip(prompts, sampling_params)]

    def one(self, prompt, sampling_params: SamplingParams, defaults: bool = False) -> Request:
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, dict):
            prompt, text = prompt_of_dict(prompt)
        token_ids = self.tokenize(prompt)
        if isinstance(sampling_params, SamplingParams):
            # the request's own copy, checked again: fields set after construction (sp.temperature = -1) are
            # refused here like constructor arguments, and later edits of the caller's object change nothing
            sampling_params = dataclasses.replace(sampling_params)
            keep = sampling_params.truncate_prompt_tokens
            if keep is not None:  # the prompt's end, as vLLM's left truncation
                token_ids = token_ids[-(self.config.max_model_len if keep == -1 else keep):]
            sampling_params = self.resolve(sampling_params, len(token_ids), defaults)
            if sampling_params.bad_words:
                sampling_params._bad_words_token_ids = self._bad_words_of(tuple(sampling_params.bad_words))
        self.check(token_ids, sampling_params)
        return Request(token_ids, sampling_params, text)

    def resolve(self, sp: SamplingParams, prompt_len: int, defaults: bool) -> SamplingParams:
        """Settings that mean "as much as the model allows", made concrete (a checked copy, where any changes):
        max_tokens=None (vLLM's "up to max_model_len") becomes the room left, and so does a default max_tokens that
        would not fit; logprobs=-1 / prompt_logprobs=-1 the whole vocabulary (vLLM's meaning; max_logprobs still
        applies); a top_k at or past the vocabulary keeps every token, so it is off."""
        room = self.config.max_model_len - prompt_len
        changes = {}
        if sp.max_tokens is None:
            if room < 1:
                raise ValueError(f"prompt length {prompt_len} leaves no room for a completion under "
                                 f"max_model_len={self.config.max_model_len}")
            changes.update(max_tokens=room)
        elif defaults and 1 <= room < sp.max_tokens:
            changes.update(max_tokens=room, min_tokens=min(sp.min_tokens, room))
        vocab_size = self.config.hf_config.vocab_size
        changes.update({name: vocab_size for name in ("logprobs", "prompt_logprobs") if getattr(sp, name) == -1})
        if sp.top_k >= vocab_size:
            changes.update(top_k=0)
        return dataclasses.replace(sp, **changes) if changes else sp

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenisation of bad words: each word (leading blanks dropped) as it is, and with a leading space
        where that gives another first token and as many tokens (mid-text words, for tokenizers that mark the
        space in the token)."""
        if self.tokenizer is None:
            raise ValueError(f"bad_words {words!r} need the tokenizer, but model folder {self.config.model!r} has "
                             "none: use logit_bias with -inf for single tokens")
        sequences = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not plain:  # the tokenizer drops all of it (its normaliser, say): nothing to ban
                raise ValueError(f"bad_words word {word!r} tokenises to no tokens with this model's tokenizer")
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            sequences.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        vocab_size = self.config.hf_config.vocab_size
        for ids in sequences:
            if max(ids) >= vocab_size:
                raise ValueError(f"bad_words {words!r} tokenise to {sequences}, ids outside the model's vocabulary "
                                 f"[0, vocab_size={vocab_size})")
        return sequences

    def _check_drawable(self, sp: SamplingParams):
        """Refuse settings under which a step would have no token to draw: every allowed token (or the whole
        vocabulary) biased to -inf, or, while min_tokens holds them back, nothing but EOS and stop tokens."""
        banned = {t for t, b in (sp.logit_bias or {}).items() if b == float("-inf")}
        banned |= {word[0] for word in sp.bad_words_token_ids or () if len(word) == 1}  # banned at every step
        held = set(sp.stop_token_ids) | set(self.config.eos)  # EOS also under ignore_eos (the sampler's _bans)
        vocab_size = self.config.hf_config.vocab_size
        if sp.allowed_token_ids is not None:
            left = [t for t in sp.allowed_token_ids if t not in banned]
            what = f"allowed_token_ids {sp.allowed_token_ids}"
        else:  # the whole vocabulary less the banned: listed only when it is small enough to matter
            left = [t for t in range(vocab_size) if t not in banned] if vocab_size - len(banned) <= len(held) else None
            what = "the vocabulary"
        if left is not None and not left:
            raise ValueError(f"logit_bias (-inf) and one-token bad_words ban every token of {what}: no token is "
                             "left to draw")
        if sp.min_tokens and left is not None and set(left) <= held:
            raise ValueError(f"min_tokens={sp.min_tokens} holds back EOS and the stop tokens, and they are all that "
                             f"{what} leaves to draw")

    def tokenize(self, prompt) -> list[int]:
        if hasattr(prompt, "tolist"):  # a numpy array or torch tensor of token ids
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model folder {self.config.model!r} has no tokenizer: pass prompts as token ids")
            try:
                token_ids = self.tokenizer.encode(prompt)
            except TypeError:  # tokenizers' word for text that is not valid Unicode (a lone surrogate)
                try:
                    prompt.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"prompt {prompt[:40]!r} is not valid text: {e.reason} at position "
                                     f"{e.start}") from None
                raise
        elif isinstance(prompt, (list, tuple)):
            if set(map(type, prompt)) <= {int}:  # the common case at C speed (isinstance against the Integral
                token_ids = list(prompt)  # ABC took ~0.4 us a token, 60 ms for bench.py's prompts: the GPU waited)
            else:
                token_ids = [int(t) if isinstance(t, Integral) and not isinstance(t, bool) else t for t in prompt]
                for t in token_ids:
                    if isinstance(t, bool) or not isinstance(t, int):
                        raise TypeError(f"token ids must be ints, got {t!r} ({type(t).__name__})")
        else:
            raise TypeError(f"a prompt must be a str, a list of token ids or a prompt dict, got "
                            f"{type(prompt).__name__}")
        if not token_ids:
            raise ValueError(f"prompt {prompt!r} is empty: a prompt needs at least one token")
        vocab_size = self.config.hf_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab_size:
            t = next(t for t in token_ids if not 0 <= t < vocab_size)
            raise ValueError(f"token id {t} is out of range: it must be in [0, vocab_size={vocab_size})")
        return token_ids

    def check(self, token_ids: list[int], sp: SamplingParams):
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        n, max_len = len(token_ids), self.config.max_model_len
        if n + sp.max_tokens > max_len:
            raise ValueError(f"prompt length {n} + max_tokens {sp.max_tokens} = {n + sp.max_tokens} exceeds "
                             f"max_model_len={max_len}")
        vocab_size = self.config.hf_config.vocab_size
        cap = vocab_size if self.config.max_logprobs == -1 else min(self.config.max_logprobs, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(sp, name) or 0) > cap:
                raise ValueError(f"{name}={getattr(sp, name)} is more than this engine returns: at most {cap} "
                                 f"(LLM(max_logprobs=...), default 20, -1 for the whole vocabulary of {vocab_size})")
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {sp.stop!r} need the text, but model folder {self.config.model!r} has "
                             "no tokenizer: use stop_token_ids")
        for name, ids in (("stop_token_ids", sp.stop_token_ids), ("logit_bias", sp.logit_bias or ()),
                          ("allowed_token_ids", sp.allowed_token_ids or ())):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"{name} holds {t}, outside the vocabulary: ids must be in "
                                     f"[0, vocab_size={vocab_size})")
        if sp.logit_bias is not None or sp.allowed_token_ids is not None or sp.bad_words:
            self._check_drawable(sp)
        bs, num_blocks = self.config.kvcache_block_size, self.config.num_kvcache_blocks
        needed = cdiv(n + sp.max_tokens - 1, bs)  # the last sampled token never needs a cache slot
        if needed > num_blocks:
            raise ValueError(f"prompt length {n} + max_tokens {sp.max_tokens} needs {needed} KV blocks of "
                             f"{bs} tokens but the cache has only num_kvcache_blocks={num_blocks}: it can never fit")
