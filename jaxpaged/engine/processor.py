"""Prompts in, `EngineCoreRequest`s out: tokenizing and every check a request must pass before
the engine core sees it (vLLM's Processor). Runs in the client (the API server process, or the
offline `LLMEngine`), so a bad request is a 400 at once and the core only schedules."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import transformers

from jaxpaged.engine.messages import CoreInfo, EngineCoreRequest
from jaxpaged.engine.sample.features import features_of, variant_for
from jaxpaged.engine.sampling_params import MAX_LOGPROBS, SamplingParams


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase | None:
    """The HF tokenizer in `path`, or None when the directory has none (token-id prompts only)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


def encode(tokenizer: transformers.PreTrainedTokenizerBase | None, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids (text through the tokenizer)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as token ids")
        return tokenizer.encode(prompt)
    return [int(t) for t in prompt]


class Processor:
    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase | None, info: CoreInfo, seed: int = 0,
                 max_logprobs: int = MAX_LOGPROBS):
        self.tokenizer, self.info, self.max_logprobs = tokenizer, info, max_logprobs
        # max_tokens of a request that sets none: up to max_model_len, and at most this (the
        # model's generation config, applied by the server)
        self.default_max_tokens: int | None = None
        self._rng = np.random.default_rng(seed)

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None) -> EngineCoreRequest:
        """The request as the core takes it; raises ValueError (with the numbers) if it can never run.
        A request without a seed gets one here, so its samples are reproducible from it."""
        ids = encode(self.tokenizer, prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        info, vocab = self.info, self.info.vocab_size
        room = info.max_model_len - len(ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(room, self.default_max_tokens or room)
        if max_tokens > room or room < 1:
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
        blocks = -(-(len(ids) + max_tokens) // info.block_size)
        if blocks > info.num_kv_blocks:
            raise ValueError(f"the request needs {blocks} KV blocks but the pool has only {info.num_kv_blocks}")
        variant_for(features_of(params, vocab))  # a request no compiled variant serves is rejected here
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**63)))
        return EngineCoreRequest(request_id, ids, params, max_tokens, arrival_time or time.monotonic())
