"""OpenAI request schemas (pydantic) and their mapping to `SamplingParams`.

Responses are plain dicts built by the route modules; requests are validated here so that
any bad field becomes a 400 with the field's name, never a 500.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxpaged.engine.generation_config import SAMPLING_KEYS, GenerationDefaults
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.serve.chat_messages import ChatCompletionNamedToolChoiceParam, ChatCompletionToolsParam, ChatMessage
from jaxpaged.serve.structured_outputs import StructuredOutputFields

INT32_MAX = 2**31 - 1
MAX_N = 128  # samples per prompt
MAX_CHOICES = 1024  # prompts x n per HTTP request

# Fields of the OpenAI / vLLM APIs that jaxpaged does not implement, with the values that ask
# for nothing (besides unset, empty, false or 0): any other value is a 400 naming the field,
# never a silent no-op. Unknown fields are ignored, as in vLLM.
UNSUPPORTED: dict[str, tuple] = {
    "suffix": (), "functions": (), "function_call": (), "use_beam_search": (), "length_penalty": (1, 1.0),
    "prompt_embeds": (), "guided_whitespace_pattern": (), "guided_decoding_backend": ("auto", "xgrammar"),
    "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": (), "reasoning_effort": (),
    "verbosity": (), "store": (), "documents": (), "mm_processor_kwargs": (), "logits_processors": (),
    "vllm_xargs": (), "kv_transfer_params": (),
}
CHAT_ONLY = ("tools", "tool_choice")  # tool calling is /v1/chat/completions's


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _reject_unsupported(self) -> OpenAIModel:
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            if extra.get(name) not in (None, "", [], {}, False, *neutral):  # unset, empty, false or 0
                raise ValueError(f"`{name}` is not supported by jaxpaged")
        for name in CHAT_ONLY:
            if extra.get(name) not in (None, [], "none"):
                raise ValueError(f"`{name}` is a field of /v1/chat/completions; tool calling needs a chat request")
        return self


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingRequest(OpenAIModel, StructuredOutputFields):
    """Fields shared by completions and chat (OpenAI's plus vLLM's sampling extras, structured
    output's among them)."""
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    priority: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    request_id: str | None = None  # the response's id after its prefix (vLLM); the X-Request-Id header wins
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:N" (unset: the server's flag)
    cache_salt: str | None = Field(None, min_length=1)  # prefix-cache blocks shared only under the same salt

    @model_validator(mode="after")
    def _check_common(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("`best_of` different from `n` is not supported by jaxpaged")
        if self.priority != 0:  # vLLM's answer under its default first-come-first-served policy
            raise ValueError(f"Got priority {self.priority} but Priority scheduling is not enabled "
                             "(`priority` must be 0: jaxpaged schedules first come, first served).")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters (raises ValueError on out-of-range values); `prompt_logprobs`
        when the request's own field is unset."""
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids (integers as strings)") from None
        given = {k: getattr(self, k) for k in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty") if getattr(self, k) is not None}
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else prompt_logprobs,
            logit_bias=bias, allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            truncate_prompt_tokens=self.truncate_prompt_tokens, structured_outputs=self.structured_outputs_params(),
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens, output_kind="delta", **given)

    def apply_defaults(self, defaults: GenerationDefaults) -> None:
        """The model's generation config (vLLM's --generation-config) for the sampling fields
        left unset; its max_tokens cap, if any, bounds the max_tokens asked for."""
        for name in SAMPLING_KEYS:
            if getattr(self, name) is None and (value := getattr(defaults, name)) is not None:
                setattr(self, name, value)
        if (cap := defaults.max_tokens_cap) is not None:
            for name in ("max_tokens", "max_completion_tokens"):
                if getattr(self, name, None) is not None:
                    setattr(self, name, min(getattr(self, name), cap))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = 16
    echo: bool = False
    add_special_tokens: bool = True  # the tokenizer's BOS etc. before the prompt's text (vLLM)
    logprobs: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_max_tokens(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:  # echo + 0: the prompt's logprobs (lm-eval's loglikelihood)
            raise ValueError("max_tokens must be at least 1, got 0 (0 only with `echo`)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if len(p) * self.n > MAX_CHOICES:
            raise ValueError(f"a request may have at most {MAX_CHOICES} choices (prompts x n)")
        return list(p)


class ChatTemplateFields(OpenAIModel):
    """How messages go through the chat template (vLLM's fields)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last message stays open: the reply continues it
    chat_template: str | None = None  # this request's template (needs --trust-request-chat-template)
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables (e.g. enable_thinking)
    tools: list[ChatCompletionToolsParam] | None = None  # the functions the template shows the model
    add_special_tokens: bool = False  # the tokenizer's BOS etc. on top of the template's (vLLM)

    @model_validator(mode="after")
    def _check_template_fields(self) -> ChatTemplateFields:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        if self.tools == []:
            raise ValueError("`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError(f"`tools` has two functions named {next(n for n in names if names.count(n) > 1)!r}")
        return self

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    echo: bool = False  # the reply starts with the last message when it has the reply's role
    # None: "auto" with tools, else "none" (vLLM)
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = None
    parallel_tool_calls: bool = True  # false: at most one call (the first)

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs` set to true")
        if self.max_output_tokens == 0:
            raise ValueError("max_tokens must be at least 1, got 0")
        return self

    @model_validator(mode="after")
    def _check_tool_choice(self) -> ChatCompletionRequest:
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        if self.tool_choice != "none" and not self.tools:
            raise ValueError("When using `tool_choice`, `tools` must be set.")
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"The tool specified in `tool_choice` ({self.tool_choice.function.name!r}) does not "
                             "match any of the specified `tools`")
        return self

    def conversation(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def role(self) -> str:
        """The reply's role (vLLM): the assistant's after a generation prompt, else the last message's."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # unset: True for a prompt, False for messages (vLLM)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.add_special_tokens is None:
            self.add_special_tokens = self.messages is None
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]

