"""Draft-model proposer (vLLM V1's `DraftModelProposer`, method `draft_model`): a smaller model
with the target's vocabulary proposes k greedy tokens per decoding row, with its own params
and its own paged KV pool. The pool has the target's blocks and block size and is addressed
by the target's block tables and slots, so the blocks the scheduler reserves for a row's
drafts hold the draft's KV too.

Per speculating step (synchronous: every token is on the host): the scheduler gives a row
placeholder drafts (`propose`, counted in the budget, blocks reserved), then `fill` catches
each row's draft KV up on the tokens it lacks (`Request.num_draft_computed_tokens` ..: the
prompt the first time, then the accepted tokens and the bonus), in chunks of at most the
largest token bucket, and runs k - 1 one-token greedy steps (`draft_programs.py`). Greedy
drafts are deterministic: the verify head treats q as one-hot on them (as vLLM does for its
draft and EAGLE proposers), so outputs keep the target's distribution.

The draft KV of a rejected position is overwritten before it is read (attention reads only
up to a row's length; `fill` counts the draft's KV up to the target's computed tokens at
most). A request admitted with prefix-cached blocks takes their draft KV as computed:
blocks cached while their request did not speculate hold stale draft KV, which can lower the
acceptance rate, never change the outputs (verification is exact).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxpaged.engine.compile_cache import in_parallel
from jaxpaged.engine.host_buffer import Layout, pack
from jaxpaged.engine.request import PENDING, Request
from jaxpaged.engine.spec_decode.config import SpeculativeConfig
from jaxpaged.engine.spec_decode.draft_programs import STEP_FIELDS, jitted_propose
from jaxpaged.engine.spec_decode.ngram_proposer import max_drafts
from jaxpaged.models import ModelConfig, load_model
from jaxpaged.models.kv_cache import KVCache, init_kv_cache
from jaxpaged.models.sharding import KV_POOL
from jaxpaged.models.step_input import SeqChunk, make_step_input

if TYPE_CHECKING:
    from jaxpaged.engine.scheduler_output import ScheduledRequest

logger = logging.getLogger("jaxpaged")


def load_draft_model(spec: SpeculativeConfig, target: ModelConfig, dtype, load_format: str,
                     max_model_len: int, mesh: Mesh | None = None) -> tuple[ModelConfig, dict]:
    """The draft model's config and params, in the target's dtype (vLLM's rule) and its
    checkpoint's own quantization, sharded on `mesh` (tensor parallelism) as a target is; a
    ValueError naming the mismatch if its vocabulary or context cannot serve the target's."""
    cfg, params = load_model(spec.model, np.dtype(dtype).name, load_format, mesh)
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config model {spec.model} has vocab_size {cfg.vocab_size}, the target "
                         f"{target.vocab_size}: the draft model must share the target's tokenizer")
    if cfg.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative_config model {spec.model} has max_position_embeddings "
                         f"{cfg.max_position_embeddings} < max_model_len {max_model_len}")
    return cfg, params


@dataclasses.dataclass
class _Piece:
    """Tokens `start .. start + n` of a row's catch-up in one draft call; the row's drafts come
    from the call of its last piece."""
    row: ScheduledRequest
    start: int
    n: int
    last: bool


