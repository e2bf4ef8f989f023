"""`SamplingParams`: what to generate and how, with vLLM's field names and checks."""
from __future__ import annotations

import dataclasses

from jaxpaged.engine.structured_output.params import StructuredOutputsParams

MAX_LOGPROBS = 20  # top-N logprobs a request may ask for (vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 64  # logit_bias entries per request
MAX_STOP_TOKEN_IDS = 56
MAX_BAD_WORDS = 128  # bad_words per request (vLLM's VLLM_MAX_NUM_BAD_WORDS)
_F32_MAX = 3.4028234663852886e38  # the sampler's inputs are float32: a larger value would become inf


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to max_model_len; 0 = the prompt only (its prompt_logprobs)
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, text stays empty (benchmarks)
    spaces_between_special_tokens: bool = True
    # "cumulative": every output so far; "delta": only what is new (streaming); "final_only".
    output_kind: str = "cumulative"
    allowed_token_ids: list[int] | None = None  # sample only these
    bad_words: list[str] | None = None  # never generate these words (vLLM's rule: `sample/token_mask.py`)
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: max_model_len)
    # the output follows a JSON schema, regex, choice or grammar (engine/structured_output/)
    structured_outputs: StructuredOutputsParams | None = None
    # bad_words as token-id sequences: set by the `Processor` (the client holds the tokenizer)
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        if isinstance(self.structured_outputs, dict):  # from the wire (messages.py)
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._check()

    def _check(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        if self.n < 1:
            bad("n", "must be at least 1")
        if not 0 <= self.temperature <= _F32_MAX:  # NaN fails too; the device holds it in float32
            bad("temperature", "must be a non-negative float32 number")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.top_k < 2**31:
            bad("top_k", "must be -1 (disable) or a positive 32-bit integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for f in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, f) <= 2:
                bad(f, "must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= _F32_MAX:
            bad("repetition_penalty", "must be a float32 number greater than zero")
        if self.max_tokens is not None and self.max_tokens < 0:
            bad("max_tokens", "must be non-negative (0: the prompt only)")
        if self.min_tokens < 0:
            bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be less than or equal to max_tokens={self.max_tokens}")
        for f in ("logprobs", "prompt_logprobs"):
            v = getattr(self, f)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                bad(f, f"must be in [0, {MAX_LOGPROBS}]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"may have at most {MAX_LOGIT_BIAS} entries")
        if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            bad("logit_bias", "values must be in [-100, 100]")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"may have at most {MAX_STOP_TOKEN_IDS} entries")
        if self.stop and not self.detokenize:
            bad("stop", "needs detokenize=True")
        if any(not s for s in self.stop):
            bad("stop", "must not contain empty strings")
        if self.output_kind not in ("cumulative", "delta", "final_only"):
            bad("output_kind", "must be cumulative, delta or final_only")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "must fit in 64 bits")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids", "must not be empty")
        if len(self.bad_words or ()) > MAX_BAD_WORDS:
            bad("bad_words", f"may have at most {MAX_BAD_WORDS} entries")
        if any(not w.strip() for w in self.bad_words or ()):
            bad("bad_words", "must not contain empty words")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens >= 1
                                                            or self.truncate_prompt_tokens == -1):
            bad("truncate_prompt_tokens", "must be an integer >= 1 or -1")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
