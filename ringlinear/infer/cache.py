"""The engine's hybrid cache: one fp32 state slot per running sequence for every Lightning layer,
fixed-size pages of keys and values for every softmax layer, and a pool of state snapshots for the
prefix cache, all allocated once at start-up.

A linear layer's cache does not grow with the sequence, so a running sequence holds exactly one
slot; its softmax layers' cache grows a page at a time. Slot 0 and page 0 are scratch for the
padding rows of captured decode steps and are never handed out.

Prefix caching (as vLLM's block hashing, extended to the Lightning state): a full page is named by
a hash chain over the tokens up to its end, and once computed it stays cached, shared read-only and
reference-counted, until it is evicted (least recently freed first) for a new page. Pages alone do
not give the Lightning state after a prefix, so the state is also kept, in snapshots, at every
`snapshot_interval` tokens (a multiple of the page size); a request resumes from the longest prefix
with its pages and a snapshot, and prefills only the rest.

Two objects share the work, as vLLM's scheduler and model runner do: the `CacheManager` (the
scheduler's) decides which slot, pages and snapshots each sequence holds; the `PagedCache` (the
model runner's) holds the tensors and the block tables the kernels read, and takes the manager's
decisions from each step's scheduler output.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import RingLinearConfig
from ..info import model_info

PageEntry = tuple[int, int, int]  # (slot, index in its block table, page)


@dataclass(frozen=True)
class CacheSize:
    num_slots: int  # sequences that can run at once
    num_pages: int
    page_size: int  # tokens per page
    max_pages_per_seq: int  # a block table's length: the longest sequence's pages
    num_snapshots: int = 0  # prefix-cache snapshots of the Lightning states (0: none kept)
    snapshot_interval: int = 0  # tokens between two snapshot positions, a multiple of page_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size


def size_cache(config: RingLinearConfig, dtype: torch.dtype, memory_bytes: int, max_num_seqs: int,
               page_size: int, max_model_len: int, snapshot_share: float = 0.0,
               snapshot_interval: int = 0) -> CacheSize:
    """Split `memory_bytes` (no more than `max_num_seqs` sequences of `max_model_len` tokens can
    use) into a state slot and at least one KV page for each of up to `max_num_seqs` sequences,
    the rest into more pages; sequences are then at most `max_model_len` tokens or the capacity.
    `snapshot_share` of the memory, if the model has Lightning layers, goes to prefix-cache snapshots."""
    info = model_info(config, dtype)
    state = info.state_bytes_per_sequence
    snapshots = int(memory_bytes * snapshot_share) // state if state and snapshot_share else 0
    memory_bytes = min(memory_bytes - snapshots * state, max_num_seqs * info.cache_bytes(max_model_len))
    page_bytes = info.kv_bytes_per_token * page_size
    slots = min(max_num_seqs, memory_bytes // (state + page_bytes))
    if slots < 1:
        raise ValueError(f"{memory_bytes / 2**20:.1f} MiB of cache memory cannot hold one sequence's state "
                         f"and one page ({(state + page_bytes) / 2**20:.1f} MiB)")
    # a model without softmax layers needs no page, but the pool keeps one
    pages = (memory_bytes - slots * state) // page_bytes if page_bytes else 1
    return fixed_cache_size(int(slots), int(pages), page_size, max_model_len, snapshots, snapshot_interval)


def fixed_cache_size(num_slots: int, num_pages: int, page_size: int, max_model_len: int, num_snapshots: int = 0,
                     snapshot_interval: int = 0) -> CacheSize:
    if snapshot_interval % page_size:
        raise ValueError(f"the snapshot interval ({snapshot_interval} tokens) must be a multiple of the page size "
                         f"({page_size})")
    longest = min(max_model_len, num_pages * page_size)
    return CacheSize(num_slots, num_pages, page_size, -(-longest // page_size), num_snapshots, snapshot_interval)


def page_hashes(token_ids: Sequence[int], num_pages: int, page_size: int, known: list[bytes]) -> list[bytes]:
    """The hash chain of the first `num_pages` full pages of `token_ids`, extending `known` (the
    first ones, already computed) in place: page i's hash covers every token up to its end."""
    for i in range(len(known), num_pages):
        parent = known[-1] if known else b""
        tokens = np.asarray(token_ids[i * page_size:(i + 1) * page_size], dtype=np.int64)
        known.append(hashlib.blake2b(parent + tokens.tobytes(), digest_size=16).digest())
    return known[:num_pages]


