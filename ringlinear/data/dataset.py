"""A tokenized corpus ready for training: the tokenizer, the training and validation token streams,
cached in a folder so that a resumed run neither retrains the tokenizer nor retokenizes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .corpus import load_documents, split_documents
from .tokenizer import encode_documents, token_byte_lengths, train_tokenizer


@dataclass
class Dataset:
    tokenizer: Tokenizer
    train: np.ndarray  # [N] token ids, documents each followed by EOS
    val: np.ndarray
    token_bytes: np.ndarray  # [vocab_size] UTF-8 bytes of each token
    summary: dict  # files, bytes and tokens of each split

    def describe(self) -> str:
        s = self.summary
        lines = [f"corpus: {s['source']}"]
        for split, label in (("train", "train"), ("val", "validation")):
            lines.append(f"  {label:<10} {s[split + '_files']:>6} files {s[split + '_bytes'] / 1e6:7.2f} MB "
                         f"{s[split + '_tokens'] / 1e6:7.2f}M tokens")
        return "\n".join(lines)


def _fingerprint(documents, vocab_size: int, val_fraction: float) -> str:
    digest = hashlib.sha256(json.dumps([vocab_size, val_fraction]).encode())
    for d in documents:
        for part in (d.name, d.text):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def prepare_dataset(cache_dir: str | Path, paths: Sequence[str | Path], vocab_size: int,
                    val_fraction: float) -> Dataset:
    """Read the corpus (`paths`, or the standard library when empty), split it by file, train the
    tokenizer on the training split and tokenize both, unless `cache_dir` already holds exactly that."""
    cache_dir = Path(cache_dir)
    documents = load_documents(paths)
    key = _fingerprint(documents, vocab_size, val_fraction)
    meta_path = cache_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("key") == key:
        tokenizer = Tokenizer.from_file(str(cache_dir / "tokenizer.json"))
        train = np.load(cache_dir / "train.npy", allow_pickle=False)
        val = np.load(cache_dir / "val.npy", allow_pickle=False)
        summary = meta["summary"]
    else:
        train_docs, val_docs = split_documents(documents, val_fraction)
        tokenizer = train_tokenizer([d.text for d in train_docs], vocab_size)
        train = encode_documents(tokenizer, [d.text for d in train_docs])
        val = encode_documents(tokenizer, [d.text for d in val_docs])
        summary = {"source": ", ".join(map(str, paths)) if paths else "Python standard library (.py files)"}
        for split, docs, tokens in (("train", train_docs, train), ("val", val_docs, val)):
            summary.update({f"{split}_files": len(docs), f"{split}_tokens": len(tokens),
                            f"{split}_bytes": sum(len(d.text.encode()) for d in docs)})
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(cache_dir / "tokenizer.json"))
        np.save(cache_dir / "train.npy", train, allow_pickle=False)
        np.save(cache_dir / "val.npy", val, allow_pickle=False)
        meta_path.write_text(json.dumps({"key": key, "summary": summary}, indent=2) + "\n")  # last: marks it complete
    return Dataset(tokenizer, train, val, token_byte_lengths(tokenizer, vocab_size), summary)
