"""One engine step as the model sees it: every scheduled token of every sequence packed along T
(B = 1), and the attention context that runs it against the `PagedCache`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from ..model.context import AttentionContext
from ..model.mla import decompress
from ..ops import lightning_attn, lightning_decode
from ..ops.attention import causal_attention
from ..ops.lightning import lightning_tree_fold, lightning_tree_verify
from ..ops.paged_attention import paged_attention
from ..ops.paged_latent_attention import DECOMPRESS_MIN_QUERIES, paged_latent_attention
from ..ops.policy import KernelPolicy
from .cache import PagedCache
from .scheduler import ScheduledChunk
from .spec.tree import DraftTree


@dataclass
class LightningRound:
    """One Lightning call of a step whose prefill chunks are cut at snapshot positions: the next
    piece of each sequence that has one, continuing from the state the previous round left."""
    rows: Tensor  # [T_r] the pieces' rows among the step's prefill rows
    cu_seqlens: Tensor  # [N_r + 1] their offsets
    seqs: Tensor  # [N_r] which prefill sequences they belong to
    save: Tensor  # [n] of those, the pieces that end at a snapshot position
    snapshots: Tensor  # [n] where their states go
    max_len: int  # the longest piece

    def to(self, device: torch.device) -> LightningRound:
        tensors = (self.rows, self.cu_seqlens, self.seqs, self.save, self.snapshots)
        return LightningRound(*(t.to(device, non_blocking=True) for t in tensors), self.max_len)


def lightning_rounds(chunks: Seq[ScheduledChunk]) -> list[LightningRound] | None:
    """The rounds of the multi-token `chunks` (in step order), or None when no snapshot is taken
    inside one: then a single call runs them all (and `final_snapshots` saves those at their ends)."""
    if not any(position < c.end for c in chunks for position, _ in c.snapshots):
        return None
    pieces: list[list[tuple[int, int, int | None]]] = []  # per chunk: (start, end, snapshot) along its rows
    for chunk in chunks:
        cuts = [(position - chunk.start, snapshot) for position, snapshot in chunk.snapshots]
        bounds = [0, *(cut for cut, _ in cuts)]
        own = [(a, b, snapshot) for a, (b, snapshot) in zip(bounds, cuts)]
        if bounds[-1] < chunk.num_tokens:
            own.append((bounds[-1], chunk.num_tokens, None))
        pieces.append(own)
    offsets = np.cumsum([0] + [c.num_tokens for c in chunks])
    rounds = []
    for r in range(max(len(p) for p in pieces)):
        members = [(i, p[r]) for i, p in enumerate(pieces) if r < len(p)]
        rows = np.concatenate([np.arange(offsets[i] + a, offsets[i] + b) for i, (a, b, _) in members])
        cu = np.cumsum([0] + [b - a for _, (a, b, _) in members])
        saved = [(j, snapshot) for j, (_, (_, _, snapshot)) in enumerate(members) if snapshot is not None]
        arrays = (rows, cu, [i for i, _ in members], [j for j, _ in saved], [s for _, s in saved])
        rounds.append(LightningRound(*(torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in arrays),
                                     max_len=int(np.diff(cu).max())))
    return rounds


def tree_masks(trees: Seq[Seq[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Of the rows of trees given by their `tree_parents` (a single token is a root), packed in
    order: the `ops.tree` ancestor bitmasks (int64, bit 63 its sign) and depths."""
    ancestors, depths = [], []
    for parents in trees:
        own: list[int] = []
        for i, parent in enumerate(parents):
            own.append((1 << i) | (own[parent] if parent >= 0 else 0))
            depths.append(depths[len(depths) - i + parent] + 1 if parent >= 0 else 0)
        ancestors += own
    bits = np.asarray(ancestors, dtype=np.uint64).view(np.int64)
    return bits, np.asarray(depths, dtype=np.int64)


def fold_paths(sizes: Seq[int], accepted: Seq[list[int]]) -> tuple[np.ndarray, list[list[int]]]:
    """Of verify chunks of `sizes` rows whose accepted draft nodes are `accepted`: each chunk's first row
    among the verify rows, and its path (the root, node 0, then the accepted nodes)."""
    return np.cumsum([0, *sizes[:-1]], dtype=np.int64), [[0, *path] for path in accepted]


