"""A tokenized corpus ready for training: the tokenizer, the training and validation token streams
with their document offsets, in a folder (`ringlinear tokenize` writes one; a run caches its own)
so that a resumed run neither retrains the tokenizer nor retokenizes. The token streams are opened
as read-only memory maps: a corpus larger than memory trains as well."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..config import read_json
from .corpus import load_documents, split_documents
from .tokenizer import encode_documents, read_tokenizer, token_byte_lengths, train_tokenizer


@dataclass
class TokenSplit:
    tokens: np.ndarray  # [N] token ids, documents each followed by EOS
    offsets: np.ndarray  # [D + 1] where each document starts; the last is N


@dataclass
class Dataset:
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    token_bytes: np.ndarray  # [vocab_size] UTF-8 bytes of each token
    summary: dict  # files, bytes and tokens of each split

    def describe(self) -> str:
        s = self.summary
        lines = [f"corpus: {s['source']}"]
        for split, label in (("train", "train"), ("val", "validation")):
            lines.append(f"  {label:<10} {s[split + '_files']:>6} files {s[split + '_bytes'] / 1e6:7.2f} MB "
                         f"{s[split + '_tokens'] / 1e6:7.2f}M tokens")
        return "\n".join(lines)


def _fingerprint(documents, vocab_size: int, val_fraction: float, tokenizer: str) -> str:
    digest = hashlib.sha256(json.dumps([vocab_size, val_fraction, tokenizer]).encode())
    for d in documents:
        for part in (d.name, d.text):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def load_dataset(directory: str | Path) -> Dataset:
    """A dataset folder written by `prepare_dataset` (or `ringlinear tokenize`)."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no tokenized dataset in {directory} (no meta.json; write one with "
                                "`ringlinear tokenize`)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or "summary" not in meta:
        raise ValueError(f"{meta_path} is not the meta.json of a tokenized dataset: it has no summary")
    tokenizer = read_tokenizer(directory / "tokenizer.json")
    splits = [TokenSplit(np.load(directory / f"{split}.npy", mmap_mode="r", allow_pickle=False),
                         np.load(directory / f"{split}_offsets.npy", allow_pickle=False)) for split in ("train", "val")]
    return Dataset(tokenizer, *splits, token_byte_lengths(tokenizer, tokenizer.get_vocab_size()), meta["summary"])


def prepare_dataset(cache_dir: str | Path, paths: Sequence[str | Path], vocab_size: int,
                    val_fraction: float, tokenizer_file: str | Path | None = None) -> Dataset:
    """Read the corpus (`paths`, or the standard library when empty), split it by file, train the
    tokenizer on the training split (or use `tokenizer_file`, e.g. a pretrained model's) and tokenize
    both, unless `cache_dir` already holds exactly that."""
    cache_dir = Path(cache_dir)
    documents = load_documents(paths)
    given = read_tokenizer(tokenizer_file) if tokenizer_file else None
    key = _fingerprint(documents, vocab_size, val_fraction, given.to_str() if given else "")
    meta_path = cache_dir / "meta.json"
    if meta_path.exists() and read_json(meta_path).get("key") == key:
        return load_dataset(cache_dir)
    meta_path.unlink(missing_ok=True)
    train_docs, val_docs = split_documents(documents, val_fraction)
    tokenizer = given or train_tokenizer([d.text for d in train_docs], vocab_size)
    summary = {"source": ", ".join(map(str, paths)) if paths else "Python standard library (.py files)"}
    if len(documents) == 1:
        summary["source"] += f" (one file: its last {val_fraction * 100:g}% held out for validation)"
    splits = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        splits[split] = TokenSplit(*encode_documents(tokenizer, [d.text for d in docs]))
        summary.update({f"{split}_files": len(docs), f"{split}_tokens": len(splits[split].tokens),
                        f"{split}_bytes": sum(len(d.text.encode()) for d in docs)})
    return write_dataset(cache_dir, tokenizer, splits["train"], splits["val"], summary, key)


def write_dataset(directory: str | Path, tokenizer: Tokenizer, train: TokenSplit, val: TokenSplit, summary: dict,
                  key: str = "") -> Dataset:
    """Write a dataset folder (meta.json last: a folder without it is incomplete) and open it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    for split, data in (("train", train), ("val", val)):
        np.save(directory / f"{split}.npy", data.tokens, allow_pickle=False)
        np.save(directory / f"{split}_offsets.npy", data.offsets, allow_pickle=False)
    (directory / "meta.json").write_text(json.dumps({"key": key, "summary": summary}, indent=2) + "\n")
    return load_dataset(directory)
