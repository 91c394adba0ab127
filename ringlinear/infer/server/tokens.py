"""Prompts to token ids without stalling the server. Tokenizing costs time and memory in proportion
to the text (a 10 MB prompt: seconds of CPU and a gigabyte that glibc's allocator keeps), so text
longer than the context could ever hold is refused by its length alone, the rest is tokenized on a
worker thread, and after a long text the freed memory goes back to the system."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json

from tokenizers import Tokenizer

from ..engine import Engine
from ..params import InvalidRequest

TRIM_AFTER_CHARS = 2**20  # tokenizing this much text leaves enough freed memory to hand back


def bytes_per_token(tokenizer: Tokenizer) -> int | None:
    """The most bytes of text one token can stand for, if the tokenizer is byte-level with no
    normalizer (GPT-2's, Ring's): every byte of the text is then in exactly one token, whose vocabulary
    string has at least as many UTF-8 bytes. None for other tokenizers: they may drop text."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if spec.get("normalizer") is not None or not byte_level or any(s.get("behavior") == "Removed" for s in steps):
        return None
    return max(len(token.encode()) for token in tokenizer.get_vocab(with_added_tokens=True))


def _release_freed_memory() -> None:
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):  # glibc
        ctypes.CDLL(libc).malloc_trim(0)


class PromptTokenizer:
    def __init__(self, engine: Engine):
        self.engine = engine
        per_token = None if engine.tokenizer is None else bytes_per_token(engine.tokenizer)
        # more characters than this are more bytes than the longest prompt's tokens can stand for
        self.max_chars = None if per_token is None else (engine.max_model_len - 1) * per_token

    async def __call__(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return self.engine.tokenize(prompt)
        if self.max_chars is not None and len(prompt) > self.max_chars:
            raise InvalidRequest("prompt", f"the prompt has {len(prompt)} characters, more than this model's context "
                                 f"of {self.engine.max_model_len} tokens can hold")
        return await asyncio.to_thread(self._tokenize, prompt)

    def _tokenize(self, text: str) -> list[int]:
        ids = self.engine.tokenize(text)
        if len(text) >= TRIM_AFTER_CHARS:
            _release_freed_memory()
        return ids
