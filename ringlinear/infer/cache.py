"""The engine's hybrid cache: one fp32 state slot per running sequence for every Lightning layer,
and fixed-size pages of keys and values for every softmax layer, allocated once at start-up.

A linear layer's cache does not grow with the sequence, so a running sequence holds exactly one
slot; its softmax layers' cache grows a page at a time. Slot 0 and page 0 are scratch for the
padding rows of captured decode steps and are never handed out.

Two objects share the work, as vLLM's scheduler and model runner do: the `CacheManager` (the
scheduler's) decides which slot and pages each sequence holds; the `PagedCache` (the model runner's)
holds the tensors and the block tables the kernels read, and takes the manager's decisions from each
step's scheduler output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

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

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size


def size_cache(config: RingLinearConfig, dtype: torch.dtype, memory_bytes: int, max_num_seqs: int,
               page_size: int, max_model_len: int) -> CacheSize:
    """Split `memory_bytes` (no more than `max_num_seqs` sequences of `max_model_len` tokens can
    use) into a state slot and at least one KV page for each of up to `max_num_seqs` sequences,
    the rest into more pages; sequences are then at most `max_model_len` tokens or the capacity."""
    info = model_info(config, dtype)
    memory_bytes = min(memory_bytes, max_num_seqs * info.cache_bytes(max_model_len))
    page_bytes = info.kv_bytes_per_token * page_size
    slots = min(max_num_seqs, memory_bytes // (info.state_bytes_per_sequence + page_bytes))
    if slots < 1:
        raise ValueError(f"{memory_bytes / 2**20:.1f} MiB of cache memory cannot hold one sequence's state "
                         f"and one page ({(info.state_bytes_per_sequence + page_bytes) / 2**20:.1f} MiB)")
    # a model without softmax layers needs no page, but the pool keeps one
    pages = (memory_bytes - slots * info.state_bytes_per_sequence) // page_bytes if page_bytes else 1
    return fixed_cache_size(int(slots), int(pages), page_size, max_model_len)


def fixed_cache_size(num_slots: int, num_pages: int, page_size: int, max_model_len: int) -> CacheSize:
    longest = min(max_model_len, num_pages * page_size)
    return CacheSize(num_slots, num_pages, page_size, -(-longest // page_size))


class CacheManager:
    """Which state slot and which pages each sequence holds (host bookkeeping only). Every slot and
    page entry handed out since the last `take_changes()` is reported by it, for the model runner."""

    def __init__(self, size: CacheSize):
        self.size, self.page_size = size, size.page_size
        self._pages = np.zeros((size.num_slots + 1, size.max_pages_per_seq), dtype=np.int64)  # slot -> pages
        self._num_pages = np.zeros(size.num_slots + 1, dtype=np.int64)  # pages held by each slot
        self._free_slots = list(range(size.num_slots, 0, -1))
        self._free_pages = list(range(size.num_pages, 0, -1))
        self._new_slots: list[int] = []
        self._new_pages: list[PageEntry] = []

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def usage(self) -> tuple[float, float]:
        """Fractions of the state slots and of the KV pages in use."""
        return (1 - self.num_free_slots / self.size.num_slots, 1 - self.num_free_pages / self.size.num_pages)

    def allocate_slot(self) -> int:
        """A free slot; its states start from zero (the runner clears it before the step)."""
        slot = self._free_slots.pop()
        self._new_slots.append(slot)
        return slot

    def reserve(self, slot: int, num_tokens: int) -> int:
        """Add pages until `slot` holds `num_tokens` tokens, as far as free pages go; returns the
        number of tokens it can hold now."""
        have = int(self._num_pages[slot])
        want = min(self.pages_for(num_tokens), self.size.max_pages_per_seq)
        while have < want and self._free_pages:
            page = self._free_pages.pop()
            self._pages[slot, have] = page
            self._new_pages.append((slot, have, page))
            have += 1
        self._num_pages[slot] = have
        return have * self.page_size

    def free(self, slot: int) -> None:
        """Give back a slot and all its pages."""
        self._free_pages.extend(self._pages[slot, : self._num_pages[slot]].tolist())
        self._num_pages[slot] = 0
        self._free_slots.append(slot)

    def take_changes(self) -> tuple[list[int], list[PageEntry]]:
        """Slots allocated and page entries added since the last call."""
        changes = self._new_slots, self._new_pages
        self._new_slots, self._new_pages = [], []
        return changes


class PagedCache:
    """The cache tensors: `states` [linear layers, slots + 1, H, D, D] fp32, `kv` [softmax layers, 2,
    pages + 1, page_size, KV, D], and the block tables (row `slot`: the pages of the sequence in that
    slot), on the host for building a step's inputs and on the device for the kernels."""

    def __init__(self, config: RingLinearConfig, size: CacheSize, device: torch.device | str, dtype: torch.dtype):
        H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.size, self.page_size, self.device = size, size.page_size, torch.device(device)
        kinds = config.layer_types
        self.linear_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == "linear")}
        self.softmax_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == "softmax")}
        self.states = torch.zeros(len(self.linear_index), size.num_slots + 1, H, D, D,
                                  dtype=torch.float32, device=device)
        self.kv = torch.zeros(len(self.softmax_index), 2, size.num_pages + 1, size.page_size, KV, D,
                              dtype=dtype, device=device)
        self.host_tables = np.zeros((size.num_slots + 1, size.max_pages_per_seq), dtype=np.int64)
        self.block_tables = torch.zeros(size.num_slots + 1, size.max_pages_per_seq, dtype=torch.int32, device=device)

    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size() + self.kv.numel() * self.kv.element_size()

    def apply(self, new_slots: Iterable[int], new_pages: list[PageEntry]) -> None:
        """Take the manager's decisions: clear the states of new slots, write new block-table entries
        (one host-to-device copy)."""
        for slot in new_slots:
            self.states[:, slot].zero_()
        if new_pages:
            entries = np.asarray(new_pages, dtype=np.int64)
            self.host_tables[entries[:, 0], entries[:, 1]] = entries[:, 2]
            slot, index, page = torch.from_numpy(entries).to(self.device).T
            self.block_tables.index_put_((slot, index), page.to(torch.int32))
