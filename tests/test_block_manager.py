"""Host-side tests of the KV block allocator (allocation, prefix caching, LRU, fork)."""
import copy
import random

import pytest

from jaxpaged.engine.block_manager import BlockManager
from jaxpaged.models.kv_cache import SCRATCH_BLOCK

BS = 4


def snapshot(bm: BlockManager) -> dict:
    return copy.deepcopy(vars(bm))


def check_invariants(bm: BlockManager) -> None:
    """Every usable block is exactly one of free / evictable / referenced; refs match tables."""
    free, evictable = list(bm._free), list(bm._evictable)
    holders = {b: 0 for b in range(bm.num_blocks)}
    for table in bm._tables.values():
        assert SCRATCH_BLOCK not in table
        for b in table:
            holders[b] += 1
    referenced = [b for b, n in holders.items() if n > 0]
    assert len(free) == len(set(free)) and len(evictable) == len(set(evictable))
    assert sorted(free + evictable + referenced) == [b for b in range(bm.num_blocks) if b != SCRATCH_BLOCK]
    assert all(bm._ref[b] == n for b, n in holders.items())
    assert all(b in bm._block_hash for b in evictable)
    assert {b: h for h, b in bm._hash_to_block.items()} == bm._block_hash


def test_allocate_and_free_restore_pool():
    bm = BlockManager(num_blocks=9, block_size=BS)
    assert bm.num_total_blocks == 8 and bm.num_free_blocks == 8 and bm.usage == 0.0
    assert bm.allocate("a", 5)  # 2 blocks
    assert bm.allocate("a", 8)  # still 2
    assert len(bm.block_table("a")) == 2
    assert bm.allocate("a", 9) and len(bm.block_table("a")) == 3
    assert bm.allocate(7, 16) and len(bm.block_table(7)) == 4
    assert bm.num_free_blocks == 1 and bm.usage == pytest.approx(7 / 8)
    check_invariants(bm)
    bm.free("a")
    bm.free(7)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert sorted(bm._free) == list(range(1, 9)) and not bm._evictable
    check_invariants(bm)


def test_trim_releases_only_blocks_wholly_past_the_tokens():
    """Rejected speculative tokens: blocks past the kept tokens go back, the rest stay."""
    bm = BlockManager(num_blocks=9, block_size=BS)
    assert bm.allocate("a", 14)  # 4 blocks
    table = list(bm.block_table("a"))
    bm.trim("a", 9)  # 9 tokens need 3 blocks
    assert bm.block_table("a") == table[:3] and bm.num_free_blocks == 5
    bm.trim("a", 12)  # nothing past 3 blocks
    assert bm.block_table("a") == table[:3]
    check_invariants(bm)
    bm.free("a")
    assert bm.num_free_blocks == 8
    check_invariants(bm)


def test_block_zero_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=BS)
    assert bm.allocate(0, 4 * BS)
    assert sorted(bm.block_table(0)) == [1, 2, 3, 4]
    assert not bm.allocate(1, 1)


def test_allocate_failure_changes_nothing():
    bm = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(3 * BS + 1))
    bm.allocate("a", len(prompt))
    bm.cache_blocks("a", prompt, len(prompt))
    bm.free("a")  # 3 evictable cached blocks + 2 free
    bm.allocate("b", BS)  # 1 free left
    computed = bm.get_computed_blocks(prompt)
    assert len(computed) == 3
    before = snapshot(bm)
    # Needs 3 reused + 3 new blocks but only 1 free: a failure must not adopt or evict anything.
    assert not bm.allocate("c", 6 * BS, computed)
    assert snapshot(bm) == before
    assert not bm.allocate("b", 7 * BS)
    assert snapshot(bm) == before
    assert bm.allocate("c", 4 * BS, computed)  # 3 reused + 1 new fits exactly
    assert bm.num_free_blocks == 0
    check_invariants(bm)


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=20, block_size=BS)
    prefix = list(range(100, 100 + 3 * BS))
    a = prefix + [1, 2]
    b = prefix + [3, 4, 5]
    assert bm.get_computed_blocks(a) == []
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)  # a lookup alone counts nothing
    bm.record_lookup(len(a), 0)
    bm.allocate("a", len(a))
    bm.cache_blocks("a", a, len(a))
    bm.cache_blocks("a", a, len(a))  # idempotent
    computed = bm.get_computed_blocks(b)
    assert computed == bm.block_table("a")[:3]
    bm.record_lookup(len(b), len(computed))
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (len(a) + len(b), 3 * BS)
    assert bm.allocate("b", len(b), computed)
    assert bm.block_table("b")[:3] == computed and bm.block_table("b")[3] != bm.block_table("a")[3]
    assert all(bm._ref[blk] == 2 for blk in computed)
    # A different first block breaks the chain even if later blocks are equal.
    assert bm.get_computed_blocks([0] * BS + prefix[BS:] + [1]) == []
    check_invariants(bm)


