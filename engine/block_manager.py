"""Paged KV-cache bookkeeping: fixed-size blocks, refcounts, prefix caching (torch-free)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from hearth.engine.sequence import Sequence

# (hash of the previous block's key, this block's tokens[, hashes of the images among them])
BlockKey = tuple[int, tuple[int, ...]] | tuple[int, tuple[int, ...], tuple[str, ...]]


class BlockManager:
    """Hands out KV blocks to sequences.

    A full block whose tokens are computed gets a key that chains its prefix; another sequence
    with the same prefix reuses it (refcount + 1) instead of recomputing. A block holding image
    placeholder tokens also keys the images' content hashes (the placeholder ids are the same
    for every image): the same image reuses its KV (and is not encoded again), another does not.
    Freed blocks keep their key and contents until they are handed out again, least recently
    freed first.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}  # key -> block id (in use or free)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cache_hits = 0  # tokens served from the prefix cache
        # The first block's parent hash per sequence (a LoRA adapter's, engine/lora/pool.py):
        # None or 0 for the base model, so adapters never share KV blocks.
        self.cache_root: Callable[[Sequence], int] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_keys(self, token_ids: list[int], num_full: int, seq: Sequence) -> list[BlockKey]:
        keys: list[BlockKey] = []
        parent, size, mm = self._root(seq), self.block_size, seq.mm
        for i in range(num_full):
            key: BlockKey = (parent, tuple(token_ids[i * size : (i + 1) * size]))
            if mm is not None:
                key = self._with_images(key, seq, i)
            keys.append(key)
            parent = hash(key)
        return keys

    def _with_images(self, key: BlockKey, seq: Sequence, i: int) -> BlockKey:
        """Block i's key with the hashes of the images whose tokens it holds (if any)."""
        images = seq.mm.hashes_in(i * self.block_size, (i + 1) * self.block_size)
        return (*key, images) if images else key

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.keys[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.keys[block] = None
        self.ref_counts[block] = 1
        return block

    # -- admission ----------------------------------------------------------------------------
    def prefix_keys(self, seq: Sequence) -> list[BlockKey]:
        """Keys of seq's full blocks that could come from the cache (one token is always left)."""
        if not self.prefix_caching:
            return []
        tokens = seq.token_ids()
        return self._block_keys(tokens, (len(tokens) - 1) // self.block_size, seq)

    def _root(self, seq: Sequence) -> int:
        return 0 if self.cache_root is None else self.cache_root(seq)

    def cached_prefix(self, seq: Sequence, keys: list[BlockKey] | None = None) -> list[int]:
        """Blocks holding a computed prefix of seq; at least one token is left to compute."""
        hits = []
        for key in self.prefix_keys(seq) if keys is None else keys:
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> bool:
        needed = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # hits now sitting in free
        return needed + revived <= len(self.free)

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a new (or preempted) sequence its cached prefix blocks."""
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.num_cache_hits += seq.num_cached_tokens

    # -- growth ---------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take())

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past seq's computed tokens (rejected draft tokens' lookahead):
        they hold no key, so they are handed out first again."""
        keep = self.blocks_for(seq.num_computed_tokens)
        for block in reversed(seq.block_table[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)
        del seq.block_table[keep:]

    def register_computed(self, seq: Sequence) -> None:
        """Key the sequence's newly full, computed blocks so later prompts can reuse them."""
        if not self.prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        size = self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else self._root(seq)
            key: BlockKey = (parent, tuple(seq.tokens(i * size, (i + 1) * size)))
            if seq.mm is not None:
                key = self._with_images(key, seq, i)
            seq.block_hashes.append(hash(key))
            block = seq.block_table[i]
            if self.keys[block] is None:
                self.keys[block] = key
                self.cached.setdefault(key, block)

    def forget_cached(self) -> None:
        """Drop every cached prefix (the blocks' contents were overwritten, e.g. by autotune)."""
        self.cached.clear()
        self.keys = [None] * self.num_blocks

    def release(self, seq: Sequence, evict_first: bool = False) -> None:
        """Drop the sequence's references; unreferenced blocks become free (tail first).
        `evict_first`: they go to the head of the free list, taken before every other free
        block (a lower-priority sequence's: better requests' cached prefixes outlive them)."""
        order = seq.block_table if evict_first else reversed(seq.block_table)
        for block in order:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if evict_first:  # head first, so the tail ends up first in line
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
