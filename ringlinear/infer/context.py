"""One engine step as the model sees it: every scheduled token of every sequence packed along T
(B = 1), and the attention context that runs it against the `PagedCache`."""

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
from ..ops.policy import KernelPolicy
from .cache import PagedCache
from .scheduler import ScheduledChunk


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
    def build(cls, chunks: Seq[ScheduledChunk], cache: PagedCache) -> StepBatch:
        """Host tensors for the scheduled chunks (single-token ones first), each adding `num_tokens`
        of its sequence's tokens to the `start` it holds in the cache."""
        token_ids = [c.seq.token_ids for c in chunks]
        num_computed, num_new = [c.start for c in chunks], [c.num_tokens for c in chunks]
        counts = np.asarray(num_new, dtype=np.int64)
        computed = np.asarray(num_computed, dtype=np.int64)
        slot_array = np.asarray([c.seq.slot for c in chunks], dtype=np.int64)
        query_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])
        positions = np.repeat(computed - query_start[:-1], counts) + np.arange(total)
        input_ids = np.fromiter(itertools.chain.from_iterable(
            ids[c:c + n] for ids, c, n in zip(token_ids, num_computed, num_new)), dtype=np.int64, count=total)
        page = cache.page_size
        slot_mapping = cache.host_tables[np.repeat(slot_array, counts), positions // page] * page + positions % page
        ends = computed + counts
        complete = np.fromiter((c.sample for c in chunks), dtype=bool, count=len(counts))
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
    cached prefix and the new tokens. `policy` picks the kernels."""

    def __init__(self, cache: PagedCache, batch: StepBatch, policy: KernelPolicy):
        self.cache, self.batch, self.policy = cache, batch, policy
        decodes = batch.num_decodes
        self.block_tables = cache.block_tables[batch.slots]
        self.prefill_slots = batch.slots[decodes:]
        self.prefill_cu_seqlens = batch.query_start[decodes:] - decodes

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        if batch != 1 or seq_len != self.batch.input_ids.shape[0]:
            raise ValueError(f"an engine step is one packed row of {self.batch.input_ids.shape[0]} tokens, "
                             f"got [{batch}, {seq_len}]")
        return self.batch.positions[None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        states = self.cache.states[self.cache.linear_index[layer_idx]]
        decodes = self.batch.num_decodes
        outputs = []
        if decodes:
            outputs.append(lightning_decode(q[0, :decodes], k[0, :decodes], v[0, :decodes], log_decay, states,
                                            self.batch.slots[:decodes], policy=self.policy))
        if decodes < q.shape[1]:
            o, final = lightning_attn(q[:, decodes:], k[:, decodes:], v[:, decodes:], log_decay,
                                      initial_state=states[self.prefill_slots], output_final_state=True,
                                      cu_seqlens=self.prefill_cu_seqlens, max_seqlen=self.batch.max_query_len,
                                      policy=self.policy)
            states[self.prefill_slots] = final
            outputs.append(o[0])
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs))[None]

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        k_cache, v_cache = self.cache.kv[self.cache.softmax_index[layer_idx]]
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache.view(-1, *new.shape[2:]).index_copy_(0, self.batch.slot_mapping, new[0])
        batch = self.batch
        o = paged_attention(q[0], k_cache, v_cache, self.block_tables, batch.seq_lens, batch.query_start, scale,
                            batch.max_query_len, policy=self.policy)
        return o[None]