def test_cached_block_is_found_only_after_its_own_prefix():
    """A block's hash chains the blocks before it: equal tokens after another prefix (or
    first) are not a hit, and the lookup stops at the first block not cached."""
    bm = BlockManager(num_blocks=20, block_size=BS)
    A, B, C, D = ([10 * k + i for i in range(BS)] for k in range(1, 5))
    for name, toks in (("ab", A + B + [1]), ("d", D + [2])):
        bm.allocate(name, len(toks))
        bm.cache_blocks(name, toks, len(toks))
    a_block, b_block = bm.block_table("ab")[:2]
    d_block = bm.block_table("d")[0]
    queries = {"AB": (A + B + [3], [a_block, b_block]), "B": (B + [3], []), "BA": (B + A + [3], []),
               "CB": (C + B + [3], []), "DB": (D + B + [3], [d_block]), "CAB": (C + A + B + [3], [])}
    for name, (toks, blocks) in queries.items():
        assert bm.get_computed_blocks(toks) == blocks, name
    check_invariants(bm)


def test_prefix_never_covers_whole_prompt():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(2 * BS))
    bm.allocate("a", len(prompt) + 1)
    bm.cache_blocks("a", prompt + [9], len(prompt) + 1)
    assert len(bm.get_computed_blocks(prompt)) == 1  # last token must be computed
    assert len(bm.get_computed_blocks(prompt + [9])) == 2
    assert bm.get_computed_blocks(prompt[:BS]) == []


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    seqs = {s: [s * 10 + i for i in range(BS + 1)] for s in range(3)}  # 1 full block each
    for s, toks in seqs.items():
        bm.allocate(s, BS)
        bm.cache_blocks(s, toks, BS)
    held = bm.block_table(0)[0]
    cached = {s: bm.block_table(s)[0] for s in (1, 2)}
    bm.free(2)  # least recently freed
    bm.free(1)
    assert bm.allocate("x", 2 * BS)  # 1 free block + evicts seq 2's block
    assert cached[2] in bm.block_table("x") and cached[1] not in bm.block_table("x")
    assert bm.get_computed_blocks(seqs[2]) == []
    assert bm.get_computed_blocks(seqs[1]) == [cached[1]]
    assert bm.allocate("y", BS) and bm.block_table("y") == [cached[1]]
    assert not bm.allocate("z", BS)  # seq 0's cached block is referenced: never evicted
    assert bm.get_computed_blocks(seqs[0]) == [held]
    check_invariants(bm)


def test_free_evicts_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    toks = list(range(3 * BS))
    bm.allocate("a", len(toks))
    bm.cache_blocks("a", toks, len(toks))
    table = bm.block_table("a")
    bm.free("a")
    assert list(bm._evictable) == table[::-1]
    bm.allocate("b", BS)
    assert bm.block_table("b") == [table[2]]
    assert bm.get_computed_blocks(toks) == table[:2]


def test_fork_shares_full_blocks():
    for caching in (True, False):
        bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=caching)
        prompt = list(range(2 * BS + 2))
        bm.allocate("p", len(prompt))
        bm.cache_blocks("p", prompt, len(prompt))
        assert bm.fork("p", "c", len(prompt)) == 2 * BS
        assert bm.block_table("c") == bm.block_table("p")[:2]
        assert bm.allocate("c", len(prompt) + 1)
        assert bm.block_table("c")[2] != bm.block_table("p")[2]
        shared = bm.block_table("c")[:2]
        assert all(bm._ref[b] == 2 for b in shared)
        assert bm.fork("p", "d", 2 * BS) == BS  # never covers all tokens
        bm.free("p")
        bm.free("d")
        assert all(bm._ref[b] == 1 for b in shared) and bm.num_free_blocks == 9 - 3
        check_invariants(bm)
        bm.free("c")
        assert bm.num_free_blocks == 9
        check_invariants(bm)


def test_caching_off_never_hits():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(3 * BS + 1))
    bm.allocate("a", len(prompt))
    bm.cache_blocks("a", prompt, len(prompt))
    bm.record_lookup(len(prompt), 0)
    assert bm.get_computed_blocks(prompt) == [] and bm.prefix_cache_queries == bm.prefix_cache_hits == 0
    bm.free("a")
    assert not bm._evictable and bm.num_free_blocks == 9


