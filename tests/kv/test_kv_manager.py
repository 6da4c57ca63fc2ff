"""KVCacheManager: exact block ids of prefix hits, the one-token cap, allocation that fails atomically,
generated tokens joining the cache, and the hit statistics."""

from __future__ import annotations

import pytest

from loom.engine.request import Request
from loom.kv.manager import NO_HIT, KVCacheManager
from loom.sampling_params import SamplingParams

BS = 4


def make_kv(num_blocks: int = 10, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_caching)


def req(request_id: str, prompt: list[int], **params) -> Request:
    return Request(request_id, list(prompt), SamplingParams(**params), 8)


def prefill(kv: KVCacheManager, r: Request) -> None:
    """Admit a request whole, as the scheduler and engine would: hit, allocate, compute."""
    hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - hit.num_tokens, hit)
    r.num_computed_tokens = r.num_tokens


def decode(kv: KVCacheManager, r: Request, token: int) -> None:
    """Sample a token, then compute it in the next step."""
    r.append_token(token)
    assert kv.allocate_slots(r, 1)
    r.num_computed_tokens += 1


def test_first_request_takes_fresh_blocks_and_caches_its_full_ones():
    kv = make_kv()
    a = req("a", range(10))
    assert kv.get_computed_blocks(a) is NO_HIT
    assert kv.allocate_slots(a, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    # Blocks 0 and 1 are full and indexed; block 2 holds 2 tokens and is not.
    assert kv.pool.num_cached_blocks == 2
    assert kv.pool.blocks[0].block_hash is not None
    assert kv.pool.blocks[1].block_hash is not None
    assert kv.pool.blocks[2].block_hash is None
    assert kv.num_free_blocks == 7


def test_second_request_with_same_prefix_reuses_exact_blocks():
    kv = make_kv()
    a = req("a", range(10))
    prefill(kv, a)
    b = req("b", [*range(10), 100, 101])
    hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit.blocks] == [0, 1]
    assert hit.num_tokens == 8
    assert kv.allocate_slots(b, 4, hit)
    # Only the two full blocks are shared; a's partial block 2 is not (b diverges inside it).
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    # b's block 3 (tokens 8..11) is now full: indexed under b's chained prefix.
    assert kv.pool.blocks[3].block_hash is not None
    assert kv.num_free_blocks == 6


def test_hit_stops_at_the_first_missing_block():
    kv = make_kv()
    prefill(kv, req("a", range(12)))
    b = req("b", [0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])
    hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit.blocks] == [0]
    assert hit.num_tokens == 4


def test_full_prompt_hit_is_capped_to_leave_one_token():
    kv = make_kv()
    prefill(kv, req("a", range(8)))
    assert kv.pool.num_cached_blocks == 2
    b = req("b", range(8))
    hit = kv.get_computed_blocks(b)
    # Both blocks are cached, but the last token must be computed to get logits: only block 0 is hit.
    assert [blk.block_id for blk in hit.blocks] == [0]
    assert hit.num_tokens == 4
    assert kv.allocate_slots(b, 4, hit)
    assert kv.block_ids("b") == [0, 2]
    # b recomputes tokens 4..7 into block 2, a duplicate of a's block 1: block 1 stays the cached copy.
    assert kv.pool.blocks[2].block_hash is None
    assert kv.pool.lookup(kv.pool.blocks[1].block_hash) is kv.pool.blocks[1]


def test_one_token_prompt_never_hits():
    kv = make_kv()
    prefill(kv, req("a", range(4)))
    assert kv.get_computed_blocks(req("b", [0])) is NO_HIT


def test_prompt_logprobs_request_gets_no_hit():
    kv = make_kv()
    prefill(kv, req("a", range(10)))
    b = req("b", range(10), prompt_logprobs=0)
    assert kv.get_computed_blocks(b) is NO_HIT
    assert kv.stats.queries == 10  # a's lookup only; b's was never made
    # Without prompt logprobs the same prompt hits.
    assert kv.get_computed_blocks(req("c", range(10))).num_tokens == 8


def test_allocate_slots_false_changes_nothing():
    kv = make_kv(num_blocks=4)
    prefill(kv, req("a", range(9)))  # blocks 0, 1, 2
    free_before = list(kv.pool.free_queue)
    b = req("b", range(100, 108))
    assert not kv.allocate_slots(b, 8)  # needs 2 blocks, 1 free
    assert kv.block_ids("b") == []
    assert list(kv.pool.free_queue) == free_before
    assert kv.allocate_slots(b, 4)  # a chunk that fits
    assert kv.block_ids("b") == [3]


