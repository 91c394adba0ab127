"""Decode and verify steps replayed from CUDA graphs.

A decode step (one new token for each of n sequences) launches hundreds of small kernels, and on
a GPU their launch overhead rather than their work sets its time; so does a speculative verify step
(each sequence's last token and its draft tree). Their forward is captured once per step shape and
batch size in `capture_sizes`: a shape is a tree's `draft_parents` (`()` for a plain decode), every
sequence of the step verifying a tree of that shape. A step of n sequences copies its inputs into the
static buffers the graphs read and replays the smallest captured size ≥ n. The extra sequences are
padding: they read and write only the scratch state slot 0 and KV page 0, and their logits are
dropped. Everything in the captured forward stays on the device (no host synchronisation). In
batch-invariant mode the kernels compute each row alone, so the padding changes no real row's bits
either. A verify step's keys and values stay in the graph's memory for the fold that follows it,
which replays a graph of its own once the accepted paths are known.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from ..model import RingLinearForCausalLM
from ..ops.policy import KernelPolicy
from .cache import PagedCache
from .context import PagedContext, StepBatch, fold_paths, fold_rows, tree_masks
from .scheduler import ScheduledChunk

Shape = tuple[int, ...]  # the draft_parents of every verify chunk of the step; () a plain decode
# The inputs copied before a replay, per token and per sequence; the layout (query_start, logits_indices)
# and the tree masks follow from the shape and stay.
_PER_TOKEN = ("input_ids", "positions", "slot_mapping")
_PER_SEQUENCE = ("slots", "seq_lens")
assert set(_PER_TOKEN + _PER_SEQUENCE) == {f.name for f in fields(StepBatch) if f.type == "Tensor"} - {
    "query_start", "logits_indices"}, "every per-step tensor of StepBatch must be copied into the graphs' buffers"


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


def step_shape(chunks: Seq[ScheduledChunk]) -> Shape | None:
    """The shape of a step whose chunks are all decodes, or all verify chunks of one tree shape; else None."""
    first = chunks[0]
    if first.drafts:
        same = all(c.drafts and c.draft_parents == first.draft_parents for c in chunks)
    else:
        same = all(c.num_tokens == 1 and not c.drafts and c.sample for c in chunks)
    return first.draft_parents if same else None


@dataclass
class _Captured:
    """The graphs of one shape: host and device input buffers, and per size its graph and the context it ran."""
    rows: int  # per sequence: the root and the drafts
    host: dict[str, Tensor]  # pinned, filled for each replay
    padding: dict[str, Tensor]  # what the host buffers hold past the real rows
    static: dict[str, Tensor]
    graphs: dict[int, torch.cuda.CUDAGraph]
    contexts: dict[int, PagedContext]
    # verify shapes: the fold of the accepted paths into the Lightning states, per size, reading these
    fold_graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)
    fold_host: Tensor | None = None  # pinned, flat: each sequence's path rows [max size, rows], then the counts
    fold_static: Tensor | None = None

    def fold_inputs(self, buffer: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """The rows [size, rows] and counts [size] of the first `size` sequences in a fold buffer."""
        n = buffer.shape[0] // (self.rows + 1)
        return buffer[:n * self.rows].view(n, self.rows)[:size], buffer[n * self.rows:][:size]


class StepGraphs:
    def __init__(self, model: RingLinearForCausalLM, cache: PagedCache, max_size: int, policy: KernelPolicy,
                 shapes: Seq[Shape] = ((),), max_tokens: int | None = None):
        """Capture every shape for batches of up to `max_size` sequences, and at most `max_tokens` rows."""
        self.model, self.cache, self.policy = model, cache, policy
        device = cache.device
        max_rows = max((1 + len(shape)) * max_size for shape in shapes)
        self.logits = torch.empty(max_rows, model.config.vocab_size, dtype=torch.float32, device=device)
        self.hidden = torch.empty(max_rows, model.config.hidden_size, dtype=model.model.word_embeddings.weight.dtype,
                                  device=device)
        memory = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        self.shapes: dict[Shape, _Captured] = {}
        for shape in shapes:
            rows = 1 + len(shape)
            sizes = [s for s in capture_sizes(max_size) if max_tokens is None or s * rows <= max_tokens]
            if sizes:
                self.shapes[shape] = self._capture(shape, sizes, memory)
        torch.cuda.synchronize(device)

    def _capture(self, shape: Shape, sizes: list[int], memory) -> _Captured:
        rows, n = 1 + len(shape), sizes[-1]
        parents = [-1, *shape]
        host = {name: torch.zeros(n * rows, dtype=torch.long).pin_memory() for name in _PER_TOKEN}
        host |= {name: torch.zeros(n, dtype=torch.long).pin_memory() for name in _PER_SEQUENCE}
        # a padding sequence writes its tokens to positions 0.. of the scratch slot (all in page 0) and sees them
        host["seq_lens"].fill_(rows)
        host["slot_mapping"].copy_(torch.arange(rows).repeat(n) % self.cache.page_size)
        static = {name: tensor.to(self.cache.device) for name, tensor in host.items()}
        captured = _Captured(rows, host, {name: t.clone() for name, t in host.items()}, static, {}, {})
        if rows > 1:
            captured.fold_host = torch.zeros(n * (rows + 1), dtype=torch.long).pin_memory()
            captured.fold_static = captured.fold_host.to(self.cache.device)
        for size in reversed(sizes):
            batch = self._batch(captured, parents, size)
            self._forward(batch)  # warm-up: compiles the kernels, creates the library handles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory):
                context = captured.contexts[size] = self._forward(batch)
            captured.graphs[size] = graph
            if rows > 1:
                fold = captured.fold_inputs(captured.fold_static, size)
                context.fold_states(*fold)  # warm-up; counts 0: folds nothing
                captured.fold_graphs[size] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(captured.fold_graphs[size], pool=memory):
                    context.fold_states(*fold)
        return captured

    def _batch(self, captured: _Captured, parents: list[int], size: int) -> StepBatch:
        """The static step of `size` sequences of one shape: views of the buffers, the fixed layout."""
        rows, device = captured.rows, self.cache.device
        views = {name: captured.static[name][:size * rows] for name in _PER_TOKEN}
        views |= {name: captured.static[name][:size] for name in _PER_SEQUENCE}
        layout = {"query_start": torch.arange(0, size * rows + 1, rows, device=device),
                  "logits_indices": torch.arange(size * rows, device=device)}
        if rows == 1:
            return StepBatch(**views, **layout, num_decodes=size, max_query_len=1)
        ancestors, depth = tree_masks([parents] * size)
        return StepBatch(**views, **layout, num_decodes=0, max_query_len=rows, num_verifies=size,
                         num_verify_tokens=size * rows, tree_ancestors=torch.from_numpy(ancestors).to(device),
                         tree_depth=torch.from_numpy(depth).to(device), max_tree_len=rows,
                         has_branches=parents[1:] != list(range(rows - 1)))

    @torch.no_grad()
    def _forward(self, batch: StepBatch) -> PagedContext:
        context = PagedContext(self.cache, batch, self.policy)
        out = self.model(batch.input_ids[None], context=context)
        rows = batch.input_ids.shape[0]
        self.logits[:rows].copy_(out.logits[0])  # output buffers shared by all shapes and sizes
        self.hidden[:rows].copy_(out.hidden_states[0])
        return context

    def fits(self, chunks: Seq[ScheduledChunk]) -> bool:
        shape = step_shape(chunks)
        captured = self.shapes.get(shape)
        return captured is not None and len(chunks) <= max(captured.graphs)

    def run(self, chunks: Seq[ScheduledChunk], batch: StepBatch) -> tuple[Tensor, Tensor, PagedContext]:
        """A step that `fits`, its batch on the host: (logits [rows, V], hidden states [rows, hidden],
        the context whose verify keys and values `fold` reads), valid until the next replay."""
        captured = self.shapes[step_shape(chunks)]
        n, rows = batch.num_seqs, captured.rows
        size = min(s for s in captured.graphs if s >= n)
        for names, real, padded in ((_PER_TOKEN, n * rows, size * rows), (_PER_SEQUENCE, n, size)):
            for name in names:
                host = captured.host[name]
                host[:real] = getattr(batch, name)
                host[real:padded] = captured.padding[name][real:padded]
                captured.static[name][:padded].copy_(host[:padded], non_blocking=True)
        captured.graphs[size].replay()
        self._replayed = (captured, size)
        return self.logits[:n * rows], self.hidden[:n * rows], captured.contexts[size]

    def fold(self, sizes: Seq[int], accepted: Seq[list[int]]) -> None:
        """`PagedContext.fold` for the verify step just replayed: the states' fold replayed from its graph."""
        captured, size = self._replayed
        starts, paths = fold_paths(sizes, accepted)
        host_rows, host_counts = captured.fold_inputs(captured.fold_host, size)
        rows, counts = fold_rows(starts, paths, captured.rows, size)
        host_rows.copy_(torch.from_numpy(rows))
        host_counts.copy_(torch.from_numpy(counts))
        captured.fold_static.copy_(captured.fold_host, non_blocking=True)
        captured.fold_graphs[size].replay()
        captured.contexts[size].move_paths(starts, paths)
