"""Log-probs in OpenAI's two shapes: the legacy one of /v1/completions (parallel lists and text
offsets; with `echo`, the prompt's tokens first, the very first with null log-probs) and the one of
/v1/chat/completions (an entry per token, with its bytes); and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..outputs import TokenLogprob

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return str(token_id) if tokenizer is None else tokenizer.decode([token_id])


def completion_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob] | None, offset: int,
                        prompt_ids: list[int] | None = None,
                        prompt_logprobs: list[TokenLogprob | None] | None = None) -> dict | None:
    """`offset`: where these tokens' text starts in the whole text; `prompt_ids` and their
    `prompt_logprobs` ([None] + one per later token) come first when echoed."""
    if logprobs is None:
        return None
    entries: list[tuple[int, TokenLogprob | None]] = []
    if prompt_ids is not None:
        entries += [(prompt_ids[0], None)] + [(lp.token_id, lp) for lp in prompt_logprobs[1:]]
    entries += [(lp.token_id, lp) for lp in logprobs]
    tokens = [_token_text(tokenizer, token_id) for token_id, _ in entries]
    offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for _, lp in entries],
            "top_logprobs": [None if lp is None else {_token_text(tokenizer, t): v for t, v in lp.top}
                             for _, lp in entries],
            "text_offset": offsets}


def vllm_prompt_logprobs(tokenizer: Tokenizer | None, values: list[TokenLogprob | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the most likely ones."""
    if values is None:
        return None

    def entry(token_id: int, logprob: float, rank: int | None) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": _token_text(tokenizer, token_id)}

    return [None if lp is None else
            {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank),
             **{str(t): entry(t, v, r) for r, (t, v) in enumerate(lp.top, start=1) if t != lp.token_id}}
            for lp in values]


def chat_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}
