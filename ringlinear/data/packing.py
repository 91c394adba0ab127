"""Documents packed end to end into fixed-length rows, with the boundaries the model masks at.

A token file holds documents as `tokens[offsets[i]:offsets[i+1]]`, each ending with EOS. Packed,
each document is preceded by EOS too, as a generation prompt is, so its first token is predicted.
The documents of one epoch follow each other in an order drawn from (seed, epoch), or in file
order without a seed, as one endless stream; a row is `seq_len` tokens of it, cut wherever it
falls. Position p of the stream is a function of the seed alone, so a run that knows how many
tokens it has consumed can resume exactly, and every rank reads just its own rows.
"""

from __future__ import annotations

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
    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, eos_id: int, seed: int | None = None):
        if len(offsets) < 2:
            raise ValueError("the token file holds no document")
        self.tokens, self.offsets, self.eos_id, self.seed = tokens, offsets, eos_id, seed
        self.lengths = np.diff(offsets) + 1  # + the EOS in front
        self.epoch_tokens = int(self.lengths.sum())
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each in the epoch's stream) for `epoch`."""
        if self._epoch is None or self._epoch[0] != epoch:
            n = len(self.lengths)
            order = np.arange(n) if self.seed is None else np.random.default_rng([self.seed, epoch]).permutation(n)
            starts = np.concatenate([[0], np.cumsum(self.lengths[order])[:-1]])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

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

    def batch(self, start: int, rows: int, seq_len: int) -> PackedBatch:
        """`rows` rows of `seq_len` tokens from position `start`, as one packed sequence."""
        ids, sizes = [], []
        for row in range(rows):
            row_ids, row_sizes = self.read(start + row * seq_len, seq_len)
            ids.append(row_ids)
            sizes += row_sizes
        cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
        return PackedBatch(torch.from_numpy(np.concatenate(ids))[None], cu_seqlens)

    def spread(self, num_rows: int, seq_len: int) -> list[PackedBatch]:
        """`num_rows` rows of `seq_len` tokens spread evenly over one epoch, each its own batch."""
        if self.epoch_tokens < seq_len:
            raise ValueError(f"the split has {self.epoch_tokens} tokens, fewer than seq_len={seq_len}")
        starts = np.linspace(0, self.epoch_tokens - seq_len, num_rows).round().astype(np.int64)
        return [self.batch(int(start), 1, seq_len) for start in starts]