@dataclass(frozen=True)
class PrefixHit:
    num_tokens: int  # of the prefix found: a multiple of the page size
    num_pages: int
    snapshot: int | None  # the Lightning states after it (None: the model has none, or no hit)
    num_reclaimed: int  # of its pages, those no sequence holds now (they count as free until taken)


@dataclass
class CacheChanges:
    """What the manager decided since the runner last looked, in the order the runner applies it."""
    saved: list[tuple[int, int]] = field(default_factory=list)  # (slot, snapshot): states at the last step's end
    new_slots: list[int] = field(default_factory=list)  # their states start at zero
    restored: list[tuple[int, int]] = field(default_factory=list)  # (slot, snapshot) copied in, before the step
    new_pages: list[PageEntry] = field(default_factory=list)  # block-table entries added
    forks: list[tuple[int, int]] = field(default_factory=list)  # (slot, new slot): states copied after the step
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # (page, new page) copied after the step


class CacheManager:
    """Which state slot, pages and snapshots each sequence holds (host bookkeeping only), and the
    prefix cache: hashed pages and snapshots by the hash of the prefix they end. Every decision is
    reported by `take_changes()`, for the model runner.

    A page is free (never hashed, or its hash dropped), cached (hashed, held by no sequence: evictable,
    least recently freed first) or held (reference count > 0, shared read-only when hashed)."""

    def __init__(self, size: CacheSize, prefix_caching: bool = False, has_state: bool = True):
        """`has_state`: the model has Lightning layers, so a prefix is reused only with a snapshot."""
        self.size, self.page_size = size, size.page_size
        self.prefix_caching, self.has_state = prefix_caching, has_state
        self._pages = np.zeros((size.num_slots + 1, size.max_pages_per_seq), dtype=np.int64)  # slot -> pages
        self._num_pages = np.zeros(size.num_slots + 1, dtype=np.int64)  # pages held by each slot
        self._free_slots = list(range(size.num_slots, 0, -1))
        self._free_pages = list(range(size.num_pages, 0, -1))
        self._refs = np.zeros(size.num_pages + 1, dtype=np.int64)
        self._cached: OrderedDict[int, None] = OrderedDict()  # hashed pages no sequence holds, LRU first
        self._page_of: dict[bytes, int] = {}  # prefix hash -> its last page
        self._hash_of: dict[int, bytes] = {}
        self._free_snapshots = list(range(size.num_snapshots - 1, -1, -1))
        self._snapshot_of: OrderedDict[bytes, int] = OrderedDict()  # prefix hash -> snapshot, LRU first
        self._changes = CacheChanges()
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which found

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence can take: the free ones and the cached ones no sequence holds."""
        return len(self._free_pages) + len(self._cached)

    @property
    def num_snapshots_used(self) -> int:
        return len(self._snapshot_of)

    @property
    def snapshot_interval(self) -> int:
        """Tokens between snapshot positions; 0: no snapshots are taken."""
        return self.size.snapshot_interval if self.size.num_snapshots and self.has_state else 0

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def usage(self) -> tuple[float, float]:
        """Fractions of the state slots and of the KV pages in use."""
        return (1 - self.num_free_slots / self.size.num_slots, 1 - self.num_free_pages / self.size.num_pages)

    # -- slots and pages ------------------------------------------------------------------------

    def allocate_slot(self) -> int:
        """A free slot; its states start from zero (the runner clears it before the step)."""
        slot = self._free_slots.pop()
        self._changes.new_slots.append(slot)
        return slot

    def _take_page(self) -> int | None:
        if self._free_pages:
            page = self._free_pages.pop()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)  # evict the least recently freed
            del self._page_of[self._hash_of.pop(page)]
        else:
            return None
        self._refs[page] = 1
        return page

    def _append_page(self, slot: int, page: int) -> None:
        index = int(self._num_pages[slot])
        self._pages[slot, index] = page
        self._num_pages[slot] = index + 1
        self._changes.new_pages.append((slot, index, page))

    def reserve(self, slot: int, num_tokens: int) -> int:
        """Add pages until `slot` holds `num_tokens` tokens, as far as free pages go; returns the
        number of tokens it can hold now."""
        want = min(self.pages_for(num_tokens), self.size.max_pages_per_seq)
        while self._num_pages[slot] < want and (page := self._take_page()) is not None:
            self._append_page(slot, page)
        return int(self._num_pages[slot]) * self.page_size

    def free(self, slot: int) -> None:
        """Give back a slot and its pages: hashed ones stay cached (the last page is evicted first)."""
        for page in reversed(self._pages[slot, : self._num_pages[slot]].tolist()):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._cached[page] = None
                else:
                    self._free_pages.append(page)
        self._num_pages[slot] = 0
        self._free_slots.append(slot)

    def trim(self, slot: int, num_tokens: int) -> None:
        """Give back the slot's pages past its first `num_tokens` tokens (those of rejected drafts:
        never hashed, held by this slot alone)."""
        keep = self.pages_for(num_tokens)
        for page in self._pages[slot, keep:self._num_pages[slot]].tolist():
            self._refs[page] = 0
            self._free_pages.append(page)
        self._num_pages[slot] = min(keep, self._num_pages[slot])

    def fork(self, slot: int, num_tokens: int) -> int | None:
        """A new slot that continues the sequence in `slot` after its first `num_tokens` tokens (all
        computed by the end of this step): the states are copied, the full pages shared and the last,
        partial page copied (it will be written). None, and nothing taken, if a slot or page lacks."""
        partial = num_tokens % self.page_size != 0
        if not self._free_slots or (partial and self.num_free_pages == 0):
            return None
        new = self._free_slots.pop()
        full = num_tokens // self.page_size
        for page in self._pages[slot, :full].tolist():
            self._refs[page] += 1
            self._append_page(new, page)
        if partial:
            page = self._take_page()
            self._append_page(new, page)
            self._changes.page_copies.append((int(self._pages[slot, full]), page))
        self._changes.forks.append((slot, new))
        return new

    # -- the prefix cache -----------------------------------------------------------------------

    def find_prefix(self, hashes: list[bytes], num_tokens: int) -> PrefixHit:
        """The longest cached prefix of the `num_tokens` known tokens of a sequence whose full pages
        hash to `hashes`, shorter than them so that one token is left to compute; with Lightning
        layers, the longest that also has a snapshot. Changes nothing."""
        found = 0
        for h in hashes[:(num_tokens - 1) // self.page_size]:
            if h not in self._page_of:
                break
            found += 1
        snapshot = None
        if self.has_state:
            per = self.snapshot_interval // self.page_size
            found = found - found % per if per else 0
            while found and hashes[found - 1] not in self._snapshot_of:
                found -= per
            snapshot = self._snapshot_of[hashes[found - 1]] if found else None
        reclaimed = sum(self._refs[self._page_of[h]] == 0 for h in hashes[:found])
        return PrefixHit(found * self.page_size, found, snapshot, int(reclaimed))

    def take_prefix(self, slot: int, hashes: list[bytes], hit: PrefixHit, num_tokens: int) -> None:
        """Give a new `slot` the pages of a prefix hit and copy its snapshot into the slot's states;
        `num_tokens` (the sequence's known tokens) counts as queried."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += hit.num_tokens
        for h in hashes[:hit.num_pages]:
            page = self._page_of[h]
            if self._refs[page] == 0:
                del self._cached[page]
            self._refs[page] += 1
            self._append_page(slot, page)
        if hit.snapshot is not None:
            self._snapshot_of.move_to_end(hashes[hit.num_pages - 1])
            self._changes.restored.append((slot, hit.snapshot))

    def register(self, slot: int, hashes: list[bytes], num_registered: int) -> int:
        """Cache the slot's full pages from `num_registered` on (those `hashes` name; their tokens are
        computed by the end of this step). A page whose prefix is cached already stays the slot's own.
        Returns the number of pages now registered."""
        for index in range(num_registered, len(hashes)):
            page, h = int(self._pages[slot, index]), hashes[index]
            if h not in self._page_of and page not in self._hash_of:
                self._page_of[h], self._hash_of[page] = page, h
        return len(hashes)

    def snapshot(self, h: bytes) -> int | None:
        """A snapshot to write for the prefix that hashes to `h`, or None if it has one already (at most
        one per prefix) or no snapshot is kept. Takes a free one, else the least recently used."""
        if not self.snapshot_interval or h in self._snapshot_of:
            return None
        if self._free_snapshots:
            snapshot = self._free_snapshots.pop()
        else:
            _, snapshot = self._snapshot_of.popitem(last=False)
        self._snapshot_of[h] = snapshot
        return snapshot

    def save_state(self, slot: int, snapshot: int) -> None:
        """Write the slot's states as they are at the end of this step into `snapshot` (for a snapshot
        position that accepted drafts reached: their state exists once the runner has folded them)."""
        self._changes.saved.append((slot, snapshot))

    def reset_prefix_cache(self) -> None:
        """Forget every cached page and snapshot (when no sequence holds a page)."""
        if (self._refs > 0).any():
            raise RuntimeError("the prefix cache can only be reset while no sequence runs")
        self._free_pages.extend(self._cached)
        self._cached.clear()
        self._page_of.clear()
        self._hash_of.clear()
        self._free_snapshots.extend(self._snapshot_of.values())
        self._snapshot_of.clear()

    def take_changes(self) -> CacheChanges:
        """Every decision since the last call."""
        changes, self._changes = self._changes, CacheChanges()
        return changes


class PagedCache:
    """The cache tensors: `states` [linear layers, slots + 1, H, D, D] fp32, `kv` the pages of the
    full-attention layers, `snapshots` [linear layers, snapshots, H, D, D] fp32, and the block tables
    (row `slot`: the pages of the sequence in that slot), on the host for building a step's inputs and
    on the device for the kernels. `kv` is [softmax layers, 2, pages + 1, page_size, KV, D] for GQA
    (keys and values) and [MLA layers, pages + 1, page_size, r + rope] for MLA (the normalised latent
    and the rope key of each token); `page_dim` is its page axis."""

    def __init__(self, config: RingLinearConfig, size: CacheSize, device: torch.device | str, dtype: torch.dtype):
        H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.size, self.page_size, self.device = size, size.page_size, torch.device(device)
        kinds = config.layer_types
        self.linear_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == "linear")}
        self.softmax_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == "softmax")}
        self.states = torch.zeros(len(self.linear_index), size.num_slots + 1, H, D, D,
                                  dtype=torch.float32, device=device)
        self.snapshots = torch.zeros(len(self.linear_index), size.num_snapshots, H, D, D,
                                     dtype=torch.float32, device=device)
        pages = (size.num_pages + 1, size.page_size)
        self.latent = config.attention_type == "mla"
        if self.latent:
            self.page_dim, layout = 1, (*pages, config.kv_lora_rank + config.qk_rope_head_dim)
        else:
            self.page_dim, layout = 2, (2, *pages, KV, D)
        self.kv = torch.zeros(len(self.softmax_index), *layout, dtype=dtype, device=device)
        self.host_tables = np.zeros((size.num_slots + 1, size.max_pages_per_seq), dtype=np.int64)
        self.block_tables = torch.zeros(size.num_slots + 1, size.max_pages_per_seq, dtype=torch.int32, device=device)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of one snapshot (every Lightning layer's state of one sequence)."""
        return self.snapshots[:, :1].numel() * 4

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.states, self.snapshots, self.kv))

    def _index(self, values: Iterable[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long).to(self.device, non_blocking=True)

    def apply_before(self, changes: CacheChanges) -> None:
        """The decisions to apply before the step: save the states the last step left for snapshots
        (before a slot is reused), clear the states of new slots, restore snapshots into the slots of
        cache hits, write new block-table entries (one host-to-device copy)."""
        if changes.saved:
            self.save_snapshots(*zip(*changes.saved))
        for slot in changes.new_slots:
            self.states[:, slot].zero_()
        if changes.restored:
            slots, snapshots = zip(*changes.restored)
            self.states[:, self._index(slots)] = self.snapshots[:, self._index(snapshots)]
        if changes.new_pages:
            entries = np.asarray(changes.new_pages, dtype=np.int64)
            self.host_tables[entries[:, 0], entries[:, 1]] = entries[:, 2]
            slot, index, page = torch.from_numpy(entries).to(self.device).T
            self.block_tables.index_put_((slot, index), page.to(torch.int32))

    def apply_after(self, changes: CacheChanges) -> None:
        """The decisions to apply after the step: forked sequences' states and partial pages copied."""
        if changes.forks:
            sources, targets = zip(*changes.forks)
            self.states[:, self._index(targets)] = self.states[:, self._index(sources)]
        if changes.page_copies:
            sources, targets = zip(*changes.page_copies)
            self.kv.index_copy_(self.page_dim, self._index(targets), self.kv.index_select(self.page_dim,
                                                                                         self._index(sources)))

    def move_tokens(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy the keys and values (latents) of every softmax layer at flat token rows `sources`
        (page * page_size + offset) to rows `targets`: an accepted draft-tree path to consecutive
        positions. All sources are read before any target is written."""
        rows = self.kv.flatten(self.page_dim, self.page_dim + 1)  # a view: pages and offsets as one dim
        rows.index_copy_(self.page_dim, targets, rows.index_select(self.page_dim, sources))

    def save_snapshots(self, slots: Sequence[int], snapshots: Sequence[int]) -> None:
        """Copy the current states of `slots` into `snapshots` (every Lightning layer)."""
        if snapshots:
            self.snapshots[:, self._index(snapshots)] = self.states[:, self._index(slots)]
