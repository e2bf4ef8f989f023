"""`SpeculativeConfig`: vLLM's `--speculative-config` JSON keys, checked by name."""
from __future__ import annotations

import dataclasses
from typing import Any

METHODS = ("ngram", "draft_model")
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's default n-gram size when neither bound is given
# Above this many running requests a step does not speculate, unless the config says otherwise
# (vLLM's key; its default, null, speculates at any batch size). Measured (docs/spec_decode.md,
# "When speculation pays"): with k = 4 at 80% acceptance it still pays at 64 rows (H100), at a
# mean accepted length of ~2.4 the H200's step times put the break-even near 32, and at 256
# rows n-gram speculation halved the fixed workload's throughput (H200).
DISABLE_BY_BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """What to propose and how many tokens. `disable_by_batch_size`: a step with more running
    requests than this does not speculate (vLLM's key; None, JSON null, = at any batch size;
    default `DISABLE_BY_BATCH_SIZE`). `synthetic_acceptance_rate`
    (jaxpaged's key, benchmarks only): each draft token is accepted with this probability
    whatever its value, and every decoding row gets k drafts (n-gram matches or not), so
    speedup against acceptance can be measured on random weights; the outputs then no longer
    follow the model."""
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = DISABLE_BY_BATCH_SIZE
    synthetic_acceptance_rate: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError("speculative_config num_speculative_tokens must be a positive integer, "
                             f"got {self.num_speculative_tokens!r}")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config model is for method draft_model, not ngram")
            lo = self.prompt_lookup_min or self.prompt_lookup_max or DEFAULT_PROMPT_LOOKUP
            hi = self.prompt_lookup_max or self.prompt_lookup_min or DEFAULT_PROMPT_LOOKUP
            if not 1 <= lo <= hi:
                raise ValueError(f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo}, {hi}")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        elif self.model is None:
            raise ValueError("speculative_config method draft_model needs model (the draft model's folder)")
        elif self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
            raise ValueError("speculative_config prompt_lookup_min / prompt_lookup_max are for method ngram")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"speculative_config disable_by_batch_size must be positive, got {self.disable_by_batch_size}")
        rate = self.synthetic_acceptance_rate
        if rate is not None and not 0 <= rate <= 1:
            raise ValueError(f"speculative_config synthetic_acceptance_rate must be in [0, 1], got {rate}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's JSON keys; an unknown key is a ValueError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"speculative_config key(s) not supported: {', '.join(unknown)} "
                             f"(supported: {', '.join(sorted(names))})")
        if "method" not in values or "num_speculative_tokens" not in values:
            raise ValueError("speculative_config needs method and num_speculative_tokens")
        return cls(**values)

    def speculates(self, num_running: int) -> bool:
        """Whether a step with `num_running` running requests speculates (`disable_by_batch_size`)."""
        return self.disable_by_batch_size is None or num_running <= self.disable_by_batch_size
