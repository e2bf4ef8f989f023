"""The draft model's jitted program (the host side is `draft_model_proposer.py`): one forward
over a ragged catch-up batch (the tokens each row's draft KV lacks, its last known token
last), the greedy next token of each row, then k - 1 one-token decode iterations that feed
each row its previous draft (as `step_programs._decode_loop`). One compile per token bucket."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.engine.host_buffer import unpack
from jaxpaged.kernels.attention_tiles import DECODE_ONLY_MAX_TOKENS
from jaxpaged.models import ModelConfig, family_module
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.step_input import StepInput

STEP_FIELDS = ("token_ids", "positions", "slot_mapping", "query_start", "seq_lens", "block_tables",
               "logits_index")


def _propose(params, kv: KVCache, buf, *, layout, num_spec: int, cfg: ModelConfig, attention):
    """Returns (drafts [S, num_spec] i32: row i's greedy tokens after its last one, kv).

    `steps` [S]: drafts row i proposes; iteration j (1 .. num_spec - 1) writes the KV of row
    i's draft j - 1 at its position only while j < steps[i] (else to the scratch block, as
    padding), so a row that proposes none (a catch-up piece before its last) writes nothing
    past its tokens. Padding rows have seq_len 0 and an empty query range."""
    a = unpack(buf, layout)
    inp = StepInput(**{f: a[f] for f in STEP_FIELDS})
    model = family_module(cfg)
    hidden, kv = model.forward(params, kv, inp.replace(logits_index=None), cfg, attention)
    first = jnp.argmax(model.compute_logits(params, hidden[inp.logits_index], cfg), axis=-1).astype(jnp.int32)
    s, bs = first.shape[0], kv.block_size
    rows = jnp.arange(s, dtype=jnp.int32)
    last = inp.positions[inp.logits_index]  # each row's last token's position
    num_rows = jnp.sum(inp.seq_lens > 0)
    decode = StepInput(token_ids=first, positions=last, slot_mapping=rows % bs,
                       query_start=jnp.minimum(jnp.arange(s + 1, dtype=jnp.int32), num_rows),
                       seq_lens=inp.seq_lens, block_tables=inp.block_tables, logits_index=None)
    decode_attention = functools.partial(attention, max_query_len=DECODE_ONLY_MAX_TOKENS)

    def iteration(j, carry):
        kv, tokens, drafts = carry
        valid = j < a["steps"]
        pos = last + j
        block = inp.block_tables[rows, jnp.minimum(pos // bs, inp.block_tables.shape[1] - 1)]
        step = decode.replace(token_ids=tokens, positions=pos,
                              slot_mapping=jnp.where(valid, block * bs + pos % bs, rows % bs),
                              seq_lens=jnp.where(valid, pos + 1, inp.seq_lens))
        hidden, kv = model.forward(params, kv, step, cfg, decode_attention)
        new = jnp.argmax(model.compute_logits(params, hidden, cfg), axis=-1).astype(jnp.int32)
        return kv, new, drafts.at[:, j].set(new)

    drafts = jnp.zeros((s, num_spec), jnp.int32).at[:, 0].set(first)
    kv, _, drafts = jax.lax.fori_loop(1, num_spec, iteration, (kv, first, drafts))
    return drafts, kv


@functools.cache
def jitted_propose(cfg: ModelConfig, attention, kv_sharding: NamedSharding | None = None):
    """The draft program per (draft model config, kernel, mesh), shared by engines (no
    recompile); the draft KV pool donated, and under a mesh kept in `kv_sharding` (the drafts
    replicated)."""
    out = None if kv_sharding is None else (NamedSharding(kv_sharding.mesh, P()), kv_sharding)
    return jax.jit(functools.partial(_propose, cfg=cfg, attention=attention), donate_argnums=1,
                   out_shardings=out, static_argnames=("layout", "num_spec"))