def test_allocate_slots_false_with_a_hit_takes_no_reference():
    kv = make_kv(num_blocks=4)
    a = req("a", range(8))
    prefill(kv, a)
    kv.free(a)  # blocks 0, 1 stay cached in the free queue
    assert list(kv.pool.free_queue) == [2, 3, 1, 0]
    b = req("b", [*range(8), *range(50, 62)])  # hits 2 blocks, needs 3 more: 5 > 4 free
    hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit.blocks] == [0, 1]
    assert not kv.allocate_slots(b, 12, hit)
    assert [blk.ref_cnt for blk in hit.blocks] == [0, 0]
    assert list(kv.pool.free_queue) == [2, 3, 1, 0]
    assert kv.block_ids("b") == []


def test_revived_hit_blocks_count_against_free_blocks():
    kv = make_kv(num_blocks=3)
    a = req("a", range(8))
    prefill(kv, a)
    kv.free(a)
    b = req("b", [*range(8), 20, 21, 22, 23])
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 8
    # 2 revived + 1 new = all 3 free blocks.
    assert kv.allocate_slots(b, 4, hit)
    assert kv.block_ids("b") == [0, 1, 2]
    assert kv.num_free_blocks == 0
    assert kv.pool.num_evictions == 0


def test_hit_blocks_not_evicted_by_own_allocation():
    # 3 blocks: two cached (free) that b hits, one scratch. b needs 2 new blocks: it must not get them by
    # evicting its own hit blocks.
    kv = make_kv(num_blocks=3)
    a = req("a", range(8))
    prefill(kv, a)
    kv.free(a)
    b = req("b", [*range(8), *range(20, 28)])
    hit = kv.get_computed_blocks(b)
    assert not kv.allocate_slots(b, 8, hit)
    assert kv.pool.lookup(kv.pool.blocks[0].block_hash) is kv.pool.blocks[0]
    assert kv.pool.num_evictions == 0


def test_generated_tokens_join_the_cache():
    kv = make_kv()
    a = req("a", range(6))
    prefill(kv, a)
    assert kv.pool.num_cached_blocks == 1
    decode(kv, a, 70)  # computes token 6
    assert kv.pool.num_cached_blocks == 1
    decode(kv, a, 71)  # computes token 7: block 1 = [4, 5, 70, 71] is full
    assert kv.pool.num_cached_blocks == 2
    assert kv.block_ids("a") == [0, 1]
    # Next turn: prompt = previous prompt + output + new text hits both blocks, output included.
    b = req("b", [*range(6), 70, 71, 5, 5, 5])
    hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit.blocks] == [0, 1]
    assert hit.num_tokens == 8


def test_freed_request_blocks_stay_hittable_tail_evicted_first():
    kv = make_kv(num_blocks=4)
    a = req("a", range(12))
    prefill(kv, a)
    kv.free(a)
    assert kv.block_ids("a") == []
    assert list(kv.pool.free_queue) == [3, 2, 1, 0]  # scratch 3, then tail to head
    kv.allocate_slots(req("x", range(100, 108)), 8)  # takes 3 and a's tail block 2
    assert kv.block_ids("x") == [3, 2]
    hit = kv.get_computed_blocks(req("b", [*range(12), 1]))
    assert [blk.block_id for blk in hit.blocks] == [0, 1]


def test_prefix_cache_disabled_gives_no_hits():
    kv = make_kv(enable_caching=False)
    a = req("a", range(10))
    prefill(kv, a)
    assert kv.pool.num_cached_blocks == 0
    b = req("b", range(10))
    assert kv.get_computed_blocks(b) is NO_HIT
    assert kv.allocate_slots(b, 10)
    assert kv.block_ids("b") == [3, 4, 5]
    assert kv.stats.queries == 0 and kv.stats.hits == 0


def test_stats_count_queried_and_hit_tokens():
    kv = make_kv()
    prefill(kv, req("a", range(10)))
    assert (kv.stats.queries, kv.stats.hits) == (10, 0)
    prefill(kv, req("b", [*range(10), 1, 2]))
    assert (kv.stats.queries, kv.stats.hits) == (22, 8)
    prefill(kv, req("c", [0, 1, 2, 3, 7]))
    assert (kv.stats.queries, kv.stats.hits) == (27, 12)


def test_free_releases_every_block_and_forgets_hashes():
    kv = make_kv(num_blocks=4)
    a = req("a", range(6))
    prefill(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    assert "a" not in kv.req_blocks and "a" not in kv.req_hashes
    kv.free(a)  # freeing twice is harmless at this level
    assert kv.num_free_blocks == 4


def test_chunked_allocation_grows_the_same_block_list():
    kv = make_kv()
    a = req("a", range(10))
    assert kv.allocate_slots(a, 3)
    assert kv.block_ids("a") == [0]
    a.num_computed_tokens = 3
    assert kv.allocate_slots(a, 3)
    assert kv.block_ids("a") == [0, 1]
    assert kv.pool.num_cached_blocks == 1
    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 4)
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.pool.num_cached_blocks == 2
    assert kv.usage() == pytest.approx(0.3)
