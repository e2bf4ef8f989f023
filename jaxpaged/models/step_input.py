"""The ragged, token-major batch of one forward step (docs/architecture.md).

All new tokens of all scheduled sequences are concatenated, so prefill, decode and mixed
steps share one layout. `T` (tokens) and `S` (sequences) are padded to buckets by the
engine: padding tokens write their K/V into the scratch block 0 and padding sequences
have `seq_lens == 0` and an empty query range.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import numpy as np
from flax import struct


@struct.dataclass
class StepInput:
    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32, flat KV slot (block * block_size + offset)
    query_start: jax.Array  # [S + 1] int32, token range of sequence s: [qs[s], qs[s+1])
    seq_lens: jax.Array  # [S] int32, context length including this step's tokens
    block_tables: jax.Array  # [S, max_blocks] int32
    logits_index: jax.Array  # [N] int32, tokens whose logits are returned (usually N == S)


class SeqChunk(NamedTuple):
    """One sequence's part of a step: its new token ids, the tokens already in the KV cache
    before them, and its block table."""
    token_ids: list[int]
    num_computed: int
    block_table: list[int]


def make_step_input(
    seqs: list[SeqChunk],
    block_size: int,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_blocks: int | None = None,
    all_logits: bool = False,
) -> StepInput:
    """Build a padded StepInput on the host from each sequence's `SeqChunk`.

    `num_computed` tokens of the sequence are already in the KV cache; the new tokens
    follow them. Logits are returned for the last new token of each sequence, or for every
    real token when `all_logits` (tests, prompt logprobs).
    """
    n = len(seqs)
    lens = np.fromiter((len(c[0]) for c in seqs), np.int32, n)
    computed = np.fromiter((c[1] for c in seqs), np.int32, n)
    table_lens = np.fromiter((len(c[2]) for c in seqs), np.int32, n)
    real_t = int(lens.sum())
    t = num_tokens or real_t
    s = num_seqs or n
    longest = int(table_lens.max()) if n else 1
    mb = max_blocks or longest
    assert t >= real_t and s >= n and mb >= longest
    # whole-batch array ops (a few per step, not per row: the host builds a step per device step)
    ends = np.cumsum(lens, dtype=np.int32)
    query_start = np.full(s + 1, real_t, np.int32)
    query_start[0], query_start[1:n + 1] = 0, ends
    seq_lens = np.zeros(s, np.int32)
    seq_lens[:n] = computed + lens
    tables = np.zeros((s, mb), np.int32)
    rows = np.repeat(np.arange(n), table_lens)
    cols = np.arange(rows.size) - np.repeat(np.cumsum(table_lens) - table_lens, table_lens)
    tables[rows, cols] = np.fromiter(itertools.chain.from_iterable(c[2] for c in seqs), np.int32, rows.size)
    owner = np.repeat(np.arange(n), lens)  # each real token's sequence
    token_ids = np.zeros(t, np.int32)
    token_ids[:real_t] = np.fromiter(itertools.chain.from_iterable(c[0] for c in seqs), np.int32, real_t)
    positions = np.zeros(t, np.int32)
    positions[:real_t] = np.arange(real_t) - (ends - lens)[owner] + computed[owner]
    slots = np.arange(t, dtype=np.int32) % block_size  # padding -> scratch block 0
    pos = positions[:real_t]
    slots[:real_t] = tables[owner, pos // block_size] * block_size + pos % block_size
    last = np.zeros(s, np.int32)
    last[:n] = ends - 1
    logits_index = np.arange(real_t, dtype=np.int32) if all_logits else last
    return StepInput(token_ids, positions, slots, query_start, seq_lens, tables, logits_index)
