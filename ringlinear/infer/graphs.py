"""Decode and verify steps replayed from CUDA graphs.

A decode step (one new token for each of n sequences) launches hundreds of small kernels, and on
a GPU their launch overhead rather than their work sets its time; so does a speculative verify step
(each sequence's last token and its draft tree). Their forward is captured once per step shape and
batch size in `capture_sizes`: a shape is a tree's `draft_parents` (`()` for a plain decode). A step
of n sequences copies its inputs into the static buffers the graphs read and replays the smallest
captured size ≥ n. The extra sequences are padding: they read and write only the scratch state slot 0
and KV page 0, and their logits are dropped. A verify step runs in the graphs of a shape whose first
nodes each of its trees is, its plain decodes and shorter trees filled with placeholder rows
(`PaddedStep`), so that drafters that propose ragged trees (n-gram matches of any length, sequences
with no drafts) keep the graphs. Everything in the captured forward stays on the device (no host
synchronisation). In batch-invariant mode the kernels compute each row alone, so padding changes no
real row's bits either. A verify step's keys and values stay in the graph's memory for the fold that
follows it, which replays a graph of its own (as does the fold of a padded plain decode's root).
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields

import numpy as np
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


def fits_shape(chunks: Seq[ScheduledChunk], shape: Shape, capacity: int) -> bool:
    """Whether a step can run as verify steps of `shape`: every chunk is a plain decode or verifies a tree
    whose nodes are the shape's first ones, and every sequence has room in its block table for the
    whole shape (`capacity` tokens)."""
    rows = 1 + len(shape)
    return all((c.draft_parents == shape[:len(c.drafts)] if c.drafts else c.num_tokens == 1 and c.sample)
               and c.start + rows <= capacity for c in chunks)


@dataclass
class PaddedStep:
    """A step laid out for the graphs of one shape: sequence n in rows [n·rows, (n + 1)·rows), its chunk's
    rows first, then placeholders (input 0, keys and values to the scratch page, outputs dropped) up to
    the shape's; sequences past the step's are padding. Real rows' ancestors are real (a chunk's nodes
    are the shape's first ones), so the placeholders change no real row."""
    inputs: dict[str, np.ndarray]  # the graphs' per-token [size·rows] and per-sequence [size] inputs
    real_rows: np.ndarray  # the rows holding the step's own, in its order
    starts: np.ndarray  # each chunk's first row
    decodes: np.ndarray  # the chunks that are plain decodes: their root enters the state after the forward


def padding_inputs(rows: int, size: int, page_size: int) -> dict[str, np.ndarray]:
    """The graphs' inputs for `size` padding sequences of `rows` rows: each in the scratch slot 0, its
    tokens at positions 0.. of page 0, seeing them."""
    inputs = {name: np.zeros(size * rows, dtype=np.int64) for name in _PER_TOKEN}
    inputs["slot_mapping"][:] = np.tile(np.arange(rows) % page_size, size)
    return inputs | {"slots": np.zeros(size, dtype=np.int64), "seq_lens": np.full(size, rows, dtype=np.int64)}


def pad_step(chunks: Seq[ScheduledChunk], batch: StepBatch, shape: Shape, size: int, page_size: int) -> PaddedStep:
    """`batch` (on the host) laid out for `size` sequences of `shape` (`fits_shape` holds)."""
    rows, n = 1 + len(shape), len(chunks)
    counts = np.asarray([c.num_tokens for c in chunks], dtype=np.int64)
    starts = np.arange(n, dtype=np.int64) * rows
    real = np.concatenate([start + np.arange(count) for start, count in zip(starts, counts)])
    _, depth = tree_masks([[-1, *shape]])
    roots = batch.positions.numpy()[batch.query_start.numpy()[:-1]]
    inputs = padding_inputs(rows, size, page_size)
    inputs["slot_mapping"][:n * rows] = 0  # placeholders' keys and values to the scratch page
    inputs["positions"][:n * rows] = (roots[:, None] + depth[None, :]).ravel()
    for name in _PER_TOKEN:
        inputs[name][real] = getattr(batch, name).numpy()
    inputs["slots"][:n] = batch.slots.numpy()
    inputs["seq_lens"][:n] = batch.seq_lens.numpy() - counts + rows
    decodes = np.asarray([i for i, c in enumerate(chunks) if not c.drafts], dtype=np.int64)
    return PaddedStep(inputs, real, starts, decodes)


def shape_batch(inputs: dict[str, Tensor], shape: Shape, size: int) -> StepBatch:
    """The step of `size` sequences of one shape over its inputs (`_PER_TOKEN`, `_PER_SEQUENCE`, on one
    device): the fixed layout and tree masks around them."""
    rows, device = 1 + len(shape), inputs["slots"].device
    layout = {"query_start": torch.arange(0, size * rows + 1, rows, device=device),
              "logits_indices": torch.arange(size * rows, device=device)}
    if rows == 1:
        return StepBatch(**inputs, **layout, num_decodes=size, max_query_len=1)
    ancestors, depth = tree_masks([[-1, *shape]] * size)
    return StepBatch(**inputs, **layout, num_decodes=0, max_query_len=rows, num_verifies=size,
                     num_verify_tokens=size * rows, tree_ancestors=torch.from_numpy(ancestors).to(device),
                     tree_depth=torch.from_numpy(depth).to(device), max_tree_len=rows,
                     has_branches=list(shape) != list(range(rows - 1)))


