"""Corpus discovery, the train/validation split, the tokenizer, batches and bits per byte."""

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.data import (EOS, Document, PackedDocuments, encode_documents, load_dataset, load_documents,
                             prepare_dataset, split_documents, token_byte_lengths, train_tokenizer)
from ringlinear.data import dataset as dataset_module
from ringlinear.data.corpus import split_text
from ringlinear.data.tokenizer import MAX_PIECE, split_at_words
from ringlinear.ops.policy import KernelPolicy
from ringlinear.train import evaluate

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def stdlib_docs():
    return load_documents()


@pytest.fixture(scope="module")
def tokenizer():
    texts = [d.text for d in load_documents([STDLIB / "json", STDLIB / "email"])]
    return train_tokenizer(texts, vocab_size=600)


def test_default_corpus_is_the_standard_library_sources(stdlib_docs):
    names = [d.name for d in stdlib_docs]
    assert names == sorted(names)
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(names)
    assert all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n for n in names)
    assert len(names) > 500
    by_name = {d.name: d.text for d in stdlib_docs}
    assert by_name["os.py"] == (STDLIB / "os.py").read_text(encoding="utf-8")


def test_split_is_deterministic_disjoint_and_stable(stdlib_docs):
    train, val = split_documents(stdlib_docs, 0.05)
    train_names, val_names = {d.name for d in train}, {d.name for d in val}
    assert not train_names & val_names
    assert train_names | val_names == {d.name for d in stdlib_docs}
    assert 0.02 < len(val) / len(stdlib_docs) < 0.08
    again_train, again_val = split_documents(list(reversed(stdlib_docs)), 0.05)
    assert {d.name for d in again_val} == val_names
    # A document's side depends on its own name only: dropping half the corpus moves nobody.
    _, half_val = split_documents(stdlib_docs[::2], 0.05)
    assert {d.name for d in half_val} == val_names & {d.name for d in stdlib_docs[::2]}


def test_split_holds_out_at_least_one_document():
    docs = [Document(f"{i}.txt", "x") for i in range(3)]
    train, val = split_documents(docs, 1e-9)
    assert len(val) == 1 and len(train) == 2
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match=f"invalid val_fraction={fraction}: must be in"):
            split_documents(docs, fraction)


def test_a_single_file_is_split_within_its_text(tmp_path):
    lines = [f"line {i:02d}\n" for i in range(100)]  # 8 characters each
    train, val = split_documents([Document("book.txt", "".join(lines))], 0.1)
    assert train == [Document("book.txt", "".join(lines[:90]))] and val == [Document("book.txt", "".join(lines[90:]))]
    # 3.5% is 28 characters, from within line 96: validation starts at that line
    train, val = split_documents([Document("book.txt", "".join(lines))], 0.035)
    assert (train[0].text, val[0].text) == ("".join(lines[:96]), "".join(lines[96:]))
    # no line start close enough: cut at the character
    assert split_text("short\n" + "x" * 994, 0.02, "one.txt") == ("short\n" + "x" * 974, "x" * 20)
    assert split_text("word " * 200, 0.01, "one.txt") == ("word " * 198, "word " * 2)
    with pytest.raises(ValueError, match="one.txt is too short to hold out val_fraction=0.5 of it"):
        split_text("x", 0.5, "one.txt")
    (tmp_path / "book.txt").write_text("".join(lines) * 20)
    data = prepare_dataset(tmp_path / "data", [tmp_path / "book.txt"], vocab_size=300, val_fraction=0.1)
    assert "book.txt (one file: its last 10% held out for validation)" in data.describe()
    assert data.tokenizer.decode(data.val.tokens[:-1].tolist()) == "".join(lines) * 2  # the last 2 of 20 copies


def test_user_files_and_folders(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.md").write_text("# bee\n")
    (tmp_path / "notes" / "a.txt").write_text("ünïcode ✓\n")
    (tmp_path / "notes" / "sub").mkdir()
    (tmp_path / "notes" / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "notes" / ".git").mkdir()
    (tmp_path / "notes" / ".git" / "HEAD").write_text("ref: x\n")
    (tmp_path / "notes" / "image.bin").write_bytes(b"\x89PNG\0\0\x01")
    (tmp_path / "notes" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "single.txt").write_text("one file\n")
    docs = load_documents([tmp_path / "notes", tmp_path / "single.txt"])
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "ünïcode ✓\n"), ("b.md", "# bee\n"), ("sub/c.txt", "sea\n"), ("single.txt", "one file\n")]


def test_missing_or_empty_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*nowhere"):
        load_documents([tmp_path / "nowhere"])
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "x.bin").write_bytes(b"\0\1\2")
    with pytest.raises(FileNotFoundError, match="no UTF-8 text files found"):
        load_documents([tmp_path / "blobs"])
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_documents([tmp_path / "blobs" / "x.bin"])


