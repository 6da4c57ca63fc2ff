"""BlockPool: which block ids are handed out, in which order they are evicted, and how refcounts and the
prefix-cache index behave. Pure CPU, no tensors."""

from __future__ import annotations

import pytest

from loom.kv.block_pool import BlockPool, hash_block


def free_ids(pool: BlockPool) -> list[int]:
    """The free queue, front (next handed out) first."""
    return list(pool.free_queue)


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def h(*tokens: int):
    return hash_block(None, list(tokens))


def test_allocation_hands_out_blocks_in_id_order():
    pool = BlockPool(6, enable_caching=True)
    assert ids(pool.allocate(2)) == [0, 1]
    assert ids(pool.allocate(3)) == [2, 3, 4]
    assert free_ids(pool) == [5]
    assert pool.num_free_blocks == 1
    assert pool.usage() == pytest.approx(5 / 6)
    assert all(pool.blocks[i].ref_cnt == 1 for i in range(5))
    assert pool.blocks[5].ref_cnt == 0


def test_allocate_zero_blocks_is_a_no_op():
    pool = BlockPool(2, enable_caching=True)
    assert pool.allocate(0) == []
    assert free_ids(pool) == [0, 1]


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0, enable_caching=True)


def test_freed_uncached_blocks_go_back_to_the_front():
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.allocate(3)  # 0, 1, 2; queue [3, 4]
    pool.free(blocks[::-1])  # tail first: 2, 1, 0, each moved to the front
    assert free_ids(pool) == [0, 1, 2, 3, 4]
    assert all(b.ref_cnt == 0 for b in blocks)
    # Uncached blocks are reused at once, before the never-used 3 and 4.
    assert ids(pool.allocate(2)) == [0, 1]
    assert pool.num_evictions == 0


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(3, enable_caching=True)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 blocks with 1 free"):
        pool.allocate(2)
    assert free_ids(pool) == [2]
    assert ids(pool.allocate(1)) == [2]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_shared_block_is_free_only_when_every_holder_frees_it():
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(1, 2))
    pool.touch([block])  # a second request hits it while the first still holds it
    assert block.ref_cnt == 2
    assert 0 not in pool.free_queue
    pool.free([block])
    assert block.ref_cnt == 1
    assert 0 not in pool.free_queue
    pool.free([block])
    assert block.ref_cnt == 0
    assert free_ids(pool) == [1, 2, 0]  # cached: goes to the back (most recently used)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([block])


def test_eviction_takes_uncached_first_then_cached_tail_before_head():
    pool = BlockPool(5, enable_caching=True)
    req = pool.allocate(4)  # 0..3; block 3 is a partial (uncached) tail
    parent = None
    for block, toks in zip(req[:3], [(1, 2), (3, 4), (5, 6)], strict=True):
        parent = hash_block(parent, list(toks))
        pool.cache_block(block, parent)
    pool.free(req[::-1])
    # 3 is uncached (front); cached blocks follow least recently used first: the tail (2) before the head.
    assert free_ids(pool) == [3, 4, 2, 1, 0]
    assert ids(pool.allocate(2)) == [3, 4]
    assert pool.num_evictions == 0
    assert pool.num_cached_blocks == 3
    assert ids(pool.allocate(1)) == [2]
    assert pool.num_evictions == 1
    assert pool.blocks[2].block_hash is None
    assert pool.num_cached_blocks == 2
    assert ids(pool.allocate(2)) == [1, 0]
    assert pool.num_evictions == 3
    assert pool.num_cached_blocks == 0


def test_eviction_is_lru_across_requests():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2), pool.allocate(2)
    for i, block in enumerate(a + b):
        pool.cache_block(block, h(i))
    pool.free(b[::-1])  # b finishes first: its blocks are older in the queue
    pool.free(a[::-1])
    assert free_ids(pool) == [3, 2, 1, 0]
    assert ids(pool.allocate(3)) == [3, 2, 1]
    assert pool.lookup(h(0)) is pool.blocks[0]
    assert pool.lookup(h(1)) is None
    assert pool.lookup(h(3)) is None