@dataclass
class _Captured:
    """The graphs of one shape: host and device input buffers, and per size its graph and the context it ran."""
    rows: int  # per sequence: the root and the drafts
    host: dict[str, Tensor]  # pinned, filled for each replay
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
        host = {name: torch.from_numpy(values).pin_memory()
                for name, values in padding_inputs(rows, n, self.cache.page_size).items()}
        static = {name: tensor.to(self.cache.device) for name, tensor in host.items()}
        captured = _Captured(rows, host, static, {}, {})
        if rows > 1:
            captured.fold_host = torch.zeros(n * (rows + 1), dtype=torch.long).pin_memory()
            captured.fold_static = captured.fold_host.to(self.cache.device)
        for size in reversed(sizes):
            views = {name: captured.static[name][:size * rows] for name in _PER_TOKEN}
            batch = shape_batch(views | {name: captured.static[name][:size] for name in _PER_SEQUENCE}, shape, size)
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

    @torch.no_grad()
    def _forward(self, batch: StepBatch) -> PagedContext:
        context = PagedContext(self.cache, batch, self.policy)
        out = self.model(batch.input_ids[None], context=context)
        rows = batch.input_ids.shape[0]
        self.logits[:rows].copy_(out.logits[0])  # output buffers shared by all shapes and sizes
        self.hidden[:rows].copy_(out.hidden_states[0])
        return context

    def plan(self, chunks: Seq[ScheduledChunk]) -> tuple[Shape, int] | None:
        """The captured (shape, size) that runs this step, or None: decode steps take the decode graphs;
        steps with verify chunks the first verify shape that `fits_shape`, their plain decodes and
        shorter trees padded with placeholders."""
        capacity = self.cache.size.max_pages_per_seq * self.cache.page_size
        decodes_only = all(not c.drafts for c in chunks)
        for shape, captured in self.shapes.items():
            if (shape == ()) == decodes_only and len(chunks) <= max(captured.graphs) and fits_shape(
                    chunks, shape, capacity):
                return shape, min(s for s in captured.graphs if s >= len(chunks))
        return None

    def run(self, plan: tuple[Shape, int], chunks: Seq[ScheduledChunk],
            batch: StepBatch) -> tuple[Tensor, Tensor, PagedContext]:
        """A step by its `plan`, its batch on the host: (logits [rows, V] and hidden states [rows, hidden]
        of the step's rows, in its order; the context whose verify keys and values `fold` reads), valid
        until the next replay. A plain decode in a verify step gets its root folded into its state here."""
        shape, size = plan
        captured, device = self.shapes[shape], self.cache.device
        padded = pad_step(chunks, batch, shape, size, self.cache.page_size)
        for name, values in padded.inputs.items():
            captured.host[name][:values.shape[0]] = torch.from_numpy(values)
            captured.static[name][:values.shape[0]].copy_(captured.host[name][:values.shape[0]], non_blocking=True)
        captured.graphs[size].replay()
        self._replayed = (captured, size, padded)
        if shape and padded.decodes.size:
            self._replay_fold(captured, size, padded.decodes, padded.starts[padded.decodes, None],
                              np.ones_like(padded.decodes))
        real = padded.real_rows  # the first rows, unless a sequence has placeholders
        contiguous = np.array_equal(real, np.arange(real.shape[0]))
        rows = slice(0, real.shape[0]) if contiguous else torch.from_numpy(real).to(device, non_blocking=True)
        return self.logits[rows], self.hidden[rows], captured.contexts[size]

    def fold(self, sizes: Seq[int], accepted: Seq[list[int]]) -> None:
        """`PagedContext.fold` for the verify step just replayed: the states' fold replayed from its graph."""
        captured, size, padded = self._replayed
        verifies = np.setdiff1d(np.arange(len(padded.starts)), padded.decodes)
        _, paths = fold_paths(sizes, accepted)
        starts = padded.starts[verifies]
        self._replay_fold(captured, size, verifies, *fold_rows(starts, paths, captured.rows))
        captured.contexts[size].move_paths(starts, paths)

    def _replay_fold(self, captured: _Captured, size: int, seqs: np.ndarray, rows: np.ndarray,
                     counts: np.ndarray) -> None:
        """Fold rows `rows[i, :counts[i]]` into the state of the step's sequence `seqs[i]`; the others fold nothing."""
        # the pinned buffer is rewritten after the sampler has read the step's tokens back: its last copy is done
        host_rows, host_counts = captured.fold_inputs(captured.fold_host, size)
        host_counts.zero_()
        host_rows[torch.from_numpy(seqs), :rows.shape[1]] = torch.from_numpy(rows)
        host_counts[torch.from_numpy(seqs)] = torch.from_numpy(counts)
        captured.fold_static.copy_(captured.fold_host, non_blocking=True)
        captured.fold_graphs[size].replay()
