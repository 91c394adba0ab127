"""Packed rows: a deterministic, resumable document stream, and document masking in the model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ringlinear import RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.data import PackedDocuments

EOS = 0


def token_file(lengths):
    """Document i = tokens 100·(i+1), 100·(i+1)+1, ... then EOS."""
    docs = [np.append(np.arange(100 * (i + 1), 100 * (i + 1) + n - 1), EOS) for i, n in enumerate(lengths)]
    return np.concatenate(docs).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)])


def test_an_epoch_holds_every_document_once_with_eos_in_front():
    tokens, offsets = token_file([5, 3, 9, 1, 4])
    stream = PackedDocuments(tokens, offsets, EOS, seed=7)
    assert stream.epoch_tokens == len(tokens) + 5
    ids, sizes = stream.read(0, stream.epoch_tokens)
    pieces = np.split(ids, np.cumsum(sizes)[:-1])
    assert sorted(len(p) for p in pieces) == [2, 4, 5, 6, 10]
    for piece in pieces:
        assert piece[0] == EOS and piece[-1] == EOS
        if len(piece) > 2:
            assert piece[1] % 100 == 0 and np.all(np.diff(piece[1:-1]) == 1)  # a whole document, in order
    order = [p[1] // 100 - 1 if len(p) > 2 else 3 for p in pieces]
    assert sorted(order) == [0, 1, 2, 3, 4] and order != [0, 1, 2, 3, 4]
    next_epoch, _ = stream.read(stream.epoch_tokens, stream.epoch_tokens)
    assert not np.array_equal(next_epoch, ids)  # reshuffled every epoch
    in_order, _ = PackedDocuments(tokens, offsets, EOS).read(0, 6)
    assert in_order.tolist() == [EOS, 100, 101, 102, 103, EOS]


def test_any_window_equals_the_same_slice_of_one_long_read():
    """So a resumed run or another process reading its own rows sees exactly the same tokens."""
    tokens, offsets = token_file([5, 3, 9, 1, 4, 12, 2])
    stream = PackedDocuments(tokens, offsets, EOS, seed=3)
    long_ids, long_sizes = stream.read(0, 200)
    boundaries = set(np.cumsum(long_sizes).tolist())
    for start, length in [(0, 7), (5, 30), (41, 50), (77, 13), (150, 50)]:
        again = PackedDocuments(tokens, offsets, EOS, seed=3)  # a fresh reader, as after a restart
        ids, sizes = again.read(start, length)
        assert np.array_equal(ids, long_ids[start:start + length])
        cuts = {start + c for c in np.cumsum(sizes)[:-1].tolist()}
        assert cuts <= boundaries  # pieces end where documents end (or where the window does)
    batch = stream.batch([10, 26, 42], seq_len=16)
    assert torch.equal(batch.input_ids[0], torch.from_numpy(long_ids[10:58]))
    assert {16, 32} <= set(batch.cu_seqlens.tolist()) and batch.cu_seqlens[-1] == 48


def test_rows_are_taken_in_a_shuffled_order_that_covers_each_stage_once():
    tokens, offsets = token_file(list(range(2, 40)))
    stream = PackedDocuments(tokens, offsets, EOS, seed=5)
    seq_len, origin = 8, 1000
    window = stream.epoch_tokens // seq_len
    stage_rows = 2 * window + 5  # two whole windows and a short one
    starts = stream.row_starts(origin, seq_len, range(stage_rows), stage_rows)
    assert sorted(starts.tolist()) == [origin + seq_len * r for r in range(stage_rows)]  # each row once
    assert not np.array_equal(starts, np.sort(starts))
    for w in range(3):  # a window's rows are the window's own: no row read twice, none of the next stage
        part = starts[w * window:(w + 1) * window]
        assert (part.min() - origin) // seq_len == w * window and (part.max() - origin) // seq_len < (w + 1) * window
    again = PackedDocuments(tokens, offsets, EOS, seed=5)  # a fresh reader, as after a restart
    assert np.array_equal(again.row_starts(origin, seq_len, range(40, 47), stage_rows), starts[40:47])
    endless = again.row_starts(origin, seq_len, range(3 * window))  # the last stage: whole windows
    assert sorted(endless.tolist()) == [origin + seq_len * r for r in range(3 * window)]
    in_order = PackedDocuments(tokens, offsets, EOS).row_starts(origin, seq_len, range(5))
    assert in_order.tolist() == [origin + seq_len * r for r in range(5)]
    with pytest.raises(ValueError, match="past the stage"):
        stream.row_starts(origin, seq_len, range(stage_rows, stage_rows + 1), stage_rows)


def test_packed_documents_give_the_losses_of_the_documents_alone():
    config = RingLinearConfig.preset("tiny", vocab_size=300, num_hidden_layers=3, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = RingLinearForCausalLM(config)
    lengths = [9, 2, 23, 14]
    tokens = np.concatenate([np.append(np.random.default_rng(i).integers(1, 300, n - 1), EOS)
                             for i, n in enumerate(lengths)]).astype(np.uint16)
    stream = PackedDocuments(tokens, np.concatenate([[0], np.cumsum(lengths)]), EOS)
    batch = stream.batch([0], seq_len=sum(lengths) + len(lengths))
    cu = batch.cu_seqlens.tolist()
    docs = [batch.input_ids[:, a:b] for a, b in zip(cu, cu[1:])]
    assert [d.shape[1] for d in docs] == [n + 1 for n in lengths]
    with torch.no_grad():
        packed = model(batch.input_ids, labels=batch.input_ids, context=SequenceContext(batch.cu_seqlens))
        alone = [model(d, labels=d) for d in docs]
    for (a, b), doc, out in zip(zip(cu, cu[1:]), docs, alone):
        per_token = F.cross_entropy(packed.logits[0, a:b - 1], doc[0, 1:], reduction="mean")
        assert torch.allclose(per_token, out.lm_loss, atol=1e-5)
    counts = torch.tensor([d.shape[1] - 1 for d in docs], dtype=torch.float32)
    expected = (torch.stack([o.lm_loss for o in alone]) * counts).sum() / counts.sum()
    assert torch.allclose(packed.lm_loss, expected, atol=1e-5)
    mtp_counts = counts - 1  # depth 1 predicts two ahead
    expected_mtp = (torch.stack([o.mtp_loss for o in alone]) * mtp_counts).sum() / mtp_counts.sum()
    assert torch.allclose(packed.mtp_loss, expected_mtp, atol=1e-5)
