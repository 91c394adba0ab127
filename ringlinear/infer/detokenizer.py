"""Incremental detokenization with stop strings.

A byte-level token can end inside a UTF-8 character, so the text of the newest tokens is only
taken once it decodes without a replacement character. While stop strings are set, the last
(longest stop - 1) characters are held back from the stream until the request ends, so no text
that a stop string later cuts off is ever sent.
"""

from __future__ import annotations

from tokenizers import Tokenizer

PROMPT_CONTEXT = 4  # prompt tokens decoded before the first new one: a token's text can depend on its left


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Take one more token; True when the text now reaches a stop string (then cut before it)."""
        self.ids.append(token_id)
        return self._decode(final=False)

    def _decode(self, final: bool) -> bool:
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False
        start = max(0, len(self.text) - self.holdback)
        self.text += after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def new_text(self, final: bool) -> str:
        """Text not yet handed out: once the request ends all of it (an incomplete character
        included), before that up to the held-back tail."""
        if final and not self.stopped:
            self._decode(final=True)
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        new, self.emitted = self.text[self.emitted:end], end
        return new