def test_tokenizer_round_trips_any_text(tokenizer):
    assert tokenizer.token_to_id(EOS) == 0
    assert tokenizer.get_vocab_size() == 600
    for text in ["def f(x):\n    return x ** 2\n", "naïve café 日本語 🙂\r\n\ttabs  and  spaces", "\x00\x7f"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert 0 not in ids
        assert tokenizer.decode(ids) == text


def test_long_texts_are_cut_in_bounded_pieces_where_words_end():
    text = "def f(x):\n    return x  \n\n\n" * 20 + "y" * 250 + " z\n"
    pieces = list(split_at_words(text, 100))
    assert "".join(pieces) == text and all(0 < len(p) <= 100 for p in pieces)
    forced = [i for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if not (b[0] in "\n " and not a[-1].isspace())]
    assert [pieces[i][-1] + pieces[i + 1][0] for i in forced] == ["yy", "yy"]  # only inside the 250 y's
    assert list(split_at_words("short", 100)) == ["short"] and list(split_at_words("", 100)) == [""]


def test_pieces_train_the_tokenizer_and_encode_as_the_whole_text():
    text = "".join(d.text for d in load_documents([STDLIB / "json"]))
    pieces = list(split_at_words(text, 500))
    assert len(pieces) > len(text) // 500
    whole = train_tokenizer([text], vocab_size=500)
    assert train_tokenizer(pieces, vocab_size=500).to_str() == whole.to_str()
    ids = whole.encode(text, add_special_tokens=False).ids
    assert [i for p in pieces for i in whole.encode(p, add_special_tokens=False).ids] == ids

    class Recording:  # the tokenizer, noting the characters of each batch it encodes
        def __init__(self):
            self.batches = []

        def __getattr__(self, name):
            return getattr(whole, name)

        def encode_batch_fast(self, texts, **kwargs):
            self.batches.append(sum(map(len, texts)))
            return whole.encode_batch_fast(texts, **kwargs)

    recording, copies = Recording(), MAX_PIECE // len(text) + 2
    stream, offsets = encode_documents(recording, [text, text * copies], batch_chars=MAX_PIECE)
    assert stream[offsets[1]:-1].tolist() == ids * copies and offsets[1] == len(ids) + 1
    assert len(recording.batches) == 2 and max(recording.batches) <= 2 * MAX_PIECE  # whole, the long one is 1 batch


def test_encoded_documents_are_separated_by_eos_and_bytes_add_up(tokenizer):
    texts = ["import os\n", "x = 'é'\n", "print('hi')\n"]
    stream, offsets = encode_documents(tokenizer, texts)
    assert stream.dtype == np.uint16
    ends = np.flatnonzero(stream == 0)
    assert len(ends) == 3 and ends[-1] == len(stream) - 1
    assert offsets.tolist() == [0, *(ends + 1).tolist()]
    pieces = [stream[a:b] for a, b in zip(offsets, offsets[1:])]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == texts
    lengths = token_byte_lengths(tokenizer, vocab_size=1024)
    assert lengths[0] == 0 and (lengths[600:] == 0).all()
    assert lengths[stream].sum() == sum(len(t.encode()) for t in texts)


def test_bits_per_byte_against_a_hand_computation(tokenizer):
    texts = ["def add(a, b):\n    return a + b\n", "x = 1\n"]
    stream, offsets = encode_documents(tokenizer, texts)
    batch = PackedDocuments(stream, offsets, 0).batch([0], len(stream) + 2)  # both documents, EOS in front
    assert batch.cu_seqlens.tolist() == [0, offsets[1] + 1, len(stream) + 2]
    torch.manual_seed(0)
    model = RingLinearForCausalLM(RingLinearConfig.preset("tiny", vocab_size=600, num_hidden_layers=3))
    with torch.no_grad():
        logp = model(batch.input_ids, context=SequenceContext(batch.cu_seqlens)).logits[0].double().log_softmax(-1)
    ids, cu = batch.input_ids[0].tolist(), batch.cu_seqlens.tolist()
    predicted = [t for a, b in zip(cu, cu[1:]) for t in range(a, b - 1)]  # within each document
    nats = -sum(logp[t, ids[t + 1]].item() for t in predicted)
    num_bytes = sum(len(t.encode()) for t in texts)  # every text token is predicted; EOS has no bytes
    loss, bpb = evaluate(model, [batch], token_byte_lengths(tokenizer, 600), KernelPolicy())
    assert loss == pytest.approx(nats / len(predicted), rel=1e-5)
    assert bpb == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)


def test_dataset_is_cached_and_rebuilt_when_its_inputs_change(tmp_path, monkeypatch):
    sources = [STDLIB / "json"]
    first = prepare_dataset(tmp_path, sources, vocab_size=400, val_fraction=0.2)
    assert first.summary["train_files"] + first.summary["val_files"] == len(load_documents(sources))
    assert first.token_bytes[first.val.tokens].sum() == first.summary["val_bytes"]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dataset_module, "train_tokenizer", fail)
    again = prepare_dataset(tmp_path, sources, vocab_size=400, val_fraction=0.2)
    assert np.array_equal(again.train.tokens, first.train.tokens) and np.array_equal(again.val.offsets, first.val.offsets)
    assert isinstance(again.train.tokens, np.memmap)
    assert np.array_equal(load_dataset(tmp_path).val.tokens, first.val.tokens)
    monkeypatch.undo()
    bigger = prepare_dataset(tmp_path, sources, vocab_size=500, val_fraction=0.2)
    assert bigger.tokenizer.get_vocab_size() == 500
    assert len(bigger.train.tokens) < len(first.train.tokens)