class DraftModelProposer:
    """The scheduler's view (`speculates`, `propose`) and the draft model's step (`fill`)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, model_config: ModelConfig, params: dict,
                 attention, block_size: int, max_num_seqs: int, buckets: list[int], mesh: Mesh | None = None):
        self.config, self.max_model_len = config, max_model_len
        self.model_config, self.params = model_config, params
        self.k = config.num_speculative_tokens
        self.block_size, self.max_num_seqs, self.buckets = block_size, max_num_seqs, buckets
        self.max_blocks = -(-max_model_len // block_size)
        self.kv: KVCache | None = None
        self.kv_sharding = NamedSharding(mesh, KV_POOL) if mesh is not None else None
        self._program = jitted_propose(model_config, attention, self.kv_sharding)

    def speculates(self, num_running: int) -> bool:
        return self.config.speculates(num_running)

    def propose(self, seq: Request, budget: int) -> list[int]:
        """Placeholders for `seq`'s drafts (as many as it may carry, at most k): `fill` sets
        their values once the step is scheduled."""
        return [PENDING] * max(0, min(self.k, max_drafts(seq, budget, self.max_model_len)))

    def warmup(self, num_blocks: int, dtype, threads: int | None = None) -> None:
        """Allocate the draft KV pool, compile the program of every token bucket (in `threads`
        threads) and run each once on all-padding inputs, so that no step compiles later."""
        t0 = time.perf_counter()
        self.kv = init_kv_cache(self.model_config, num_blocks, self.block_size, dtype, self.kv_sharding)
        padding = {t: self._inputs([], t) for t in self.buckets}
        in_parallel(threads, lambda t: self._program.lower(self.params, self.kv, padding[t][0], layout=padding[t][1],
                                                            num_spec=self.k).compile(), self.buckets)
        for t in self.buckets:
            jax.block_until_ready(self._run([], t))
        logger.info("warm-up: compiled the draft model's program for %d token buckets (%.1f s)", len(self.buckets),
                    time.perf_counter() - t0)

    def fill(self, rows: list[ScheduledRequest]) -> None:
        """Set the drafts of the rows that carry placeholders (the catch-up in chunks of at
        most the largest bucket, a row's pieces in order)."""
        cap, chunks, used = self.buckets[-1], [[]], 0
        for row in rows:
            if not row.draft_token_ids:
                continue
            seq = row.request
            # the draft's KV of drafts the target rejected is stale: it counts up to the target's
            pos, end = min(seq.num_draft_computed_tokens, seq.num_computed_tokens), seq.num_tokens
            while pos < end:
                if used == cap:
                    chunks.append([])
                    used = 0
                n = min(end - pos, cap - used)
                chunks[-1].append(_Piece(row, pos, n, pos + n == end))
                pos, used = pos + n, used + n
        for chunk in chunks:
            if not chunk:
                continue
            t = next(b for b in self.buckets if b >= sum(p.n for p in chunk))
            drafts = np.asarray(jax.device_get(self._run(chunk, t)))
            for i, p in enumerate(chunk):
                if p.last:
                    d = len(p.row.draft_token_ids)
                    p.row.draft_token_ids = drafts[i, :d].tolist()
                    # the last token's KV and that of the drafts fed back (all but the last)
                    p.row.request.num_draft_computed_tokens = p.start + p.n + d - 1

    def _inputs(self, chunk: list[_Piece], t: int) -> tuple[np.ndarray, Layout]:
        """The draft program's packed inputs for `chunk` padded to `t` tokens."""
        seqs = [SeqChunk(p.row.request.all_token_ids[p.start:p.start + p.n], p.start, p.row.block_table)
                for p in chunk]
        s = min(t, self.max_num_seqs)
        inp = make_step_input(seqs, self.block_size, t, s, self.max_blocks)
        steps = np.zeros(s, np.int32)
        steps[:len(chunk)] = [len(p.row.draft_token_ids) if p.last else 0 for p in chunk]
        return pack({f: getattr(inp, f) for f in STEP_FIELDS} | {"steps": steps})

    def _run(self, chunk: list[_Piece], t: int) -> jax.Array:
        """Dispatch the draft program on `chunk` padded to `t` tokens; returns drafts [S, k]."""
        return self.dispatch(*self._inputs(chunk, t))

    def dispatch(self, buf: np.ndarray, layout: Layout) -> jax.Array:
        """Dispatch the draft program on packed inputs (updates `kv`); the drafts [S, k] on the
        device, not waited for (the benchmarks record and replay these calls)."""
        drafts, self.kv = self._program(self.params, self.kv, buf, layout=layout, num_spec=self.k)
        return drafts
