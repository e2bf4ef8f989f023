"""The paged-attention kernels' launch choices (`paged_attention_gpu.py`), host-side and static
except the split-KV helpers the kernel also traces: which kernel a batch takes
(`DECODE_ONLY_MAX_TOKENS`), the tiles (`TileConfig`, `choose_config`), split-KV's parts
(`split_parts`, `work_slots`, `kv_part`) and the device's SMs they are sized for."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# Batches whose sequences have at most this many new tokens run the per-sequence kernel alone:
# faster than the fused launch for decode-heavy batches, but it walks a sequence's q-blocks
# serially, so a long chunk there is slow. The bound is static (T or the caller's
# `max_query_len`): the engine compiles a forward with this hint for the steps it fits.
DECODE_ONLY_MAX_TOKENS = 32
# Off-GPU (interpret mode) no device reports its SMs: tile as on an H200.
_DEFAULT_NUM_SMS = 132
# Split-KV's partial results are a [num_splits, T, Hq, D] f32 buffer (the merge reads only the
# parts each row has): the static part count keeps num_splits * T at most this.
_MAX_SPLIT_ROWS = 512


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """The streaming multiprocessors of the local GPU (`core_count`)."""
    return getattr(jax.local_devices()[0], "core_count", None) or _DEFAULT_NUM_SMS


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int  # (token, head) rows per program; power of two >= Gp
    block_n: int  # keys per inner step; power of two
    num_splits: int = 1  # split-KV: at most this many parts a sequence (per-sequence kernel only)
    num_warps: int = 4
    num_stages: int = 3
    split_mask: bool = True  # unmasked loop over fully visible KV blocks, masked edges only
    heavy_first: bool = True  # per-q-block kernel: last (longest causal) q-blocks first
    min_split_keys: int = 256  # split-KV: keys per part at least this (short contexts use fewer parts)
    programs: int = 0  # split-KV: at most this many programs over a step's live sequences (0: two per SM)


def choose_config(t: int, s: int, hq: int, hkv: int, d: int, max_ctx: int) -> tuple[TileConfig, TileConfig]:
    """(per-sequence kernel config, per-q-block kernel config) from the static shapes."""
    gp = next_pow2(hq // hkv)
    # Decode tiles tuned on the H200 (docs/kernels.md): 64-key steps up to 2k contexts, 128-key
    # steps and 8 warps for long ones, and 128-key steps at any context once there are >= 1024
    # programs. `max_ctx` is the static block-table width, so a long table picks the long-context tiles.
    long_ctx = max_ctx >= 4096
    dec_n = (128 if long_ctx or s * hkv >= 1024 else 64) * 128 // max(d, 128)
    # Split-KV where the bucket's sequences give fewer than two programs per SM: up to the parts
    # one live sequence needs for that. The kernel sizes each step's parts from its live
    # sequences and their contexts (buckets are padded: a lone decode row sits in one of 16).
    target, min_keys = 2 * num_sms(), TileConfig.min_split_keys
    splits = 1
    if s * hkv < target:
        splits = max(1, min(-(-target // hkv), _MAX_SPLIT_ROWS // max(t, 1), -(-max_ctx // min_keys)))
    dec = TileConfig(block_m=max(16, gp), block_n=dec_n, num_splits=splits, num_warps=8 if long_ctx else 4,
                     num_stages=3)
    pre = TileConfig(block_m=max(128 if d <= 128 else 64, gp), block_n=64, num_warps=4, num_stages=2)
    return dec, pre


def short_query_len(dec: TileConfig, group: int) -> int:
    """The most new tokens of a sequence that the per-sequence kernel with config `dec` takes
    beside the per-q-block kernel ("split" and "short" modes): one block of its rows per KV head
    (`group` query heads each)."""
    return dec.block_m // next_pow2(group)


def split_parts(live, hkv: int, programs: int, num_splits: int):
    """Split-KV parts of each live sequence: at most `programs` programs over the step's `live`
    sequences and their `hkv` KV heads (rounded down: a long-context tile takes a whole SM, so
    a few programs past 2 per SM add a wave), at most `num_splits`. Ints or traced scalars."""
    n = programs // (live * hkv)
    return jnp.clip(n, 1, num_splits) if isinstance(n, jax.Array) else max(1, min(n, num_splits))


def work_slots(num_seqs: int, hkv: int, programs: int, num_splits: int) -> int:
    """The per-sequence kernel's (part, sequence) slots: enough for any live count (static)."""
    if num_splits == 1:
        return num_seqs
    return max(n * split_parts(n, hkv, programs, num_splits) for n in range(1, num_seqs + 1))


def kv_part(blk_lo, blk_hi, sp, *, parts, min_blocks: int):
    """Part `sp` of `parts` of a sequence's visible KV blocks [blk_lo, blk_hi): `[b0, b1)`,
    each part at least `min_blocks` blocks (a short context fills fewer parts; the rest are
    empty). Scalars in, scalars out (ints or traced)."""
    per = jnp.maximum((blk_hi - blk_lo + parts - 1) // parts, min_blocks)
    b0 = jnp.minimum(blk_lo + sp * per, blk_hi)
    return b0, jnp.minimum(b0 + per, blk_hi)
