"""`LLM`: the offline API of notebooks and research code, as in vLLM."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jaxpaged.engine.arg_utils import create_engine_config
from jaxpaged.engine.generation_config import load_generation_defaults
from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.processor import apply_chat_template
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.serve.chat_messages import ChatMessage
from jaxpaged.serve.protocol import ChatTemplateFields

Prompt = str | list[int] | dict  # text, token ids, or vLLM's TextPrompt / TokensPrompt dict


def _prompt(p: Prompt) -> tuple[str | list[int], str | None]:
    """vLLM's prompt forms as (text or token ids, cache salt): `{"prompt": text}` (TextPrompt)
    and `{"prompt_token_ids": ids}` (TokensPrompt), each with an optional `cache_salt` (prefix-
    cache blocks shared only under the same salt); other keys (multi-modal data, ...) are refused."""
    if not isinstance(p, dict):
        return p, None
    salt = p.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError("a prompt's cache_salt must be a non-empty string")
    keys = set(p) - {"cache_salt"}
    if keys == {"prompt"} and isinstance(p["prompt"], str):
        return p["prompt"], salt
    if keys == {"prompt_token_ids"}:
        return list(p["prompt_token_ids"]), salt
    raise ValueError("a prompt dict must be {'prompt': text} or {'prompt_token_ids': ids} (and optionally "
                     f"'cache_salt'); got keys {sorted(p)}")


class LLM:
    """Load a model and generate for batches of prompts with continuous batching.

    Keyword arguments are vLLM's engine arguments, the names of `jaxpaged serve`'s flags
    (engine/arg_utils.py): `EngineConfig`'s fields (dtype, max_model_len, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, enable_prefix_caching, seed, tokenizer,
    generation_config, max_logprobs, ...), revision / download_dir for a hub id, and vLLM's
    arguments that change nothing here (a warning) or are unsupported (an error). An unknown
    name is a TypeError.
    """

    def __init__(self, model: str, **kwargs):
        config = create_engine_config(str(model), kwargs)
        self.generation_defaults = load_generation_defaults(config.model, config.generation_config,
                                                            config.override_generation_config)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use without SamplingParams: the model's generation config
        (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) over
        SamplingParams' defaults, unless generation_config="vllm"."""
        return self.generation_defaults.sampling_params()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or a TextPrompt / TokensPrompt dict, which
        may carry a `cache_salt`); results come back in input order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_prompt(p) for p in prompts]
        params = sampling_params or self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for (prompt, salt), p in zip(prompts, params):
                ids.append(str(next(self._ids)))
                self.engine.add_request(ids[-1], prompt, dataclasses.replace(p, output_kind="final_only"),
                                        cache_salt=salt)
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:  # a bad prompt or an interrupt: leave nothing running
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return [results[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template
        (`chat_template` or the tokenizer's). `continue_final_message`: the reply continues the
        last message (with `add_generation_prompt=False`); `chat_template_kwargs`: more template
        variables (e.g. `enable_thinking`); `tools`: OpenAI function tools for the template (the
        replies are not parsed for calls, as in vLLM). Messages are OpenAI's: an assistant's
        `tool_calls` (arguments as JSON text or a dict) and `tool` messages reach the template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        fields = ChatTemplateFields.model_validate({"tools": tools})  # the server's checks and forms
        prompt_ids = [apply_chat_template(self.get_tokenizer(), [ChatMessage.model_validate(m).template_message()
                                                                 for m in c], chat_template, add_generation_prompt,
                                          continue_final_message, chat_template_kwargs, fields.template_tools())
                      for c in conversations]
        return self.generate(prompt_ids, sampling_params, use_tqdm)
