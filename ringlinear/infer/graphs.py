"""Decode steps replayed from CUDA graphs.

A decode step (one new token for each of n sequences) launches hundreds of small kernels, and on
a GPU their launch overhead rather than their work sets its time. The step's forward is captured
once per batch size in `capture_sizes`; a step of n sequences copies its inputs into the static
buffers the graphs read and replays the smallest captured size ≥ n. The extra rows are padding:
they read and write only the scratch state slot 0 and KV page 0, and their logits are dropped.
Everything in the captured forward stays on the device (no host synchronisation). In batch-invariant
mode the kernels compute each row alone, so the padding changes no real row's bits either.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from ..model import RingLinearForCausalLM
from ..ops.policy import KernelPolicy
from .cache import PagedCache
from .context import PagedContext, StepBatch

# A decode step's layout is fixed (one row per sequence: query_start 0..n, every row sampled); every other
# tensor of its StepBatch, one entry per sequence, is copied into the graphs' buffers before a replay
# (so is a tensor a context adds to StepBatch).
_LAYOUT = ("query_start", "logits_indices")
_INPUTS = tuple(f.name for f in fields(StepBatch) if f.type == "Tensor" and f.name not in _LAYOUT)
_PADDING = {"seq_lens": 1}  # a padding row sees one key, its own, at position 0 of page 0; the rest are 0


def capture_sizes(max_size: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of a quarter of the power of two below, at least 8: from 32
    sequences on, a padded step does at most 25% extra work."""
    sizes, size = [], 1
    while size <= max_size:
        sizes.append(size)
        size = size * 2 if size < 16 else size + max(8, 2 ** (size.bit_length() - 1) // 4)
    if sizes[-1] != max_size:
        sizes.append(max_size)
    return sizes


class DecodeGraphs:
    def __init__(self, model: RingLinearForCausalLM, cache: PagedCache, max_size: int, policy: KernelPolicy):
        self.model, self.cache, self.policy = model, cache, policy
        self.sizes = capture_sizes(max_size)
        device, n = cache.device, self.sizes[-1]
        self.host = {name: torch.full((n,), _PADDING.get(name, 0), dtype=torch.long).pin_memory()
                     for name in _INPUTS}
        self.static = {name: tensor.to(device) for name, tensor in self.host.items()}
        self.static["query_start"] = torch.arange(n + 1, device=device)
        self.static["logits_indices"] = torch.arange(n, device=device)
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        memory = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        for size in reversed(self.sizes):
            batch = self._batch(size)
            self._forward(batch)  # warm-up: compiles the kernels, creates the library handles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory):
                self._forward(batch)
            self.graphs[size] = graph
        torch.cuda.synchronize(device)

    def _batch(self, size: int) -> StepBatch:
        views = {name: tensor[:size] for name, tensor in self.static.items()}
        views["query_start"] = self.static["query_start"][:size + 1]
        return StepBatch(**views, num_decodes=size, max_query_len=1)

    @torch.no_grad()
    def _forward(self, batch: StepBatch) -> None:
        context = PagedContext(self.cache, batch, self.policy)
        logits = self.model(batch.input_ids[None], context=context).logits[0]
        self.logits[:batch.num_seqs].copy_(logits)  # one output buffer shared by all sizes

    def fits(self, batch: StepBatch) -> bool:
        return batch.num_decodes == batch.num_seqs <= self.sizes[-1]

    def run(self, batch: StepBatch) -> Tensor:
        """Logits [rows sampled, V] of a decode step whose batch is on the host."""
        n = batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        for name in _INPUTS:
            host = self.host[name]
            host[:n] = getattr(batch, name)
            host[n:size] = _PADDING.get(name, 0)
            self.static[name][:size].copy_(host[:size], non_blocking=True)
        self.graphs[size].replay()
        if batch.logits_indices.shape[0] == n:
            return self.logits[:n]
        return self.logits[batch.logits_indices.to(self.logits.device)]
