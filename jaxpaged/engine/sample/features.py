"""Sampling features: what a step's head must do, as a set of flags instead of mode strings.

Each request needs some features (`features_of`); a step needs the union over its rows. Every
feature is static in the head program, so each combination would be a compile per token
bucket: the runner instead runs the first of a few compiled `VARIANTS` that covers the step.
A feature that no variant covers would be rejected when the request arrives.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

from jaxpaged.engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class SamplingFeatures:
    random: bool = False  # some row samples (temperature > 0): Gumbel-max after min_p
    top_k_top_p: bool = False  # some sampled row can be cut by top_k / top_p (two bisections)
    penalties: bool = False  # presence / frequency / repetition over the token history
    logit_bias: bool = False  # logit_bias entries, and min_tokens' bans of EOS and stop ids
    logprobs: bool = False  # the top-N logprobs of each sampled token
    prompt_logprobs: bool = False  # logprobs of every prompt position
    token_bitmask: bool = False  # a per-row allowed-token bitmask [S, ceil(V / 32)]: grammars, allowed_token_ids, bad_words

    def flags(self) -> tuple[bool, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)

    def __or__(self, other: SamplingFeatures) -> SamplingFeatures:
        return SamplingFeatures(*(a or b for a, b in zip(self.flags(), other.flags())))

    def covers(self, other: SamplingFeatures) -> bool:
        return all(a or not b for a, b in zip(self.flags(), other.flags()))

    @property
    def needs_history(self) -> bool:
        """Inputs built per step from each request's history on the host (token history, bans
        that end at min_tokens, prompt positions, bitmasks): such a step's head waits for the
        step before it to be processed (`ModelRunner.launches_late`). Top-N logprobs need none:
        their head is dispatched with the forward, as greedy's."""
        return self.penalties or self.logit_bias or self.prompt_logprobs or self.token_bitmask

    @property
    def in_decode_loop(self) -> bool:
        """Whether the multi-step decode loop serves these: it samples K tokens without the host
        and returns their ids only (no history inputs, no logprobs)."""
        return not (self.needs_history or self.logprobs)

    @property
    def name(self) -> str:
        """The variant's name (`full`, ...), else its features joined by `+`."""
        return _VARIANT_NAMES.get(self) or "+".join(n for n in self.__dataclass_fields__ if getattr(self, n))


GREEDY = SamplingFeatures()
SAMPLE = SamplingFeatures(random=True)
SAMPLE_FILTERED = SamplingFeatures(random=True, top_k_top_p=True)
# structured output (and allowed_token_ids / bad_words) alone: the bitmask without penalties,
# bias or logprobs, greedy or sampled
GREEDY_MASKED = SamplingFeatures(token_bitmask=True)
SAMPLE_MASKED = SamplingFeatures(random=True, top_k_top_p=True, token_bitmask=True)
# top-N logprobs alone (what most clients that ask for logprobs ask for), greedy or sampled
GREEDY_LOGPROBS = SamplingFeatures(logprobs=True)
SAMPLE_LOGPROBS = SamplingFeatures(random=True, top_k_top_p=True, logprobs=True)
FULL = SamplingFeatures(random=True, top_k_top_p=True, penalties=True, logit_bias=True, logprobs=True,
                        prompt_logprobs=True, token_bitmask=True)
# The compiled head variants per token bucket, cheapest first: top-k / top-p cost ~2.7 ms of a
# 256-row step on an H200, the history inputs more (the full head doubles a batch-64 step on an
# H100); most batches need one of the first three, structured output one of the masked ones,
# top-N logprobs one of the logprobs ones.
VARIANTS = (GREEDY, SAMPLE, SAMPLE_FILTERED, GREEDY_MASKED, SAMPLE_MASKED, GREEDY_LOGPROBS, SAMPLE_LOGPROBS, FULL)
_VARIANT_NAMES = {GREEDY: "greedy", SAMPLE: "sample", SAMPLE_FILTERED: "sample_filtered",
                  GREEDY_MASKED: "greedy_masked", SAMPLE_MASKED: "sample_masked",
                  GREEDY_LOGPROBS: "greedy_logprobs", SAMPLE_LOGPROBS: "sample_logprobs", FULL: "full"}
LOOP_VARIANTS = tuple(v for v in VARIANTS if v.in_decode_loop)  # the decode loop's
# The verify head's compiled variants (speculative decoding, spec_decode/verify.py), cheapest
# first: greedy rows run in any; logit bias and top-N logprobs are a variant of their own (a
# scatter, a top-k over every position's vocabulary and a [K + 1, S, N] copy to the host,
# which the common steps skip).
VERIFY_FULL = SamplingFeatures(random=True, top_k_top_p=True, logit_bias=True, logprobs=True)
VERIFY_VARIANTS = (SAMPLE, SAMPLE_FILTERED, VERIFY_FULL)


_interned: dict[SamplingFeatures, SamplingFeatures] = {}


def features_of(params: SamplingParams, vocab_size: int) -> SamplingFeatures:
    """The features one request needs (top_k >= vocab_size cuts nothing; greedy rows ignore
    top_k / top_p). Equal features are one object, so a step's union is over a few."""
    random = not params.greedy
    features = SamplingFeatures(
        random=random,
        top_k_top_p=random and (0 < params.top_k < vocab_size or params.top_p < 1),
        penalties=(params.presence_penalty != 0 or params.frequency_penalty != 0
                   or params.repetition_penalty != 1),
        logit_bias=bool(params.logit_bias) or params.min_tokens > 0,
        logprobs=(params.logprobs or 0) > 0,
        prompt_logprobs=params.prompt_logprobs is not None,
        token_bitmask=(bool(params.allowed_token_ids) or bool(params.bad_words_token_ids)
                       or params.structured_outputs is not None),
    )
    return _interned.setdefault(features, features)


def union(features: Iterable[SamplingFeatures]) -> SamplingFeatures:
    """What a step of requests with these features needs (cheap per row: distinct objects only)."""
    distinct = list({id(f): f for f in features}.values())
    if len(distinct) == 1:
        return distinct[0]
    return functools.reduce(SamplingFeatures.__or__, distinct, SamplingFeatures())


@functools.cache
def variant_for(needed: SamplingFeatures, speculative: bool = False) -> SamplingFeatures:
    """The cheapest compiled variant (of the verify head's if `speculative`) that serves a
    step needing `needed`."""
    for v in VERIFY_VARIANTS if speculative else VARIANTS:
        if v.covers(needed):
            return v
    raise ValueError(f"no compiled {'verify' if speculative else 'sampling'} variant has the features {needed.name}")
