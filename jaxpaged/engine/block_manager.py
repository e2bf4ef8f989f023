"""Host-side KV block allocator with prefix caching (vLLM V1 `KVCacheManager` semantics).

Every usable block is in exactly one state:
- free: on the free list, holds nothing worth keeping;
- evictable: ref count 0 but its block hash is cached; kept in LRU order and reused only
  when the free list is empty (the least recently freed goes first);
- referenced: ref count > 0, held by the block tables of one or more sequences.

A full block is identified by a chained hash of (previous block's hash, its token ids), so
equal hashes mean equal prefixes; a request's `cache_salt` (vLLM's) seeds the chain, so only
requests with the same salt share blocks. Block `SCRATCH_BLOCK` is never handed out.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from jaxpaged.models.kv_cache import SCRATCH_BLOCK

SeqId = Hashable  # int or str


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block."""
    return hash((parent_hash, tuple(token_ids)))


def chain_root(cache_salt: str | None) -> int | None:
    """The parent hash of a sequence's first block: none, or its salt's."""
    return None if cache_salt is None else hash(("cache_salt", cache_salt))


class BlockManager:
    """Free list, per-sequence block tables, ref counts and a prefix cache of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 1 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: list[int] = [b for b in range(num_blocks - 1, -1, -1) if b != SCRATCH_BLOCK]
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._ref = [0] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self._tables: dict[SeqId, list[int]] = {}
        self._seq_hashes: dict[SeqId, list[int]] = {}  # hashes of the seq's leading full blocks
        # prompt tokens looked up / found on admission (vLLM's `prefix_cache_queries` / `_hits`);
        # a preempted request's re-admission finds its own blocks, so it is counted apart
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.preempted_prefix_cache_queries = 0
        self.preempted_prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_total_blocks(self) -> int:
        """Usable blocks (scratch excluded)."""
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def holds(self, seq_id: SeqId) -> bool:
        """Whether the sequence has a block table (allocated and not freed)."""
        return seq_id in self._tables

    def block_table(self, seq_id: SeqId) -> list[int]:
        return self._tables[seq_id]

    def kv_waste(self, num_tokens_by_seq: dict[SeqId, int]) -> float:
        """Allocated-but-empty slots / allocated slots over the given live sequences."""
        allocated = used = 0
        for seq_id, n in num_tokens_by_seq.items():
            slots = len(self._tables[seq_id]) * self.block_size
            allocated += slots
            used += min(n, slots)
        return (allocated - used) / allocated if allocated else 0.0

    def get_computed_blocks(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """Longest chain of cached full blocks prefixing `token_ids` (under `cache_salt`), leaving
        >= 1 token to compute.

        Changes no state (the scheduler records an admitted lookup with `record_lookup`).
        """
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        parent = chain_root(cache_salt)
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_lookup(self, num_tokens: int, num_blocks: int, preempted: bool = False) -> None:
        """Count an admitted request's lookup: `num_tokens` looked up, `num_blocks` blocks found."""
        if not self.enable_prefix_caching:
            return
        if preempted:
            self.preempted_prefix_cache_queries += num_tokens
            self.preempted_prefix_cache_hits += num_blocks * self.block_size
        else:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_blocks * self.block_size

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, seq_id: SeqId, num_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Ensure `seq_id` has blocks for `num_tokens` tokens; False (and no change) if short.

        On the first call for a sequence, `computed_blocks` (from `get_computed_blocks`)
        become the start of its block table.
        """
        table = self._tables.get(seq_id)
        computed = computed_blocks or []
        if table is not None and computed:
            raise ValueError(f"computed_blocks given for already allocated sequence {seq_id!r}")
        have = len(table) if table is not None else len(computed)
        num_new = max(0, _cdiv(num_tokens, self.block_size) - have)
        reusable = sum(1 for b in computed if b in self._evictable)
        if num_new > self.num_free_blocks - reusable:
            return False
        if table is None:
            for b in computed:
                if self._ref[b] == 0:
                    del self._evictable[b]
                self._ref[b] += 1
            table = self._tables[seq_id] = list(computed)
            self._seq_hashes[seq_id] = [self._block_hash[b] for b in computed]
        for _ in range(num_new):
            table.append(self._take_block())
        return True

    def _take_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently used unreferenced cached block
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash.pop(block)]
        self._ref[block] = 1
        return block

    def cache_blocks(self, seq_id: SeqId, token_ids: Sequence[int], num_computed_tokens: int,
                     cache_salt: str | None = None) -> None:
        """Register the sequence's full blocks within its first `num_computed_tokens` tokens
        (under its `cache_salt`).

        Idempotent. A hash already cached by another block keeps its existing mapping.
        """
        if not self.enable_prefix_caching:
            return
        table, hashes = self._tables[seq_id], self._seq_hashes[seq_id]
        bs = self.block_size
        for i in range(len(hashes), min(num_computed_tokens // bs, len(table))):
            h = hash_block(hashes[-1] if hashes else chain_root(cache_salt), token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = table[i]
            if h not in self._hash_to_block and block not in self._block_hash:
                self._hash_to_block[h] = block
                self._block_hash[block] = h

    def fork(self, parent_id: SeqId, child_id: SeqId, num_tokens: int) -> int:
        """Share the parent's full blocks covering the child's first `num_tokens` tokens.

        The parent must have computed those tokens. Returns the tokens covered: a multiple of
        `block_size` and < `num_tokens`, so the child computes at least one token.
        """
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} already allocated")
        parent = self._tables[parent_id]
        k = min(max(num_tokens - 1, 0) // self.block_size, len(parent))
        for b in parent[:k]:
            self._ref[b] += 1
        self._tables[child_id] = parent[:k]
        self._seq_hashes[child_id] = self._seq_hashes[parent_id][:k]
        return k * self.block_size

    def free(self, seq_id: SeqId) -> None:
        """Release the sequence's blocks, tail first (so the tail is evicted first)."""
        table = self._tables.pop(seq_id)
        del self._seq_hashes[seq_id]
        for b in reversed(table):
            self._release(b)

    def trim(self, seq_id: SeqId, num_tokens: int) -> None:
        """Release the sequence's blocks wholly past its first `num_tokens` tokens (rejected
        speculative tokens' blocks)."""
        table = self._tables[seq_id]
        while len(table) > _cdiv(num_tokens, self.block_size):
            self._release(table.pop())

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._block_hash:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only when no sequence holds blocks (returns success)."""
        if self._tables:
            return False
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_hash.clear()
        return True
