"""Log-probs in OpenAI's two shapes: the legacy one of /v1/completions (parallel lists and text
offsets) and the one of /v1/chat/completions (an entry per token, with its bytes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..outputs import TokenLogprob

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return str(token_id) if tokenizer is None else tokenizer.decode([token_id])


def completion_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob] | None,
                        offset: int) -> dict | None:
    """`offset`: where these tokens' text starts in the whole completion."""
    if logprobs is None:
        return None
    tokens = [_token_text(tokenizer, lp.token_id) for lp in logprobs]
    offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}
