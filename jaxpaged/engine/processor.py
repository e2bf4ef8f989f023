"""Prompts in, `EngineCoreRequest`s out: tokenizing and every check a request must pass before
the engine core sees it (vLLM's Processor). Runs in the client (the API server process, or the
offline `LLMEngine`), so a bad request is a 400 at once and the core only schedules."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import transformers

from jaxpaged.engine.messages import CoreInfo, EngineCoreRequest
from jaxpaged.engine.sample.features import features_of, variant_for
from jaxpaged.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxpaged.engine.structured_output.compiler import GrammarCompiler, get_grammar_compiler


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase | None:
    """The HF tokenizer in `path`, or None when the directory has none (token-id prompts only)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


def encode(tokenizer: transformers.PreTrainedTokenizerBase | None, prompt: str | list[int],
           add_special_tokens: bool = True) -> list[int]:
    """A prompt's token ids (text through the tokenizer, with its special tokens, e.g. BOS,
    unless `add_special_tokens` is False)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as token ids")
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    return [int(t) for t in prompt]


# apply_chat_template arguments that `chat_template_kwargs` may not set: the request's own fields,
# and those that change what the call returns
RESERVED_TEMPLATE_KWARGS = frozenset((
    "chat_template", "tokenize", "conversation", "messages", "tools", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
    "return_assistant_tokens_mask"))


def apply_chat_template(tokenizer: transformers.PreTrainedTokenizerBase | None, messages: list[dict],
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        chat_template_kwargs: dict[str, Any] | None = None,
                        tools: list[dict[str, Any]] | None = None, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a conversation through `chat_template` (else the tokenizer's).
    `continue_final_message`: the last message stays open for the model to continue;
    `chat_template_kwargs` reach the template as variables (e.g. `enable_thinking`); `tools`:
    OpenAI function tools, the template's `tools` (as in transformers); `add_special_tokens`:
    the tokenizer's own (e.g. BOS) added to the rendered text (off: templates spell them)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so chat is not available")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: give one (the server's --chat-template)")
    kwargs = dict(chat_template_kwargs or {})
    if reserved := sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys()):
        raise ValueError(f"chat_template_kwargs may not set {reserved}")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tools=tools, **kwargs)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


class Processor:
    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase | None, info: CoreInfo, seed: int = 0,
                 max_logprobs: int = MAX_LOGPROBS, tokenizer_path: str | None = None):
        """`tokenizer_path`: the tokenizer's folder, for structured output's grammars."""
        self.tokenizer, self.info, self.max_logprobs = tokenizer, info, max_logprobs
        self.grammars: GrammarCompiler | None = None
        if tokenizer is not None and tokenizer_path is not None:
            self.grammars = get_grammar_compiler(tokenizer_path, info.vocab_size, tuple(info.eos_token_ids))
        # max_tokens of a request that sets none: up to max_model_len, and at most this (the
        # model's generation config, applied by the server)
        self.default_max_tokens: int | None = None
        self._rng = np.random.default_rng(seed)

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None, cache_salt: str | None = None) -> EngineCoreRequest:
        """The request as the core takes it; raises ValueError (with the numbers) if it can never run.
        The prompt is cut to `truncate_prompt_tokens`, `bad_words` are tokenized, and a request
        without a seed gets one here, so its samples are reproducible from it."""
        ids = self._truncate(encode(self.tokenizer, prompt), params.truncate_prompt_tokens)
        if not ids:
            raise ValueError("the prompt is empty")
        info, vocab = self.info, self.info.vocab_size
        room = info.max_model_len - len(ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(room, self.default_max_tokens or room)
        if max_tokens > room or (params.max_tokens is None and room < 1):
            raise ValueError(
                f"This model's maximum context length is {info.max_model_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
                f"for the completion). Please reduce the prompt or max_tokens.")
        for name in ("logprobs", "prompt_logprobs"):
            if (asked := getattr(params, name)) is not None and asked > self.max_logprobs:
                raise ValueError(f"Requested {name} of {asked}, which is greater than max allowed: "
                                 f"{self.max_logprobs} (max_logprobs)")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in (*params.stop_token_ids, *params.logit_bias)):
            raise ValueError(f"stop_token_ids and logit_bias token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.allowed_token_ids or ()):
            raise ValueError(f"allowed_token_ids contains out-of-vocab token ids (must be in [0, {vocab}))")
        if params.bad_words:
            params = dataclasses.replace(params, bad_words_token_ids=self._bad_words_token_ids(params.bad_words))
        if any(not 0 <= t < vocab for word in params.bad_words_token_ids or () for t in word):
            raise ValueError(f"bad_words token ids must be in [0, {vocab})")
        blocks = -(-(len(ids) + max_tokens) // info.block_size)
        if blocks > info.num_kv_blocks:
            raise ValueError(f"the request needs {blocks} KV blocks but the pool has only {info.num_kv_blocks}")
        if params.structured_outputs is not None:  # compiled here, so that a bad spec is refused at once
            self.structured_output_grammars().compile(params.structured_outputs)
        variant_for(features_of(params, vocab))  # a request no compiled variant serves is rejected here
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**63)))
        return EngineCoreRequest(request_id, ids, params, max_tokens, arrival_time or time.monotonic(), cache_salt)

    def structured_output_grammars(self) -> GrammarCompiler:
        if self.grammars is None:
            raise ValueError("structured outputs need the model's tokenizer, and this model has none")
        return self.grammars

    def _truncate(self, ids: list[int], k: int | None) -> list[int]:
        """The last `k` prompt tokens (vLLM's truncate_prompt_tokens; -1: max_model_len)."""
        if k is None:
            return ids
        if k > self.info.max_model_len:
            raise ValueError(f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                             f"({self.info.max_model_len}). Please, select a smaller truncation size.")
        return ids[-(self.info.max_model_len if k == -1 else k):]

    def _bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad words: each word as it is (leading space stripped), and
        with a leading space where that gives other tokens of the same count."""
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer, and this model has none")
        out: list[list[int]] = []
        for word in bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"bad_words: {word!r} has no tokens")
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            out.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return out