def fold_rows(starts: np.ndarray, paths: Seq[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """`lightning_tree_fold`'s (rows [len(paths), width], counts): each path's rows, padded with its last."""
    rows = np.stack([start + np.asarray(path)[np.minimum(np.arange(width), len(path) - 1)]
                     for start, path in zip(starts, paths)])
    return rows, np.asarray([len(path) for path in paths], dtype=np.int64)


def final_snapshots(chunks: Seq[ScheduledChunk]) -> tuple[Tensor, Tensor] | None:
    """(which of the multi-token `chunks`, snapshot) for the snapshots taken at their ends."""
    pairs = [(i, snapshot) for i, c in enumerate(chunks) for position, snapshot in c.snapshots if position == c.end]
    if not pairs:
        return None
    return tuple(torch.tensor(column, dtype=torch.long) for column in zip(*pairs))


@dataclass
class DecompressedChunks:
    """An MLA step's prompt chunks of at least DECOMPRESS_MIN_QUERIES new tokens, which attend in the
    decompressed form (their whole context's keys and values expanded into heads, then causal
    attention), and the rest of the step, which attends in the absorbed form."""
    chunks: list[tuple[int, int, int, int]]  # (sequence, first row, end row, tokens in the cache after the step)
    rows: Tensor  # [T'] the other sequences' rows
    seqs: Tensor  # [N'] those sequences
    query_start: Tensor  # [N' + 1] their offsets along `rows`
    max_query_len: int  # their longest run of new tokens

    @classmethod
    def build(cls, counts: np.ndarray, query_start: np.ndarray, ends: np.ndarray,
              first: int = 0) -> DecompressedChunks | None:
        """Over the step's sequences from `first` on (the ones before it attend in a call of their own)."""
        long = counts >= DECOMPRESS_MIN_QUERIES
        long[:first] = False
        if not long.any():
            return None
        short = np.flatnonzero(~long)
        short = short[short >= first]
        rows = np.concatenate([np.zeros(0, dtype=np.int64)] + [np.arange(query_start[n], query_start[n + 1])
                                                               for n in short])
        offsets = np.zeros(len(short) + 1, dtype=np.int64)
        np.cumsum(counts[short], out=offsets[1:])
        chunks = [(int(n), int(query_start[n]), int(query_start[n + 1]), int(ends[n])) for n in np.flatnonzero(long)]
        return cls(chunks, *(torch.from_numpy(a) for a in (rows, short, offsets)),
                   max_query_len=int(counts[short].max(initial=0)))

    def to(self, device: torch.device) -> DecompressedChunks:
        tensors = (self.rows, self.seqs, self.query_start)
        return DecompressedChunks(self.chunks, *(t.to(device, non_blocking=True) for t in tensors), self.max_query_len)


@dataclass
class StepBatch:
    """Sequences with exactly one new token come first: they take the decode kernels; then verify
    chunks (a sequence's last token and its draft tree: node i at position prefix + depth, its keys
    and values in the page slot of prefix + i); then prompt chunks."""
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T] where each token's keys and values go: page * page_size + offset
    slots: Tensor  # [N] state slot (and block-table row) of each sequence
    seq_lens: Tensor  # [N] its tokens in the cache after this step
    query_start: Tensor  # [N+1] offsets of its new tokens along T
    logits_indices: Tensor  # positions along T whose next token is sampled
    num_decodes: int
    max_query_len: int
    rounds: list[LightningRound] | None = None  # the prefill chunks' Lightning calls, if cut for snapshots
    num_verifies: int = 0  # verify chunks, after the decodes
    num_verify_tokens: int = 0  # their rows
    final_snapshots: tuple[Tensor, Tensor] | None = None  # else (prefill sequence, snapshot) at chunk ends
    decompressed: DecompressedChunks | None = None  # MLA: the long prompt chunks, if any
    # with verify chunks, of the decode and verify rows: `ops.tree`'s ancestor bitmasks and depths
    tree_ancestors: Tensor | None = None
    tree_depth: Tensor | None = None
    max_tree_len: int = 0  # the largest verify chunk
    has_branches: bool = False  # some verify chunk is not a chain: softmax layers need the tree mask

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]

    @classmethod
    def build(cls, chunks: Seq[ScheduledChunk], cache: PagedCache) -> StepBatch:
        """Host tensors for the scheduled chunks (single-token ones first), each adding `num_tokens`
        of its sequence's tokens to the `start` it holds in the cache."""
        num_computed, num_new = [c.start for c in chunks], [c.num_tokens for c in chunks]
        counts = np.asarray(num_new, dtype=np.int64)
        computed = np.asarray(num_computed, dtype=np.int64)
        slot_array = np.asarray([c.seq.slot for c in chunks], dtype=np.int64)
        query_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])
        slot_positions = np.repeat(computed - query_start[:-1], counts) + np.arange(total)
        input_ids = np.fromiter(itertools.chain.from_iterable(c.input_ids() for c in chunks), dtype=np.int64,
                                count=total)
        page = cache.page_size
        slot_mapping = (cache.host_tables[np.repeat(slot_array, counts), slot_positions // page] * page
                        + slot_positions % page)
        ends = computed + counts
        logits_indices = np.concatenate([np.zeros(0, dtype=np.int64)] + [
            np.arange(query_start[i + 1] - c.num_logits, query_start[i + 1]) for i, c in enumerate(chunks)])
        num_decodes = int((counts == 1).sum())
        num_verifies = sum(bool(c.drafts) for c in chunks)
        verify = slice(num_decodes, num_decodes + num_verifies)
        assert (counts[:num_decodes] == 1).all() and all(c.drafts for c in chunks[verify]), \
            "single-token sequences must come first, then verify chunks"
        positions, trees = slot_positions, {}
        if num_verifies:
            ancestors, depth = tree_masks([c.tree_parents for c in chunks[:verify.stop]])
            positions = slot_positions.copy()
            positions[:len(depth)] = computed[:verify.stop].repeat(counts[:verify.stop]) + depth
            trees = {"tree_ancestors": torch.from_numpy(ancestors), "tree_depth": torch.from_numpy(depth),
                     "max_tree_len": int(counts[verify].max()),
                     "has_branches": not all(DraftTree(c.drafts, c.draft_parents).is_chain for c in chunks[verify])}
        arrays = (input_ids, positions, slot_mapping, slot_array, ends, query_start, logits_indices)
        prefills = chunks[verify.stop:]
        rounds = lightning_rounds(prefills)
        first = verify.stop if trees.get("has_branches") else 0  # tree-masked rows take a call of their own
        decompressed = DecompressedChunks.build(counts, query_start, ends, first) if cache.latent else None
        return cls(*(torch.from_numpy(a) for a in arrays), num_decodes=num_decodes,
                   max_query_len=int(counts.max(initial=0)), rounds=rounds,
                   final_snapshots=final_snapshots(prefills) if rounds is None else None,
                   num_verifies=num_verifies, num_verify_tokens=int(counts[verify].sum()), decompressed=decompressed,
                   **trees)

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def to(self, device: torch.device) -> StepBatch:
        """The same batch on `device`, in one host-to-device copy."""
        tensors = self.tensors()
        flat = torch.cat(list(tensors.values())).to(device, non_blocking=True)
        moved = flat.split([t.numel() for t in tensors.values()])
        rounds = None if self.rounds is None else [r.to(device) for r in self.rounds]
        final = None if self.final_snapshots is None else tuple(t.to(device) for t in self.final_snapshots)
        decompressed = None if self.decompressed is None else self.decompressed.to(device)
        return replace(self, **dict(zip(tensors, moved)), rounds=rounds, final_snapshots=final,
                       decompressed=decompressed)


class PagedContext(AttentionContext):
    """Lightning layers: single-token sequences update their state slots in place (decode kernel);
    verify chunks run from their slots' states without writing them (tree verify kernel), keeping
    their keys and values for `fold`; longer runs continue from their slots' states (varlen chunk
    kernel) and write the final states back, in rounds cut at snapshot positions when the step takes
    snapshots. Softmax layers: the new keys and values go to their pages (a verify chunk's node i at
    prefix + i), then paged attention reads the cached prefix and the new tokens, with the tree mask
    for decode and verify rows when some tree has branches (a chain is causal). `policy` picks the
    kernels."""

    def __init__(self, cache: PagedCache, batch: StepBatch, policy: KernelPolicy):
        self.cache, self.batch, self.policy = cache, batch, policy
        decodes, verifies = batch.num_decodes, batch.num_decodes + batch.num_verifies
        self.block_tables = cache.block_tables[batch.slots]
        self.verify_slots = batch.slots[decodes:verifies]
        self.verify_cu_seqlens = batch.query_start[decodes:verifies + 1] - decodes
        self.prefill_slots = batch.slots[verifies:]
        self.prefill_cu_seqlens = batch.query_start[verifies:] - (decodes + batch.num_verify_tokens)
        self.verified: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # Lightning layer -> verify rows' k, v, log λ

    def positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        if batch != 1 or seq_len != self.batch.input_ids.shape[0]:
            raise ValueError(f"an engine step is one packed row of {self.batch.input_ids.shape[0]} tokens, "
                             f"got [{batch}, {seq_len}]")
        return self.batch.positions[None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
        states = self.cache.states[self.cache.linear_index[layer_idx]]
        decodes, verified = self.batch.num_decodes, self.batch.num_decodes + self.batch.num_verify_tokens
        outputs = []
        if decodes:
            outputs.append(lightning_decode(q[0, :decodes], k[0, :decodes], v[0, :decodes], log_decay, states,
                                            self.batch.slots[:decodes], policy=self.policy))
        if verified > decodes:
            rows = slice(decodes, verified)
            outputs.append(lightning_tree_verify(q[0, rows], k[0, rows], v[0, rows], log_decay, states,
                                                 self.verify_slots, self.batch.tree_ancestors[rows],
                                                 self.batch.tree_depth[rows], self.verify_cu_seqlens,
                                                 self.batch.max_tree_len, policy=self.policy))
            self.verified[layer_idx] = (k[0, rows], v[0, rows], log_decay)
        if verified < q.shape[1]:
            q, k, v = q[0, verified:], k[0, verified:], v[0, verified:]
            if self.batch.rounds is None:
                o, final = lightning_attn(q[None], k[None], v[None], log_decay,
                                          initial_state=states[self.prefill_slots], output_final_state=True,
                                          cu_seqlens=self.prefill_cu_seqlens,
                                          max_seqlen=min(self.batch.max_query_len, q.shape[0]), policy=self.policy)
                states[self.prefill_slots] = final
                if self.batch.final_snapshots is not None:
                    seqs, snapshots = self.batch.final_snapshots
                    self.cache.snapshots[self.cache.linear_index[layer_idx]][snapshots] = final[seqs]
                outputs.append(o[0])
            else:
                snapshots = self.cache.snapshots[self.cache.linear_index[layer_idx]]
                outputs.append(self._lightning_rounds(q, k, v, log_decay, states, snapshots))
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs))[None]

    def fold(self, sizes: Seq[int], accepted: Seq[list[int]]) -> None:
        """After the target accepted the path `accepted[n]` (draft nodes, root to leaf) of verify
        chunk n (`sizes[n]` rows): its root and those nodes enter the slot's state in every Lightning
        layer, and their keys and values move to consecutive positions prefix + depth (a chain's are
        there already); the rejected ones leave no trace but in pages past the path, given back."""
        starts, paths = fold_paths(sizes, accepted)
        rows, counts = fold_rows(starts, paths, max(len(path) for path in paths))
        device = self.cache.device
        self.fold_states(torch.from_numpy(rows).to(device), torch.from_numpy(counts).to(device))
        self.move_paths(starts, paths)

    def fold_states(self, rows: Tensor, counts: Tensor) -> None:
        """Sequence n's rows `rows[n, :counts[n]]` of the verify chunks into its state in every Lightning
        layer (a replayed graph's step has padding sequences after the real ones: counts 0)."""
        slots = self.verify_slots[:rows.shape[0]]
        for layer_idx, (k, v, log_decay) in self.verified.items():
            states = self.cache.states[self.cache.linear_index[layer_idx]]
            lightning_tree_fold(k, v, log_decay, states, slots, rows, counts, policy=self.policy)

    def move_paths(self, starts: np.ndarray, paths: Seq[list[int]]) -> None:
        """The accepted nodes' keys and values to positions prefix + depth, where a path left the first branch."""
        moves = [(start + node, start + depth) for start, path in zip(starts, paths)
                 for depth, node in enumerate(path) if node != depth]
        if moves and self.cache.softmax_index:
            offsets = torch.tensor(moves, device=self.cache.device) + self.batch.num_decodes  # rows of the step
            self.cache.move_tokens(self.batch.slot_mapping[offsets[:, 0]], self.batch.slot_mapping[offsets[:, 1]])

    def _lightning_rounds(self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, states: Tensor,
                          snapshots: Tensor) -> Tensor:
        """The prefill rows [T, H, D] round by round; pieces that end at a snapshot position save it."""
        current = states[self.prefill_slots]
        o = torch.empty_like(q)
        for r in self.batch.rounds:
            o_r, final = lightning_attn(q[r.rows][None], k[r.rows][None], v[r.rows][None], log_decay,
                                        initial_state=current[r.seqs], output_final_state=True,
                                        cu_seqlens=r.cu_seqlens, max_seqlen=r.max_len, policy=self.policy)
            o[r.rows] = o_r[0]
            current[r.seqs] = final
            snapshots[r.snapshots] = final[r.save]
        states[self.prefill_slots] = current
        return o

    def softmax(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        k_cache, v_cache = self.cache.kv[self.cache.softmax_index[layer_idx]]
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache.view(-1, *new.shape[2:]).index_copy_(0, self.batch.slot_mapping, new[0])
        batch = self.batch
        if not batch.has_branches:
            o = paged_attention(q[0], k_cache, v_cache, self.block_tables, batch.seq_lens, batch.query_start, scale,
                                batch.max_query_len, policy=self.policy)
            return o[None]
        # the tree mask covers trees of up to MAX_TREE_TOKENS rows: prompt chunks take a second call
        seqs, rows = batch.num_decodes + batch.num_verifies, batch.num_decodes + batch.num_verify_tokens
        o = paged_attention(q[0, :rows], k_cache, v_cache, self.block_tables[:seqs], batch.seq_lens[:seqs],
                            batch.query_start[:seqs + 1], scale, batch.max_tree_len, policy=self.policy,
                            tree_ancestors=batch.tree_ancestors)
        if rows == q.shape[1]:
            return o[None]
        prompt = paged_attention(q[0, rows:], k_cache, v_cache, self.block_tables[seqs:], batch.seq_lens[seqs:],
                                 batch.query_start[seqs:] - rows, scale, min(batch.max_query_len, q.shape[1] - rows),
                                 policy=self.policy)
        return torch.cat([o, prompt])[None]

    def latent_attention(self, layer_idx: int, q: Tensor, latent: Tensor, k_rope: Tensor, kv_b: Tensor,
                         scale: float) -> Tensor:
        """MLA layers: the new tokens' latents and rope keys go to their pages; then decodes, verify
        chunks and short prompt chunks attend in the absorbed form, reading the cached prefix and the
        new tokens (draft trees, when a verify chunk branches, in a call with the tree mask of their
        own), and long prompt chunks (`batch.decompressed`) in the decompressed form."""
        cache = self.cache.kv[self.cache.softmax_index[layer_idx]]
        entries = torch.cat([latent[0], k_rope[0]], dim=-1)
        cache.view(-1, entries.shape[-1]).index_copy_(0, self.batch.slot_mapping, entries)
        batch, split = self.batch, self.batch.decompressed
        if split is None and not batch.has_branches:
            return paged_latent_attention(q[0], cache, kv_b, self.block_tables, batch.seq_lens, batch.query_start,
                                          scale, batch.max_query_len, policy=self.policy)[None]
        r, H = latent.shape[-1], q.shape[2]
        nope = q.shape[-1] - k_rope.shape[-1]
        o = q.new_empty(q.shape[1], H, kv_b.shape[0] // H - nope)
        seqs = rows = 0
        if batch.has_branches:
            seqs, rows = batch.num_decodes + batch.num_verifies, batch.num_decodes + batch.num_verify_tokens
            o[:rows] = paged_latent_attention(q[0, :rows], cache, kv_b, self.block_tables[:seqs], batch.seq_lens[:seqs],
                                              batch.query_start[:seqs + 1], scale, batch.max_tree_len,
                                              policy=self.policy, tree_ancestors=batch.tree_ancestors)
        if split is None:  # the prompt chunks after the trees, all short
            if rows < q.shape[1]:
                o[rows:] = paged_latent_attention(
                    q[0, rows:], cache, kv_b, self.block_tables[seqs:], batch.seq_lens[seqs:],
                    batch.query_start[seqs:] - rows, scale, min(batch.max_query_len, q.shape[1] - rows),
                    policy=self.policy)
            return o[None]
        if split.rows.numel():
            o[split.rows] = paged_latent_attention(
                q[0, split.rows], cache, kv_b, self.block_tables[split.seqs], batch.seq_lens[split.seqs],
                split.query_start, scale, split.max_query_len, policy=self.policy)
        for seq, first, end, length in split.chunks:
            pages = self.block_tables[seq, :-(-length // self.cache.page_size)]
            context = cache[pages].flatten(0, 1)[None, :length]  # [1, length, r + rope]
            k, v = decompress(context[..., :r], context[..., r:], kv_b, H, nope)
            o[first:end] = causal_attention(q[:, first:end], k, v, scale, policy=self.policy)[0]
        return o[None]
