"""Byte-level BPE tokenizer trained with `tokenizers`, corpus tokenization to a numpy array, and the
bytes each token stands for (for bits per byte)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOS = "<|endoftext|>"  # id 0: ends every document
MAX_PIECE = 1 << 20  # characters the tokenizer trains on or encodes at once: its memory grows with a text's length


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json; an error naming the file when it is absent or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # `tokenizers` raises a bare Exception for every problem
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def split_at_words(text: str, limit: int = MAX_PIECE) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters that join back to it. Each cut falls before a
    line break, else a space, that follows a character that is not whitespace: the byte-level
    pre-tokenizer splits there anyway, so the pieces hold the very words of the text and train the
    same tokenizer. Only `limit` characters without such a place are cut where they end."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        for separator in ("\n", " "):
            cut = text.rfind(separator, start + 1, end + 1)
            while cut > start and text[cut - 1].isspace():
                cut = text.rfind(separator, start + 1, cut)
            if cut > start:
                end = cut
                break
        yield text[start:end]
        start = end
    yield text[start:]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE: every byte is a token, so any text round-trips exactly."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet):
        raise ValueError(f"invalid vocab_size={vocab_size}: a byte-level BPE has {len(alphabet)} byte tokens and "
                         f"{EOS}, so at least {len(alphabet) + 1} tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=alphabet)
    tokenizer.train_from_iterator((piece for text in texts for piece in split_at_words(text)), trainer)
    return tokenizer


def _splits_at_words(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` finds words as `train_tokenizer`'s do (GPT-2's byte-level rule, nothing
    normalized first), so that the pieces of `split_at_words` encode to the tokens of their text."""
    ours = pre_tokenizers.ByteLevel(add_prefix_space=False).__getstate__()
    return tokenizer.normalizer is None and getattr(tokenizer.pre_tokenizer, "__getstate__", lambda: None)() == ours


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str],
                     batch_chars: int = 4 * MAX_PIECE) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one token stream, each followed by EOS, and the [N + 1] offsets at which
    they start (the last one is the stream's length). Encoded about `batch_chars` characters at a
    time, a long document in pieces when the tokenizer allows it (same tokens, bounded memory)."""
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS} token to end documents with")
    dtype = _token_dtype(tokenizer.get_vocab_size())
    split = split_at_words if _splits_at_words(tokenizer) else lambda text: [text]
    tokens: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    batch: list[tuple[int, str | None]] = []  # (document, a piece of it or None: the EOS that ends it)
    progress = tqdm(total=len(texts), desc="tokenizing", unit="doc", leave=False, mininterval=1.0)

    def encode_batch() -> None:
        encodings = iter(tokenizer.encode_batch_fast([p for _, p in batch if p is not None], add_special_tokens=False))
        for document, piece in batch:
            ids = np.asarray([eos] if piece is None else next(encodings).ids, dtype=dtype)
            tokens.append(ids)
            lengths[document] += len(ids)
        progress.update(sum(piece is None for _, piece in batch))
        batch.clear()

    size = 0
    for document, text in enumerate(texts):
        for piece in [*split(text), None]:
            batch.append((document, piece))
            size += len(piece or "")
            if size >= batch_chars:
                encode_batch()
                size = 0
    encode_batch()
    progress.close()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return (np.concatenate(tokens) if tokens else np.zeros(0, dtype=dtype)), offsets


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
