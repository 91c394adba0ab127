"""Documents packed end to end into fixed-length rows, with the boundaries the model masks at.

A token file holds documents as `tokens[offsets[i]:offsets[i+1]]`, each ending with EOS. Packed,
each document is preceded by EOS too, as a generation prompt is, so its first token is predicted.
The documents of one epoch follow each other in an order drawn from (seed, epoch), or in file
order without a seed, as one endless stream; a row is `seq_len` tokens of it, cut wherever it
falls. Position p of the stream is a function of the seed alone, so a run that knows how many
tokens it has consumed can resume exactly, and every rank reads just its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class PackedBatch:
    input_ids: Tensor  # [1, N]: rows laid end to end
    cu_seqlens: Tensor  # [S + 1] offsets of the document pieces (a row's end is one too)

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.cu_seqlens.to(device))


class PackedDocuments:
    max_window = 1 << 16  # rows shuffled together at most: a permutation of 512 KiB

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, eos_id: int, seed: int | None = None):
        if len(offsets) < 2:
            raise ValueError("the token file holds no document")
        self.tokens, self.offsets, self.eos_id, self.seed = tokens, offsets, eos_id, seed
        self.lengths = np.diff(offsets) + 1  # + the EOS in front
        self.epoch_tokens = int(self.lengths.sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._window: tuple[tuple, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each in the epoch's stream) for `epoch`."""
        if epoch not in self._epochs:
            n = len(self.lengths)
            order = np.arange(n) if self.seed is None else np.random.default_rng([self.seed, epoch]).permutation(n)
            starts = np.concatenate([[0], np.cumsum(self.lengths[order])[:-1]])
            # a shuffle window spans at most two epochs: keep those two
            self._epochs = {e: v for e, v in self._epochs.items() if abs(e - epoch) == 1} | {epoch: (order, starts)}
        return self._epochs[epoch]

    def read(self, start: int, length: int) -> tuple[np.ndarray, list[int]]:
        """`length` tokens from position `start` of the stream, and the lengths of the document pieces
        they hold, in order."""
        pieces, sizes = [], []
        while length > 0:
            epoch, offset = divmod(start, self.epoch_tokens)
            order, starts = self._order(epoch)
            i = int(np.searchsorted(starts, offset, side="right")) - 1
            doc, inside = int(order[i]), offset - int(starts[i])
            take = min(length, int(self.lengths[doc]) - inside)
            first = int(self.offsets[doc]) + inside - 1  # index in the file; -1 is the EOS in front
            if inside == 0:
                pieces += [np.array([self.eos_id]), self.tokens[first + 1:first + take]]
            else:
                pieces.append(self.tokens[first:first + take])
            sizes.append(take)
            start, length = start + take, length - take
        return np.concatenate(pieces).astype(np.int64), sizes

    def row_starts(self, origin: int, seq_len: int, rows: range, stage_rows: int | None = None) -> np.ndarray:
        """Stream positions of `rows` of a stage whose `stage_rows` rows (None: endless) are cut one after
        another from `origin`, and taken in an order shuffled within windows of about an epoch."""
        window = max(1, min(self.max_window, self.epoch_tokens // seq_len))
        if stage_rows is not None and rows and rows[-1] >= stage_rows:
            raise ValueError(f"row {rows[-1]} is past the stage's {stage_rows} rows")
        slots = []
        for row in rows:
            first = row - row % window
            slots.append(first + self._permutation(origin, seq_len, first, window, stage_rows)[row - first])
        return origin + np.array(slots, dtype=np.int64) * seq_len

    def _permutation(self, origin: int, seq_len: int, first: int, window: int, stage_rows: int | None) -> np.ndarray:
        """The order of the rows first, first + 1, ... of a window (the last one of a stage may be short)."""
        size = window if stage_rows is None else min(window, stage_rows - first)
        key = (origin, seq_len, first, size)
        if self._window is None or self._window[0] != key:
            order = np.arange(size) if self.seed is None else np.random.default_rng([self.seed, *key]).permutation(size)
            self._window = (key, order)
        return self._window[1]

    def batch(self, starts: Sequence[int], seq_len: int) -> PackedBatch:
        """The rows of `seq_len` tokens at stream positions `starts`, as one packed sequence."""
        ids, sizes = [], []
        for start in starts:
            row_ids, row_sizes = self.read(int(start), seq_len)
            ids.append(row_ids)
            sizes += row_sizes
        cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
        return PackedBatch(torch.from_numpy(np.concatenate(ids))[None], cu_seqlens)

    def spread(self, num_rows: int, seq_len: int) -> list[PackedBatch]:
        """`num_rows` rows of `seq_len` tokens spread evenly over one epoch, each its own batch."""
        if self.epoch_tokens < seq_len:
            raise ValueError(f"the split has {self.epoch_tokens} tokens, fewer than seq_len={seq_len}")
        starts = np.linspace(0, self.epoch_tokens - seq_len, num_rows).round().astype(np.int64)
        return [self.batch([start], seq_len) for start in starts]