def test_cache_hit_revives_a_free_cached_block():
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(7, 8))
    pool.free([block])
    assert free_ids(pool) == [1, 2, 0]
    hit = pool.lookup(h(7, 8))
    assert hit is block
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert free_ids(pool) == [1, 2]
    # Revived, it is safe from eviction: the pool is now full without it.
    assert ids(pool.allocate(2)) == [1, 2]
    assert pool.num_evictions == 0
    assert pool.lookup(h(7, 8)) is block


def test_touching_a_recently_freed_block_then_freeing_it_makes_it_most_recent():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache_block(block, h(i))
    pool.free(blocks[::-1])
    assert free_ids(pool) == [2, 1, 0]
    pool.touch([pool.blocks[2]])
    pool.free([pool.blocks[2]])
    assert free_ids(pool) == [1, 0, 2]


def test_same_hash_twice_keeps_the_first_block():
    pool = BlockPool(3, enable_caching=True)
    first, second = pool.allocate(2)
    key = h(1, 2, 3, 4)
    pool.cache_block(first, key)
    pool.cache_block(second, key)
    assert pool.lookup(key) is first
    assert first.block_hash == key
    assert second.block_hash is None
    assert pool.num_cached_blocks == 1
    # The duplicate is plain scratch once freed: it goes to the front, the cached copy to the back.
    pool.free([second, first])
    assert free_ids(pool) == [1, 2, 0]


def test_cache_block_never_rehashes_a_cached_block():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(1))
    pool.cache_block(block, h(2))
    assert block.block_hash == h(1)
    assert pool.lookup(h(2)) is None


def test_caching_disabled_indexes_nothing():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(1))
    assert block.block_hash is None
    assert pool.lookup(h(1)) is None
    pool.free([block])
    assert free_ids(pool) == [0, 1]


def test_reset_prefix_cache_drops_only_free_cached_blocks():
    pool = BlockPool(4, enable_caching=True)
    held, freed = pool.allocate(1), pool.allocate(2)
    for i, block in enumerate(held + freed):
        pool.cache_block(block, h(i))
    pool.free(freed[::-1])
    assert free_ids(pool) == [3, 2, 1]
    assert pool.reset_prefix_cache() == 2
    assert pool.lookup(h(0)) is held[0]
    assert pool.lookup(h(1)) is None and pool.lookup(h(2)) is None
    assert pool.blocks[1].block_hash is None
    # Dropped blocks are scratch now: at the front, ahead of the never-used 3.
    assert free_ids(pool)[-1] == 3
    assert sorted(free_ids(pool)[:2]) == [1, 2]
    assert pool.num_evictions == 0


def test_hash_is_deterministic_and_depends_on_tokens_and_order():
    assert hash_block(None, [1, 2, 3, 4]) == hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 4, 3])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])
    # Token ids are hashed as 64-bit values: no collision between 256 and 1, 0.
    assert hash_block(None, [256]) != hash_block(None, [1, 0])
    assert len(hash_block(None, [1])) == 16


def test_hash_chaining_same_block_after_different_beginnings_differs():
    shared = [9, 9, 9, 9]
    after_a = hash_block(hash_block(None, [1, 2, 3, 4]), shared)
    after_b = hash_block(hash_block(None, [5, 6, 7, 8]), shared)
    assert after_a != after_b
    assert after_a != hash_block(None, shared)
    assert after_a == hash_block(hash_block(None, [1, 2, 3, 4]), shared)


def test_prompts_sharing_a_block_aligned_run_after_different_beginnings_share_no_blocks():
    from loom.engine.request import Request
    from loom.kv.manager import KVCacheManager
    from loom.sampling_params import SamplingParams

    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = Request("a", [1, 2, 3, 4, 9, 9, 9, 9, 0], SamplingParams(), 4)
    assert kv.allocate_slots(a, a.num_tokens, kv.get_computed_blocks(a))
    assert kv.pool.num_cached_blocks == 2
    b = Request("b", [5, 6, 7, 8, 9, 9, 9, 9, 0], SamplingParams(), 4)
    hit = kv.get_computed_blocks(b)
    assert hit.blocks == [] and hit.num_tokens == 0
    assert kv.allocate_slots(b, b.num_tokens, hit)
    assert set(kv.block_ids("a")).isdisjoint(kv.block_ids("b"))
    assert kv.pool.num_cached_blocks == 4
