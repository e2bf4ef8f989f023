"""What crosses between the engine core and its clients (API servers, `AsyncLLM`, `LLMEngine`),
with vLLM V1's names: `EngineCoreRequest` in, one `EngineCoreOutputs` per step out.

On a socket each message is one msgpack array (`encode` / `decode`): plain lists of ints,
floats and strings, no pickling. Nothing here imports JAX: an API server process uses it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from jaxpaged.engine.sampling_params import SamplingParams


@dataclasses.dataclass
class EngineCoreRequest:
    """A tokenized, validated request (`Processor.process`); `max_tokens` is resolved."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only under the same salt


@dataclasses.dataclass
class PromptLogprobsChunk:
    """Logprobs of prompt positions `start .. start + len(logprobs)` (each of the next prompt
    token), with ranks and the top-N ids and logprobs, as one step computed them."""
    start: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclasses.dataclass
class EngineCoreOutput:
    """One sample's (request_id, index) news from one step: 0..K new token ids with logprobs
    (ranks and top-N only when the request asked for logprobs), prompt logprobs, and the
    finish reason when the core finished it (EOS, a stop token id, length)."""
    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    ranks: list[int] | None = None  # [K]
    top_ids: list[list[int]] | None = None  # [K][N]
    top_logprobs: list[list[float]] | None = None  # [K][N]
    prompt_logprobs: PromptLogprobsChunk | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None


@dataclasses.dataclass
class SchedulerStats:
    """The core's gauges and counters after a step (Prometheus reads them)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # speculative decoding (vLLM's spec_decode counters): rows that had drafts, draft tokens,
    # accepted draft tokens, and accepted ones by position in the draft
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats


@dataclasses.dataclass
class CoreInfo:
    """What a client needs to validate requests without the model: the core's limits."""
    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    eos_token_ids: list[int]
    quantization: str | None = None  # the weights' (vLLM's method name); None: float weights
    kv_cache_dtype: str = "auto"  # the KV pool's dtype


# ---- the wire: msgpack arrays ------------------------------------------------------------
# client -> core: [ADD, request] | [ABORT, [request_id, ...]] | [STOP, [[request_id, index, stop], ...]]
#                 | [HELLO] (a client's first message) | [SHUTDOWN]
# core -> client: [OUTPUTS, [output, ...], stats] | [ERROR, request_id, message]
#                 | [DEAD, message]
HELLO, ADD, ABORT, STOP, SHUTDOWN, OUTPUTS, ERROR, DEAD = range(8)
_PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
_OUTPUT_FIELDS = [f.name for f in dataclasses.fields(EngineCoreOutput)]
_PROMPT_FIELDS = [f.name for f in dataclasses.fields(PromptLogprobsChunk)]
_STATS_FIELDS = [f.name for f in dataclasses.fields(SchedulerStats)]
_PROMPT_AT = _OUTPUT_FIELDS.index("prompt_logprobs")
_STRUCTURED_AT = _PARAM_FIELDS.index("structured_outputs")


def _row(obj: Any, fields: list[str]) -> list:
    """A dataclass's fields as a list, by reference (`dataclasses.astuple` deep-copies)."""
    return [getattr(obj, f) for f in fields]


def request_to_wire(r: EngineCoreRequest) -> list:
    params = _row(r.params, _PARAM_FIELDS)
    if r.params.structured_outputs is not None:  # a dict on the wire; SamplingParams rebuilds it
        params[_STRUCTURED_AT] = dataclasses.asdict(r.params.structured_outputs)
    return [r.request_id, r.prompt_token_ids, params, r.max_tokens, r.arrival_time, r.cache_salt]


def request_from_wire(data: list) -> EngineCoreRequest:
    request_id, ids, params, max_tokens, arrival, salt = data
    return EngineCoreRequest(request_id, ids, SamplingParams(**dict(zip(_PARAM_FIELDS, params))), max_tokens, arrival,
                             salt)


def output_to_wire(o: EngineCoreOutput) -> list:
    row = _row(o, _OUTPUT_FIELDS)
    if o.prompt_logprobs is not None:
        row[_PROMPT_AT] = _row(o.prompt_logprobs, _PROMPT_FIELDS)
    return row


def output_from_wire(row: list) -> EngineCoreOutput:
    o = EngineCoreOutput(*row)
    if o.prompt_logprobs is not None:
        o.prompt_logprobs = PromptLogprobsChunk(*o.prompt_logprobs)
    return o


def encode(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def outputs_message(outs: EngineCoreOutputs) -> bytes:
    return encode([OUTPUTS, [output_to_wire(o) for o in outs.outputs], _row(outs.stats, _STATS_FIELDS)])


def outputs_from_message(message: list) -> EngineCoreOutputs:
    _, rows, stats = message
    return EngineCoreOutputs([output_from_wire(r) for r in rows], SchedulerStats(*stats))
