"""One engine step as the model sees it: every scheduled token of every sequence packed along T
(B = 1), and the attention context that runs it against the `CachePool`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ..model.context import AttentionContext
from ..ops import lightning_attn, lightning_decode
from ..ops.paged_attention import paged_attention
from .cache import CachePool


@dataclass
class StepBatch:
    """Sequences with exactly one new token come first: they take the decode kernels."""
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T] where each token's keys and values go: page * page_size + offset
    slots: Tensor  # [N] state slot (and block-table row) of each sequence
    seq_lens: Tensor  # [N] its tokens in the cache after this step
    query_start: Tensor  # [N+1] offsets of its new tokens along T
    logits_indices: Tensor  # positions along T whose next token is sampled
    num_decodes: int
    max_query_len: int

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]

    @classmethod
    def build(cls, token_ids: Seq[list[int]], num_computed: Seq[int], num_new: Seq[int], slots: Seq[int],
              pool: CachePool) -> StepBatch:
        """Host tensors for sequences that hold `num_computed[i]` tokens in the cache and now add the
        next `num_new[i]` of their `token_ids[i]`, which must start with the single-token ones."""
        counts = np.asarray(num_new, dtype=np.int64)
        computed = np.asarray(num_computed, dtype=np.int64)
        slot_array = np.asarray(slots, dtype=np.int64)
        query_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])
        positions = np.repeat(computed - query_start[:-1], counts) + np.arange(total)
        input_ids = np.fromiter(itertools.chain.from_iterable(
            ids[c:c + n] for ids, c, n in zip(token_ids, num_computed, num_new)), dtype=np.int64, count=total)
        page = pool.page_size
        slot_mapping = pool.host_tables[np.repeat(slot_array, counts), positions // page] * page + positions % page
        ends = computed + counts
        complete = ends == np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(counts))
        num_decodes = int((counts == 1).sum())
        assert (counts[:num_decodes] == 1).all(), "single-token sequences must come first"
        arrays = (input_ids, positions, slot_mapping, slot_array, ends, query_start, query_start[1:][complete] - 1)
        return cls(*(torch.from_numpy(a) for a in arrays), num_decodes=num_decodes,
                   max_query_len=int(counts.max(initial=0)))

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def to(self, device: torch.device) -> StepBatch:
        """The same batch on `device`, in one host-to-device copy."""
        tensors = self.tensors()
        flat = torch.cat(tensors).to(device, non_blocking=True)
        moved = flat.split([t.numel() for t in tensors])
        return StepBatch(*moved, num_decodes=self.num_decodes, max_query_len=self.max_query_len)


class PagedContext(AttentionContext):
    """Lightning layers: single-token sequences update their state slots in place (decode kernel);
    longer runs continue from their slots' states (varlen chunk kernel) and write the final states
    back. Softmax layers: the new keys and values go to their pages, then paged attention reads the
    cached prefix and the new tokens. `backend` picks the kernels ("auto": Triton on CUDA)."""

    def __init__(self, pool: CachePool, batch: StepBatch, backend: str = "auto"):
        self.pool, self.batch, self.backend = pool, batch, backend
        decodes = batch.num_decodes
        self.block_tables = pool.block_tables[batch.slots]
        self.prefill_slots = batch.slots[decodes:]
        self.prefill_cu_seqlens = batch.query_start[decodes:] - decodes

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        if batch != 1 or seq_len != self.batch.input_ids.shape[0]:
            raise ValueError(f"an engine step is one packed row of {self.batch.input_ids.shape[0]} tokens, "
                             f"got [{batch}, {seq_len}]")
        return self.batch.positions[None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        states = self.pool.states[self.pool.linear_index[layer_idx]]
        decodes = self.batch.num_decodes
        outputs = []
        if decodes:
            outputs.append(lightning_decode(q[0, :decodes], k[0, :decodes], v[0, :decodes], log_decay, states,
                                            self.batch.slots[:decodes], backend=self.backend))
        if decodes < q.shape[1]:
            o, final = lightning_attn(q[:, decodes:], k[:, decodes:], v[:, decodes:], log_decay,
                                      initial_state=states[self.prefill_slots], output_final_state=True,
                                      cu_seqlens=self.prefill_cu_seqlens, backend=self.backend)
            states[self.prefill_slots] = final
            outputs.append(o[0])
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs))[None]

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        k_cache, v_cache = self.pool.kv[self.pool.softmax_index[layer_idx]]
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache.view(-1, *new.shape[2:]).index_copy_(0, self.batch.slot_mapping, new[0])
        batch = self.batch
        o = paged_attention(q[0], k_cache, v_cache, self.block_tables, batch.seq_lens, batch.query_start, scale,
                            batch.max_query_len, backend=self.backend)
        return o[None]
