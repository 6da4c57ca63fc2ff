"""KV-cache manager: which blocks each request holds, prefix hits, and caching of full blocks.

The scheduler talks to this class only; the pool behind it is an implementation detail.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from loom.kv.block_pool import Block, BlockHash, BlockPool, hash_block


class KVRequest(Protocol):
    """What the KV layer reads of a request (the engine's Request is one; kv never imports the engine)."""

    @property
    def request_id(self) -> str: ...

    @property
    def all_token_ids(self) -> list[int]: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_computed_tokens(self) -> int: ...

    @property
    def skip_prefix_cache(self) -> bool:
        """True when the request must compute every token (it takes no prefix hits)."""
        ...

    @property
    def mm_spans(self) -> Sequence[tuple[int, int, str]]:
        """(offset, length, content key) of each image's run of placeholder tokens."""
        ...


@dataclass(slots=True)
class PrefixHit:
    """Blocks a new request can reuse, and how many of its tokens they cover."""

    blocks: list[Block]
    num_tokens: int


NO_HIT = PrefixHit([], 0)


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    hits: int = 0
    """Prompt tokens found there."""


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        # Hashes of each request's full blocks, computed once and extended as tokens arrive.
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.stats = PrefixCacheStats()
        # program id -> (expiry, blocks it holds a reference on): KV a later call of the same agent
        # program will likely reuse, kept out of the LRU until released, expired, or memory is short.
        self.pins: OrderedDict[str, tuple[float, list[Block]]] = OrderedDict()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def _block_hashes(self, request: KVRequest, num_tokens: int) -> list[BlockHash]:
        """Hashes of the full blocks among the request's first num_tokens tokens."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        bs = self.block_size
        spans = request.mm_spans
        for i in range(len(hashes), num_tokens // bs):
            start, end = i * bs, (i + 1) * bs
            extra = b"".join(key.encode() for off, n, key in spans if off < end and start < off + n)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[start:end], extra))
        return hashes

    def get_computed_blocks(self, request: KVRequest) -> PrefixHit:
        """The longest cached prefix of a request that holds no blocks yet.

        At least one token is always left to compute: the last token's logits are needed to sample.
        Requests asking for prompt logprobs take no hits, since cached tokens produce no logits.
        """
        if not self.enable_caching or request.skip_prefix_cache:
            return NO_HIT
        max_hit_tokens = request.num_tokens - 1
        hashes = self._block_hashes(request, max_hit_tokens)
        blocks: list[Block] = []
        for block_hash in hashes:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, len(blocks) * self.block_size) if blocks else NO_HIT

    def allocate_slots(
        self, request: KVRequest, num_new_tokens: int, hit: PrefixHit = NO_HIT, num_lookahead: int = 0
    ) -> bool:
        """Make room for num_new_tokens more tokens of the request (after the hit, if any), the last
        num_lookahead of them draft tokens that are not the request's yet (never indexed for reuse).

        Returns False, changing nothing, if the pool cannot hold them; the caller then preempts or waits.
        """
        held = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + hit.num_tokens
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(held) - len(hit.blocks)
        # Hit blocks sitting in the free queue stop being free once touched.
        num_revived = sum(1 for b in hit.blocks if b.ref_cnt == 0)
        while num_new_blocks + num_revived > self.pool.num_free_blocks:
            # Pins are a hint: real demand for memory releases them (oldest first) before anyone waits.
            if not self.pins:
                return False
            self.release(next(iter(self.pins)))
            num_revived = sum(1 for b in hit.blocks if b.ref_cnt == 0)
        if not held and self.enable_caching and not request.skip_prefix_cache:
            # Counted when a lookup admits the request, not on each lookup of one still waiting for room.
            self.stats.queries += request.num_tokens
            self.stats.hits += hit.num_tokens
        if hit.blocks:
            self.pool.touch(hit.blocks)
        blocks = self.req_blocks.setdefault(request.request_id, held)
        blocks.extend(hit.blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.allocate(num_new_blocks))
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens - num_lookahead)
        return True

    def _cache_full_blocks(self, request: KVRequest, blocks: list[Block], num_tokens: int) -> None:
        # The KV of these tokens is written by this step's forward before any layer reads it, so
        # indexing the blocks now is safe even for a request hitting them in the same step.
        hashes = self._block_hashes(request, num_tokens)
        for block, block_hash in zip(blocks, hashes, strict=False):
            if block.block_hash is None:
                self.pool.cache_block(block, block_hash)

    def free(self, request: KVRequest) -> None:
        blocks = self.req_blocks.pop(request.request_id, None)
        if blocks:
            # Blocks are indexed when allocated, ahead of the forward that writes them. A request freed
            # before that forward ran (preempted in the step that scheduled it) leaves blocks past its
            # num_computed_tokens indexed with unwritten KV: take them out of the cache.
            for block in blocks[request.num_computed_tokens // self.block_size :]:
                self.pool.uncache(block)
            self.pool.free(blocks[::-1])
        self.req_hashes.pop(request.request_id, None)

    def pin(self, program_id: str, request: KVRequest, ttl_s: float) -> None:
        """Keep the request's cached full blocks from eviction on behalf of its program (call before
        freeing the request). Replaces the program's previous pin: a later call's blocks usually extend
        the earlier prefix."""
        blocks = [b for b in self.req_blocks.get(request.request_id, ()) if b.block_hash is not None]
        if not blocks:
            return
        self.pool.touch(blocks)
        self.release(program_id)
        self.pins[program_id] = (time.monotonic() + ttl_s, blocks)

    def release(self, program_id: str) -> bool:
        """Drop a program's pin; its blocks return to the LRU (still cached)."""
        entry = self.pins.pop(program_id, None)
        if entry is None:
            return False
        self.pool.free(entry[1][::-1])
        return True

    def expire_pins(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [pid for pid, (expiry, _) in self.pins.items() if expiry <= now]
        for pid in expired:
            self.release(pid)
        return len(expired)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(blocks) for _, blocks in self.pins.values())

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()
