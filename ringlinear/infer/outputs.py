"""What the engine hands back: per step, what each request gained; in the end, the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # under the model's own distribution (before penalties and temperature)
    top: list[tuple[int, float]]  # the most likely tokens and their log-probs, best first
    rank: int | None = None  # of token_id among all tokens, 1 = the most likely (given for prompt tokens)


@dataclass
class RequestOutput:
    """What one step added to a request: a stream's unit. The last one has a finish reason."""
    request_id: str
    token_ids: list[int]
    text: str  # text completed by these tokens ("" without a tokenizer)
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length" or "abort" on the last output
    num_prompt_tokens: int
    num_output_tokens: int  # so far
    stop_logprob: TokenLogprob | None = None  # the stop token that ended it (not in the output), if asked
    index: int = 0  # which of the request's completions
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first output, if asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    """One completion of a request, the sum of its outputs."""
    request_id: str
    prompt_token_ids: list[int]
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # [None] + one per prompt token after the first

    def add(self, output: RequestOutput) -> None:
        self.token_ids += output.token_ids
        self.text += output.text
        if output.logprobs is not None:
            self.logprobs = (self.logprobs or []) + output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.finish_reason, self.stop_logprob = output.finish_reason, output.stop_logprob
