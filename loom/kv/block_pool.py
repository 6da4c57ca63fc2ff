"""The pool of KV-cache blocks: allocation, refcounts, and the prefix cache's hash index with LRU eviction.

The pool never touches a tensor: a block is an index into the per-layer KV tensors the runner owns.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BlockHash = bytes


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    """Set while the block is full and indexed by the prefix cache."""


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash of a full block, chained over every block before it.

    Chaining makes the key the whole prefix, not just this block's tokens: two prompts that share a
    block-aligned run of tokens after different beginnings never share KV. A cryptographic digest (not
    Python's hash()) because a collision would silently serve another prompt's KV. `extra` carries what
    the token ids do not say: the content of the images whose placeholder tokens fall in the block (every
    image of a given size has the same placeholder ids).
    """
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(b"\x00mm")
        h.update(extra)
    return h.digest()


class BlockPool:
    """Fixed set of blocks. Blocks with ref_cnt 0 wait in `free_queue`, least recently used first.

    A free block may still hold cached KV (it has a hash): it stays reusable by a prefix hit until it is
    handed out for new tokens, which evicts it. Uncached free blocks are kept at the front of the queue,
    so they are taken before any cached one.
    """

    def __init__(self, num_blocks: int, enable_caching: bool):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found by a prefix hit (reviving them from the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[Block]:
        """Hand out n blocks for new tokens, evicting the least recently used cached ones if needed."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop one reference on each block. Pass a request's blocks tail first: the tail of a sequence
        is less likely to be shared than its head, so it should be evicted first."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def cache_block(self, block: Block, block_hash: BlockHash) -> None:
        """Index a full block under its prefix hash. If another block already holds this prefix (two
        requests computed it in the same step), the first one stays the cached copy."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def uncache(self, block: Block) -> None:
        """Drop a block from the prefix index: its KV was never written."""
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix held only by the free queue; returns how many were dropped."""
        dropped = 0
        for block in list(self.cached.values()):
            if block.ref_cnt == 0:
                del self.cached[block.block_hash]
                block.block_hash = None
                self.free_queue.move_to_end(block.block_id, last=False)
                dropped += 1
        return dropped
