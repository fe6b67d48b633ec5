"""Which block of the KV pool belongs to whom: a free list, reference counts and a prefix cache.

The pool itself (tensors) lives in `models/attention.PagedKVCache`; this room only does the
bookkeeping, in plain Python on the host, so it costs no device work.

Prefix caching (as vLLM's automatic prefix caching): a *full* block is named by a hash of its
tokens chained with its parent block's hash, so equal hashes mean equal whole prefixes. A new
sequence walks its prompt block by block and takes every block already in the table (reference
count + 1) instead of recomputing it. A block whose count drops to 0 keeps its contents and its
hash, parked in an LRU list; it is reused (and forgotten) only when no never-cached block is
left. Block 0 is a scratch block that padded tokens write into; it is never handed out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from truthgpt.errors import RequestError

SCRATCH_BLOCK = 0


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The chained name of a full block: its tokens and (through `parent`) every token before."""
    return hash((parent, tokens))


class BlockManager:
    """Hands out blocks of `block_size` token slots from a pool of `num_blocks` blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise RequestError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))  # never cached, or forgotten
        self.evictable: OrderedDict[int, None] = OrderedDict()  # count 0 but still cached, LRU
        self.hash_of: dict[int, int] = {}  # block -> its hash
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (hash collisions)
        self.block_of: dict[int, int] = {}  # hash -> block
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take now (never-cached ones and evictable cached ones)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], int | None]:
        """Blocks holding the longest cached prefix of token_ids (whole blocks only), each with
        one more reference, and the chained hash of the last (None when none). At least one
        token is always left to compute, since the model has to run on the last prompt token
        to give the first new one."""
        if not self.enable_prefix_caching:
            return [], None
        size = self.block_size
        usable = (len(token_ids) - 1) // size  # whole blocks strictly before the last token
        blocks: list[int] = []
        parent = matched = None
        for index in range(usable):
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            parent = block_hash(parent, tokens)
            block = self.block_of.get(parent)
            if block is None or self.tokens_of[block] != tokens:
                break
            blocks.append(block)
            matched = parent
        for block in blocks:
            self._take(block)
        return blocks, matched

    def record_lookup(self, num_tokens: int, hit_tokens: int) -> None:
        """Count one prompt's lookup in the stats, once it is admitted: a prompt that waits for
        blocks is looked up again every step, and counting each would weigh the hit rate
        towards whoever waits longest."""
        if self.enable_prefix_caching:
            self.stats.queried_tokens += num_tokens
            self.stats.hit_tokens += hit_tokens

    def register_full_blocks(
        self,
        block_table: list[int],
        token_ids: list[int],
        num_known: int,
        start: int,
        parent: int | None,
    ) -> tuple[int, int | None]:
        """Name every full block among the first `num_known` tokens of a sequence, from block
        index `start` on (those tokens will be in the pool by the end of this step); returns the
        next index to name and the chained hash of the block before it. `parent`: the chained
        hash of block `start - 1` (None at 0). Content that a cached block already holds stays
        unnamed, which is why the chain is carried here and not read back from the block."""
        size = self.block_size
        full = min(num_known // size, len(block_table))
        if not self.enable_prefix_caching or full <= start:
            return start, parent
        for index in range(start, full):
            block = block_table[index]
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            if block in self.hash_of:  # shared from the cache: already named
                parent = self.hash_of[block]
                continue
            parent = block_hash(parent, tokens)
            # Content equal to a cached block (computed twice, e.g. two equal prompts admitted
            # together) stays unnamed; the chain goes on from the shared name either way.
            if parent not in self.block_of:
                self.block_of[parent] = block
                self.hash_of[block] = parent
                self.tokens_of[block] = tokens
        return full, parent

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after an engine error, their contents are not trusted)."""
        for block in list(self.evictable):
            self.free.append(block)
        self.evictable.clear()
        self.hash_of.clear()
        self.tokens_of.clear()
        self.block_of.clear()

    # -- allocation ---------------------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (reference count 1); raises when the pool cannot give them."""
        if count > self.num_free_blocks:
            raise RequestError(f"need {count} KV blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(count):
            if self.free:
                block = self.free.popleft()
            else:  # reuse the least recently used cached block: forget what it held
                block, _ = self.evictable.popitem(last=False)
                self._forget(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block; tail blocks first, so that when the cache must
        evict, it evicts the ends of sequences before the prefixes others may share."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _forget(self, block: int) -> None:
        name = self.hash_of.pop(block, None)
        self.tokens_of.pop(block, None)
        if name is not None and self.block_of.get(name) == block:
            del self.block_of[name]
