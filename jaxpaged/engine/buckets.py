"""The padded step sizes (token buckets) and which step programs each gets: every bucket a
forward and heads; the short-query forward and the multi-step decode loop only for the
buckets that decode-only steps land in. Each forward or loop is a heavy compile (start-up)."""
from __future__ import annotations

from jaxpaged.kernels.attention_tiles import DECODE_ONLY_MAX_TOKENS


def token_buckets(max_num_batched_tokens: int, max_num_seqs: int, sizes: tuple[int, ...] | None = None,
                  smallest: int = 16, extra: tuple[int, ...] = (), factor: int = 2) -> list[int]:
    """The padded step sizes (one compiled forward each). Default: powers of `factor` from
    `smallest` up to the budget, the budget itself, and with factor 2 the 1.5x steps between
    128 and `max_num_seqs` (e.g. 192): decode steps of more than ~128 rows make the GEMMs
    compute-bound on a GPU, so padding them to the next power of two costs time (a CPU's
    defaults take factor 4: fewer programs to compile).
    `extra` sizes join the rule (the decoding token budget: its steps are not padded).
    `sizes` replaces the rule (vLLM's cudagraph capture sizes); the budget is always added."""
    if sizes is None:
        out, b = [], min(smallest, max_num_batched_tokens)
        while b < max_num_batched_tokens:
            out.append(b)
            if factor == 2 and b >= 128 and 3 * b // 2 <= max_num_seqs:  # (sizes past the budget dropped below)
                out.append(3 * b // 2)
            b *= factor
        sizes = out + [t for t in extra if t > 0]
    return sorted({t for t in sizes if t < max_num_batched_tokens} | {max_num_batched_tokens})


def short_query_buckets(buckets: list[int], max_num_seqs: int) -> list[int]:
    """The buckets that get a second forward for steps whose queries all have at most
    `DECODE_ONLY_MAX_TOKENS` new tokens (the kernel's per-sequence launch): those above it, up
    to the one that holds a full decode batch. A larger step has prompt tokens anyway, and each
    forward is a heavy compile (start-up time)."""
    return [t for t in decode_buckets(buckets, max_num_seqs) if t > DECODE_ONLY_MAX_TOKENS]


def decode_buckets(buckets: list[int], max_num_seqs: int) -> list[int]:
    """The buckets an all-decode step (one token per sequence) can land in, up to the one that
    holds `max_num_seqs` rows: the multi-step decode loop's."""
    full_batch = next((t for t in buckets if t >= max_num_seqs), buckets[-1])
    return [t for t in buckets if t <= full_batch]
