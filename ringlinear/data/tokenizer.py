"""Byte-level BPE tokenizer trained with `tokenizers`, corpus tokenization to a numpy array, and the
bytes each token stands for (for bits per byte)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOS = "<|endoftext|>"  # id 0: ends every document


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json; an error naming the file when it is absent or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # `tokenizers` raises a bare Exception for every problem
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE: every byte is a token, so any text round-trips exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one token stream, each followed by EOS, and the [N + 1] offsets at which
    they start (the last one is the stream's length)."""
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS} token to end documents with")
    dtype = _token_dtype(tokenizer.get_vocab_size())
    pieces, lengths = [], []
    progress = tqdm(total=len(texts), desc="tokenizing", unit="doc", leave=False, mininterval=1.0)
    for start in range(0, len(texts), batch):
        for encoding in tokenizer.encode_batch_fast(list(texts[start:start + batch]), add_special_tokens=False):
            pieces += [np.asarray(encoding.ids, dtype=dtype), np.asarray([eos], dtype=dtype)]
            lengths.append(len(encoding.ids) + 1)
        progress.update(min(batch, len(texts) - start))
    progress.close()
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)), offsets


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """[vocab_size] UTF-8 bytes of text each token id encodes: 0 for special and unused ids. The
    byte-level alphabet maps each byte to one character, so a token's length is its byte count."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special = {added.content for added in tokenizer.get_added_tokens_decoder().values()}
    for token, i in tokenizer.get_vocab().items():
        if token not in special and i < vocab_size:
            lengths[i] = len(token)
    return lengths


def bits_per_byte(nats: float, num_bytes: int) -> float:
    """Summed cross-entropy in nats over the UTF-8 bytes of the text those tokens encode."""
    return nats / (math.log(2) * num_bytes)