def test_kv_waste():
    bm = BlockManager(num_blocks=10, block_size=BS)
    assert bm.kv_waste({}) == 0.0
    bm.allocate("a", BS + 1)  # 2 blocks, 8 slots, 5 used
    bm.allocate("b", 2 * BS)  # 2 blocks, 8 slots, 8 used
    assert bm.kv_waste({"a": BS + 1}) == pytest.approx(3 / 8)
    assert bm.kv_waste({"a": BS + 1, "b": 2 * BS}) == pytest.approx(3 / 16)


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(2 * BS + 1))
    bm.allocate("a", len(prompt))
    bm.cache_blocks("a", prompt, len(prompt))
    assert not bm.reset_prefix_cache()  # a sequence still holds blocks
    bm.free("a")
    assert len(bm.get_computed_blocks(prompt)) == 2
    assert bm.reset_prefix_cache()
    assert bm.get_computed_blocks(prompt) == [] and not bm._evictable and len(bm._free) == 9
    check_invariants(bm)


@pytest.mark.parametrize("seed", range(8))
def test_random_ops_against_model(seed):
    """Random allocate/cache/fork/free; every hit must return blocks holding the right tokens."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=12, block_size=BS, enable_prefix_caching=seed % 4 != 3)
    bases = [[rng.randrange(3) for _ in range(3 * BS)] for _ in range(3)]
    content: dict[int, list] = {}  # block -> tokens written into its slots (model of the KV)
    seqs: dict[int, tuple[list[int], int]] = {}  # seq -> (tokens, num_computed)
    next_id = 0

    def compute(s, upto):
        toks, done = seqs[s]
        table = bm.block_table(s)
        for pos in range(done, upto):
            b = table[pos // BS]
            assert sum(t.count(b) for t in bm._tables.values()) == 1  # never write a shared block
            content.setdefault(b, [None] * BS)[pos % BS] = toks[pos]
        seqs[s] = (toks, upto)
        bm.cache_blocks(s, toks, upto)

    for _ in range(300):
        op = rng.random()
        if op < 0.3 or not seqs:  # new request
            toks = rng.choice(bases)[: rng.randrange(1, 3 * BS + 1)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
            computed = bm.get_computed_blocks(toks)
            assert len(computed) * BS < len(toks)
            for i, b in enumerate(computed):
                assert content[b] == toks[i * BS : (i + 1) * BS]
            before = snapshot(bm)
            if bm.allocate(next_id, len(toks), computed):
                seqs[next_id] = (toks, len(computed) * BS)
            else:
                assert snapshot(bm) == before
            next_id += 1
        elif op < 0.65:  # compute a chunk, or decode one token
            s = rng.choice(list(seqs))
            toks, done = seqs[s]
            if done == len(toks):
                before = snapshot(bm)
                if not bm.allocate(s, len(toks) + 1):
                    assert snapshot(bm) == before
                    continue
                toks.append(rng.randrange(3))
            compute(s, rng.randint(done + 1, len(toks)))
        elif op < 0.8:  # fork a sequence's computed prefix
            p = rng.choice(list(seqs))
            toks, done = seqs[p]
            if done == 0:
                continue
            n = rng.randint(1, done)
            covered = bm.fork(p, next_id, n)
            assert covered % BS == 0 and covered < n
            assert bm.block_table(next_id) == bm.block_table(p)[: covered // BS]
            if bm.allocate(next_id, n):
                seqs[next_id] = (toks[:n], covered)
            else:
                bm.free(next_id)
            next_id += 1
        else:
            s = rng.choice(list(seqs))
            bm.free(s)
            del seqs[s]
        check_invariants(bm)
        assert set(bm._tables) == set(seqs)
        for s, (toks, _) in seqs.items():
            assert len(bm.block_table(s)) == -(-len(toks) // BS)
    for s in list(seqs):
        bm.free(s)
    assert bm.num_free_blocks == bm.num_total_blocks
    check_invariants(bm)


def test_cache_salt_shares_blocks_only_under_the_same_salt():
    """vLLM's cache_salt: the same prompt reuses cached blocks only with the same salt (or none
    with none); a salted prefix is invisible to other salts and to unsalted requests."""
    bm = BlockManager(num_blocks=20, block_size=BS)
    prompt = list(range(3 * BS + 1))
    for seq, salt in (("salted", "tenant-a"), ("plain", None)):
        bm.allocate(seq, len(prompt))
        bm.cache_blocks(seq, prompt, len(prompt), salt)
    salted, plain = bm.block_table("salted")[:3], bm.block_table("plain")[:3]
    assert not set(salted) & set(plain)  # the same tokens, two chains
    assert bm.get_computed_blocks(prompt, "tenant-a") == salted
    assert bm.get_computed_blocks(prompt) == plain
    assert bm.get_computed_blocks(prompt, "tenant-b") == []
    check_invariants(bm)
